"""The lab report: `report/index.html` (one self-contained file, images embedded, readable
offline) and `report/report.md` (with its figures beside it), written from measured results
only: the dataset, one section per experiment (architecture, parameter count with its
calculation, iterations, curves, accuracies, time, a computed overfitting verdict, and what
`cifar4 interpret` finds: the most confused pair, the top losses, Grad-CAM maps, calibration),
the overfitting CNN's mistakes beside the regularised one's, the MLP vs CNN comparison beside
the session's own numbers, and the session's numeric questions answered.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from torch import nn

from .. import interpret, models, plots, record, runs
from .. import io as cio
from ..config import Experiment
from ..data import Dataset, dataset_name, info
from ..data.split import make_split
from ..errors import RunError
from . import SESSION_PLAN, Reference

GAP_LIMIT = SESSION_PLAN.gap_limit  # train - validation accuracy above this is called overfitting
_TEMPLATES = Environment(loader=PackageLoader("cifar4.lab", "templates"), keep_trailing_newline=True,
                         undefined=StrictUndefined)


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


def _head(model: nn.Module) -> nn.Module:
    head = getattr(model, "head", None)
    return head if isinstance(head, nn.Module) else model


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@dataclass
class Block:
    """One piece of a report section; the templates render each kind as HTML and Markdown."""

    kind: str                        # p, pre, table, fig
    text: str = ""
    head: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    name: str = ""                   # fig: file name under figures/
    alt: str = ""
    data_uri: str = ""               # fig: the image embedded in the HTML page
    figs: list[Block] = field(default_factory=list)  # figs: figures side by side


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def pre(self, text: str) -> None:
        self.blocks.append(Block("pre", text))

    def table(self, head: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(Block("table", head=head, rows=rows))

    def fig(self, src: Path, figdir: Path, name: str, alt: str) -> None:
        self.blocks.append(_figure(src, figdir, name, alt))

    def figs(self, figures: list[tuple[Path, str, str]], figdir: Path) -> None:
        """(source, name, caption) figures shown side by side."""
        self.blocks.append(Block("figs", figs=[_figure(src, figdir, name, alt) for src, name, alt in figures]))


def _figure(src: Path, figdir: Path, name: str, alt: str) -> Block:
    dst = figdir / name
    if src != dst:
        cio.write_bytes(dst, src.read_bytes())
    return Block("fig", name=name, alt=alt, data_uri=_img(dst))


def write_report(entries: list[tuple[str, Path]], ds: Dataset, out_dir: str | Path,
                 title: str | None = None, runs_dir: str | Path | None = None) -> Path:
    """entries: (experiment name, finished run directory). Writes index.html (self-contained)
    and report.md (figures beside it) from the templates; returns the index.html path.
    runs_dir: the user's runs folder (`cifar4 train`'s runs/), whose finished runs join the
    lab's on the accuracy / time frontier, one panel per dataset (CIFAR-4 beside CIFAR-10)."""
    out_dir = Path(out_dir)
    figdir = out_dir / "figures"
    try:
        figdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot write the report in '{out_dir}': {e.strerror or e}") from None
    metrics = {name: runs.read_metrics(d) for name, d in entries}
    comparable = ds.is_cifar4  # the session's classes (a subset of its images, as --quick uses, still compares)
    intro = Section("", "")
    intro.p(f"Dataset: {dataset_name(ds)}. Every number below was measured by cifar4 and read from the "
            f"run directories; " + ("the session's numbers are the notebook's own, quoted for comparison."
                                    if comparable else
                                    "the session's numbers are left out: they were measured on CIFAR-4 "
                                    "(bird, cat, frog, horse), so they are not comparable with these."))
    reference = SESSION_PLAN.reference if comparable else {}
    sections = [_dataset_section(ds, metrics, figdir)]
    interps = {name: interpretation(folder, ds, out_dir / "interpret" / name) for name, folder in entries}
    sections += [_ensemble_section(name, folder, metrics[name], figdir, interps)
                 if metrics[name]["model"] == "ensemble"
                 else _experiment_section(name, folder, metrics[name], figdir, reference, interps)
                 for name, folder in entries]
    pair = _overfit_pair(entries, metrics)
    if pair:
        sections.append(_mistakes_section(pair, metrics, interps, figdir))
    sections.append(_comparison_section(entries, metrics, reference))
    sections.append(_frontier_section(metrics, figdir, Path(runs_dir) if runs_dir else None,
                                      {Path(d).resolve() for _, d in entries}))
    transfers = [(n, metrics[n]) for n, _ in entries if metrics[n]["model"] == "transfer"]
    if transfers:
        sections.append(_transfer_section(transfers, reference))
    sections.append(_questions_section(metrics, ds.num_classes))
    default_title = SESSION_PLAN.title if ds.is_cifar4 else f"{SESSION_PLAN.title} on {dataset_name(ds)}"
    context = {"title": title or default_title, "intro": intro.blocks, "sections": sections}
    md = _TEMPLATES.get_template("report.md.j2").render(context)
    page = _TEMPLATES.select_template(["report.html.j2"]).render(context)
    cio.write_text(out_dir / "report.md", md)
    cio.write_text(out_dir / "index.html", page)
    return out_dir / "index.html"


