#!/usr/bin/env python3
"""Where a GPU training epoch goes: the same trainer `cifar4 train` builds, timed per epoch
under a few settings, and the kernels of one epoch from torch's profiler.

    python benchmarks/gpu_steps.py fast-28 --variants eager benchmark compile --profile

Variants (each on a freshly built model and trainer, in this order; on a GPU the experiment with
its `[gpu]` table, as `cifar4 train` runs it there):
- eager: as `cifar4 train` runs it;
- benchmark: cuDNN's autotuner on (torch.backends.cudnn.benchmark);
- compile: benchmark, the forward pass through torch.compile (its compile time reported apart);
- b1024: benchmark, batches of 1024 (the same images per epoch in half the steps).
For each: the first epoch (start-up costs included), then the median of the next epochs, the
validation pass, and images per second. `--profile` adds the top kernels of one epoch and the
sum of their device time against the epoch's wall time (equal: the GPU is the bound; the wall
far above: the host is). Prints JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cifar4 import config as cfgmod
from cifar4 import data as datamod
from cifar4.training import pipeline
from cifar4.training.evaluate import evaluate


def build(exp, ds, folder: Path):
    run = pipeline._prepare(exp, ds, folder)
    pipeline._build_model(run)  # no plan: the trainer decides its precision and kernels itself
    pipeline._build_trainer(run, None, save_state=False, extra=None, progress=False)
    tr = run.trainer
    x_store, y_store = tr.store(run.x["train"], run.y["train"])
    return run, tr, x_store, y_store


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_epoch(tr, x_store, y_store) -> float:
    sync()
    t = time.perf_counter()
    tr._train_epoch(x_store, y_store)
    sync()
    return time.perf_counter() - t


def variant(name: str, exp, ds, epochs: int, profile: bool) -> dict:
    torch.backends.cudnn.benchmark = name != "eager"
    if name == "b1024":
        exp = exp.model_copy(update={"train": exp.train.model_copy(update={"batch_size": 1024})})
    with tempfile.TemporaryDirectory() as d:
        run, tr, x_store, y_store = build(exp, ds, Path(d))
        compile_s = None
        if name == "compile":
            tr.forward = torch.compile(tr.model)
        first = timed_epoch(tr, x_store, y_store)
        if name == "compile":
            compile_s = first
        rest = [timed_epoch(tr, x_store, y_store) for _ in range(epochs)]
        sync()
        t = time.perf_counter()
        evaluate(tr.model, run.x["val"], run.y["val"], run.norm, device=tr.device, precision=tr.precision)
        sync()
        val_s = time.perf_counter() - t
        out = {"variant": name, "batch_size": exp.train.batch_size, "steps_per_epoch": tr.steps_per_epoch,
               "precision": tr.precision, "first_epoch_s": round(first, 4),
               "epoch_s": round(statistics.median(rest), 4),
               "step_ms": round(1000 * statistics.median(rest) / tr.steps_per_epoch, 3),
               "images_per_s": round(len(x_store) / statistics.median(rest)),
               "val_pass_s": round(val_s, 4), "compile_first_epoch_s": compile_s}
        if profile and torch.cuda.is_available():
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof
            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                wall = timed_epoch(tr, x_store, y_store)
            events = p.key_averages()

            def dev(e) -> float:
                return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0))
            # the kernels alone: an aten op's device time is that of the kernels it launched
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            kernel_us = sum(dev(e) for e in kernels)
            out["profiled_epoch_s"] = round(wall, 4)
            out["kernel_s"] = round(kernel_us / 1e6, 4)
            top = sorted(kernels, key=dev, reverse=True)[:18]
            out["top"] = [{"op": e.key[:60], "device_ms": round(dev(e) / 1e3, 2), "calls": e.count} for e in top]
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment")
    ap.add_argument("--variants", nargs="+", default=["eager", "benchmark"],
                    choices=["eager", "benchmark", "compile", "b1024"])
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs after the first")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    exp = cfgmod.load(a.experiment)
    if exp.gpu and torch.cuda.is_available():
        exp = exp.on_gpu()  # as `cifar4 train` runs it there
    ds = datamod.load(a.data)
    results = []
    for v in a.variants:
        r = variant(v, exp, ds, a.epochs, a.profile and v in ("eager", "benchmark"))
        print(json.dumps(r), flush=True)
        results.append(r)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{a.experiment} on {gpu}, torch {torch.__version__}")
    print("| variant | batch | first epoch s | epoch s | step ms | images/s | val pass s "
          "| kernels s (profiled epoch s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        k = f"{r['kernel_s']} ({r['profiled_epoch_s']})" if "kernel_s" in r else ""
        print(f"| {r['variant']} | {r['batch_size']} | {r['first_epoch_s']} | {r['epoch_s']} | {r['step_ms']} | "
              f"{r['images_per_s']} | {r['val_pass_s']} | {k} |")
    for r in results:
        for t in r.get("top", []):
            print(f"  {r['variant']:9s} {t['device_ms']:8.2f} ms  x{t['calls']:<5d} {t['op']}")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": gpu, "torch": torch.__version__, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
