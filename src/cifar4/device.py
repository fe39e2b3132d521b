"""Where and in which precision the arithmetic runs: one place for picking the device, for
deciding whether bf16 pays on it, and for the autocast context that training, evaluation,
feature extraction and prediction all use."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import torch
from torch import nn

from .errors import ConfigError

_THREADS: list[int] = []  # a thread count fixed for this process (data-parallel ranks share the cores)
_ALLOCATOR: list[bool] = []  # whether keep_freed_memory has run in this process

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * 1024 * 1024           # glibc's largest: blocks below it come from the heap
TRIM_THRESHOLD = 2**31 - 1                   # never give the heap's top back between steps


def keep_freed_memory() -> bool:
    """Tune glibc's allocator so a training step reuses the memory the previous step freed:
    by default glibc serves large blocks with fresh mmap()s and returns freed memory to the
    system, so every step pays page faults again; tuned, the course's CNN, the deep MLP and the
    fast net all step faster (and faster than with jemalloc; figures in docs/benchmarks, from
    benchmarks/cpu_settings.py). The process keeps its peak memory instead
    of returning it (CIFAR4_MALLOC=default leaves glibc as it is). Returns whether it applied
    (glibc only; a no-op elsewhere)."""
    if _ALLOCATOR:
        return _ALLOCATOR[0]
    ok = False
    if os.environ.get("CIFAR4_MALLOC") == "default":
        _ALLOCATOR.append(ok)
        return ok
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        ok = False
    _ALLOCATOR.append(ok)
    return ok


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (what runs record and caches key on)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


def cpu_features() -> str:
    """What tells CPUs of one model name apart (a VM's "AMD EPYC" may be a Zen 4 with AVX-512
    and bf16 dot products or a Zen 3 with AVX2 only): family and model numbers, the vector
    instruction set torch dispatches to, and the bf16 units, e.g. "family 25 model 17, AVX512,
    avx512_bf16". Runs record it; the precision cache keys on it."""
    fields = _cpu_fields()
    parts = [f"family {fields['cpu family']} model {fields['model']}"] if "model" in fields else []
    parts.append(torch.backends.cpu.get_cpu_capability())
    parts += list(_bf16_units())
    return ", ".join(parts)


def fix_threads(n: int) -> None:
    """Use `n` CPU threads from now on, whatever pick_device would choose."""
    _THREADS[:] = [max(1, n)]
    torch.set_num_threads(_THREADS[0])


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> the CUDA GPU when there is one, else the CPU (all its cores); 'cuda:N' a given GPU."""
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"device '{name}' is unknown; expected auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        torch.set_num_threads(_THREADS[0] if _THREADS else
                              max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                  else (os.cpu_count() or 1)))
    return torch.device(name)


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays off where the hardware has it natively: AVX512-BF16/AMX CPUs, Ampere+ GPUs.
    oneDNN also runs bf16 on AVX-512 CPUs without those instructions (Skylake, Cascade Lake),
    emulated: there a fast-net training step and the transfer backbones' feature extraction are
    slower in bf16 than in fp32, or no faster, so there, as on an AVX2-only CPU, it is not."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return supported and bool(_bf16_units())


@functools.cache
def _bf16_units() -> tuple[str, ...]:
    """The CPU's bf16 instruction sets among AVX512-BF16 and AMX-BF16 (read once a process)."""
    flags = _cpu_fields().get("flags", "").split()
    return tuple(f for f in ("avx512_bf16", "amx_bf16") if f in flags)


def _cpu_fields() -> dict[str, str]:
    """The first CPU's family, model and flags lines of /proc/cpuinfo (none where it is missing)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                k, _, v = ln.partition(":")
                k = k.strip()
                if k in ("cpu family", "model", "flags") and k not in fields:
                    fields[k] = v.strip()
                if not ln.strip() and fields:
                    break
    except OSError:
        pass
    return fields


def resolve_precision(precision: str, device: torch.device, model: nn.Module) -> str:
    """'auto' -> bf16 for models with convolutions on bf16-capable hardware (where the course's
    CNN trains faster per epoch with the same accuracy), else fp32 (the dense MLPs are bound
    by memory, not arithmetic, and measured slower in bf16 on the CPU)."""
    if precision != "auto":
        return precision
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return "bf16" if has_conv and bf16_is_fast(device) else "fp32"


def inference_precision(recorded: str, device: torch.device) -> str:
    """The precision a saved model was evaluated in at the end of training (model.json), where
    this hardware runs it natively; fp32 elsewhere."""
    return recorded if recorded == "fp32" or bf16_is_fast(device) else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """The one autocast context: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on a CPU), so that a host clock read after
    it times what ran, not what was launched (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """The module on `device` with channels_last weights (what the CPU's oneDNN and the GPU's
    tensor cores run fastest for convolutions; a no-op for dense layers)."""
    return module.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