def _dataset_section(ds: Dataset, metrics: dict[str, dict[str, Any]], figdir: Path) -> Section:
    inf = info(ds)
    s = Section("The dataset", "dataset")
    s.p(f"{inf['images']:,} images of shape {tuple(inf['X_shape'][1:])}, {inf['X_dtype']}, from "
        f"{source_name(ds)} (sha256 of its pixels and labels {ds.checksum()[:16]}...). Pixel values "
        f"{inf['pixel_min']}-{inf['pixel_max']}; per-channel mean {inf['channel_mean']}, std "
        f"{inf['channel_std']} (after /255).")
    s.table(["class", "images"], [[c, f"{n:,}"] for c, n in inf["class_counts"].items()])
    plots.sample_grid(ds.X, ds.Y, ds.classes, figdir / "samples.png", per_class=8)
    s.fig(figdir / "samples.png", figdir, "samples.png", "sample images per class")
    first = next(iter(metrics.values()), None)
    if first:
        sp = first["split"]
        full = make_split(ds, sp["kind"], sp["seed"]).sizes()
        s.p(f"Split: {sp['kind']} (seed {sp['seed']}), as the session's two train_test_split calls: "
            f"{full['train']:,} train / {full['val']:,} validation / {full['test']:,} test images"
            + ("" if (sp["train"], sp["test"]) == (full["train"], full["test"]) else
               f"; these runs used a subset: {sp['train']:,} / {sp['val']:,} / {sp['test']:,}") + ".")
    return s


