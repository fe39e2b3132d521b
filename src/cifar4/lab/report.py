"""The lab report: `report/index.html` (one self-contained file, images embedded, readable
offline) and `report/report.md` (with its figures beside it), written from measured results
only: the dataset, one section per experiment (architecture, parameter count with its
calculation, iterations, curves, accuracies, time, a computed overfitting verdict), the MLP vs
CNN comparison beside the session's own numbers, and the session's numeric questions answered.
"""

from __future__ import annotations

import base64
import html
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .. import io as cio
from .. import models, plots, runs
from ..config import Experiment
from ..config import from_dict as exp_from_dict
from ..config import read_toml
from ..data import Dataset, info
from ..data.split import make_split

# The practical session's own results (seed/ notebook), for comparison. Its MLPs and CNNs were
# fed raw 0-255 pixels: the notebook computed X/255.0 but split the unscaled X_cifar4.
SESSION_RESULTS: dict[str, dict[str, Any]] = {
    "mlp-raw": {"epochs": 4, "train": 0.2512, "test": 0.2494},
    "mlp-20": {"epochs": 10, "train": 0.2507, "test": 0.2564},
    "mlp-deep": {"epochs": 22, "train": 0.6312, "test": 0.5617},
    "mlp-overfit": {"epochs": 60, "train": 0.7673, "test": 0.6114},
    "mlp-regularized": {"epochs": 60, "train": 0.6651, "test": 0.5869},
    "cnn": {"epochs": 7, "train": 0.7643, "test": 0.6944},
    "cnn-overfit": {"epochs": 20, "train": 0.8677, "test": 0.7036},
    "cnn-augmented": {"epochs": 20, "train": 0.7289, "test": 0.7150},
    "cnn-augmented-long": {"epochs": 60, "train": 0.8046, "test": 0.7828},
    # the session's bonus: an ImageNet ResNet50 frozen at 32x32 under a 256-128 dense head
    "transfer-32": {"epochs": 15, "train": 0.8064, "test": 0.7314},
}

GAP_LIMIT = 0.05  # train - validation accuracy above this is called overfitting


def verdict(metrics: dict[str, Any], history: list[dict]) -> tuple[str, str]:
    """(verdict, the numbers behind it), from the final train/val accuracies (both measured in
    evaluation mode) and the validation-loss curve."""
    gap = metrics["train_accuracy"] - metrics["val_accuracy"]
    vl = [h["val_loss"] for h in history]
    best = int(np.argmin(vl))
    tail = vl[-3:]
    rise = float(np.mean(tail) - vl[best])
    nums = (f"train {metrics['train_accuracy']:.3f} - val {metrics['val_accuracy']:.3f} = gap "
            f"{gap * 100:.1f} points; val_loss lowest {vl[best]:.3f} at epoch {best + 1}, "
            f"last-3 mean {np.mean(tail):.3f}")
    if metrics["train_accuracy"] < 0.35:
        return "underfitting (chance level)", nums
    if gap > GAP_LIMIT and rise > 0.02 * max(vl[best], 1e-9) and best < len(vl) - 1:
        return "overfitting", nums
    if gap > GAP_LIMIT:
        return "overfitting (gap only; validation loss still flat)", nums
    return "no overfitting", nums


