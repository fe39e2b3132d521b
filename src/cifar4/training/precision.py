"""Which arithmetic a training run uses, measured rather than assumed.

Whether bf16 autocast pays on a CPU depends on the CPU (AMX tiles, AVX512-BF16 dot products
alone, or no bf16 at all) and on the model (convolutions gain where dense layers may lose). So
`precision = "auto"` on a CPU times a few training steps of the model in fp32 and in bf16 (on a
throw-away copy, with the run's batch, optimizer and loss; the run's random streams are left as
they were) and keeps the faster; bf16 must win by MARGIN to be chosen, since fp32 is exact. The
answer is cached per CPU model and features (device.cpu_features), torch version, thread count,
oneDNN instruction-set limit and model, in <cache>/precision.json ($CIFAR4_CACHE or the user
cache folder), so each machine measures each model once. A CPU without AVX-512 (AVX2 only: no
bf16 arithmetic at all, oneDNN would emulate it) is not timed: fp32, and the run says why
(emulated steps are many times slower than fp32's, so timing them would cost a first run more
than any choice could save). So is an AVX-512 CPU without bf16 instructions (neither
AVX512-BF16 nor AMX: Skylake, Cascade Lake), where oneDNN emulates bf16 at about half fp32's
speed. A model with 3x3
convolutions (models/layers.Conv3x3: the fast nets) is also timed in bf16 with the weight
gradients of its small, wide maps taken as matmuls; that is kept where it wins by MARGIN (on some
CPUs oneDNN's bf16 weight-gradient kernel is several times slower than its forward one for those
maps). On a GPU, "auto" is bf16 where the GPU supports it (tensor cores). An explicit fp32, bf16
or bf16-matmul-wgrad (`--precision`) is used as given, untimed: the last is the matmul variant
that "auto" may choose, so a run that used it can be repeated without the cache (for models
without such maps it is plain bf16).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import io as cio
from .. import locks
from ..config import TrainConfig
from ..data import work_cache
from ..device import autocast, bf16_is_fast, cpu_features, cpu_name, synchronize, to_device
from ..models.layers import matmul_weight_grads

MARGIN = 0.05          # bf16 must be at least 5 % faster per step
PROBE_BATCH = 128      # images per measured step (the run's batch size if smaller)
PROBE_STEPS = 3        # timed steps per precision, after one warm-up step
EMULATED = 10.0        # a bf16 warm-up this many times fp32's: emulated bf16, not timed further
CACHE_VERSION = 4      # part of the key: a changed measurement invalidates older answers (4: none from a busy machine)
BUSY_LOAD = 1.5        # a 1-minute load average above this many times the usable cores: a busy machine
MATMUL = "bf16-matmul-wgrad"  # bf16 with the small maps' weight gradients as matmuls


@dataclass(frozen=True)
class Choice:
    precision: str
    reason: str
    seconds: dict[str, float]  # measured seconds per probe step, per precision (empty: not measured)
    cached: bool = False
    matmul_weight_grads: bool = False  # bf16 steps take the small maps' weight gradients as matmuls


def decide(cfg: TrainConfig, device: torch.device, model: nn.Module, sample: torch.Tensor | None,
           optimizer: Optimizer | None = None) -> Choice:
    """A run's precision (choose), measured once: under torchrun rank 0 measures and every rank
    takes its answer, since the ranks must compute alike."""
    from dataclasses import asdict

    from . import distributed
    w = distributed.world()
    choice = choose(cfg.precision, device, model, cfg, sample, optimizer) if w.main else None
    if w.size > 1:
        choice = Choice(**distributed.broadcast(asdict(choice) if choice else None))
    assert choice is not None
    return choice


def arithmetic(asked: str) -> str:
    """The number format a precision setting computes in: the matmul variant is bf16 (it only
    changes how training takes some weight gradients; inference and extraction have none)."""
    return "bf16" if asked == MATMUL else asked


def cache_path() -> Path:
    return work_cache() / "precision.json"


def _key(model: nn.Module, batch: int) -> str:
    shapes = ";".join(f"{n}:{tuple(p.shape)}:{int(p.requires_grad)}" for n, p in model.named_parameters())
    model_id = hashlib.sha256(f"{type(model).__name__}|{shapes}|{batch}".encode()).hexdigest()[:16]
    return "|".join([f"v{CACHE_VERSION}", cpu_name(), cpu_features(), torch.__version__,
                     f"threads={torch.get_num_threads()}",
                     f"isa={os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')}", model_id])


Optimizer = Callable[[nn.Module], torch.optim.Optimizer]


def choose(asked: str, device: torch.device, model: nn.Module, cfg: TrainConfig,
           sample: torch.Tensor | None = None, optimizer: Optimizer | None = None) -> Choice:
    """The precision of a run: as asked, or ('auto') measured on this CPU / the GPU's rule.
    `sample`: model inputs (N, ...) to time steps on; without it, 'auto' keeps the rule.
    `optimizer`: makes the run's optimizer for a model (the trainer passes its own; default
    plain SGD)."""
    if asked == MATMUL:
        return Choice(arithmetic(asked), "as asked", {}, matmul_weight_grads=True)
    if asked != "auto":
        return Choice(asked, "as asked", {})
    if device.type == "cuda":
        bf16 = bf16_is_fast(device)
        return Choice("bf16" if bf16 else "fp32", "this GPU " + ("supports" if bf16 else "lacks") + " bf16", {})
    if sample is None or not any(p.requires_grad for p in model.parameters()):
        return Choice("fp32", "nothing to measure", {})
    if not bf16_is_fast(device):  # no bf16 instructions (AVX2 only, AVX-512 without them, or oneDNN held below)
        cpu = f"{cpu_name()}: {cpu_features()}"
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
        who = f"oneDNN, held to {isa} by ONEDNN_MAX_CPU_ISA on this CPU ({cpu})," if isa else f"this CPU ({cpu})"
        return Choice("fp32", f"{who} has no bf16 arithmetic (neither AVX512-BF16 nor AMX), so bf16 "
                      "would be emulated, slower than fp32 (not timed)", {})
    batch = min(PROBE_BATCH, cfg.batch_size, len(sample))
    key = _key(model, batch)
    path = cache_path()
    known = _read(path).get(key)
    if isinstance(known, dict) and known.get("precision") in ("fp32", "bf16"):
        mm = bool(known.get("matmul_weight_grads", False))
        return Choice(known["precision"], _reason(known["precision"], known.get("seconds", {}), mm),
                      known.get("seconds", {}), cached=True, matmul_weight_grads=mm)
    seconds = measure(model, sample[:batch], device, optimizer)
    mm = seconds.get(MATMUL, seconds["bf16"]) < (1 - MARGIN) * seconds["bf16"]  # the matmuls must win too
    prec = "bf16" if seconds[MATMUL if mm else "bf16"] < (1 - MARGIN) * seconds["fp32"] else "fp32"
    mm = mm and prec == "bf16"
    if machine_busy():  # used for this run, not kept for the next ones (machine_busy says why)
        return Choice(prec, _reason(prec, seconds, mm) + "; measured while this machine was busy, so not kept",
                      seconds, matmul_weight_grads=mm)
    try:
        with locks.hold(path.with_name(path.name + ".lock"), "precision cache", wait=True):
            table = _read(path)
            table[key] = {"precision": prec, "matmul_weight_grads": mm, "seconds": seconds,
                          "cpu": cpu_name(), "torch": torch.__version__, "batch": batch}
            cio.write_json(path, table)
    except (OSError, locks.LockedError):  # an unwritable cache only costs a new measurement next time
        pass
    return Choice(prec, _reason(prec, seconds, mm), seconds, matmul_weight_grads=mm)


def machine_busy() -> bool:
    """Whether other work shares the CPU: the 1-minute load average above BUSY_LOAD times the
    cores this process may use. A precision measured then is used for its run but not kept:
    the precisions' steps are timed one after the other, so a neighbour's burst can land on
    one of them, and a kept answer decides every later run on the machine (a wrong fp32 kept
    for `fast`'s net makes a time limit time it in fp32 and take a lighter fallback: the
    CIFAR-10 benchmark page tells the case)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average (Windows): nothing to go by
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return load > BUSY_LOAD * cores