def _experiment_section(name: str, folder: Path, m: dict[str, Any], figdir: Path,
                        reference: dict[str, Reference], interps: dict[str, dict[str, Any]]) -> Section:
    exp: Experiment = record.read_experiment(folder)
    hist = runs.read_history(folder)
    loaded = runs.load_model(folder)
    v, nums = verdict(m, hist)
    s = Section(name, name)
    if exp.description:
        s.p(exp.description)
    if m["model"] == "transfer":  # a 150-layer backbone: described, not tabulated
        o = m["model_options"]
        s.p(f"Backbone {o['backbone']} ({o['weights']} weights) at {o['resolution']} px, "
            f"{_finetune_text(o)}{_backbone_trained(loaded.model)}; head: "
            + "; ".join(param_lines(_head(loaded.model))) +
            f". Total {m['params']:,} parameters ({m['trainable_params']:,} trainable).")
    else:
        s.pre(models.summary(loaded.model, m["model"]).text())
        s.p("Parameters, layer by layer: " + "; ".join(param_lines(loaded.model)) +
            f". Total {m['params']:,} ({m['trainable_params']:,} trainable).")
    aug = {k: val for k, val in exp.augment.model_dump().items() if val}
    s.p(f"Training: {m['epochs']} epochs x ceil({m['split']['train']:,} / {exp.train.batch_size}) "
        f"= {m['epochs']} x {m['steps_per_epoch']} = {m['iterations']:,} iterations (parameter updates); "
        f"each training image is used {times(m['epochs'])}. Optimizer {exp.train.optimizer}, "
        f"pixels {'scaled to [0,1]' if exp.data.scale else 'raw 0-255'}"
        + (", augmentation " + ", ".join(f"{k}={val}" for k, val in aug.items()) if aug else "") + ".")
    s.fig(folder / "curves.png", figdir, f"{name}-curves.png", f"{name} training curves")
    ref = reference.get(name)
    s.table(["", "train", "validation", "test"],
            [["accuracy", f"{m['train_accuracy']:.4f}", f"{m['val_accuracy']:.4f}", f"{m['test_accuracy']:.4f}"],
             ["loss", f"{m['train_loss']:.4f}", f"{m['val_loss']:.4f}", f"{m['test_loss']:.4f}"]]
            + ([["session (accuracy)", f"{ref.train:.4f}", "", f"{ref.test:.4f}"]] if ref else []))
    s.p(f"Time: {m['train_seconds']:.1f} s of training, {m['seconds_per_epoch']:.2f} s per epoch "
        f"({m['precision']}, {m['machine']['device']}, {m['machine']['cpu']}).")
    s.p(f"Overfitting verdict: {v}. ({nums}; the limit is a gap of {GAP_LIMIT * 100:.0f} points.)")
    if not exp.data.scale:  # raw 0-255 pixels: what the session's 'not working' MLP shows
        chance = 1 / len(m["per_class_accuracy"])
        s.p(f"Why it fails: the inputs are raw 0-255 pixels, so the first layer's outputs are "
            f"huge: the first-epoch loss is {hist[0]['loss']:.1f} (chance is ln {len(m['per_class_accuracy'])}"
            f" = {np.log(len(m['per_class_accuracy'])):.3f}), and the big early updates leave ReLU units "
            f"dead. " + (f"Here the network predicts one class for every image: accuracy at chance "
                         f"({m['train_accuracy']:.3f} train, chance {chance:.2f}). "
                         if m["train_accuracy"] < chance + 0.1 else
                         f"On this data it still reached {m['train_accuracy']:.3f} train accuracy. ")
            + "Scaling the pixels to [0,1] fixes it (data.scale = true).")
    _interpretation(s, name, interps[name], figdir)
    return s


def times(n: int) -> str:
    """'once', '2 times': how often each training image is used."""
    return "once" if n == 1 else f"{n:,} times"


def source_name(ds: Dataset) -> str:
    """The dataset's file name and where it came from, without the folder it sits in on the
    machine that ran the lab (a report is read elsewhere)."""
    path, _, origin = ds.source.partition(" (")
    return Path(path).name + (f" ({origin}" if origin else "")


def interpretation(folder: Path, ds: Dataset, spare: Path) -> dict[str, Any]:
    """What `cifar4 interpret` finds for a run on the test split, with the folder its figures
    are in ("folder"): read from <run>/interpret/ when it is of these weights and this data,
    else computed there, or in `spare` where the run folder cannot be written (attention maps
    only where the 'interpret' extra is installed: the report does not need it)."""
    res = interpret.cached(folder, ds)
    if res is not None:
        return {**res, "folder": str(folder / interpret.FOLDER)}
    kw: dict[str, Any] = {"data": ds, "device": "cpu", "with_attention": interpret.captum_available()}
    try:
        return {**interpret.interpret_run(folder, **kw), "folder": str(folder / interpret.FOLDER)}
    except RunError:  # a read-only run folder: the interpretation goes beside the report
        return {**interpret.interpret_run(folder, spare, **kw), "folder": str(spare)}


