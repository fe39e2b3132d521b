#!/usr/bin/env python3
"""The practical session's Keras models, trained with TensorFlow/Keras: the reference that
cifar4's speed ratios are measured against.

The models are the session notebook's, as written there: the 20-unit MLP fed raw 0-255 pixels
(`mlp-raw`) or pixels scaled to [0, 1] (`mlp-20`), the deep MLP 1024-768-512-256-128
(`mlp-deep`), the CNN conv32-pool-conv64-pool-dense4 (`cnn`) and that CNN trained on
ImageDataGenerator's rotation 15, shifts 0.1 and horizontal flips (`cnn-augmented`, and
`cnn-augmented-long` for its 60 epochs). Each trains with adam, categorical cross-entropy and
batches of 100 on the session's 70/15/15 split (scikit-learn's `train_test_split` twice with
`random_state` = the split seed, 42 as in the notebook), which is cifar4's `session` split.

The clock counts what Keras' `fit` counts: the steps and the validation after each epoch. After
each epoch the test accuracy is measured with the clock stopped (so time-to-accuracy can be read
off, the same accounting as benchmarks/time_to_accuracy.py); each epoch prints one JSON line on
stderr, and the run ends with one JSON object on the last line of stdout.

    python benchmarks/keras_reference.py cnn --data cifar4.npz
    python benchmarks/keras_reference.py cnn-augmented --epochs 5      # dataset from $CIFAR4_DATA

TensorFlow is not a cifar4 dependency: `pip install tensorflow` (the figures in
docs/benchmarks/ used TensorFlow 2.21 on the CPU) into this environment or another one, and
pass that environment's interpreter to time_to_accuracy.py with --keras-python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import NoReturn

# experiment -> (hidden layers of an MLP, or None for the CNN; default epochs, as cifar4's
# experiment of the same name; pixels scaled to [0, 1]; augmented)
MODELS = {
    "mlp-raw": ((20,), 4, False, False),
    "mlp-20": ((20,), 10, True, False),
    "mlp-deep": ((1024, 768, 512, 256, 128), 22, True, False),
    "cnn": (None, 7, True, False),
    "cnn-augmented": (None, 20, True, True),
    "cnn-augmented-long": (None, 60, True, True),
}
# the notebook's own names, accepted too
ALIASES = {"mlp20_raw": "mlp-raw", "mlp20": "mlp-20", "mlp_deep": "mlp-deep",
           "cnn_aug": "cnn-augmented-long"}
BATCH = 100


def fail(message: str) -> NoReturn:
    print(f"keras_reference.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def import_keras():
    """TensorFlow and Keras, imported only when a model is trained."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        from tensorflow import keras
    except ImportError:
        fail("TensorFlow/Keras is not installed: pip install tensorflow")
    return tf, keras


def load_split(path: str, split_seed: int, scaled: bool):
    """The session's split of the dataset file: (x, one-hot y) for train, validation, test."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    try:
        with np.load(path) as d:
            x, y = d["X"], d["Y"]
    except (OSError, ValueError, KeyError) as e:
        fail(f"--data {path}: expected a cifar4 .npz file with arrays X and Y ({e})")
    x = x / 255.0 if scaled else x.astype("float32")
    onehot = np.eye(4, dtype="float32")[y]
    x_train, x_rest, y_train, y_rest = train_test_split(x, onehot, train_size=0.7, random_state=split_seed)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, train_size=0.5, random_state=split_seed)
    return (x_train, y_train), (x_val, y_val), (x_test, y_test)


def build(keras, hidden):
    """The notebook's model: an MLP of `hidden` ReLU layers, or its CNN when `hidden` is None."""
    layers = keras.layers
    inputs = keras.Input(shape=(32, 32, 3))
    if hidden is None:
        x = layers.Conv2D(32, kernel_size=3, activation="relu")(inputs)
        x = layers.MaxPooling2D()(x)
        x = layers.Conv2D(64, kernel_size=3, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Flatten()(x)
    else:
        x = layers.Flatten()(inputs)
        for units in hidden:
            x = layers.Dense(units, activation="relu")(x)
    model = keras.Model(inputs, layers.Dense(4, activation="softmax")(x))
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def epoch_clock(keras, x_test, y_test, curve: list[dict]):
    """A callback that records, after each epoch, the fit's seconds so far (the test evaluation
    excluded), the validation accuracy and the test accuracy."""

    class EpochClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()
            self.excluded = 0.0

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            _, test_acc = self.model.evaluate(x_test, y_test, batch_size=BATCH, verbose=0)
            curve.append({"epoch": epoch + 1, "train_seconds": round(now - self.start - self.excluded, 2),
                          "val_accuracy": round(float(logs["val_accuracy"]), 4),
                          "test_accuracy": round(float(test_acc), 4)})
            print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
            self.excluded += time.perf_counter() - now

    return EpochClock()


def train(name: str, epochs: int, data: str, split_seed: int) -> dict:
    hidden, _, scaled, augmented = MODELS[name]
    tf, keras = import_keras()
    (x_train, y_train), val, (x_test, y_test) = load_split(data, split_seed, scaled)
    model = build(keras, hidden)
    curve: list[dict] = []
    fit = {"validation_data": val, "epochs": epochs, "verbose": 0,
           "callbacks": [epoch_clock(keras, x_test, y_test, curve)]}
    if augmented:
        from tensorflow.keras.preprocessing.image import ImageDataGenerator
        gen = ImageDataGenerator(rotation_range=15, width_shift_range=0.1, height_shift_range=0.1,
                                 horizontal_flip=True)
        gen.fit(x_train)
        model.fit(gen.flow(x_train, y_train, batch_size=BATCH), **fit)
    else:
        model.fit(x_train, y_train, batch_size=BATCH, **fit)
    _, train_acc = model.evaluate(x_train, y_train, batch_size=BATCH, verbose=0)
    _, test_acc = model.evaluate(x_test, y_test, batch_size=BATCH, verbose=0)
    return {"reference": "keras", "tensorflow": tf.__version__, "experiment": name, "epochs": epochs,
            "params": int(model.count_params()), "n_train": len(x_train), "split_seed": split_seed,
            "train_seconds": curve[-1]["train_seconds"], "train_accuracy": round(float(train_acc), 4),
            "test_accuracy": round(float(test_acc), 4), "cpu_threads": os.cpu_count(), "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=[*MODELS, *ALIASES], help="the cifar4 experiment it matches")
    ap.add_argument("--epochs", type=int, default=None, help="default: the cifar4 experiment's epochs")
    ap.add_argument("--data", default=None, help="the dataset .npz file (default: $CIFAR4_DATA)")
    ap.add_argument("--split-seed", type=int, default=42)
    a = ap.parse_args()
    name = ALIASES.get(a.experiment, a.experiment)
    epochs = a.epochs if a.epochs is not None else MODELS[name][1]
    if epochs < 1:
        fail(f"--epochs {epochs}: expected a whole number >= 1")
    data = a.data or os.environ.get("CIFAR4_DATA")
    if not data:
        fail("no dataset: pass --data PATH or set CIFAR4_DATA to the cifar4 .npz file")
    if not os.path.isfile(data):
        fail(f"--data {data}: no such file (expected the cifar4 .npz file)")
    print(json.dumps(train(name, epochs, data, a.split_seed)), flush=True)


if __name__ == "__main__":
    main()
