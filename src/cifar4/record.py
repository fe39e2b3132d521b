"""The run record: the files of a run folder that say what the run was and what it measured,
each read and written here against one typed schema.

    config.toml   the experiment as it ran (config.Experiment)
    run.json      the data it trained on and the plan it followed (RunInfo)
    model.json    how to rebuild the saved model: architecture, classes, normalization (ModelInfo)
    metrics.json  accuracies, losses, timings, choices, versions, machine (Metrics); written
                  last, so its presence means the run finished

`RECORD_FILES` maps each file name to its schema; the reference of the run directory is
generated from the schemas' field descriptions. Runs written by older versions keep loading:
every key that a run may lack is optional, and keys this version does not know are kept
(`extra="allow"`), so a reader never loses what an older or newer writer put there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import io as cio
from .config import Experiment, explain, from_dict, read_toml
from .errors import CheckpointError, RunError

CONFIG_FILE = "config.toml"
RUN_FILE = "run.json"
MODEL_FILE = "model.json"
METRICS_FILE = "metrics.json"
MODEL_FORMAT = "cifar4-model"  # model.json's "format": what marks a cifar4 model description


class _Record(BaseModel):
    """A record file's table: known keys typed, unknown ones kept."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- metrics.json parts

class SplitInfo(_Record):
    kind: str = Field(description="How the rows were split: session, stratified or official.")
    seed: int = Field(description="The split's seed (data.split_seed).")
    train: int = Field(description="Training rows.")
    val: int = Field(description="Validation rows.")
    test: int = Field(description="Test rows.")


class DataInfo(_Record):
    source: str = Field(description="Where the dataset was read from (a file or folder).")
    sha256: str = Field(description="Checksum of the dataset's images and labels: a resume, an "
                                    "ensemble and the lab check that runs share their data by it.")
    images: int = Field(description="Images in the whole dataset, before the split.")


class NormalizationInfo(_Record):
    scale: float | None = Field(default=None, description="Pixels are multiplied by this (1/255 "
                                                          "for the session's X / 255.0, 1 for raw pixels).")
    mean: list[float] | None = Field(default=None, description="Per-channel mean subtracted after scaling.")
    std: list[float] | None = Field(default=None, description="Per-channel standard deviation divided by.")


class PrecisionChoice(_Record):
    asked: str = Field(description="train.precision as set: auto, fp32, bf16 or bf16-matmul-wgrad.")
    chosen: str = Field(description="The precision training used.")
    reason: str = Field(description="Why: measured faster, not measured (no bf16 arithmetic), or as asked.")
    step_seconds: dict[str, float] = Field(default_factory=dict,
                                           description="Seconds per probe step, per precision "
                                                       "measured (empty: not measured).")
    cached: bool = Field(default=False, description="The answer came from this machine's earlier "
                                                    "measurement (<cache>/precision.json).")
    matmul_weight_grads: bool = Field(default=False, description="bf16 steps take the small maps' "
                                                                 "weight gradients as matmuls.")


class KernelInfo(_Record):
    compiled: bool = Field(description="The compiled CPU kernel was used (else torch's own operator).")
    reason: str = Field(description="What was used and why.")
    build_seconds: float = Field(default=0.0, description="Seconds spent building it in this run "
                                                          "(0: loaded from the cache).")


class Kernels(_Record):
    pool2x2: KernelInfo | None = Field(default=None, description="The session CNN's 2x2 max-pools on a CPU.")


class BudgetPlanInfo(_Record):
    after_steps: int = Field(description="Training steps taken when this plan was made.")
    seconds_left: float = Field(description="Seconds to the deadline then.")
    step_seconds: float = Field(description="Measured seconds per training step.")
    final_eval_seconds: float = Field(description="Expected seconds of the final evaluation.")
    total_steps: int = Field(description="Training steps the plan fitted in.")
    tta: int | None = Field(default=None, description="The final evaluation's test-time level chosen "
                                                      "(first plan of a time budget only).")


class TimeInfo(_Record):
    seconds: float = Field(description="The time budget or limit, in seconds from the command's start.")
    plans: list[BudgetPlanInfo] = Field(default_factory=list, description="Every plan made, in order.")
    tta: int | None = Field(default=None, description="The test-time level a time budget chose.")
    max_epochs: int | None = Field(default=None, description="A time limit: the epochs never exceeded.")
    spent_before_training: float | None = Field(default=None, description="Seconds already gone when "
                                                "training started, where that spent the whole limit "
                                                "(the run then trains one epoch).")


