"""The fit loop: optimizers with Keras' defaults, learning-rate schedules, categorical
cross-entropy (+ Keras-style L2), validation after every epoch, callbacks.

The training set lives on the device as one uint8 tensor; each step gathers a batch, scales it,
augments it as a whole and takes one optimizer step. Nothing loops over images in Python.
Everything random draws from one seeded generator (data order, augmentation) or from torch's
seeded global generator (initialisation, dropout), so a seed fixes the run on a given machine.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..data.transforms import Augment, BatchAugment, InputTransform
from ..device import autocast, synchronize, to_device
from ..errors import ConfigError
from ..models import native
from ..models.layers import matmul_weight_grads
from . import batchnorm, distributed, precision
from .budget import Budget, Deadline
from .callbacks import Callback, CallbackList, History
from .evaluate import evaluate
from .plan import Plan

KERAS_LR = {"adam": 1e-3, "sgd": 1e-2, "rmsprop": 1e-3}


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global generator (init, dropout) and return the data generator."""
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    lr = cfg.lr or KERAS_LR[cfg.optimizer]
    # Parameter groups by learning-rate multiplier: biases and BN shifts (bias_lr_scale), a
    # pretrained backbone being fine-tuned (backbone_lr_scale), both, or neither.
    groups: dict[float, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = cfg.bias_lr_scale if p.ndim <= 1 else 1.0
        if name.startswith("backbone."):
            scale *= cfg.backbone_lr_scale
        groups.setdefault(scale, []).append(p)
    # the base group first: the history logs its rate, and a saved state names groups by order
    order = sorted(groups, key=lambda s: s != 1.0)
    params: list = [{"params": groups[s], "lr": lr * s} for s in order]
    if not params:
        raise ConfigError("the model has no trainable parameters; expected at least its head")
    # Fused kernels update all parameters in one pass: several times faster Adam steps on the
    # 4.5M-parameter MLP, where the optimizer's step was the training step's largest cost.
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-7, fused=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
    return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-7, momentum=cfg.momentum)


# A last batch smaller than this share of a batch joins the one before it (epoch_steps says why)
SMALLEST_LAST_BATCH = 0.25


def epoch_steps(images: int, batch_size: int) -> int:
    """Optimizer steps in one pass over `images`: full batches, and the remainder a batch of its
    own unless it is under a quarter of a batch, when it joins the last full one. A step on a
    few images at a high learning rate moves the weights on a noisy mean, and batch norm then
    normalizes by those few images: CIFAR-10's official split (42,500 training images) would
    end every epoch at batch 256 with a batch of 4. CIFAR-4's split (16,800: 65 batches and
    one of 160) and any size a batch divides keep a batch per ceil(images / batch_size)."""
    full, rest = divmod(images, batch_size)
    if full == 0:
        return 1
    return full + (1 if rest >= batch_size * SMALLEST_LAST_BATCH else 0)


def lr_factor(schedule: str, warmup: float, total_steps: int):
    """Multiplier of the base learning rate at a given step. 'linear' with warmup is the
    one-cycle (triangular) schedule of the fast CIFAR recipes."""
    w = int(warmup * total_steps)

    def f(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < w:
            return (step + 1) / w
        t = (step - w) / max(1, total_steps - w)
        if schedule == "linear":
            return max(0.0, 1.0 - t)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))  # cosine
    return f


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Keras' kernel_regularizer=l2(1): the sum of squared kernels (not biases, not BN)."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad:
            total = total + m.weight.pow(2).sum()
    return total


