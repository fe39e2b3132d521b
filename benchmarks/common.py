"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics


def by_experiment(results: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by experiment, in the order they came."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["experiment"], []).append(r)
    return groups


def mean_std(values: list[float]) -> str:
    """'0.9290 +- 0.0011' (the sample standard deviation), or the one value."""
    return f"{statistics.mean(values):.4f}" + (f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else "")
