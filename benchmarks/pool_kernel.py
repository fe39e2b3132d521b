#!/usr/bin/env python3
"""The compiled pooling kernel (cifar4/models/native.py) against the library's pooling on this CPU:
the session CNN's two pools timed alone (forward and backward, bf16, channels_last, batch 100,
median ms of 7 blocks), then an experiment's whole training step (augmentation, forward, loss,
backward, Adam) with one and then the other, in alternating blocks of 60 steps in one process,
so the host's drift hits both alike. Prints JSON, then the paired speed-up.

    python benchmarks/pool_kernel.py
    python benchmarks/pool_kernel.py --experiment cnn --blocks 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cifar4.device import cpu_features, cpu_name, keep_freed_memory
from cifar4.models import native
from cifar4.models.layers import MaxPooling2D
from common import step_setup


def use_kernel(on: bool, status: native.Status) -> None:
    """Switch the layers between the loaded kernel and the library's pooling (what a process
    where the build failed would use)."""
    native._LOADED[:] = [status if on else native.Status(False, "switched off by the benchmark")]


def median_ms(fn: Callable[[], object], calls: int = 200) -> float:
    for _ in range(20):
        fn()
    blocks = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        blocks.append(1000 * (time.perf_counter() - t) / calls)
    return round(statistics.median(blocks), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="cnn-augmented")
    ap.add_argument("--blocks", type=int, default=12, help="blocks of 60 steps per side")
    a = ap.parse_args()
    keep_freed_memory()
    t0 = time.perf_counter()
    status = native.load()
    print(json.dumps({"kernel": status.to_dict(), "load_seconds": round(time.perf_counter() - t0, 2),
                      "cpu": cpu_name(), "cpu_features": cpu_features(), "torch": torch.__version__}), flush=True)
    if not status.compiled:
        raise SystemExit(f"no compiled kernel to compare: {status.reason}")

    pool = MaxPooling2D(activation="relu")
    for shape in ((100, 32, 28, 28), (100, 64, 12, 12)):  # the session CNN's pools, as training crops them
        x = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=torch.bfloat16)
        g = g.contiguous(memory_format=torch.channels_last)
        row: dict[str, list] = {"pool": list(shape), "library": [], "kernel": []}
        for on in (False, True, False, True):  # twice each, taking turns
            use_kernel(on, status)
            row["kernel" if on else "library"].append(median_ms(lambda x=x, g=g: torch.autograd.grad(pool(x), x, g)))
        print(json.dumps(row), flush=True)

    s = step_setup(a.experiment)

    def step(i: int) -> None:
        xb, yb = s.batch(i)
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(s.model(xb).float(), yb)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()

    for i in range(30):
        step(i)
    ms: dict[str, list[float]] = {"library": [], "kernel": []}
    for b in range(a.blocks):
        for on in ((False, True) if b % 2 == 0 else (True, False)):
            use_kernel(on, status)
            for i in range(5):
                step(i)
            t = time.perf_counter()
            for i in range(60):
                step(i)
            ms["kernel" if on else "library"].append(round(1000 * (time.perf_counter() - t) / 60, 3))
    use_kernel(True, status)
    ratios = [lib / ker for lib, ker in zip(ms["library"], ms["kernel"], strict=True)]
    print(json.dumps({"experiment": a.experiment, "step_ms": ms}), flush=True)
    print(f"{a.experiment} step, ms (median of {a.blocks} blocks): library {statistics.median(ms['library']):.2f}, "
          f"kernel {statistics.median(ms['kernel']):.2f}; paired speed-up median {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