def _interpretation(s: Section, name: str, res: dict[str, Any], figdir: Path) -> None:
    """A sentence from the interpretation's numbers, the per-class table, the top losses, the
    attention maps."""
    out = Path(res["folder"])
    s.p(f"Interpretation (test split, {res['images']:,} images): {res['summary']}")
    rep = res["classification_report"]
    s.table(["class", "precision", "recall", "F1", "images"],
            [[c, f"{rep[c]['precision']:.3f}", f"{rep[c]['recall']:.3f}", f"{rep[c]['f1-score']:.3f}",
              f"{int(rep[c]['support']):,}"] for c in _classes(res)])
    figs = [(out / res["figures"]["top_losses"], f"{name}-top-losses.png",
             f"{name}: the test images with the highest loss (true class, prediction, its probability)")]
    if "attention" in res["figures"]:
        figs.append((out / res["figures"]["attention"], f"{name}-attention.png",
                     f"{name}: {res['attention'][0]['method']} maps for the predicted class"))
    for src, fig_name, alt in figs:
        s.fig(src, figdir, fig_name, alt)
    if "attention" not in res["figures"]:
        s.p("Attention maps need the 'interpret' extra: pip install 'cifar4[interpret]'.")


def _classes(res: dict[str, Any]) -> list[str]:
    return [k for k in res["classification_report"] if k not in ("accuracy", "macro avg", "weighted avg")]


def _ensemble_section(name: str, folder: Path, m: dict[str, Any], figdir: Path,
                      interps: dict[str, dict[str, Any]]) -> Section:
    """An ensemble run: its members (each a run of its own), their weights and numbers."""
    s = Section(name, name)
    exp: Experiment = record.read_experiment(folder)
    if exp.description:
        s.p(exp.description)
    s.p(f"The class probabilities of {len(m['members'])} trained models averaged with weights "
        f"{', '.join(f'{w:.2f}' for w in m['model_options']['weights'])} "
        f"({'chosen on the validation split' if m['weights_chosen'] == 'validation' else m['weights_chosen']}); "
        f"{m['params']:,} parameters in all.")
    s.table(["member", "weight", "val acc", "test acc", "whole run s"],
            [[mm["experiment"], f"{mm['weight']:.2f}", f"{mm['val_accuracy']:.4f}", f"{mm['test_accuracy']:.4f}",
              f"{mm['total_seconds']:.0f}" if mm.get("total_seconds") else "-"] for mm in m["members"]]
            + [["ensemble", "", f"{m['val_accuracy']:.4f}", f"{m['test_accuracy']:.4f}", f"{m['total_seconds']:.0f}"]])
    s.fig(folder / "curves.png", figdir, f"{name}-curves.png", f"{name}: the members' validation curves")
    s.p(f"Time: {m['total_seconds']:.0f} s for the whole run, members included "
        f"({m['machine']['device']}, {m['machine']['cpu']}).")
    _interpretation(s, name, interps[name], figdir)
    return s


def _regularised(folder: Path) -> bool:
    """Trained with a cure for overfitting: augmentation, dropout, batch norm, L2 or weight decay."""
    exp: Experiment = record.read_experiment(folder)
    opts = exp.model.options
    return any(bool(v) for v in exp.augment.model_dump().values()) or bool(opts.get("dropout")) \
        or bool(opts.get("batchnorm")) or bool(exp.train.l2) or bool(exp.train.weight_decay)


def _overfit_pair(entries: list[tuple[str, Path]],
                  metrics: dict[str, dict[str, Any]]) -> tuple[tuple[str, Path], tuple[str, Path]] | None:
    """(the session CNN run with the largest train-validation gap beyond the limit, the
    regularised session CNN run with the best validation accuracy), or None."""
    cnns = [(n, f, _regularised(f)) for n, f in entries if metrics[n]["model"] == "cnn"]
    gap = {n: metrics[n]["train_accuracy"] - metrics[n]["val_accuracy"] for n, _, _ in cnns}
    over = [(n, f) for n, f, cured in cnns if not cured and gap[n] > GAP_LIMIT]
    cured = [(n, f) for n, f, c in cnns if c]
    if not over or not cured:
        return None
    return max(over, key=lambda t: gap[t[0]]), max(cured, key=lambda t: metrics[t[0]]["val_accuracy"])


