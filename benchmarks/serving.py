#!/usr/bin/env python3
"""Using a trained run: inference throughput of onnxruntime against PyTorch, `cifar4 predict`
over JPEG files on disk, and a bounded load test of `cifar4 serve` on 127.0.0.1.

    python benchmarks/serving.py RUN [--data FILE] [--clients 16] [--requests 2000]
                                     [--no-token] [--no-metrics] [--skip inference files]

1. The run exported to ONNX (without TTA); the test split classified in batches of 256 by
   PyTorch (the run's precision, as `cifar4 predict` runs it) and by onnxruntime: images/s,
   best of 3.
2. `--files` test images written as JPEG (quality 90, 32x32) to a temporary folder, then
   predict_files over the folder as `cifar4 predict RUN FOLDER` does: images/s, decoding
   included.
3. A real uvicorn server (`cifar4 serve RUN`, as a class gets it: with an access token and
   /metrics; `--no-token`, `--no-metrics` measure without them) and `--clients` threads sending
   `--requests` POST /api/predict requests of one PNG each, then it stops with SIGTERM: errors,
   p50 / p99 latency, requests per second, the server's resident memory after a 50-request
   warm-up and after the run (VmRSS from /proc), its exit status, and with metrics what
   /metrics counted (images, mean images per batch).

It prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar4 import config
from cifar4.data import load
from cifar4.data.split import split_indices
from cifar4.runs import load_model
from cifar4.serving.export import export
from cifar4.serving.predict import predict_arrays, predict_files


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def inference(run: Path, X: np.ndarray, data) -> dict:
    import onnxruntime as ort
    onnx_path = Path(tempfile.mkdtemp()) / "model.onnx"
    export(run, onnx_path, tta=False, data=data)
    loaded = load_model(run)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = 256

    def torch_pass():
        with torch.inference_mode():
            for i in range(0, len(X), batch):
                predict_arrays(loaded, X[i:i + batch])

    def ort_pass():
        for i in range(0, len(X), batch):
            session.run(None, {"images": X[i:i + batch]})
    torch_pass(), ort_pass()  # warm-up: kernel selection, allocations
    return {"images": len(X), "batch": batch, "precision_pytorch": loaded.inference_precision,
            "pytorch_images_per_s": round(len(X) / best_of(torch_pass)),
            "onnxruntime_images_per_s": round(len(X) / best_of(ort_pass))}


def jpeg_files(run: Path, X: np.ndarray, n: int) -> dict:
    folder = Path(tempfile.mkdtemp())
    for i in range(n):
        Image.fromarray(X[i % len(X)]).save(folder / f"{i:05d}.jpg", quality=90)
    loaded = load_model(run)
    seconds = best_of(lambda: predict_files(loaded, [folder], batch_size=256), repeats=2)
    return {"files": n, "images_per_s": round(n / seconds), "seconds": round(seconds, 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _scraped(text: str, name: str) -> float:
    """The sum of a metric's samples in Prometheus text (every label set)."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def load_test(run: Path, data: str | None, X: np.ndarray, clients: int, requests: int,
              token: bool = True, metrics: bool = True) -> dict:
    import httpx
    port = _free_port()
    cmd = [sys.executable, "-m", "cifar4", "serve", str(run), "--port", str(port)]
    if data:
        cmd += ["--data", data]
    if not metrics:
        cmd.append("--no-metrics")
    secret = secrets.token_urlsafe(16) if token else ""
    env = {k: v for k, v in os.environ.items() if k != "CIFAR4_TOKEN"} | ({"CIFAR4_TOKEN": secret} if token else {})
    headers = {"Authorization": f"Bearer {secret}"} if token else {}
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    scraped: dict = {}
    try:
        for _ in range(600):  # until every model is loaded
            try:
                urllib.request.urlopen(url + "/api/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        bodies = []
        for i in range(64):
            buf = io.BytesIO()
            Image.fromarray(X[i]).save(buf, format="PNG")
            bodies.append(buf.getvalue())
        with httpx.Client(timeout=60, headers=headers) as c:
            for i in range(50):  # warm-up: the model loads, allocations settle
                c.post(url + "/api/predict", files={"files": ("w.png", bodies[i % 64], "image/png")})
        rss_before = _rss_mb(server.pid)
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        per_client = requests // clients

        def client(k: int) -> None:
            with httpx.Client(timeout=60, headers=headers) as c:
                for j in range(per_client):
                    t0 = time.perf_counter()
                    try:
                        r = c.post(url + "/api/predict",
                                   files={"files": (f"{k}-{j}.png", bodies[(k * 7 + j) % 64], "image/png")})
                        ok = r.status_code == 200 and len(r.json()["predictions"]) == 1
                        msg = "" if ok else f"{r.status_code} {r.text[:100]}"
                    except httpx.HTTPError as e:
                        msg = repr(e)
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        if msg:
                            errors.append(msg)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_after = _rss_mb(server.pid)
        if metrics:
            text = httpx.get(url + "/metrics", headers=headers).text
            batches = _scraped(text, "cifar4_batch_images_count")
            scraped = {"metrics_images_classified": _scraped(text, "cifar4_images_classified_total"),
                       "metrics_mean_batch_images": round(_scraped(text, "cifar4_batch_images_sum")
                                                          / max(batches, 1), 2)}
    finally:
        server.terminate()  # SIGTERM: a graceful stop, exit status 0
        exit_status = server.wait(timeout=60)
    lat = sorted(latencies)
    return {"token": token, "metrics": metrics, **scraped, "exit_status": exit_status,
            "clients": clients, "requests": len(lat), "errors": len(errors), "first_error": errors[:1],
            "p50_ms": round(1000 * statistics.median(lat), 1),
            "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
            "requests_per_s": round(len(lat) / wall, 1), "rss_mb_before": round(rss_before, 1),
            "rss_mb_after": round(rss_after, 1), "rss_change_pct": round(100 * (rss_after / rss_before - 1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--skip", nargs="*", default=[], choices=["inference", "files", "load"])
    ap.add_argument("--no-token", action="store_true", help="Serve without an access token.")
    ap.add_argument("--no-metrics", action="store_true", help="Serve without /metrics.")
    a = ap.parse_args()
    ds = load(a.data)
    exp = config.from_dict(config.read_toml(a.run / "config.toml"))
    _, idx = split_indices(exp.data, ds)
    X = ds.X[idx["test"]]
    out: dict = {"run": str(a.run), "experiment": exp.name, "cpu": cpu_name(), "cores": os.cpu_count(),
                 "torch": torch.__version__}
    if "inference" not in a.skip:
        out["inference"] = inference(a.run, X, ds)
    if "files" not in a.skip:
        out["predict_jpeg"] = jpeg_files(a.run, X, a.files)
    if "load" not in a.skip:
        out["load"] = load_test(a.run, a.data, X, a.clients, a.requests, not a.no_token, not a.no_metrics)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