class FallbackTry(_Record):
    fallback: int | None = Field(description="The candidate timed: None for the experiment as "
                                             "written, else the index into its fallbacks.")
    step_seconds: float | None = Field(description="Measured seconds per training step; None: not "
                                       "timed, the features it lacks alone outlast the limit.")
    image_seconds: float | None = Field(description="Measured seconds of inference per image; None: "
                                        "not timed, as step_seconds.")
    epochs_fit: float = Field(description="Epochs that would fit the time limit at that speed.")
    extraction_seconds: float | None = Field(default=None, description="A frozen backbone: seconds "
                                             "expected to extract the features not yet cached.")
    steps_fit: int | None = Field(default=None, description="Training steps that would fit the time "
                                  "limit at that speed (up to the candidate's epochs).")
    steps_needed: int | None = Field(default=None, description="Steps the candidate had to fit to be "
                                     "chosen: those of `fits` of the experiment's epochs, on the training "
                                     "set or on train.reference_images where that is smaller.")


class FallbackInfo(_Record):
    used: int | None = Field(description="The fallback trained (index into the experiment's "
                                         "fallbacks); None: the experiment as written.")
    tried: list[FallbackTry] = Field(default_factory=list, description="Each candidate's timing.")
    fits: float = Field(description="The share of its epochs a candidate must fit to be chosen.")


class DistillInfo(_Record):
    weight: float = Field(description="ensemble.distill: the share of the earlier members' probabilities "
                                      "in the targets (the label keeps the rest).")
    temperature: float = Field(description="ensemble.distill_temperature: their logits divided by it "
                                           "before the softmax.")
    teachers: list[str] = Field(description="The earlier members that taught (their member folders).")
    teacher_agrees: float = Field(description="The share of the training rows on which the teachers' "
                                              "mean probabilities pick the label's class.")
    seconds: float = Field(description="Seconds spent computing the targets (counted in the "
                                       "ensemble's time, before this member's limit was set).")
    left_out: list[str] | None = Field(default=None, description="Earlier members that did not teach: "
                                       "they trained on other rows (a fallback's subset).")


class FeaturesInfo(_Record):
    views: list[str] = Field(default_factory=list, description="The image views whose features "
                                                               "were cached (the image, its mirror).")
    precision: str | None = Field(default=None, description="Precision the backbone extracted in.")
    engine: str | None = Field(default=None, description="What ran the backbone: torch, or "
                                                         "onnxruntime (fp32 on a CPU, with the export extra).")
    cache: str | None = Field(default=None, description="How the feature cache was used.")
    extracted: int | None = Field(default=None, description="Feature rows extracted in this run.")
    cached: int | None = Field(default=None, description="Feature rows read from the cache.")
    seconds: float | None = Field(default=None, description="Seconds spent getting the features.")
    files: list[str] = Field(default_factory=list, description="The cache files used.")


class MemberInfo(_Record):
    run: str = Field(description="The member's run folder.")
    experiment: str = Field(description="The member's experiment name.")
    weight: float = Field(description="Its weight in the average of probabilities.")
    train_accuracy: float | None = Field(default=None, description="The member's own train accuracy.")
    val_accuracy: float | None = Field(default=None, description="The member's own validation accuracy.")
    test_accuracy: float | None = Field(default=None, description="The member's own test accuracy.")
    fit_seconds: float | None = Field(default=None, description="The member's fit_seconds.")
    warmup_seconds: float | None = Field(default=None, description="The member's warmup_seconds.")
    feature_seconds: float | None = Field(default=None, description="The member's feature_seconds.")
    total_seconds: float | None = Field(default=None, description="The member's total_seconds.")


class SkippedMember(_Record):
    member: int = Field(description="The member's position in the ensemble (from 1).")
    experiment: str = Field(description="The member's experiment name.")
    reason: str = Field(description="Why it was skipped.")
    tried: list[FallbackTry] = Field(default_factory=list, description="Its candidates' timings.")


class MachineInfo(_Record):
    platform: str | None = Field(default=None, description="Operating system and architecture.")
    cpu: str | None = Field(default=None, description="The CPU's model name.")
    cpu_features: str | None = Field(default=None, description="The CPU's instruction sets that "
                                                               "matter here (AVX2, AVX-512, AMX...).")
    cpu_count: int | None = Field(default=None, description="Logical CPUs.")
    torch_threads: int | None = Field(default=None, description="torch's intra-op threads.")
    device: str | None = Field(default=None, description="The device trained on (cpu, cuda:0).")
    gpu: str | None = Field(default=None, description="The GPU's name, on a GPU.")


