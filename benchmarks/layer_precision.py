#!/usr/bin/env python3
"""Whether bf16 pays layer by layer: an experiment's training step (forward, backward, its
optimizer, at its batch size, on random images) with bf16 autocast, each convolution either
left to autocast (bf16) or kept in fp32, against the whole step in fp32.

The run's precision is chosen per machine for the whole model (training/precision.py); this
shows what a per-layer choice could add. Where oneDNN has AMX, bf16 wins in every layer; with
AVX512-BF16 dot products alone (a Zen 4, imitated on an AMX Xeon with
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) a layer can be slower in bf16 than in fp32. Up to three
convolutions: every combination; more: all bf16, all fp32, and each one alone in fp32. Median of
`--steps` timed steps after warm-up steps. Prints JSON lines, then a table.

    python benchmarks/layer_precision.py cnn
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/layer_precision.py cnn fast
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from cifar4 import config, models
from cifar4.device import pick_device
from cifar4.training.train import make_optimizer


def _median_ms(step, steps: int) -> float:
    for _ in range(max(5, steps // 4)):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000


def _keep_fp32(conv: nn.Conv2d, fp32: bool) -> None:
    """Make `conv` run outside autocast, in fp32, handing bf16 on to the next layer as autocast
    would (or undo it)."""
    if "forward" in conv.__dict__:
        del conv.forward
    if fp32:
        plain = conv.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", enabled=False):
                return plain(x.float()).to(torch.bfloat16)
        conv.forward = forward  # type: ignore[method-assign]


def measure(name: str, steps: int) -> list[dict]:
    exp = config.load(name)
    torch.manual_seed(0)
    model = models.build(exp.model.name, **exp.model.options).to(memory_format=torch.channels_last)
    model.train()
    optimizer = make_optimizer(model, exp.train)
    bs = exp.train.batch_size
    x = torch.randn(bs, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (bs,))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    fp32_ms = _median_ms(lambda: step(False), steps)
    rows = [{"experiment": name, "setting": "fp32 (no autocast)", "ms": round(fp32_ms, 2)}]
    if len(convs) <= 3:
        plans = list(itertools.product((False, True), repeat=len(convs)))
    else:
        plans = [(False,) * len(convs), (True,) * len(convs)] + \
            [tuple(i == j for j in range(len(convs))) for i in range(len(convs))]
    for plan in plans:
        for conv, fp32 in zip(convs, plan, strict=True):
            _keep_fp32(conv, fp32)
        label = "bf16 autocast, convolutions " + " ".join("fp32" if f else "bf16" for f in plan)
        rows.append({"experiment": name, "setting": label, "ms": round(_median_ms(lambda: step(True), steps), 2)})
    for conv in convs:
        _keep_fp32(conv, False)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    for r in rows:
        r.update({"isa": isa, "threads": torch.get_num_threads(), "batch": bs})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="+")
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    pick_device("cpu")  # all cores, as training uses them
    rows = []
    for name in a.experiments:
        for r in measure(name, a.steps):
            print(json.dumps(r), flush=True)
            rows.append(r)
    print("\n| experiment | ISA | setting | ms per step |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['experiment']} | {r['isa']} | {r['setting']} | {r['ms']:.2f} |")


if __name__ == "__main__":
    main()