@dataclass
class Trainer:
    """Owns the model, optimizer, schedule and data generator of one training run."""

    model: nn.Module
    cfg: TrainConfig
    norm: InputTransform
    augment: BatchAugment = field(default_factory=Augment)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    callbacks: Sequence[Callback] = ()
    generator: torch.Generator = field(default_factory=torch.Generator)
    epochs: int = 0
    steps_per_epoch: int = 0
    stop_training: bool = False
    restored_epoch: int | None = None
    final_statistics: str | None = None  # the batch-norm statistics the last epoch kept (_final_statistics)
    start_epoch: int = 0
    # deprecated: a time budget or limit is followed by a budget.Deadline callback (the
    # pipeline adds one); a budget given here gets one at fit, with a one-line note
    budget: Budget | None = None
    log: Callable[[str], None] | None = None  # where that callback says what it chose
    plan: Plan | None = None  # what the run decided before training (precision, kernels); None: decided here

    def __post_init__(self) -> None:
        to_device(self.model, self.device)
        self.params: dict[str, Any] = {}  # the callbacks' view of the run (_sync_params)
        self.total_steps = 0  # planned: epochs x steps per epoch, or what a deadline callback set
        self.steps_done = 0
        # On a GPU, augmentation draws its random numbers there (a host-side draw copied up would
        # make every step wait); seeded from the data generator, so a seed still fixes the run.
        self.aug_generator = self.generator
        if self.device.type == "cuda":
            self.aug_generator = torch.Generator(device=self.device)
            self.aug_generator.manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))
        self.world = distributed.world()
        # Under torchrun the forward pass goes through DistributedDataParallel, which averages
        # the gradients of the ranks' shares; the plain model stays the one saved and evaluated.
        self.forward: nn.Module = self.model
        if self.world.size > 1 and any(p.requires_grad for p in self.model.parameters()):
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self._cbs = CallbackList([], self.model, self.params, self.plan)
        self.history = next((c for c in self.callbacks if isinstance(c, History)), None)
        if self.history is None:
            self.history = History()
            self.callbacks = [self.history, *self.callbacks]
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        # compiled CPU kernels the model uses (the session CNN's pools) and the precision: the
        # run's plan decided them; a trainer used on its own decides them the same way here
        # (kernels built once per machine; "auto" on a CPU measured on the first training rows)
        self.precision_choice: precision.Choice | None = None
        self.precision = ""
        if self.plan is not None:
            self.kernels: native.Status | None = self.plan.kernels
            self._use_precision(self.plan.precision)
        else:
            self.kernels = native.prepare(self.model, self.device)
            if self.cfg.precision != "auto" or self.device.type != "cpu":
                self._choose_precision(None)

    def train_epochs(self, epochs: int, steps_per_epoch: int) -> None:
        """Train exactly `epochs` epochs of `steps_per_epoch` steps, the schedule fitted to them,
        whatever budget was set (a time limit spent before training ends the run this way)."""
        self.budget = None
        self.total_steps = epochs * steps_per_epoch

    @property
    def total_steps(self) -> int:
        """The training steps the run takes in all: epochs x steps per epoch, or what a deadline
        callback fitted to the time left. The learning-rate schedule follows it. It lives in
        `params`, where a callback may change it (see Callback)."""
        return int(self.params.get("total_steps", 0))

    @total_steps.setter
    def total_steps(self, n: int) -> None:
        self.params["total_steps"] = int(n)

    def _follow_params(self) -> None:
        """After callbacks ran: the epochs follow the total steps, which one may have changed."""
        if self.steps_per_epoch:
            self.epochs = max(self.start_epoch + 1, math.ceil(self.total_steps / self.steps_per_epoch))
            self.params["epochs"] = self.epochs

    def _choose_precision(self, sample: torch.Tensor | None) -> None:
        cfg = self.cfg
        self._use_precision(precision.decide(cfg, self.device, self.model, sample, lambda m: make_optimizer(m, cfg)))

    def _use_precision(self, choice: precision.Choice) -> None:
        self.precision_choice, self.precision = choice, choice.precision
        matmul_weight_grads(self.model, choice.matmul_weight_grads)
        matmul_weight_grads(self.model, choice.matmul_weight_grads)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        return autocast(self.device, self.precision)

    def fit(self, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
            y_val: torch.Tensor) -> History:
        """Train for the configured epochs (from `start_epoch` when resumed), validating after
        each; callbacks see every step, as in Keras' fit(). `y_train`: class indices, or one row
        of target probabilities per image (a distilled ensemble member: the label's class keeps
        the largest share, so training accuracy still counts against it)."""
        x_store, y_store = self._schedule_and_store(x_train, y_train)
        if self.budget is not None and not any(isinstance(c, Deadline) for c in self.callbacks):
            warnings.warn("Trainer(budget=...) is deprecated; add budget.Deadline(budget, x_val, norm) "
                          "to the callbacks", DeprecationWarning, stacklevel=2)
            self.callbacks = [*self.callbacks, Deadline(self.budget, x_val, self.norm, self.log)]
        cbs = self._cbs = CallbackList(self.callbacks, self.model, self.params, self.plan, trainer=self)
        model: Any = self.model
        model.stop_training = False  # Keras' flag: a callback sets it to end training
        cbs.on_train_begin()
        self._follow_params()
        epoch = self.start_epoch
        while epoch < self.epochs and self.steps_done < self.total_steps:
            if self.stop_training or model.stop_training:
                break
            epoch += 1
            cbs.on_epoch_begin(epoch)
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            loss, accuracy = self._train_epoch(x_store, y_store)
            seconds = time.perf_counter() - t0
            t_val = time.perf_counter()  # (the recalibration counts as validation: a deadline plans it)
            last = epoch >= self.epochs or self.steps_done >= self.total_steps
            kept = batchnorm.statistics(self.model) if last and self.cfg.bn_recalibrate else None
            self.recalibrate(x_store)
            val = evaluate(self.model, x_val, y_val, self.norm, device=self.device,
                           precision=self.precision, tta=0)
            if kept:
                val = self._final_statistics(kept, val, x_val, y_val)
            logs = {"epoch": epoch, "loss": loss, "accuracy": accuracy, "val_loss": val["loss"],
                    "val_accuracy": val["accuracy"], "seconds": round(seconds, 4), "lr": lr,
                    "val_seconds": round(time.perf_counter() - t_val, 4)}
            cbs.on_epoch_end(epoch, logs)
            self._follow_params()
        cbs.on_train_end()
        restored = cbs.restored_epoch()
        if restored is not None:
            self.restored_epoch = restored
        assert self.history is not None
        return self.history

    def _final_statistics(self, kept: list[torch.Tensor], val: dict[str, Any], x_val: torch.Tensor,
                          y_val: torch.Tensor) -> dict[str, Any]:
        """After the last epoch, the batch-norm statistics the model ends with: the recalibrated
        ones or the running averages training left, whichever validates better (a choice on
        validation, as early stopping's). Recalibration makes the curve follow the weights while
        the learning rate is high; at the end of a decayed schedule the running averages, taken
        on the augmented batches the weights were trained on, can serve better (measured in
        docs/explanation/training-flow.md). Under torchrun rank 0's choice holds on every rank.
        `final_statistics` says which was kept."""
        norms = batchnorm.updated(self.model)
        recalibrated = batchnorm.statistics(self.model)
        batchnorm.load_statistics(self.model, kept)
        running = evaluate(self.model, x_val, y_val, self.norm, device=self.device,
                           precision=self.precision, tta=0)
        if running["accuracy"] > val["accuracy"]:
            self.final_statistics, val = "running", running
        else:
            self.final_statistics = "recalibrated"
            batchnorm.load_statistics(self.model, recalibrated)
        distributed.broadcast_tensors(*(t for m in norms for t in m.buffers()))
        return val

    def recalibrate(self, x_store: torch.Tensor) -> None:
        """Recompute the running statistics of the batch norms that training updates, in place,
        at the current weights, in the training precision (batchnorm.recalibrate says how and
        why): the same rows every epoch and on every rank, and under torchrun rank 0's
        statistics on all of them, bit for bit. Training-mode steps use each batch's own
        statistics, so the weights' trajectory is unchanged; evaluation, and the model saved,
        restored and evaluated at the end, see the recalibrated ones."""
        if not self.cfg.bn_recalibrate:
            return
        norms = batchnorm.recalibrate(self.model, x_store, batchnorm.rows(len(x_store), self.cfg).to(self.device),
                                      self.cfg.batch_size, self._autocast)
        distributed.broadcast_tensors(*(t for m in norms for t in m.buffers()))

    def _schedule_and_store(self, x_train: torch.Tensor, y_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Schedule, and the training set on the device, normalized once and kept as NHWC
        floats: a batch is then one gather, and its NCHW view is already channels_last."""
        cfg, n = self.cfg, len(x_train)
        if cfg.batch_size > n:
            raise ConfigError(f"train.batch_size {cfg.batch_size} is larger than the training set "
                              f"({n} images); expected at most {n}")
        self.steps_per_epoch = epoch_steps(n, cfg.batch_size)
        if not self.total_steps:
            self.total_steps = cfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self._sync_params()
        if self.scheduler is None:  # the schedule follows total_steps (a deadline callback may change it)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: lr_factor(cfg.schedule, cfg.warmup, self.total_steps)(step))
        x_store = self._stored(x_train)
        if not self.precision:
            sample = x_store[:precision.PROBE_BATCH]
            if sample.ndim == 3 and self.augment.active:  # feature views (N, views, dim): one view
                sample = sample[:, 0]
            self._choose_precision(sample.permute(0, 3, 1, 2) if sample.ndim == 4 else sample)
        return x_store, y_train.to(self.device)

    def store(self, x_train: torch.Tensor, y_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training set as the fit keeps it on the device (normalized once, images as NHWC),
        with the schedule and precision set up for it: what a caller that steps the trainer
        itself (the learning-rate range test, lr_find.py) gathers its batches from."""
        return self._schedule_and_store(x_train, y_train)

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """One optimizer step of the model on a batch of `store`'s rows, at the optimizer's rates
        as they are (the schedule is not advanced): the batch's loss."""
        return self._step(self.model, self.forward, self.optimizer, self._decay(self.optimizer), xb, yb,
                          self.aug_generator)[0]

    def _sync_params(self) -> None:
        """What callbacks see as `params` (Keras' epochs and steps, and where a resumed run
        starts): kept current as a callback changes the total steps (Callback says how)."""
        self.params.update({"epochs": self.epochs, "steps": self.steps_per_epoch, "initial_epoch": self.start_epoch,
                            "total_steps": self.total_steps})

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs as the fit keeps them on the device: normalized once, images as NHWC (a
        batch's NCHW view is then channels_last); features as they come."""
        x = self.norm.apply(x.to(self.device))
        return x.permute(0, 2, 3, 1) if x.ndim == 4 else x

    def warm_up(self, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                y_val: torch.Tensor) -> float:
        """On a GPU, before the fit: two training steps and one validation pass of a throwaway
        copy of the model, in the batch shapes the fit will meet (a full batch, the epoch's last
        partial one, the validation's batches), so that CUDA's lazy kernel loading and cuDNN's
        first choices happen here rather than inside the fit (airbench's timing does the same).
        The model, optimizer, schedule and random generators are left as they were. Seconds
        spent; 0 on a CPU, which loads nothing lazily."""
        return self._warm(x_train, y_train, x_val, y_val) if self.device.type == "cuda" else 0.0

    def _warm(self, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
              y_val: torch.Tensor) -> float:
        t = time.perf_counter()
        n, bs = len(x_train), self.cfg.batch_size
        rows = torch.arange(min(n, bs))
        x, y = self._stored(x_train[rows]), y_train[rows].to(self.device)
        model = copy.deepcopy(self.model).train()
        optimizer = make_optimizer(model, self.cfg)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # dropout draws from the global generators
            gen = torch.Generator(device=self.device)
            gen.manual_seed(0)
            for size in dict.fromkeys((len(rows), n % bs or len(rows))):  # (under torchrun, its share)
                self._step(model, model, optimizer, self._decay(optimizer), x[:size], y[:size], gen)
            evaluate(model, x_val, y_val, self.norm, device=self.device, precision=self.precision, tta=0)
        del model, optimizer
        synchronize(self.device)
        return time.perf_counter() - t

    def _decay(self, optimizer: torch.optim.Optimizer) -> list[tuple[dict, list[torch.Tensor]]]:
        """Decoupled weight decay: kernels only (not biases or BN), each at its group's rate."""
        if not self.cfg.weight_decay:
            return []
        return [(g, [p for p in g["params"] if p.ndim > 1]) for g in optimizer.param_groups]

    def _step(self, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
              decay: list[tuple[dict, list[torch.Tensor]]], xb: torch.Tensor, yb: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch as stored (NHWC images or features), augmented whole,
        then under torchrun on this rank's share of it. (loss, logits, labels stepped on)."""
        cfg = self.cfg
        if xb.ndim == 4:
            xb = xb.permute(0, 3, 1, 2)
        if self.augment.active:
            xb = self.augment(xb, generator)
        if self.world.size > 1:  # this rank's share of the global batch
            xb, yb = xb[self.world.rank::self.world.size], yb[self.world.rank::self.world.size]
        with self._autocast():
            logits = forward(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
        if cfg.l2:
            loss = loss + cfg.l2 * l2_penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if decay:
            with torch.no_grad():
                for g, ps in decay:
                    if ps:
                        torch._foreach_mul_(ps, 1 - g["lr"] * cfg.weight_decay)
        optimizer.step()
        return loss, logits, yb

    def _train_epoch(self, x_store: torch.Tensor, y_store: torch.Tensor) -> tuple[float, float]:
        """One pass over the training set in a fresh random order (or what is left of the
        planned steps): (mean loss, accuracy)."""
        cfg, n = self.cfg, len(x_store)
        assert self.scheduler is not None
        decay = self._decay(self.optimizer)
        batch_logs = self._cbs.wants_batch_logs  # else: no host sync per step
        batch_begin = self._cbs.wants_batch_begin
        self.model.train()
        order = torch.randperm(n, generator=self.generator).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        step = 0
        while step < self.steps_per_epoch and self.steps_done < self.total_steps:
            if batch_begin:  # a deadline callback may change the run's length here
                self._cbs.on_batch_begin(step)
                self._follow_params()
                if self.steps_done >= self.total_steps:
                    break
            last = step == self.steps_per_epoch - 1  # it takes what is left (epoch_steps)
            idx = order[step * cfg.batch_size:n if last else (step + 1) * cfg.batch_size]
            loss, logits, yb = self._step(self.model, self.forward, self.optimizer, decay, x_store[idx],
                                          y_store[idx], self.aug_generator)
            self.scheduler.step()
            with torch.no_grad():
                loss_sum += loss.detach() * len(yb)
                correct += (logits.argmax(1) == (yb.argmax(1) if yb.ndim > 1 else yb)).sum()
            step += 1
            self.steps_done += 1
            seen = n if last else min(step * cfg.batch_size, n)
            if batch_logs:
                logs = {"loss": float(loss_sum) / seen, "accuracy": float(correct) / seen}
                self._cbs.on_batch_end(step, logs)
        distributed.all_sum(loss_sum, correct)  # every rank's share of the epoch
        return float(loss_sum) / max(1, seen), float(correct) / max(1, seen)

    # ------------------------------------------------------------ resuming

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "generator": self.generator.get_state(),
            "aug_generator": self.aug_generator.get_state() if self.aug_generator is not self.generator else None,
            "torch_rng": torch.get_rng_state(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "steps": {"done": self.steps_done, "total": self.total_steps},
        }

    def load_state_dict(self, state: dict[str, Any], epoch: int, total_steps: int) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # Saved moments are contiguous; the parameters are channels_last. The fused optimizer
        # kernels index both alike, so give each moment its parameter's strides again (without
        # this, a resumed run drifts from an uninterrupted one).
        for p, st in self.optimizer.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    st[k] = torch.empty_like(p).copy_(v)
        steps = state.get("steps") or {"done": 0, "total": total_steps}  # states saved before budgets
        self.steps_done, self.total_steps = int(steps["done"]), int(steps["total"])
        if not self.steps_done:
            self.steps_done = epoch * math.ceil(total_steps / max(1, self.cfg.epochs))
        cfg = self.cfg
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(cfg.schedule, cfg.warmup, self.total_steps)(step))
        if state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        if state.get("aug_generator") is not None and self.aug_generator is not self.generator:
            self.aug_generator.set_state(state["aug_generator"])
        torch.set_rng_state(state["torch_rng"])
        # callbacks a caller added to the first run (after the built-in ones) need not come back
        for cb, s in zip(self.callbacks, state["callbacks"], strict=False):
            cb.load_state_dict(s)
        self.start_epoch = epoch