# ---------------------------------------------------------------- the files

class Metrics(_Record):
    """metrics.json: what a finished run measured. Written last: its presence means finished."""

    experiment: str = Field(description="The experiment's name.")
    model: str = Field(description="The model's registry name (ensemble for an ensemble).")
    model_options: dict[str, Any] = Field(default_factory=dict, description="The model's options, "
                                          "defaults filled in (an ensemble: its weights).")
    train_accuracy: float = Field(description="Accuracy on the train split's first "
                                              "train_accuracy_images rows, without test-time views.")
    val_accuracy: float = Field(description="Accuracy on the validation split, with the run's test-time views.")
    test_accuracy: float | None = Field(default=None, description="Accuracy on the test split; None "
                                        "where the test split was held out (a sweep's trials).")
    train_loss: float = Field(description="Cross-entropy on the same train rows.")
    val_loss: float = Field(description="Cross-entropy on the validation split.")
    test_loss: float | None = Field(default=None, description="Cross-entropy on the test split (None: held out).")
    per_class_accuracy: dict[str, float] = Field(default_factory=dict, description="Accuracy per class on "
                                                 "the test split (validation where the test is held out).")
    confusion: list[list[int]] = Field(default_factory=list, description="Confusion matrix of the same "
                                       "split: rows the true class, columns the predicted one.")
    train_seconds: float = Field(description="Seconds of the training epochs' steps (no validation).")
    seconds_per_epoch: float | None = Field(default=None, description="train_seconds per epoch.")
    fit_seconds: float | None = Field(default=None, description="Wall time of the fit: steps, "
                                      "validation after each epoch, callbacks.")
    warmup_seconds: float | None = Field(default=None, description="Before the fit: a GPU's kernels "
                                         "loaded (0 on a CPU).")
    eval_seconds: float | None = Field(default=None, description="The final evaluation's seconds.")
    epochs: int = Field(description="Epochs trained (0 for an ensemble).")
    epochs_planned: int | None = Field(default=None, description="The experiment's epochs, or what "
                                       "the time budget or limit allowed.")
    restored_epoch: int | None = Field(default=None, description="The epoch whose weights the run "
                                       "kept (early stopping or checkpoint_best), None: the last.")
    iterations: int | None = Field(default=None, description="Training steps taken.")
    steps: int | None = Field(default=None, description="Training steps taken (as iterations).")
    final_statistics: Literal["recalibrated", "running"] | None = Field(
        default=None, description="The batch-norm statistics the model ends with: recalibrated at "
        "the final weights, or the running averages training left, whichever validated better "
        "(absent for a model without batch norm's recalibration).")
    steps_per_epoch: int | None = Field(default=None, description="Steps in a full epoch.")
    params: int = Field(description="Parameters of the model.")
    trainable_params: int | None = Field(default=None, description="Of which trainable.")
    seed: int = Field(description="The training seed (initialisation, data order, augmentation).")
    split: SplitInfo = Field(description="The split's kind, seed and sizes.")
    train_accuracy_images: int | None = Field(default=None, description="Rows train_accuracy was "
                                              "measured on (the first ones of the train split).")
    data: DataInfo = Field(description="The dataset trained on.")
    normalization: NormalizationInfo | None = Field(default=None, description="Input normalization, "
                                                    "from the training rows.")
    precision: str = Field(default="fp32", description="The precision of the final evaluation "
                                                       "(and of training): fp32 or bf16.")
    precision_choice: PrecisionChoice | None = Field(default=None, description="How the training "
                                                     "precision was chosen.")
    kernels: Kernels | None = Field(default=None, description="Compiled CPU kernels the model used.")
    tta: int | None = Field(default=None, description="The final evaluation's test-time level: 0 "
                            "none, 1 the image and its mirror, 2 six views.")
    resumed_from_epoch: int | None = Field(default=None, description="The epoch a --resume continued from.")
    time_limit: TimeInfo | None = Field(default=None, description="What a time limit planned.")
    time_budget: TimeInfo | None = Field(default=None, description="What a time budget planned.")
    fallback: FallbackInfo | None = Field(default=None, description="Which variant a time limit chose.")
    distill: DistillInfo | None = Field(default=None, description="An ensemble's later member: what it "
                                        "learned from the earlier ones besides its labels ([ensemble] distill).")
    gpu: dict[str, Any] | None = Field(default=None, description="The experiment's gpu table, where it "
                                       "applied (the run was on a GPU).")
    held_out_test: bool | None = Field(default=None, description="True: the test split was not "
                                       "evaluated; per_class_accuracy and confusion are on validation.")
    backbone_sha256: str | None = Field(default=None, description="Checksum of a transfer backbone's weights.")
    features: FeaturesInfo | None = Field(default=None, description="A frozen backbone's cached features.")
    feature_seconds: float | None = Field(default=None, description="Seconds spent getting the "
                                          "frozen backbone's features.")
    members: list[MemberInfo] | None = Field(default=None, description="An ensemble's members.")
    weights_chosen: str | None = Field(default=None, description="An ensemble's weights: validation, "
                                       "equal or given.")
    ensemble_seconds: float | None = Field(default=None, description="Seconds spent combining an ensemble.")
    skipped_members: list[SkippedMember] | None = Field(default=None, description="Ensemble members a "
                                                        "time limit skipped.")
    versions: dict[str, str] = Field(default_factory=dict, description="Python and package versions.")
    machine: MachineInfo | None = Field(default=None, description="The machine trained on.")
    started_at: str | None = Field(default=None, description="When the run started (ISO 8601, local time).")
    finished_at: str | None = Field(default=None, description="When metrics.json was written.")
    total_seconds: float | None = Field(default=None, description="Seconds from the command's start "
                                        "to metrics.json (an ensemble combined afterwards: its "
                                        "members' and its own).")


