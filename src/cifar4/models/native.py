"""Compiled CPU kernels, built on this machine the first time a training run needs them.

One so far, `pool2x2` (csrc/pool2x2.cpp): the session CNN's 2x2 max pool with its ReLU, for
training on a CPU. The library's pooling writes an int64 index per output, and its backward
(`max_unpool2d`) zero-fills the input's gradient and scatters into it; the kernel keeps one byte
per output and writes the gradient in one pass, with the same values and gradients bit for bit.
Less memory traffic makes both passes faster than the library's, and the course CNN's training
step with them (measured by `benchmarks/pool_kernel.py`; figures in docs/benchmarks).

It is built with torch.utils.cpp_extension (a C++ compiler with OpenMP, and ninja, a
dependency) with -march=native, into <cache>/kernels/<key>/ ($CIFAR4_CACHE or the user cache
folder), the key hashing the source, torch's version, the CPU (model and features) and oneDNN's
instruction-set limit, so a build never runs on a CPU it was not made for: seconds, once per
machine. Where it cannot be built (no compiler, say), training takes the library's pooling, which
gives the same numbers, and the run says why; the failure is remembered under the same key (remove
that folder to try again). CIFAR4_KERNELS=library skips the kernels altogether.

Nothing is built inside a training step: the trainer calls `prepare(model)` first, and the layers
ask `ops()`, which only answers what is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

SOURCE = Path(__file__).with_name("csrc") / "pool2x2.cpp"
FAILED = "failed.txt"  # in the build folder: why the last build failed (not retried for this key)


@dataclass(frozen=True)
class Status:
    compiled: bool
    reason: str                # what was used and why, for the run's log and metrics.json
    build_seconds: float = 0.0  # spent building in this process (0: loaded from the cache)

    def to_dict(self) -> dict[str, Any]:
        return {"compiled": self.compiled, "reason": self.reason, "build_seconds": round(self.build_seconds, 2)}


_LOADED: list[Status] = []  # this process's answer, once asked


def _isa_limit() -> str:
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "native")


def key() -> str:
    from ..device import cpu_features, cpu_name
    text = "|".join([SOURCE.read_text(), torch.__version__, cpu_name(), cpu_features(), _isa_limit(),
                     sys.version.split()[0]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_dir(k: str | None = None) -> Path:
    """Where this machine's build lives (`k`: key(), when the caller has it already)."""
    from ..data import work_cache
    return work_cache() / "kernels" / f"pool2x2-{k or key()}"


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp"]
    isa = _isa_limit().upper()
    if isa not in ("NATIVE", "ALL", "DEFAULT") and not isa.startswith(("AVX512", "AVX10")):
        flags.append("-mno-avx512f")  # oneDNN held below AVX-512 (an older laptop imitated): so is the kernel
    return flags


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx)


def _ninja_on_path() -> bool:
    """torch's builder runs `ninja` from PATH; the ninja package's binary is in the environment's
    bin folder, which is not on PATH when cifar4 runs without the environment activated."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def load(verbose: bool = False) -> Status:
    """Load the kernels into this process, building them first if this machine has no build;
    never raises: a kernel that cannot be had is a Status saying why (the library's pooling is
    used instead). Asked once per process."""
    if _LOADED:
        return _LOADED[0]
    status = _load(verbose)
    _LOADED.append(status)
    return status


def _load(verbose: bool) -> Status:
    if os.environ.get("CIFAR4_KERNELS", "").lower() == "library":
        return Status(False, "the library's, as CIFAR4_KERNELS=library asks")
    if sys.platform != "linux":
        return Status(False, f"the library's, since the compiled kernel is built on Linux only "
                             f"(this is {sys.platform})")
    k = key()
    folder = build_dir(k)
    failed = folder / FAILED
    if failed.is_file():
        return Status(False, f"the library's, since building the compiled kernel failed before ({_first_line(failed)}; "
                             f"remove {folder} to try again)")
    if _compiler() is None:
        return Status(False, f"the library's, since no C++ compiler ({os.environ.get('CXX', 'c++')}) is on PATH "
                             "to build the compiled kernel")
    if not _ninja_on_path():
        return Status(False, "the library's, since ninja, which builds the compiled kernel, is not installed "
                             "(pip install ninja)")
    t0 = time.perf_counter()
    fresh = not any(folder.glob("*.so"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load as build
        build(name=f"cifar4_pool2x2_{k}", sources=[str(SOURCE)], extra_cflags=_flags(),
              extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False, verbose=verbose)
    except Exception as e:  # any failure of a compiler or linker: keep the reason, use the library
        last = _last_line(str(e)) or type(e).__name__
        with contextlib.suppress(OSError):  # an unwritable cache: the next run tries again
            failed.write_text(last + "\n")
        return Status(False, f"the library's, since building the compiled kernel failed ({last})")
    seconds = time.perf_counter() - t0
    if fresh:
        return Status(True, f"compiled kernel, built for this machine in {seconds:.1f} s", seconds)
    return Status(True, "compiled kernel (built earlier on this machine)")


def _first_line(path: Path) -> str:
    try:
        return path.read_text().strip().splitlines()[0][:200]
    except (OSError, IndexError):
        return "no reason kept"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def ops() -> ModuleType | None:
    """The loaded kernels (torch.ops.cifar4), or None where they are not loaded: never builds."""
    if _LOADED and _LOADED[0].compiled:
        return torch.ops.cifar4
    return None


def wants(model: nn.Module) -> bool:
    """Whether `model` has a layer that uses the kernels (one whose class names a kernel in
    `native_kernel`: layers.MaxPooling2D)."""
    return any(getattr(m, "native_kernel", None) == "pool2x2" for m in model.modules())


def prepare(model: nn.Module, device: torch.device) -> Status | None:
    """Before training `model` on `device`: load (and if need be build) the kernels it uses.
    None where it uses none (a GPU, or a model without such layers)."""
    if device.type != "cpu" or not wants(model):
        return None
    return load()
