#!/usr/bin/env python3
"""Whether torch.compile pays for an experiment's training step on this machine: the step
(its augmentation, forward and loss under the run's autocast, backward, its optimizer, at its
batch size, on random images) eager, then with the forward and loss compiled by inductor, in
a fresh process each: first with an empty inductor cache (a user's first run: the compile is
paid in the first step) and again with the cache that run left (a later run). Prints one JSON
line per process, then a table: seconds of the first step and milliseconds per step after
warm-up.

    python benchmarks/compile_step.py cnn-augmented
    python benchmarks/compile_step.py cnn-augmented --precision fp32 --steps 300

Inductor needs a C++ compiler on the machine; where it has none the compiled rows fail and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(name: str, mode: str, precision: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from cifar4.device import keep_freed_memory
    from common import step_setup

    keep_freed_memory()
    s = step_setup(name)

    def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            logits = s.model(xb)
        return F.cross_entropy(logits.float(), yb, label_smoothing=s.exp.train.label_smoothing)

    fn = torch.compile(loss_of) if mode != "eager" else loss_of

    def step(i: int) -> None:
        loss = fn(*s.batch(i))
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()

    t = time.perf_counter()
    step(0)
    first = time.perf_counter() - t
    for i in range(1, 30):
        step(i)
    t = time.perf_counter()
    for i in range(30, 30 + steps):
        step(i)
    ms = 1000 * (time.perf_counter() - t) / steps
    return {"experiment": name, "mode": mode, "precision": precision, "batch": s.batch_size,
            "first_step_s": round(first, 2), "ms_per_step": round(ms, 2), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiments", nargs="*")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--child", nargs=2, metavar=("EXPERIMENT", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.precision, a.steps)), flush=True)
        return
    if not a.experiments:
        ap.error("name at least one experiment, e.g. cnn-augmented")
    rows = []
    for name in a.experiments:
        with tempfile.TemporaryDirectory(prefix="cifar4-inductor-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            for mode in ("eager", "compiled, empty cache", "compiled, cache kept"):
                cmd = [sys.executable, __file__, "--child", name, mode, "--precision", a.precision,
                       "--steps", str(a.steps)]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    last = (p.stderr.strip().splitlines() or ["no output"])[-1]
                    row = {"experiment": name, "mode": mode, "error": last[:300]}
                else:
                    row = json.loads(p.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| experiment | mode | first step s | ms per step |\n|---|---|---|---|")
    for r in rows:
        ms = r.get("ms_per_step", r.get("error"))
        print(f"| {r['experiment']} | {r['mode']} | {r.get('first_step_s', '-')} | {ms} |")


if __name__ == "__main__":
    main()