class PlanInfo(_Record):
    """What the run decided before training, and why (training/plan.py)."""

    device: str = Field(description="The device trained on.")
    gpu_variant: bool = Field(default=False, description="The experiment's gpu table was merged in.")
    fallback: int | None = Field(default=None, description="The fallback a time limit chose "
                                 "(None: the experiment as written).")
    precision: str = Field(description="The training precision: fp32 or bf16.")
    precision_reason: str = Field(default="", description="Why that precision.")
    matmul_weight_grads: bool = Field(default=False, description="bf16 steps take the small maps' "
                                      "weight gradients as matmuls.")
    kernels: str | None = Field(default=None, description="Compiled CPU kernels used, and why (None: none).")
    tta: int = Field(default=0, description="The final evaluation's test-time level as planned.")
    epochs: int = Field(description="The experiment's epochs (a time budget or limit may shorten them).")
    steps_per_epoch: int = Field(description="Training steps per epoch.")
    schedule: str = Field(description="The learning-rate schedule, fitted to the planned steps.")
    time_limit: float | None = Field(default=None, description="The time limit in seconds (None: none).")
    time_budget: float | None = Field(default=None, description="The time budget in seconds (None: none).")
    reasons: list[str] = Field(default_factory=list, description="Each choice and why, as printed.")
    train_images: int | None = Field(default=None, description="Training images: what steps per "
                                     "epoch, a fallback's steps and the estimates were planned on.")
    classes: int | None = Field(default=None, description="Classes of the data: the model's outputs.")
    eval_images: int | None = Field(default=None, description="Image views of the final evaluation as "
                                    "planned (the train sample, then val and test at each view).")


class RunInfo(_Record):
    """run.json: written when the run starts, with its plan."""

    data: str = Field(description="Where the dataset was read from.")
    data_sha256: str = Field(description="The dataset's checksum (as metrics.json's data.sha256).")
    plan: PlanInfo | None = Field(default=None, description="What the run decided before training.")


class ModelInfo(_Record):
    """model.json: what rebuilds the model whose weights model.safetensors holds."""

    format: str = Field(description=f"Always \"{MODEL_FORMAT}\".")
    version: int = Field(default=1, description="The description's version.")
    model: str = Field(description="The model's registry name.")
    options: dict[str, Any] = Field(default_factory=dict, description="The model's options, defaults "
                                                                      "filled in.")
    num_classes: int = Field(description="Outputs of the model.")
    classes: list[str] = Field(description="Class names, in output order.")
    input_shape: list[int] = Field(default_factory=lambda: [3, 32, 32],
                                   description="One input image's shape: [3, S, S], S the side of the "
                                               "images it was trained on (32 unless a transfer model "
                                               "was trained on larger imported images).")
    normalization: dict[str, Any] = Field(description="Input normalization (scale, mean, std).")
    precision: str = Field(default="fp32", description="The precision the final evaluation used: "
                                                       "fp32 or bf16.")