def param_lines(model: nn.Module) -> list[str]:
    """Each layer's parameter count as the session asks for it: (inputs + 1 bias) x units."""
    lines = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            b = 1 if m.bias is not None else 0
            lines.append(f"{name}: ({m.in_features} + {b}) x {m.out_features} = "
                         f"{(m.in_features + b) * m.out_features:,}")
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            b = 1 if m.bias is not None else 0
            n = (k * m.in_channels // m.groups + b) * m.out_channels
            frozen = "" if m.weight.requires_grad else " (frozen)"
            lines.append(f"{name}: ({m.kernel_size[0]}x{m.kernel_size[1]}x{m.in_channels // m.groups}"
                         f" + {b}) x {m.out_channels} = {n:,}{frozen}")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            lines.append(f"{name}: 4 x {m.num_features} = {4 * m.num_features:,} "
                         f"(scale, shift trainable{' (scale frozen)' if not m.weight.requires_grad else ''}; "
                         f"moving mean, variance not)")
    return lines


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table_md(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _table_html(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


class _Doc:
    """Writes the same content as Markdown and as HTML."""

    def __init__(self, figdir: Path):
        self.md: list[str] = []
        self.html: list[str] = []
        self.figdir = figdir

    def h(self, level: int, text: str, anchor: str = "") -> None:
        self.md.append("#" * level + " " + text)
        a = f' id="{anchor}"' if anchor else ""
        self.html.append(f"<h{level}{a}>{html.escape(text)}</h{level}>")

    def p(self, text: str) -> None:
        self.md.append(text)
        self.html.append(f"<p>{html.escape(text)}</p>")

    def pre(self, text: str) -> None:
        self.md.append("```\n" + text + "\n```")
        self.html.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, head: list[str], rows: list[list[str]]) -> None:
        self.md.append(_table_md(head, rows))
        self.html.append(_table_html(head, rows))

    def fig(self, src: Path, name: str, alt: str) -> None:
        dst = self.figdir / name
        shutil.copyfile(src, dst)
        self.md.append(f"![{alt}](figures/{name})")
        self.html.append(f'<img src="{_img(dst)}" alt="{html.escape(alt)}">')


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}pre{background:#f7f7f7;padding:8px;overflow-x:auto}
img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}"""


def write_report(entries: list[tuple[str, Path]], ds: Dataset, out_dir: str | Path,
                 title: str = "CIFAR-4 practical session: results") -> Path:
    """entries: (experiment name, finished run directory). Returns the index.html path."""
    out_dir = Path(out_dir)
    figdir = out_dir / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    doc = _Doc(figdir)
    doc.h(1, title)
    doc.p("Every number below was measured by cifar4 and read from the run directories; the "
          "session's numbers are the notebook's own, quoted for comparison.")

    # ---- dataset
    inf = info(ds)
    doc.h(2, "The dataset", "dataset")
    doc.p(f"{inf['images']:,} images of shape {tuple(inf['X_shape'][1:])}, {inf['X_dtype']}, from "
          f"{inf['source']} (sha256 of X {inf['X_sha256'][:16]}...). Pixel values "
          f"{inf['pixel_min']}-{inf['pixel_max']}; per-channel mean {inf['channel_mean']}, std "
          f"{inf['channel_std']} (after /255).")
    doc.table(["class", "images"], [[c, f"{n:,}"] for c, n in inf["class_counts"].items()])
    grid = figdir / "_samples.png"
    plots.sample_grid(ds.X, ds.Y, ds.classes, grid, per_class=8)
    doc.fig(grid, "samples.png", "sample images per class")

    metrics = {name: runs.read_metrics(d) for name, d in entries}
    first = next(iter(metrics.values()), None)
    if first:
        s = first["split"]
        full = make_split(ds, s["kind"], s["seed"]).sizes()
        doc.p(f"Split: {s['kind']} (seed {s['seed']}), as the session's two train_test_split calls: "
              f"{full['train']:,} train / {full['val']:,} validation / {full['test']:,} test images"
              + ("" if (s["train"], s["test"]) == (full["train"], full["test"]) else
                 f"; these runs used a subset: {s['train']:,} / {s['val']:,} / {s['test']:,}") + ".")

    # ---- experiments
    rows_cmp = []
    for name, folder in entries:
        m = metrics[name]
        exp: Experiment = exp_from_dict(read_toml(folder / "config.toml"))
        hist = runs.read_history(folder)
        loaded = runs.load_model(folder)
        v, nums = verdict(m, hist)
        doc.h(2, f"{name}", name)
        if exp.description:
            doc.p(exp.description)
        if m["model"] == "transfer":  # a 150-layer backbone: described, not tabulated
            o = m["model_options"]
            doc.p(f"Backbone {o['backbone']} ({o['weights']} weights) at {o['resolution']} px, "
                  f"{_finetune_text(o['finetune'])}; head: " + "; ".join(param_lines(loaded.model.head)) +
                  f". Total {m['params']:,} parameters ({m['trainable_params']:,} trainable).")
        else:
            doc.pre(models.summary(loaded.model, m["model"]).text())
            doc.p("Parameters, layer by layer: " + "; ".join(param_lines(loaded.model)) +
                  f". Total {m['params']:,} ({m['trainable_params']:,} trainable).")
        spe = m["steps_per_epoch"]
        doc.p(f"Training: {m['epochs']} epochs x ceil({m['split']['train']:,} / {exp.train.batch_size}) "
              f"= {m['epochs']} x {spe} = {m['iterations']:,} iterations (parameter updates); each "
              f"training image is used {m['epochs']} times. Optimizer {exp.train.optimizer}, "
              f"pixels {'scaled to [0,1]' if exp.data.scale else 'raw 0-255'}"
              + (", augmentation " + ", ".join(f"{k}={val}" for k, val in exp.augment.model_dump().items() if val)
                 if any(exp.augment.model_dump().values()) else "") + ".")
        doc.fig(folder / "curves.png", f"{name}-curves.png", f"{name} training curves")
        sess = SESSION_RESULTS.get(name)
        doc.table(["", "train", "validation", "test"],
                  [["accuracy", f"{m['train_accuracy']:.4f}", f"{m['val_accuracy']:.4f}", f"{m['test_accuracy']:.4f}"],
                   ["loss", f"{m['train_loss']:.4f}", f"{m['val_loss']:.4f}", f"{m['test_loss']:.4f}"]]
                  + ([["session (accuracy)", f"{sess['train']:.4f}", "", f"{sess['test']:.4f}"]] if sess else []))
        doc.p(f"Time: {m['train_seconds']:.1f} s of training, {m['seconds_per_epoch']:.2f} s per epoch "
              f"({m['precision']}, {m['machine']['device']}, {m['machine']['cpu']}).")
        doc.p(f"Overfitting verdict: {v}. ({nums}; the limit is a gap of {GAP_LIMIT * 100:.0f} points.)")
        if name == "mlp-raw" or (not exp.data.scale and m["train_accuracy"] < 0.35):
            doc.p(f"Why it fails: the inputs are raw 0-255 pixels, so the first layer's outputs are "
                  f"huge, the first-epoch loss is {hist[0]['loss']:.1f} (chance is ln 4 = 1.386), the "
                  f"big early updates leave the ReLU units dead, and the network predicts one class "
                  f"for every image: accuracy at chance. Scaling the pixels to [0,1] fixes it (mlp-20).")
        rows_cmp.append([name, m["model"], f"{m['params']:,}", str(m["epochs"]), f"{m['train_accuracy']:.4f}",
                         f"{m['val_accuracy']:.4f}", f"{m['test_accuracy']:.4f}",
                         f"{(m['train_accuracy'] - m['val_accuracy']) * 100:.1f}",
                         f"{m['seconds_per_epoch']:.2f}", f"{m['train_seconds']:.0f}",
                         f"{sess['test']:.4f} ({sess['epochs']} ep.)" if sess else "-"])

    # ---- comparison
    doc.h(2, "MLP vs CNN", "comparison")
    doc.table(["experiment", "model", "params", "epochs", "train acc", "val acc", "test acc",
               "gap (points)", "s/epoch", "train s", "session test acc"], rows_cmp)
    mlps = [(n, metrics[n]) for n, _ in entries if metrics[n]["model"].startswith("mlp")]
    cnns = [(n, metrics[n]) for n, _ in entries if metrics[n]["model"] == "cnn"]
    if mlps and cnns:
        bm = max(mlps, key=lambda t: t[1]["test_accuracy"])
        bc = max(cnns, key=lambda t: t[1]["test_accuracy"])
        doc.p(f"Best MLP: {bm[0]}, {bm[1]['params']:,} parameters, test accuracy "
              f"{bm[1]['test_accuracy']:.4f}. Best session CNN: {bc[0]}, {bc[1]['params']:,} parameters "
              f"({bm[1]['params'] / bc[1]['params']:.0f}x fewer), test accuracy {bc[1]['test_accuracy']:.4f} "
              f"({(bc[1]['test_accuracy'] - bm[1]['test_accuracy']) * 100:+.1f} points). Convolutions share "
              f"their weights across positions and see local patterns, which dense layers on flattened "
              f"pixels must learn separately for every position.")

    # ---- transfer learning
    transfers = [(n, metrics[n]) for n, _ in entries if metrics[n]["model"] == "transfer"]
    if transfers:
        _transfer_section(doc, transfers)

    # ---- the session's questions with numeric answers
    doc.h(2, "The session's questions, answered from the runs", "questions")
    qa = []
    if "mlp-raw" in metrics:
        m = metrics["mlp-raw"]
        qa.append(["How many times is each image used in training (4 epochs)?", f"{m['epochs']} times"])
        qa.append(["How many training iterations (parameter updates)?",
                   f"{m['epochs']} x ceil({m['split']['train']:,}/100) = {m['iterations']:,}"])
        qa.append(["What does the raw-pixel MLP reach?", f"train {m['train_accuracy']:.4f}, test "
                   f"{m['test_accuracy']:.4f} (chance: 0.25)"])
    probe = models.build("mlp-20")
    qa.append(["Trainable parameters of the 20-unit MLP?", "(3072 + 1) x 20 + (20 + 1) x 4 = "
               f"{models.count_params(probe)[0]:,}"])
    cnn_rows = models.summary(models.build("cnn")).rows
    qa.append(["Output shape after Conv2D(32, 3) with default 'valid' padding?", f"{cnn_rows[1][1]}: "
               "32 - 3 + 1 = 30, no padding"])
    qa.append(["Output shape after MaxPooling2D() with defaults?", f"{cnn_rows[2][1]}: floor(30 / 2) = 15"])
    for n in ("mlp-overfit", "cnn-overfit", "mlp-regularized", "cnn-augmented-long"):
        if n in metrics:
            m = metrics[n]
            qa.append([f"Train-validation gap of {n} after {m['epochs']} epochs?",
                       f"{(m['train_accuracy'] - m['val_accuracy']) * 100:.1f} points (train "
                       f"{m['train_accuracy']:.4f}, val {m['val_accuracy']:.4f}, test {m['test_accuracy']:.4f})"])
    doc.table(["question", "answer"], qa)

    md = "\n\n".join(doc.md) + "\n"
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) +
            f"</title><style>{CSS}</style></head><body>" + "\n".join(doc.html) + "</body></html>\n")
    cio.write_text(out_dir / "report.md", md)
    cio.write_text(out_dir / "index.html", page)
    grid.unlink(missing_ok=True)
    return out_dir / "index.html"


def _finetune_text(finetune: Any) -> str:
    if finetune == 0:
        return "frozen"
    return "fine-tuned whole" if finetune == "all" else f"top {finetune} blocks fine-tuned"


def transfer_mode(o: dict[str, Any]) -> str:
    if o["finetune"] != 0:
        return "(c) fine-tuned"
    return "(a) frozen, native 32 px" if int(o["resolution"]) <= 32 else "(b) frozen, upsampled, cached features"


def _transfer_section(doc: "_Doc", transfers: list[tuple[str, dict[str, Any]]]) -> None:
    sess = SESSION_RESULTS["transfer-32"]
    doc.h(2, "Transfer learning", "transfer")
    doc.p(f"The session froze an ImageNet ResNet50 at the native 32x32 under a 256-128 dense head and "
          f"reached {sess['test']:.4f} test accuracy ({sess['train']:.4f} train), below its own small "
          f"CNN. Here the backbone's weights come from an installed package (no download), its own "
          f"input normalization is applied, and the modes are compared on the same split.")
    rows = []
    for name, m in transfers:
        o = m["model_options"]
        f = m.get("features")
        feat = (f"{f['seconds']:.0f} s ({f['cache']}, {f['extracted']:,} images computed, "
                f"{len(f['views'])} view{'s' if len(f['views']) > 1 else ''})") if f else "-"
        rows.append([name, transfer_mode(o), f"{o['backbone']} ({o['weights']})", f"{o['resolution']} px",
                     f"{m['trainable_params']:,} / {m['params']:,}", f"{m['train_accuracy']:.4f}",
                     f"{m['test_accuracy']:.4f}", feat, f"{m['fit_seconds']:.1f} s"])
    doc.table(["experiment", "mode", "backbone", "input", "trainable / total params", "train acc",
               "test acc", "feature extraction", "training"], rows)
    best = max(transfers, key=lambda t: t[1]["test_accuracy"])
    doc.p(f"Best: {best[0]}, test accuracy {best[1]['test_accuracy']:.4f}, "
          f"{(best[1]['test_accuracy'] - sess['test']) * 100:+.1f} points against the session's "
          f"{sess['test']:.4f}.")
    by = {n: m for n, m in transfers}
    pre = [m for m in by.values() if m["model_options"]["weights"] != "none"]
    rnd = [m for m in by.values() if m["model_options"]["weights"] == "none"]
    for r in rnd:
        twin = next((p for p in pre if {k: v for k, v in p["model_options"].items() if k != "weights"}
                     == {k: v for k, v in r["model_options"].items() if k != "weights"}), None)
        if twin:
            doc.p(f"Do the ImageNet weights carry? The same network and head with a randomly "
                  f"initialised backbone reach {r['test_accuracy']:.4f}; the pretrained features "
                  f"{twin['test_accuracy']:.4f} ({(twin['test_accuracy'] - r['test_accuracy']) * 100:+.1f} "
                  f"points).")
    small = [m for m in pre if int(m["model_options"]["resolution"]) <= 32 and m["model_options"]["finetune"] == 0]
    big = [m for m in pre if int(m["model_options"]["resolution"]) > 32 and m["model_options"]["finetune"] == 0]
    if small and big:
        a, b = small[0], max(big, key=lambda m: m["test_accuracy"])
        doc.p(f"Why 32x32 is the wrong size: ImageNet networks downsample 32 times, so a 32x32 "
              f"image ends as a single 1x1 cell after features tuned to objects some 100-200 pixels "
              f"wide; upsampled to {b['model_options']['resolution']} px the same frozen network gives "
              f"{b['test_accuracy']:.4f} instead of {a['test_accuracy']:.4f}.")


def compare_runs(run_dirs: list[str | Path], out_png: str | Path | None = None) -> list[dict[str, Any]]:
    """Key numbers of several runs (and their validation curves overlaid in out_png)."""
    rows, curves = [], []
    for r in run_dirs:
        folder = runs.resolve_run(r)
        m = runs.read_metrics(folder)
        rows.append({"run": str(folder), "experiment": m["experiment"], "model": m["model"],
                     "params": m["params"], "epochs": m["epochs"], "train_accuracy": m["train_accuracy"],
                     "val_accuracy": m["val_accuracy"], "test_accuracy": m["test_accuracy"],
                     "gap": m["train_accuracy"] - m["val_accuracy"],
                     "seconds_per_epoch": m["seconds_per_epoch"], "train_seconds": m["train_seconds"]})
        curves.append((f"{m['experiment']} ({folder.name})", runs.read_history(folder)))
    if out_png:
        plots.compare(curves, Path(out_png))
    return rows


