"""Figures (matplotlib, Agg backend, no display needed): the session's training curves (loss,
accuracy; train vs validation), confusion matrices, sample grids, overlaid curves of runs, the
learning-rate range test, the accuracy / time frontier by dataset."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import io as cio


def _pyplot() -> Any:
    """pyplot on the Agg backend, imported where a figure is drawn: a command that draws none
    (an error, `predict`, `serve`, a refused resume) does not pay matplotlib's import, a large
    share of what a command spends importing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _epoch_axis(ax) -> None:
    """Whole epochs on the x axis: a one-epoch run's axis read 0.96 ... 1.04 with the default
    ticks (min_n_ticks=1: MaxNLocator gives up on integers when fewer than two fit, as one
    epoch's)."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    cio.write_with(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def curves(rows: list[dict], path: Path, title: str = "") -> None:
    """Two panels as in the session's display_training_curves: loss and accuracy per epoch."""
    plt = _pyplot()
    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(ep, [r[key] for r in rows], "o-", ms=3, label=key)
        ax.plot(ep, [r[f"val_{key}"] for r in rows], "o-", ms=3, label=f"val_{key}")
        _epoch_axis(ax)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)


def member_curves(members: list[tuple[str, list[dict]]], path: Path, title: str = "") -> None:
    """An ensemble's figure: each member's validation accuracy per epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, rows in members:
        if rows:
            ax.plot([r["epoch"] for r in rows], [r["val_accuracy"] for r in rows], "o-", ms=3,
                    label=f"{label} (val_accuracy)")
    _epoch_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    _save(fig, path)


def confusion(cm: list[list[int]], classes: tuple[str, ...] | list[str], path: Path, title: str = "") -> None:
    plt = _pyplot()
    cm_a = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.4, 3.8))
    ax.imshow(cm_a, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm_a.shape[0]):
        for j in range(cm_a.shape[1]):
            ax.text(j, i, str(cm_a[i, j]), ha="center", va="center",
                    color="white" if cm_a[i, j] > cm_a.max() / 2 else "black")
    ax.set_title(title or "confusion (test)")
    _save(fig, path)


def sample_grid(X: np.ndarray, Y: np.ndarray, classes: tuple[str, ...], path: Path,
                per_class: int = 8, seed: int = 0) -> None:
    """`per_class` random images of each class, one row per class, labelled."""
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 1.1, len(classes) * 1.25))
    axes = np.atleast_2d(axes)
    for k, name in enumerate(classes):
        idx = np.flatnonzero(k == Y)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else np.zeros(0, int)
        for j in range(per_class):
            ax = axes[k, j]
            ax.axis("off")
            if j < len(pick):
                ax.imshow(X[pick[j]], interpolation="nearest")
                ax.set_title(f"{k}: {name}" if j == 0 else str(int(pick[j])), fontsize=7)
    _save(fig, path)


@dataclass(frozen=True)
class FrontierPoint:
    """One point of a frontier figure: a preset (or experiment, or budget) on one machine or
    from one place, its whole-command seconds and test accuracy as the mean and sample standard
    deviation over its runs (seeds, splits)."""

    label: str
    series: str
    seconds: float
    accuracy: float
    seconds_std: float = 0.0
    accuracy_std: float = 0.0
    runs: int = 1


def frontier_points(runs: list[tuple[str, str, float, float]]) -> list[FrontierPoint]:
    """(label, series, seconds, accuracy) per run -> one point per (series, label), in the order
    first seen: several seeds of a preset are one point with its spread, not a cloud."""
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for label, series, secs, acc in runs:
        groups.setdefault((series, label), []).append((float(secs), float(acc)))
    out = []
    for (series, label), v in groups.items():
        t, a = np.array([s for s, _ in v]), np.array([x for _, x in v])
        out.append(FrontierPoint(label, series, float(t.mean()), float(a.mean()), _sd(t), _sd(a), len(v)))
    return out


def _sd(x: np.ndarray) -> float:
    """The sample standard deviation (0 for one value)."""
    return float(x.std(ddof=1)) if len(x) > 1 else 0.0


def on_frontier(points: list[FrontierPoint]) -> set[tuple[str, str]]:
    """(series, label) of the points no faster point of their series is as accurate as."""
    front: set[tuple[str, str]] = set()
    best: dict[str, float] = {}
    for p in sorted(points, key=lambda p: p.seconds):
        if p.accuracy > best.get(p.series, -1.0):
            best[p.series] = p.accuracy
            front.add((p.series, p.label))
    return front


def dataset_title(classes: list[str] | tuple[str, ...]) -> str:
    """CIFAR-4 or CIFAR-10 from the class names a run recorded (in output order), else the
    number of classes: the figures group runs by the data they measured."""
    from .data import CIFAR10_CLASSES, CLASSES
    if tuple(classes) == CLASSES:
        return "CIFAR-4"
    if tuple(classes) == CIFAR10_CLASSES:
        return "CIFAR-10"
    return f"{len(classes)} classes"


def panel_order(datasets: Iterable[str]) -> list[str]:
    """The frontier's panels left to right: CIFAR-4, CIFAR-10, then any other data by name."""
    return sorted(datasets, key=lambda d: (d != "CIFAR-4", d != "CIFAR-10", d))