def _mistakes_section(pair: tuple[tuple[str, Path], tuple[str, Path]], metrics: dict[str, dict[str, Any]],
                      interps: dict[str, dict[str, Any]], figdir: Path) -> Section:
    """The overfitting CNN's top losses beside the regularised one's, and how sure each was."""
    s = Section("What overfitting gets wrong", "mistakes")
    (over, _), (cured, _) = pair
    gap = {n: (metrics[n]["train_accuracy"] - metrics[n]["val_accuracy"]) * 100 for n in (over, cured)}
    ece = {n: interps[n]["calibration"]["ece_before"] for n in (over, cured)}
    s.p(f"{over} (train-validation gap {gap[over]:.1f} points) beside {cured} (gap {gap[cured]:.1f}): test "
        f"accuracy {metrics[over]['test_accuracy']:.4f} against {metrics[cured]['test_accuracy']:.4f}; "
        f"{_sureness(over, interps[over])}; {_sureness(cured, interps[cured])}; the expected calibration error "
        f"is {ece[over]:.3f} against {ece[cured]:.3f}.")
    s.figs([(Path(interps[n]["folder"]) / interps[n]["figures"]["top_losses"], f"{n}-top-losses.png",
             f"{n}: top losses") for n, _ in pair], figdir)
    return s


def _sureness(name: str, res: dict[str, Any]) -> str:
    """How sure a model was of its worst mistakes (the wrong predictions among its top losses)."""
    wrong = [t["probability"] for t in res["top_losses"] if t["true"] != t["predicted"]]
    if not wrong:
        return f"{name} made no mistake on the test split"
    return (f"{name}'s {len(wrong)} worst mistakes gave the wrong class a mean probability of "
            f"{float(np.mean(wrong)):.2f}")


def _frontier_section(metrics: dict[str, dict[str, Any]], figdir: Path, runs_dir: Path | None,
                      lab_dirs: set[Path]) -> Section:
    """Test accuracy against the seconds each run took from its start to metrics.json: the
    lab's runs and the finished runs of the user's runs folder, one panel per dataset (as each
    run's metrics.json records its classes), several seeds of a run one point with their spread."""
    s = Section("What a minute buys: accuracy against time", "frontier")
    by_data: dict[str, list[tuple[str, str, float, float]]] = {}
    for dataset, label, series, secs, acc in _frontier_runs(metrics, runs_dir, lab_dirs):
        by_data.setdefault(dataset, []).append((label, series, secs, acc))
    if not by_data:
        s.p("No run recorded its whole time.")
        return s
    panels = {d: plots.frontier_points(by_data[d]) for d in plots.panel_order(by_data)}
    plots.frontier_panels(panels, figdir / "frontier.png", title="test accuracy against whole-run seconds")
    s.fig(figdir / "frontier.png", figdir, "frontier.png", "test accuracy against whole-run seconds, "
          "per dataset: " + ", ".join(panels))
    rows, said = [], []
    for d, pts in panels.items():
        front = plots.on_frontier(pts)
        rows += [[d, p.series, p.label, str(p.runs), f"{p.seconds:.0f}", f"{p.accuracy:.4f}"
                  + (f" +- {p.accuracy_std:.4f}" if p.runs > 1 else ""), "yes" if (p.series, p.label) in front else ""]
                 for p in sorted(pts, key=lambda p: (p.series, p.seconds))]
        fast, best = min(pts, key=lambda p: p.seconds), max(pts, key=lambda p: p.accuracy)
        said.append(f"on {d}, the fastest, {fast.label} ({fast.series}), reached {fast.accuracy:.4f} in "
                    f"{fast.seconds:.0f} s" + ("" if best is fast else
                                              f"; the most accurate, {best.label} ({best.series}), "
                                              f"{best.accuracy:.4f} in {best.seconds:.0f} s "
                                              f"({best.seconds / max(fast.seconds, 1e-9):.1f}x the time)"))
    s.table(["dataset", "from", "run", "runs", "whole run s", "test acc", "on the frontier"], rows)
    s.p(_capital("; ".join(said)) + ". A run is on the frontier when no faster run from the same "
        "place reached its test accuracy. Times are from the run's start to its metrics.json "
        "(loading, feature extraction, training, the final evaluation), on the machine that ran it.")
    return s


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _frontier_runs(metrics: dict[str, dict[str, Any]], runs_dir: Path | None, lab_dirs: set[Path]
                   ) -> list[tuple[str, str, str, float, float]]:
    """(dataset, label, where from, seconds, test accuracy) of the lab's runs and of the
    finished runs under `runs_dir` that recorded both (a held-out test has no accuracy)."""
    found = [(name, "this lab", m) for name, m in metrics.items()]
    if runs_dir is not None and runs_dir.is_dir():
        for d in sorted(p for p in runs_dir.iterdir() if (p / record.METRICS_FILE).is_file()
                        and p.resolve() not in lab_dirs):  # a lab inside runs/: its runs drawn once
            try:
                m = runs.read_metrics(d)
            except RunError:  # a metrics.json of another version, or damaged: not this figure's
                continue
            budget = (m.get("time_budget") or {}).get("seconds")
            found.append((m["experiment"] + (f" --time-budget {budget:g}" if budget else ""), f"{runs_dir}/", m))
    return [(_dataset_of(m), label, where, float(m["total_seconds"]), float(m["test_accuracy"]))
            for label, where, m in found if m.get("total_seconds") and m.get("test_accuracy") is not None]