def _reason(prec: str, seconds: dict[str, float], mm: bool = False) -> str:
    if not seconds:
        return ""
    text = (f"a training step took {seconds['bf16'] * 1000:.0f} ms in bf16 against "
            f"{seconds['fp32'] * 1000:.0f} ms in fp32 on this CPU ({cpu_name()})")
    if MATMUL in seconds:
        text += (f"; {seconds[MATMUL] * 1000:.0f} ms in bf16 with the small maps' weight gradients "
                 f"as matmuls ({'used' if mm else 'not used'})")
    return text


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def step_times(net: nn.Module, x: torch.Tensor, device: torch.device, prec: str,
               optimizer: Optimizer | None = None, steps: int = PROBE_STEPS,
               give_up: float | None = None) -> list[float]:
    """Seconds of a warm-up training step of `net` (forward, loss, backward, optimizer step)
    on the batch `x`, then of `steps` more; only the warm-up where it took over `give_up`
    seconds. `net` itself trains: pass a copy."""
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    net.train()
    opt = optimizer(net) if optimizer is not None else \
        torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    times: list[float] = []
    for i in range(1 + steps):
        t = time.perf_counter()
        with autocast(device, prec):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(device)
        times.append(time.perf_counter() - t)
        if i == 0 and give_up is not None and times[0] > give_up:
            break
    return times


def measure(model: nn.Module, x: torch.Tensor, device: torch.device,
            optimizer: Optimizer | None = None) -> dict[str, float]:
    """Seconds per training step (forward, loss, backward, optimizer step) in each precision
    (and, for a model with 3x3 convolutions on a CPU with native bf16, in bf16 with matmul
    weight gradients: the MATMUL key), on a copy of the model; torch's random state is
    restored afterwards."""
    out: dict[str, float] = {}
    modes = [("fp32", "fp32"), ("bf16", "bf16"), (MATMUL, "bf16")]
    with torch.random.fork_rng(devices=[]):
        for mode, prec in modes:
            net = to_device(copy.deepcopy(model), device)
            if mode == MATMUL and (device.type != "cpu" or not matmul_weight_grads(net, True)):
                continue  # a GPU, or no 3x3 convolutions
            # emulated bf16 (oneDNN held to AVX2 on an AVX-512 CPU: many times fp32's step)
            # loses at once, without the timed steps. A native bf16 warm-up (oneDNN generating
            # its kernels) can take a few times fp32's step, so EMULATED is drawn well above it.
            times = step_times(net, x, device, prec, optimizer, PROBE_STEPS,
                               give_up=EMULATED * out["fp32"] if mode == "bf16" else None)
            out[mode] = round(min(times[1:] or times), 5)
            if len(times) == 1:
                break  # emulated bf16: its warm-up step says enough
    return out