def frontier_panels(panels: dict[str, list[FrontierPoint]], path: Path, title: str = "") -> None:
    """Test accuracy against whole-command seconds (log axis), one panel per dataset side by
    side (each its own accuracy axis: CIFAR-10's ten classes score lower than CIFAR-4's four),
    one colour and marker per series, error bars of one standard deviation both ways."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.6), squeeze=False)
    series = list(dict.fromkeys(p.series for pts in panels.values() for p in pts))
    for ax, (name, pts) in zip(axes[0], panels.items(), strict=True):
        for k, ser in enumerate(series):
            mine = [p for p in pts if p.series == ser]
            if mine:
                ax.errorbar([p.seconds for p in mine], [p.accuracy for p in mine], fmt="osD^v<>"[k % 7],
                            xerr=[p.seconds_std for p in mine], yerr=[p.accuracy_std for p in mine],
                            ms=5, capsize=2, ls="none", color=f"C{k}", label=ser or None)
        ax.set_xscale("log")
        _frontier_axes(ax, pts)
        for p, (dx, dy, ha) in zip(pts, _label_offsets(ax, pts), strict=True):
            ax.annotate(p.label, (p.seconds, p.accuracy), textcoords="offset points", xytext=(dx, dy),
                        ha=ha, fontsize=7, color=f"C{series.index(p.series)}")
        ax.set_xlabel("seconds, command start to metrics.json (mean over runs)")
        ax.set_ylabel("test accuracy (mean +- std over runs)")
        ax.grid(alpha=0.3, which="both")
        # wrapped to the panel's width: a long title (file, images, split, dates) would run
        # into the next panel's
        ax.set_title(textwrap.fill(name, 70), fontsize=10)
        if any(p.series for p in pts):
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()  # room for the panels' titles, wrapped to two lines, under the figure's
    _save(fig, path)


NICE_SECONDS = (1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600, 900, 1200, 1800, 3600)


def _frontier_axes(ax, pts: list[FrontierPoint]) -> None:
    """Room around the points for their labels, and seconds written as plain numbers on the
    log axis (its default 3 x 10^1 style runs the labels into each other)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter
    lo, hi = min(p.seconds for p in pts), max(p.seconds for p in pts)
    ax.set_xlim(lo / 1.3, hi * 1.3)
    ax.margins(y=0.1)
    ticks: list[float] = [t for t in NICE_SECONDS if lo / 1.3 <= t <= hi * 1.3] or [round(lo, 1)]
    if len(ticks) > 7:  # every other one, keeping the last
        ticks = ticks[::-1][::2][::-1]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _label_box(px: float, py: float, w: float, ha: str, dy: int) -> tuple[float, float, float, float]:
    """A label's box (left, right, bottom, top, in points) for a point at (px, py)."""
    left = px - 4 - w if ha == "right" else px + 4
    return left, left + w, py + dy, py + dy + 8