def _dataset_of(m: dict[str, Any]) -> str:
    """CIFAR-4, CIFAR-10 or the number of classes, from the classes a run's metrics.json scored."""
    classes = list(m.get("per_class_accuracy") or {})
    return plots.dataset_title(classes) if classes else Path(m["data"]["source"]).name


def _comparison_section(entries: list[tuple[str, Path]], metrics: dict[str, dict[str, Any]],
                        reference: dict[str, Reference]) -> Section:
    s = Section("MLP vs CNN", "comparison")
    rows = []
    for name, _ in entries:
        m, ref = metrics[name], reference.get(name)
        rows.append([name, m["model"], f"{m['params']:,}", str(m["epochs"] or "-"), f"{m['train_accuracy']:.4f}",
                     f"{m['val_accuracy']:.4f}", f"{m['test_accuracy']:.4f}",
                     f"{(m['train_accuracy'] - m['val_accuracy']) * 100:.1f}",
                     f"{m['seconds_per_epoch']:.2f}" if m.get("seconds_per_epoch") else "-",
                     f"{m['train_seconds']:.0f}",
                     f"{ref.test:.4f} ({ref.epochs} ep.)" if ref else "-"])
    s.table(["experiment", "model", "params", "epochs", "train acc", "val acc", "test acc",
             "gap (points)", "s/epoch", "train s", "session test acc"], rows)
    mlps = [(n, metrics[n]) for n, _ in entries if metrics[n]["model"].startswith("mlp")]
    cnns = [(n, metrics[n]) for n, _ in entries if metrics[n]["model"] == "cnn"]
    if mlps and cnns:  # chosen on validation, as the session teaches
        bm = max(mlps, key=lambda t: t[1]["val_accuracy"])
        bc = max(cnns, key=lambda t: t[1]["val_accuracy"])
        s.p(f"Best MLP (by validation accuracy): {bm[0]}, {bm[1]['params']:,} parameters, test accuracy "
            f"{bm[1]['test_accuracy']:.4f}. Best session CNN: {bc[0]}, {bc[1]['params']:,} parameters "
            f"({bm[1]['params'] / bc[1]['params']:.0f}x fewer), test accuracy {bc[1]['test_accuracy']:.4f} "
            f"({(bc[1]['test_accuracy'] - bm[1]['test_accuracy']) * 100:+.1f} points). Convolutions share "
            f"their weights across positions and see local patterns, which dense layers on flattened "
            f"pixels must learn separately for every position.")
    return s