RECORD_FILES: dict[str, type[BaseModel]] = {
    CONFIG_FILE: Experiment, RUN_FILE: RunInfo, MODEL_FILE: ModelInfo, METRICS_FILE: Metrics}


# ---------------------------------------------------------------- reading and writing

def read_experiment(folder: str | Path, name: str = CONFIG_FILE) -> Experiment:
    """The experiment a run folder's config.toml (or `name`) holds, checked by the schema."""
    path = Path(folder) / name
    return from_dict(read_toml(path), f"'{path}'")


def write_experiment(folder: str | Path, exp: Experiment, name: str = CONFIG_FILE) -> None:
    cio.write_text(Path(folder) / name, exp.to_toml())


def _read_json(path: Path, error: type[Exception], missing: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(missing) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"'{path}' is not valid JSON ({e})") from None


def _check(schema: type[_Record], d: Any, path: Path, error: type[Exception]) -> None:
    if not isinstance(d, dict):
        raise error(f"'{path}' holds {type(d).__name__}; expected a JSON object")
    try:
        schema.model_validate(d)
    except ValidationError as e:
        raise error(explain(e, f"'{path}'")) from None


def read_metrics(folder: str | Path) -> dict[str, Any]:
    """metrics.json as written (a dict), checked against Metrics."""
    path = Path(folder) / METRICS_FILE
    d = _read_json(path, RunError, f"run '{folder}' has no metrics.json; is the run finished?")
    _check(Metrics, d, path, RunError)
    return d


def write_metrics(folder: str | Path, metrics: dict[str, Any]) -> None:
    """Write metrics.json, last: its presence means the run finished. Checked first, so a run
    never records a key with a value of the wrong kind."""
    path = Path(folder) / METRICS_FILE
    _check(Metrics, metrics, path, RuntimeError)
    cio.write_json(path, metrics)


def metrics(**values: Any) -> dict[str, Any]:
    """A metrics dict from keyword values, checked against Metrics, keys in the order given."""
    Metrics.model_validate(values)
    return dict(values)


def read_run_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / RUN_FILE
    d = _read_json(path, RunError, f"run '{folder}' has no run.json")
    _check(RunInfo, d, path, RunError)
    return d


def write_run_info(folder: str | Path, source: str, sha256: str, plan: dict[str, Any] | None = None) -> None:
    """run.json: the data the run trains on, and its plan where one was made."""
    info: dict[str, Any] = {"data": source, "data_sha256": sha256}
    if plan is not None:
        info["plan"] = plan
    _check(RunInfo, info, Path(folder) / RUN_FILE, RuntimeError)
    cio.write_json(Path(folder) / RUN_FILE, info)


def model_info(model: str, options: dict[str, Any], classes: tuple[str, ...] | list[str],
               normalization: dict[str, Any], precision: str = "fp32", size: int = 32) -> dict[str, Any]:
    """model.json's content for a model trained on `size` px images."""
    return ModelInfo(format=MODEL_FORMAT, version=1, model=model, options=options,
                     num_classes=len(classes), classes=list(classes), input_shape=[3, size, size],
                     normalization=normalization, precision=precision).model_dump(mode="json")


def write_model_info(folder: str | Path, info: dict[str, Any]) -> None:
    cio.write_json(Path(folder) / MODEL_FILE, info)


def read_model_info(folder: str | Path) -> dict[str, Any]:
    """model.json, checked: a cifar4 model description with its classes and normalization
    (CheckpointError otherwise; RunError where the run has none yet)."""
    path = Path(folder) / MODEL_FILE
    meta = _read_json(path, CheckpointError, f"run '{folder}' has no model.json; is the run finished?")
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"'{path}' is not a cifar4 model description "
                              f"(expected \"format\": \"{MODEL_FORMAT}\")")
    return meta


__all__ = ["RECORD_FILES", "Metrics", "RunInfo", "ModelInfo", "PlanInfo", "read_experiment",
           "write_experiment", "read_metrics", "write_metrics", "metrics", "read_run_info",
           "write_run_info", "model_info", "read_model_info", "write_model_info"]
