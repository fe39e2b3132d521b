"""The one error hierarchy of cifar4.

Every failure a user can cause (a bad file, config, flag, image or checkpoint) raises a
subclass of `Cifar4Error` whose message is one line naming the input, what was found and what
was expected. The CLI turns these into that line on stderr and exit code 2; anything else is a
bug and keeps its traceback.
"""

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """"; did you mean 'x'?" for the nearest of `choices` (difflib's ratio, at least 0.7), or ""
    when none is near: the ending of a message that names an unknown value. `prefix` goes before
    the suggestion ('train.' for a key), not into the comparison, where it would bring every key
    near."""
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.7)  # 0.6 offered 'best' for 'resnet'
    return f"; did you mean '{prefix}{near[0]}'?" if near else ""


class Cifar4Error(Exception):
    """Base of every error cifar4 raises on purpose."""


class DataError(Cifar4Error):
    """A dataset file or array is missing, unreadable or not CIFAR-4 shaped."""


class FetchError(Cifar4Error):
    """The dataset could not be built from any source."""


class ConfigError(Cifar4Error):
    """An experiment file, preset or option is invalid."""


class ModelError(Cifar4Error):
    """An unknown model name or impossible architecture options."""


class RunError(Cifar4Error):
    """A run directory is missing, incomplete, or would be overwritten."""


class LockedError(RunError):
    """A lab folder, run folder or cache file is in use by another process."""


class CheckpointError(Cifar4Error):
    """A weights file is corrupt, truncated or does not fit the architecture."""


class ImageError(Cifar4Error):
    """An image given to predict cannot be decoded or is unsafe to decode."""


class ExportError(Cifar4Error):
    """An exported model does not reproduce its run."""


class MissingExtraError(Cifar4Error):
    """A command needs an optional extra that is not installed (the message names it)."""
