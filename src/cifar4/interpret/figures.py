"""The interpretation's figures (PNG, matplotlib's Agg backend): the top losses, attention maps
over their images, the reliability diagram before and after temperature scaling, and the
session CNN's first-layer filters and feature maps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..plots import _pyplot, _save
from .attribution import Maps
from .calibration import Reliability


def _rgb(x: np.ndarray, side: int) -> np.ndarray:
    """An image (h, w, 3) uint8 or float in [0, 1] -> float (side, side, 3), nearest upscaling."""
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    rows = np.arange(side) * x.shape[0] // side
    cols = np.arange(side) * x.shape[1] // side
    return x[rows][:, cols]


def _heat(image: np.ndarray, heat: np.ndarray, side: int) -> np.ndarray:
    """An attention map (h, w) in [0, 1] laid over its image, half transparent (jet colours)."""
    from matplotlib import colormaps
    return 0.5 * _rgb(image, side) + 0.5 * _rgb(colormaps["jet"](heat)[..., :3], side)


def _mosaic(cells: list[np.ndarray], titles: list[str], cols: int, path: Path, title: str = "",
            red: list[bool] | None = None, row_labels: list[str] | None = None, side: int = 64) -> None:
    """Cells (side, side, 3) in a grid drawn as one image on one axes, each titled above: one
    axes instead of one per image (a grid of 48 axes took seconds to draw)."""
    plt = _pyplot()
    rows, band, gap = max(1, math.ceil(len(cells) / cols)), 26, 4
    h, w = side + band, side + gap
    canvas = np.ones((rows * h, cols * w - gap, 3), np.float32)
    for i, c in enumerate(cells):
        r, k = divmod(i, cols)
        canvas[r * h + band:r * h + band + side, k * w:k * w + side] = c
    left = 1.2 if row_labels else 0.0
    fig = plt.figure(figsize=(left + canvas.shape[1] / 62, 0.4 + canvas.shape[0] / 62))
    ax = fig.add_axes((left / (left + canvas.shape[1] / 62), 0, 1 - left / (left + canvas.shape[1] / 62),
                       canvas.shape[0] / 62 / (0.4 + canvas.shape[0] / 62)))
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    for i, t in enumerate(titles):
        r, k = divmod(i, cols)
        ax.text(k * w + side / 2, r * h + band - 2, t, ha="center", va="bottom", fontsize=6,
                color="firebrick" if red and red[i] else "black")
    for r, label in enumerate(row_labels or []):
        ax.text(-6, r * h + band + side / 2, label, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0, va="top")
    _save(fig, path)


def top_losses(X: np.ndarray, true: np.ndarray, pred: np.ndarray, prob: np.ndarray,
               classes: tuple[str, ...], path: Path, title: str = "", cols: int = 8) -> None:
    """Each image the model got most wrong, titled with its true class, the predicted class and
    the probability the model gave that prediction (red where the prediction is wrong)."""
    _mosaic([_rgb(x, 64) for x in X],
            [f"true {classes[t]}\npred {classes[p]} {q:.2f}" for t, p, q in zip(true, pred, prob, strict=True)],
            cols, path, title, red=[t != p for t, p in zip(true, pred, strict=True)])


def attention(X: np.ndarray, rows: list[tuple[str, Maps]], true: np.ndarray, prob: np.ndarray,
              classes: tuple[str, ...], path: Path, title: str = "") -> None:
    """The images in the first row (true class, prediction and its probability), then one row
    of maps laid over them per model or member (jet colours: red is where the map is high)."""
    n = len(X)
    pred = rows[0][1].target if rows else np.zeros(n, int)
    cells = [_rgb(x, 64) for x in X]
    titles = [f"{classes[true[j]]}\n-> {classes[pred[j]]} {prob[j]:.2f}" for j in range(n)]
    red = [bool(true[j] != pred[j]) for j in range(n)]
    for _, maps in rows:
        cells += [_heat(X[j], maps.maps[j], 64) for j in range(n)]
        titles += [""] * n
        red += [False] * n
    _mosaic(cells, titles, n, path, title, red,
            row_labels=["image"] + [f"{label}\n{maps.method}" for label, maps in rows])


def reliability(before: Reliability, after: Reliability, temperature: float, path: Path, title: str = "") -> None:
    """Accuracy against confidence per bin, before and after temperature scaling; the diagonal
    is perfect calibration, bars below it are overconfidence."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.8), sharey=True)
    for ax, rel, label in ((axes[0], before, "as trained"), (axes[1], after, f"temperature {temperature:.2f}")):
        width = np.diff(rel.edges)
        full = rel.count > 0
        ax.bar(rel.edges[:-1][full], rel.accuracy[full], width=width[full], align="edge", edgecolor="black",
               alpha=0.75, label="accuracy")
        ax.bar(rel.edges[:-1][full], (rel.confidence - rel.accuracy)[full], bottom=rel.accuracy[full],
               width=width[full], align="edge", color="salmon", alpha=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (probability of the predicted class)")
        ax.set_title(f"{label}: ECE {rel.ece:.3f}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)


def filters(weight: np.ndarray, path: Path, title: str = "") -> None:
    """First-layer kernels (C_out, 3, k, k) as small RGB images, each scaled to [0, 1]."""
    cells = []
    for w in weight:
        w = w.transpose(1, 2, 0)
        cells.append(_rgb((w - w.min()) / max(float(w.max() - w.min()), 1e-12), 48))
    _mosaic(cells, [str(i) for i in range(len(cells))], 8, path, title, side=48)


def feature_maps(image: np.ndarray, maps: np.ndarray, path: Path, title: str = "") -> None:
    """An image, then each channel of a layer's output for it (viridis, each on its own scale)."""
    from matplotlib import colormaps
    cells = [_rgb(image, 64)]
    for m in maps:
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
        cells.append(_rgb(colormaps["viridis"](m)[..., :3], 64))
    _mosaic(cells, ["input"] + [str(i) for i in range(len(maps))], 11, path, title)
