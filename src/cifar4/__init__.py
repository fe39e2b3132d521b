"""cifar4: a deep-learning lab for CIFAR-4 (bird, cat, frog, horse), and other small-image classes.

The Python API mirrors the command line:

    import cifar4
    ds = cifar4.load_dataset()                      # cifar4 data info
    result = cifar4.train("cnn", ds)                # cifar4 train --experiment cnn
    result.metrics["test_accuracy"], result.run_dir
    cifar4.evaluate_run(result.run_dir)             # cifar4 evaluate RUN
    cifar4.predict(result.run_dir, ["cat.jpg"])     # cifar4 predict RUN cat.jpg
"""

from importlib import metadata as _metadata

from .config import Experiment
from .config import from_dict as experiment_from_dict
from .config import load as load_experiment
from .data import CLASSES, Dataset, from_arrays
from .data import info as dataset_info
from .data import load as load_dataset
from .data.fetch import fetch as fetch_dataset
from .data.images import read_image
from .data.split import make_split
from .errors import (
    CheckpointError,
    Cifar4Error,
    ConfigError,
    DataError,
    FetchError,
    ImageError,
    LockedError,
    ModelError,
    RunError,
)
from .models import build as build_model
from .models import summary
from .runs import list_runs, load_model
from .serving.predict import predict
from .training.evaluate_run import evaluate_run
from .training.pipeline import Result, resume, train

try:
    __version__ = _metadata.version("cifar4")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "CLASSES", "Dataset", "Experiment", "Result", "build_model", "dataset_info", "evaluate_run",
    "experiment_from_dict", "fetch_dataset", "from_arrays", "list_runs", "load_dataset",
    "load_experiment", "load_model", "make_split", "predict", "read_image", "resume", "summary",
    "train",
    "Cifar4Error", "CheckpointError", "ConfigError", "DataError", "FetchError", "ImageError",
    "LockedError", "ModelError", "RunError",
]