def _label_offsets(ax, pts: list[FrontierPoint]) -> list[tuple[int, int, str]]:
    """(dx, dy, alignment) in points per label: the first place, of just above or just below its
    point on its right, then on its left, then further below, where its box covers no marker
    and no label placed before it (a side where it would run off the panel is not tried).
    Boxes are estimated from the label's length (7 pt text); if no place is clear, the first."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    span = math.log(x1 / x0)
    width, height = (v * 72 / ax.figure.dpi for v in (ax.bbox.width, ax.bbox.height))  # in points
    def at(p: FrontierPoint) -> tuple[float, float]:
        return math.log(p.seconds / x0) / span * width, (p.accuracy - y0) / (y1 - y0) * height

    # boxes in points (left, right, bottom, top): the markers first, then each label placed
    placed = [(x - 3, x + 3, y - 3, y + 3) for x, y in map(at, pts)]
    out = []
    for p in pts:
        px, py = at(p)
        w = 4.0 * len(p.label)
        sides = ["left", "right"] if px + 4 + w <= width else ["right"]  # ha: the label's anchor
        if px - 4 - w < 0:
            sides = ["left"]
        tries = [(ha, dy) for ha in sides for dy in (3, -10)] + [(sides[0], -10 - 9 * k) for k in range(1, 6)]
        ha, dy = next(((h, d) for h, d in tries
                       if not any(a < r and b > lft and c < t and e > bt for lft, r, bt, t in placed
                                  for a, b, c, e in [_label_box(px, py, w, h, d)])), tries[0])
        placed.append(_label_box(px, py, w, ha, dy))
        out.append((-4 if ha == "right" else 4, dy, ha))
    return out


def frontier(points: list[tuple[str, float, float]], path: Path, title: str = "") -> None:
    """(label, seconds, accuracy) points: accuracy against time on a log time axis."""
    frontier_panels({title: [FrontierPoint(label, "", t, acc) for label, t, acc in points]}, path)


def compare(runs: list[tuple[str, list[dict]]], path: Path) -> None:
    """Validation loss and accuracy of several runs on shared axes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, rows in runs:
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [r["val_loss"] for r in rows], label=label)
        axes[1].plot(ep, [r["val_accuracy"] for r in rows], label=label)
    for ax, t in zip(axes, ("val_loss", "val_accuracy"), strict=True):
        ax.set_title(t)
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    _save(fig, path)


def lr_range(lrs: list[float], losses: list[float], smoothed: list[float], suggested: float, min_over_10: float,
             default: float, path: Path, title: str = "") -> None:
    """Loss against learning rate (log axis): each step's loss, its smoothed curve, and the
    suggested, minimum/10 and default rates as vertical lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(lrs, losses, color="0.7", lw=0.8, label="loss (each step)")
    ax.plot(lrs, smoothed, lw=1.8, label="smoothed loss")
    for x, style, label in ((suggested, "r-", f"suggested {suggested:.2g} (steepest descent)"),
                            (min_over_10, "g--", f"minimum / 10: {min_over_10:.2g}"),
                            (default, "k:", f"experiment's rate {default:.2g}")):
        ax.axvline(x, color=style[0], ls=style[1:], lw=1.2, label=label)
    finite = [v for v in smoothed[10:] if np.isfinite(v)]
    if finite:  # the diverging tail would flatten the part worth reading
        low, first = min(finite), finite[0]
        ax.set_ylim(low - 0.1 * abs(first - low) - 1e-3, max(first, low) + 0.6 * abs(first - low) + 1e-3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path)