def _questions_section(metrics: dict[str, dict[str, Any]], num_classes: int) -> Section:
    q = SESSION_PLAN.questions
    s = Section("The session's questions, answered from the runs", "questions")
    qa = []
    if q.iterations in metrics:
        m = metrics[q.iterations]
        qa.append([f"How many times is each image used in training ({m['epochs']} epochs)?", times(m["epochs"])])
        qa.append(["How many training iterations (parameter updates)?",
                   f"{m['epochs']} epochs x {m['steps_per_epoch']} batches of the {m['split']['train']:,} "
                   f"training images = {m['iterations']:,}"])
        qa.append([f"What does {q.iterations} reach?", f"train {m['train_accuracy']:.4f}, test "
                   f"{m['test_accuracy']:.4f} (chance: {1 / len(m['per_class_accuracy']):.2f})"])
    probe = models.build(q.parameters_model, num_classes=num_classes)
    qa.append([f"Trainable parameters of {q.parameters_model}?",
               " + ".join(line.split(": ", 1)[1] for line in param_lines(probe)) +
               f" = {models.count_params(probe)[0]:,}"])
    rows = models.summary(models.build(q.shapes_model, num_classes=num_classes)).rows
    qa.append(["Output shape after Conv2D(32, 3) with default 'valid' padding?", f"{rows[1][1]}: "
               "32 - 3 + 1 = 30, no padding"])
    qa.append(["Output shape after MaxPooling2D() with defaults?", f"{rows[2][1]}: floor(30 / 2) = 15"])
    for n in q.gaps:
        if n in metrics:
            m = metrics[n]
            qa.append([f"Train-validation gap of {n} after {m['epochs']} epochs?",
                       f"{(m['train_accuracy'] - m['val_accuracy']) * 100:.1f} points (train "
                       f"{m['train_accuracy']:.4f}, val {m['val_accuracy']:.4f}, test {m['test_accuracy']:.4f})"])
    s.table(["question", "answer"], qa)
    return s


def _finetune_text(o: dict[str, Any]) -> str:
    tuned = int(o.get("tune_blocks") or 0)  # runs from before the option have no key
    if tuned:
        return (f"top {tuned} block{'s' if tuned > 1 else ''} and the head convolution trained on cached "
                f"activations, the blocks below frozen")
    finetune = o["finetune"]
    if finetune == 0:
        return "frozen"
    return "fine-tuned whole" if finetune == "all" else f"top {finetune} blocks fine-tuned"


def _backbone_trained(model: nn.Module) -> str:
    """The backbone's trainable parameters, where it has any: the head's lines below leave
    them out."""
    backbone = getattr(model, "backbone", None)
    n = models.count_params(backbone)[0] if isinstance(backbone, nn.Module) else 0
    return f" ({n:,} of its parameters trainable)" if n else ""


def transfer_mode(o: dict[str, Any]) -> str:
    if int(o.get("tune_blocks") or 0):
        return "(d) top blocks tuned on cached activations"
    if o["finetune"] != 0:
        return "(c) fine-tuned"
    return "(a) frozen, native 32 px" if int(o["resolution"]) <= 32 else "(b) frozen, upsampled, cached features"


def _transfer_section(transfers: list[tuple[str, dict[str, Any]]], reference: dict[str, Reference]) -> Section:
    sess = reference.get(SESSION_PLAN.questions.transfer_reference)
    doc = Section("Transfer learning", "transfer")
    if sess is not None:
        doc.p(f"The session froze an ImageNet ResNet50 at the native 32x32 under a 256-128 dense head and "
              f"reached {sess.test:.4f} test accuracy ({sess.train:.4f} train), below its own small "
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
    best = max(transfers, key=lambda t: t[1]["val_accuracy"])
    doc.p(f"Best (by validation accuracy): {best[0]}, test accuracy {best[1]['test_accuracy']:.4f}"
          + (f", {(best[1]['test_accuracy'] - sess.test) * 100:+.1f} points against the session's "
             f"{sess.test:.4f}." if sess is not None else "."))
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
        a, b = small[0], max(big, key=lambda m: m["val_accuracy"])
        doc.p(f"Why 32x32 is the wrong size: ImageNet networks downsample 32 times, so a 32x32 "
              f"image ends as a single 1x1 cell after features tuned to objects some 100-200 pixels "
              f"wide; upsampled to {b['model_options']['resolution']} px the same frozen network gives "
              f"{b['test_accuracy']:.4f} instead of {a['test_accuracy']:.4f}.")
    return doc


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
                     "seconds_per_epoch": m.get("seconds_per_epoch"), "train_seconds": m["train_seconds"]})
        curves.append((f"{m['experiment']} ({folder.name})", runs.read_history(folder)))
    if out_png:
        plots.compare(curves, Path(out_png))
    return rows


