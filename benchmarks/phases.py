#!/usr/bin/env python3
"""Where a command's time goes: a timeline of its steps, in one process, without a profiler.

Runs a `cifar4` command in this process (as `python -m cifar4 ...` would) with the pipeline's
steps wrapped by a wall clock, and prints each call that took at least --min seconds, nested,
with its start from the interpreter's start (`time.perf_counter()` at this script's first line
is close to it: the interpreter's own start-up, some 20-50 ms, is not counted). The gaps are
what the listed steps do not cover (imports, mostly). cProfile slows Python-heavy code two- to
threefold and charges the GIL's waits to the wrong places; this costs a few microseconds a call.

    python benchmarks/phases.py train --preset fast-long --seed 1 -q --json
    python benchmarks/phases.py --min 0.01 --also cifar4.runs:read_metrics -- evaluate RUN
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

STEPS = [
    "cifar4.config:load", "cifar4.data:load", "cifar4.device:pick_device",
    "cifar4.data.split:split_indices",
    "cifar4.training.pipeline:train", "cifar4.training.pipeline:_train_ensemble",
    "cifar4.training.pipeline:_run", "cifar4.training.pipeline:_prepare",
    "cifar4.training.pipeline:_make_plan", "cifar4.training.pipeline:_build_model",
    "cifar4.training.pipeline:_fit_to_limit", "cifar4.training.pipeline:_build_trainer",
    "cifar4.training.pipeline:_fit", "cifar4.training.pipeline:_evaluate_splits",
    "cifar4.training.pipeline:_write_artifacts", "cifar4.training.pipeline:_metrics",
    "cifar4.training.pipeline:_initialise",
    "cifar4.training.train:Trainer.warm_up", "cifar4.training.precision:choose",
    "cifar4.training.features:features", "cifar4.training.features:extraction_seconds",
    "cifar4.training.features:CachedFeatures.__init__", "cifar4.training.features:_extract_into",
    "cifar4.training.pipeline:_pending_views", "cifar4.training.onnx_extract:session",
    "cifar4.training.train:Trainer.fit",
    "cifar4.models.transfer:TransferNet.__init__", "cifar4.models.transfer:TransferNet._inference_backbone",
    "cifar4.training.ensemble:make_ensemble", "cifar4.training.ensemble:choose_weights",
    "cifar4.training.ensemble:_member", "cifar4.training.ensemble:_logits",
    "cifar4.plots:curves", "cifar4.plots:confusion", "cifar4.models.summary:summary",
    "cifar4.models:build",
    "cifar4.runs:save_model", "cifar4.runs:load_model", "cifar4.runs:write_predictions",
    "torch.optim.optimizer:Optimizer.__init__", "torch.cuda:_lazy_init",
]

EVENTS: list[tuple[int, str, float, float]] = []  # (depth, name, start, end)
_DEPTH = [0]


def _timed(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def inner(*a: Any, **k: Any) -> Any:
        depth, start = _DEPTH[0], time.perf_counter()
        _DEPTH[0] += 1
        try:
            return fn(*a, **k)
        finally:
            _DEPTH[0] -= 1
            EVENTS.append((depth, name, start, time.perf_counter()))
    inner.__wrapped_by_phases__ = True  # type: ignore[attr-defined]
    return inner


def wrap(spec: str) -> bool:
    """Wrap `module:function` or `module:Class.method` everywhere it is referenced (modules
    that imported the function by name hold their own reference)."""
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:
        return False
    owner: Any = mod
    *path, last = attr.split(".")
    for p in path:
        owner = getattr(owner, p, None)
    fn = getattr(owner, last, None) if owner is not None else None
    if fn is None or getattr(fn, "__wrapped_by_phases__", False):
        return False
    new = _timed(attr, fn)
    setattr(owner, last, new)
    if not path:  # a module-level function: every module that holds it by name
        for m in list(sys.modules.values()):
            d = getattr(m, "__dict__", None)
            if not d:
                continue
            for k, v in list(d.items()):
                if v is fn:
                    d[k] = new
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min", type=float, default=0.05, help="list calls of at least this many seconds")
    ap.add_argument("--also", nargs="*", default=[], help="more module:function steps to time")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the cifar4 command and its arguments")
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    t = time.perf_counter()
    from cifar4 import cli
    imported = time.perf_counter()
    missing = [s for s in STEPS + a.also if not wrap(s)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(args)
    end = time.perf_counter()
    print(f"import cifar4.cli: {t - T0:.2f} -> {imported - T0:.2f} s ({imported - t:.2f} s)")
    for depth, name, s, e in sorted(EVENTS, key=lambda ev: (ev[2], ev[0])):
        if e - s >= a.min:
            print(f"{s - T0:7.2f} {e - s:7.2f}  {'  ' * depth}{name}")
    print(f"command returned {rc} at {end - T0:.2f} s (from this script's start)")
    if missing:
        print("not found (not timed): " + ", ".join(missing))
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
