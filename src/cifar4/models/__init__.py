"""Models: the registry (`cifar4 models`), the protocol a model may follow to take part in a
run (models/base.py), the Keras-style summary, weight files, and the model families:

    registry.py      name + options -> nn.Module
    base.py          what a run asks of a model beyond forward()
    summary.py       the Keras summary table, parameter counts
    weights.py       reading weight files (safetensors, .pth with weights_only) and strict loading
    layers.py seed.py   the session's MLPs and CNN, Keras-named layers with Glorot init
    fast.py          the airbench-style fast net
    ensemble.py      trained models averaged into one (cifar4 ensemble)
    efficientnet.py resnet.py transfer.py   ImageNet backbones and the transfer model
"""

from . import ensemble, fast, seed, transfer  # noqa: F401  (each registers its models)
from .base import backbone_digest, cached_features_only, cached_inputs, full_precision, init_from_data, load_pretrained
from .registry import MODEL_SIZE, ModelSpec, build, input_size, names, register, resolve_options, spec
from .summary import Summary, count_params, summary

__all__ = ["MODEL_SIZE", "ModelSpec", "Summary", "backbone_digest", "build", "cached_features_only", "cached_inputs",
           "count_params",
           "full_precision", "init_from_data", "input_size", "load_pretrained", "names", "register",
           "resolve_options", "spec", "summary"]
