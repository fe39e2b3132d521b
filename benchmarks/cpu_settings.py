#!/usr/bin/env python3
"""Which CPU settings pay for training on this machine: measured, not assumed.

For each model it times training steps (forward, backward, optimizer step, at the experiment's
batch size and augmentation-free, on random images) in a fresh process per setting, because
the settings are process-wide: torch intra-op threads, bf16 autocast against fp32, oneDNN's
primitive cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY), the memory allocator (glibc's as training
tunes it, glibc's untouched, or jemalloc / tcmalloc through LD_PRELOAD when installed) and the
instruction set oneDNN may use (ONEDNN_MAX_CPU_ISA=AVX2 imitates a laptop without AVX-512). One
setting changes at a time from the engine's default. Prints one JSON line per measurement, then a table.

    python benchmarks/cpu_settings.py fast cnn mlp-deep --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ALLOCATORS = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")


def find_lib(name: str) -> str | None:
    return next((str(Path(d) / name) for d in LIBDIRS if (Path(d) / name).exists()), None)


def worker(experiment: str, precision: str, steps: int, threads: int) -> dict:
    """Seconds per training step of `experiment` in this process's settings."""
    import torch
    import torch.nn.functional as F

    from cifar4 import config, models
    from cifar4.data.transforms import Normalization
    from cifar4.device import autocast, keep_freed_memory, to_device
    from cifar4.training.train import make_optimizer

    keep_freed_memory()  # as training does (CIFAR4_MALLOC=default: glibc untouched)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    exp = config.load(experiment)
    model = models.build(exp.model.name, num_classes=4, **exp.model.options)
    x8 = torch.randint(0, 256, (exp.train.batch_size, 32, 32, 3), dtype=torch.uint8)
    x = Normalization().apply(x8)
    models.init_from_data(model, x)
    to_device(model, torch.device("cpu"))
    opt = make_optimizer(model, exp.train)
    y = torch.randint(0, 4, (len(x),))
    cast = autocast(torch.device("cpu"), precision)
    times = []
    for i in range(steps + 3):  # three warm-up steps: oneDNN builds its kernels
        t = time.perf_counter()
        with cast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return {"experiment": experiment, "precision": precision, "threads": threads,
            "batch_size": exp.train.batch_size, "step_s": statistics.median(times),
            "images_per_s": exp.train.batch_size / statistics.median(times)}


def settings(max_threads: int) -> list[tuple[str, dict[str, str], int, str | None]]:
    """(label, environment, threads, precision override): the default, then one change each."""
    out: list[tuple[str, dict[str, str], int, str | None]] = [("default", {}, max_threads, None)]
    if max_threads > 1:
        out.append((f"{max_threads // 2} thread(s)", {}, max_threads // 2, None))
    out.append(("fp32", {}, max_threads, "fp32"))
    out.append(("bf16", {}, max_threads, "bf16"))
    out.append(("primitive cache off", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}, max_threads, None))
    out.append(("glibc malloc untuned", {"CIFAR4_MALLOC": "default"}, max_threads, None))
    for name, lib in ALLOCATORS.items():
        path = find_lib(lib)
        if path:
            out.append((name, {"LD_PRELOAD": path, "CIFAR4_MALLOC": "default"}, max_threads, None))
    out.append(("AVX2 only, fp32", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, max_threads, "fp32"))
    out.append(("AVX2 only, bf16", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, max_threads, "bf16"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="*", default=["fast", "cnn", "mlp-deep"])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--worker", nargs=3, metavar=("EXPERIMENT", "PRECISION", "THREADS"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.steps, int(a.worker[2]))))
        return
    max_threads = len(os.sched_getaffinity(0))
    rows = []
    for exp in a.experiments:
        from cifar4 import config
        default_precision = config.load(exp).train.precision
        for label, env, threads, prec in settings(max_threads):
            precision = prec or ("bf16" if default_precision == "auto" else default_precision)
            cmd = [sys.executable, __file__, "--steps", str(a.steps), "--worker", exp, precision, str(threads)]
            p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
            if p.returncode:
                print(f"{exp} {label}: failed ({p.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
                continue
            r = {**json.loads(p.stdout.strip().splitlines()[-1]), "setting": label}
            print(json.dumps(r), flush=True)
            rows.append(r)
    print("\n| model | setting | precision | threads | ms per step | images/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['experiment']} | {r['setting']} | {r['precision']} | {r['threads']} | "
              f"{1000 * r['step_s']:.1f} | {r['images_per_s']:.0f} |")


if __name__ == "__main__":
    main()
