#!/usr/bin/env python3
"""Feature extraction through the frozen transfer backbone: images per second as the cache
computes them, and under other memory layouts, precisions and batch sizes.

    python benchmarks/extraction.py --images 8192 --resolution 160 --profile

    python benchmarks/extraction.py --images 2048 --tune-blocks 4 --forward none

Rows (each after one untimed batch, the device synchronised around the clock):
- extract: training/features.extract as `cifar4 train` calls it (batch norms folded, inputs and
  weights channels_last, the run's precision, the features copied back to the host per batch),
  once per extraction engine (`--engines`: torch, and onnxruntime where extraction is fp32 on a
  CPU with the export extra installed; its first batch includes exporting the graph, into an
  empty cache folder); with `--tune-blocks N` what the cache holds for N tuned blocks, the
  activation maps below them;
- the backbone's forward pass alone on inputs already on the device, in each of
  {channels_last, contiguous (NCHW)} x {bf16 autocast, fp16 autocast, fp32} (bf16/fp16 on a GPU
  only) and, on a GPU, with cuDNN's autotuner.
The first batch of the first row is reported apart (kernels loaded, heuristics run). `--profile`
adds the top kernels of one batch in the layout `extract` uses. Prints JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cifar4 import data as datamod
from cifar4 import models
from cifar4.device import autocast, bf16_is_fast, keep_freed_memory, pick_device
from cifar4.training import onnx_extract
from cifar4.training.features import extract, feature_precision


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(net, prepare, X: np.ndarray, device: torch.device, batch: int, precision: str,
                 layout: torch.memory_format) -> float:
    """Images per second of the backbone's forward pass (inputs uploaded beforehand)."""
    net = net.to(memory_format=layout)
    xs = [torch.from_numpy(X[i:i + batch]).to(device).permute(0, 3, 1, 2).float().div(255)
          for i in range(0, len(X), batch)]
    cast = {"bf16": autocast(device, "bf16"), "fp32": autocast(device, "fp32"),
            "fp16": torch.autocast(device.type, dtype=torch.float16)}[precision]
    with torch.no_grad(), cast:
        net.features(prepare(xs[0]).contiguous(memory_format=layout))  # untimed
        sync(device)
        t = time.perf_counter()
        for x in xs:
            net.features(prepare(x).contiguous(memory_format=layout))
        sync(device)
    return len(X) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--resolution", type=int, default=160)
    ap.add_argument("--batch", type=int, nargs="+", default=[512])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tune-blocks", type=int, default=0)
    ap.add_argument("--engines", nargs="+", default=["torch", "onnxruntime"], choices=["torch", "onnxruntime"])
    ap.add_argument("--forward", choices=["all", "none"], default="all",
                    help="the forward-pass rows by layout and precision (none: the extract rows alone)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = pick_device("auto")
    # as a training command does: without it, on the AVX2 EPYC, the forward pass at batch 512
    # spent more time in page faults than computing (5m52s of system time in a 4m42s run)
    keep_freed_memory()
    ds = datamod.load(a.data)
    X = ds.X[:a.images]
    model = models.build("transfer", 4, resolution=a.resolution, tune_blocks=a.tune_blocks)
    models.load_pretrained(model)
    model.to(device).eval()
    prec = feature_precision("auto", device)
    rows = []
    os.environ["CIFAR4_CACHE"] = tempfile.mkdtemp(prefix="cifar4-extraction-")  # graphs exported afresh
    for engine in a.engines:
        os.environ[onnx_extract.ENV_VAR] = engine
        if onnx_extract.engine(device, prec) != engine:
            print(json.dumps({"row": f"extract ({engine})", "skipped": "not this device or precision, "
                                                                      "or the export extra is missing"}))
            continue
        sync(device)
        t = time.perf_counter()
        extract(model, X[:a.batch[0]], False, device, prec)
        sync(device)
        first = {"row": f"first batch (cold; {engine})", "batch": a.batch[0], "precision": prec,
                 "seconds": round(time.perf_counter() - t, 3)}
        t = time.perf_counter()
        extract(model, X, False, device, prec)
        row = {"row": f"extract ({engine})", "batch": a.batch[0], "precision": prec,
               "layout": "channels_last" if engine == "torch" else "the graph's",
               "images_per_s": round(len(X) / (time.perf_counter() - t))}
        rows += [first, row]
        print(json.dumps(first), json.dumps(row), sep="\n", flush=True)

    fused = model._inference_backbone()
    precisions = ["bf16", "fp16", "fp32"] if device.type == "cuda" else \
        (["bf16", "fp32"] if bf16_is_fast(device) else ["fp32"])
    layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    for batch in a.batch if a.forward == "all" else []:
        for bench in ([False, True] if device.type == "cuda" else [False]):
            torch.backends.cudnn.benchmark = bench
            for p in precisions:
                for name, layout in layouts.items():
                    r = {"row": "forward" + (" +autotune" if bench else ""), "batch": batch, "precision": p,
                         "layout": name,
                         "images_per_s": round(forward_rate(fused, model.prepare, X, device, batch, p, layout))}
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    torch.backends.cudnn.benchmark = False

    top = []
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        fused = fused.to(memory_format=torch.channels_last)
        x = torch.from_numpy(X[:a.batch[0]]).to(device).permute(0, 3, 1, 2).float().div(255)
        with torch.no_grad(), autocast(device, prec), profile(activities=acts) as pr:
            fused.features(model.prepare(x))
            sync(device)

        def dev(e) -> float:
            return float(getattr(e, "self_device_time_total", 0) or 0) if device.type == "cuda" \
                else float(e.self_cpu_time_total)
        ev = [e for e in pr.key_averages()
              if device.type != "cuda" or e.device_type == torch.autograd.DeviceType.CUDA]
        top = [{"op": e.key[:70], "ms": round(dev(e) / 1e3, 2), "calls": e.count}
               for e in sorted(ev, key=dev, reverse=True)[:15]]
        for t_ in top:
            print(f"  {t_['ms']:8.2f} ms  x{t_['calls']:<4d} {t_['op']}")

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    what = f", the maps below {a.tune_blocks} tuned blocks" if a.tune_blocks else ""
    print(f"\nefficientnet-lite0 at {a.resolution} px{what} on {gpu}, torch {torch.__version__}")
    print("| row | batch | precision | layout | images/s (or s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['batch']} | {r['precision']} | {r.get('layout', '')} | "
              f"{r.get('images_per_s', r.get('seconds'))} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": gpu, "torch": torch.__version__,
                                           "resolution": a.resolution, "tune_blocks": a.tune_blocks, "rows": rows,
                                           "top": top}, indent=1))


if __name__ == "__main__":
    main()
