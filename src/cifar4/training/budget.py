"""`--time-budget SECONDS`: the user says how long they can wait, from the command's start to
metrics.json; training fits its length to that. `--time-limit SECONDS` (train.time_limit, which
the `fast` preset sets) is the same measurement used as a ceiling: the experiment's epochs run
as set where they fit, and are shortened (the schedule fitted to the steps that fit) where not.

A `Deadline` callback follows the clock during training (the pipeline adds it to the run's
callbacks when the experiment has a budget or a limit): it measures the run's speed through the
batch and epoch events (seconds per training step over the first steps, and the seconds of one
inference pass per image, timed on validation images), then sets `params["total_steps"]` so
that what remains fits: the training steps, the validation after each epoch, the
final evaluation (its train subset, and validation and test with their test-time views) and
writing the run's files. The one-cycle schedule is stretched or compressed to exactly those
steps (its warm-up stays the same fraction), so a short budget still ends with a fully decayed
learning rate. The plan is made again after every epoch with the epoch's measured time, and
every REPLAN_EVERY steps of the epoch where the run ends, so a machine that slows down (another
process on the cores) is followed: on a busy host, whose step time can swing by a third from
one epoch to the next, plans made only at epochs' ends overran their budgets. In the epochs
between the first and the last, every REPLAN_EVERY steps a check (`fit`, a plan not recorded)
asks whether the steps left still fit, and plans again where they do not, since a host that
slows down for a minute in the epoch before the last would otherwise take the run far past its
limit.

A budget (not a limit: there the views belong to the experiment) also chooses the final
evaluation's test-time views, at its first plan: the experiment's, or fewer where they would
take more than EVAL_SHARE of the time left, since a short run gains more from the training
time they cost than from the views.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..device import synchronize
from . import batchnorm
from .callbacks import Callback
from .evaluate import evaluate

if TYPE_CHECKING:
    from ..data.transforms import InputTransform

PLAN_AFTER = 4            # training steps timed before the first plan (the first one warms up)
REPLAN_EVERY = 16         # steps between plans in the epoch where the run ends (checks before it)
WRITE_SECONDS = 2.5       # weights, figures, predictions and summary (measured 1.5-2 s on 2 cores)
SAFETY = 0.03             # of the remaining time kept in reserve for timing noise
LIMIT_TOLERANCE = 0.15    # a time limit's first plan keeps its epochs if 85 % of them fit (see Budget.steps)
# The final evaluation's share of the time left at a budget's first plan above which the
# test-time views are cut (six -> the image and its mirror -> the image alone). Chosen on
# validation accuracy (`fast` at budgets of 30, 60 and 90 s, each run with six, two and one
# view): in a short run the training time the views cost buys more accuracy than they give, and
# past this share the fewer views won or tied (figures: docs/benchmarks)
EVAL_SHARE = 0.15


def process_age() -> float:
    """Seconds since this process started (the command's start: imports and loading count), or
    0 where the system does not say."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Budget:
    """A deadline (a time.perf_counter() value) and what must still happen after training."""

    seconds: float
    deadline: float
    eval_images: int                    # image-views of the final evaluation (at `tta`)
    max_epochs: int | None = None       # a time limit (train.time_limit): never more than these
    plans: list[dict[str, Any]] = field(default_factory=list)
    views: dict[int, int] = field(default_factory=dict)  # image-views per test-time level it may choose
    tta: int | None = None              # the level chosen (None: no choice made)

    @classmethod
    def starting(cls, seconds: float, started: float, eval_images: int | dict[int, int],
                 max_epochs: int | None = None) -> Budget:
        """`started`: the perf_counter time the command started. `eval_images`: the final
        evaluation's image-views, or for a budget those of each test-time level it may choose
        from (the experiment's level the highest). `max_epochs`: a limit rather than a budget:
        the run keeps its epochs where they fit and is shortened where not."""
        if isinstance(eval_images, dict):
            return cls(seconds, started + seconds, eval_images[max(eval_images)], max_epochs, views=dict(eval_images))
        return cls(seconds, started + seconds, eval_images, max_epochs)

    @property
    def kind(self) -> str:
        return "time limit" if self.max_epochs is not None else "time budget"

    def steps(self, done: int, step_seconds: float, image_seconds: float, val_images: int,
              steps_per_epoch: int) -> int:
        """The total number of training steps that fits, given `done` already taken; recorded
        as a plan."""
        now = time.perf_counter()
        if not self.plans and self.views:
            self._choose_views(now, image_seconds)
        total = self.fit(done, step_seconds, image_seconds, val_images, steps_per_epoch, now)
        plan = {"after_steps": done, "seconds_left": round(self.deadline - now, 2),
                "step_seconds": round(step_seconds, 4),
                "final_eval_seconds": round(self.eval_images * image_seconds, 2), "total_steps": total}
        if not self.plans and self.tta is not None:
            plan["tta"] = self.tta
        self.plans.append(plan)
        return total

    def fit(self, done: int, step_seconds: float, image_seconds: float, val_images: int,
            steps_per_epoch: int, now: float | None = None) -> int:
        """What `steps` would plan now, without recording it (a check between plans)."""
        now = time.perf_counter() if now is None else now
        left = self._left(now) - self.eval_images * image_seconds
        total = _steps_with_validations(done, left, step_seconds, val_images * image_seconds, steps_per_epoch)
        if self.max_epochs is not None:
            cap = self.max_epochs * steps_per_epoch
            # Early plans rest on few steps, and the first ones are the slowest: a schedule cut
            # by an early plan and restored by a later one makes another run of the same seed.
            # A limit keeps its epochs while the shortfall is within a tolerance that shrinks to
            # nothing as the run goes on; the plans of the last epoch still cut it to the deadline.
            if total >= cap * (1 - LIMIT_TOLERANCE * (1 - done / cap) ** 2):
                total = cap
            total = max(done, 1, min(total, cap))
        return total

    def choose_views(self, image_seconds: float) -> int:
        """The test-time level a budget plans for, at this inference speed and time left (the
        plan makes this choice before training: budget.steps then keeps it)."""
        self._choose_views(time.perf_counter(), image_seconds)
        assert self.tta is not None
        return self.tta

    def _choose_views(self, now: float, image_seconds: float) -> None:
        """The most test-time views whose final evaluation takes at most EVAL_SHARE of the time
        left (the fewest where none does)."""
        levels = sorted(self.views, reverse=True)
        share = EVAL_SHARE * self._left(now)
        self.tta = next((lv for lv in levels if self.views[lv] * image_seconds <= share), levels[-1])
        self.eval_images = self.views[self.tta]

    def _left(self, now: float) -> float:
        """Seconds left for training and the final evaluation: to the deadline, less the
        reserve and the files' writing."""
        return (self.deadline - now) * (1 - SAFETY) - WRITE_SECONDS

    def views_cut(self) -> bool:
        """Whether the budget chose fewer test-time views than the experiment's."""
        return self.tta is not None and bool(self.views) and self.tta < max(self.views)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds": self.seconds, "plans": self.plans}
        if self.tta is not None:
            out["tta"] = self.tta  # the final evaluation's test-time level it chose
        if self.max_epochs is not None:
            out["max_epochs"] = self.max_epochs
        return out


def _steps_with_validations(done: int, left: float, step_seconds: float, validation: float, spe: int) -> int:
    """The most steps (counting the `done` ones) whose training and validations fit in `left`
    seconds, `validation` seconds a pass after every epoch, the last one too where it ends
    part-way (the trainer validates it whole). Spread over an epoch's steps, a validation is
    exact where the run ends with an epoch; where it ends part-way through one, the spread
    counts only that share of its last pass, which on a large validation split (CIFAR-10's
    7,500 images) and a run shorter than an epoch was most of that pass uncounted. So the run
    ends part-way through an epoch only where that epoch's whole validation fits too; else at
    the end of the epoch before."""
    per_step = step_seconds + validation / spe
    more = max(0, math.floor(left / per_step)) if per_step > 0 else 0
    total = max(done, done + more, 1)
    if total % spe == 0 or total <= done:
        return total
    whole = done // spe  # epochs already validated
    epochs = -(-total // spe) - whole  # validations still to come, the last one part-way
    partial = done + math.floor((left - epochs * validation) / step_seconds) if step_seconds > 0 else total
    before = (whole + epochs - 1) * spe  # the end of the epoch before the last
    if partial > before:
        return max(min(total, partial), 1)
    return max(done, before, 1)


PROBE_IMAGES = 256  # validation images timed for the inference speed before the first validation


class Deadline(Callback):
    """Follows a time budget or limit (`budget`) while the run trains, by re-planning its total
    steps, and through them the schedule, in `self.params["total_steps"]` (the trainer reads it
    after every event; Callback says how):

    - after PLAN_AFTER steps (the first one warms up and is not timed): the first plan;
    - after every epoch, on the epoch's measured seconds per step (a time limit that now cuts
      the run says so);
    - every REPLAN_EVERY steps of the epoch where the run ends, and in the epochs between the
      first and the last where a check (`Budget.fit`) finds that the steps left no longer fit.

    The seconds of one inference pass per image come from the last validation (the epoch logs'
    `val_seconds`) or, before the first one, from one pass timed on `x_val`'s first
    PROBE_IMAGES. `log` receives what it chose. A resumed run keeps the steps it had planned
    (the deadline was the interrupted command's): the state carries the plans made so far,
    which `summary` still reports."""

    def __init__(self, budget: Budget | None, x_val: torch.Tensor, norm: InputTransform,
                 log: Callable[[str], None] | None = None):
        self.budget, self.x_val, self.norm, self.log = budget, x_val, norm, log
        self._record: dict[str, Any] | None = None  # what summary reports when no budget is followed
        self._key = "time_limit" if budget is not None and budget.max_epochs is not None else "time_budget"
        self._epoch = 0
        self._t_ref, self._ref_step = 0.0, 0  # this epoch's steps are timed from here
        self._val_seconds: float | None = None
        self._probe_seconds: float | None = None  # per image, before the first validation

    def spent_before_training(self, spent: float) -> None:
        """A limit found spent before training (the pipeline then trains one epoch): nothing is
        followed, and the summary says so."""
        assert self.budget is not None
        self._record = {"seconds": self.budget.seconds, "spent_before_training": round(spent, 1),
                        "max_epochs": 1, "plans": []}
        self.budget = None

    @property
    def key(self) -> str:
        """The metrics.json key of what it follows: `time_limit` or `time_budget`."""
        return self._key

    def summary(self) -> dict[str, Any] | None:
        """What the budget or limit planned (metrics.json's `time_budget` or `time_limit`)."""
        return self.budget.summary() if self.budget is not None else self._record

    def _device(self) -> torch.device:
        return self.plan.device if self.plan is not None else next(self.model.parameters()).device

    def _sync(self) -> float:
        """The clock, once a GPU's launched steps have run."""
        synchronize(self._device())
        return time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_begin(self, batch, logs=None):
        b = self.budget
        if b is None:
            return
        # every epoch before the one where the run ends is whole
        done, spe = (self._epoch - 1) * self.params["steps"] + batch, self.params["steps"]
        if batch == 0 or done == 1:  # the first step warms up; time the next ones
            self._t_ref, self._ref_step = self._sync(), batch
        first = done == PLAN_AFTER and not b.plans
        again = False
        if b.plans and batch > self._ref_step and batch % REPLAN_EVERY == 0:
            # In the epoch where the run ends, plan again on its steps so far, so that a host that
            # slows down now still ends in time (the epoch's end would be too late to notice).
            # After the first epoch (whose first steps are the slowest), an earlier epoch is
            # planned again where a plan now would cut the run, since a host that slows down in
            # the epoch before the last would otherwise overrun the limit. (That check reads the
            # clock without draining a GPU's queue of launched steps.)
            total = self.params["total_steps"]
            again = total - done <= spe - batch or (
                done > spe and b.fit(done, (time.perf_counter() - self._t_ref) / (batch - self._ref_step),
                                     self._image_seconds(), self._val_images(), spe) < total)
        if first or again:
            self._plan(done, (self._sync() - self._t_ref) / (batch - self._ref_step), announce=first)

    def on_epoch_end(self, epoch, logs=None):
        b = self.budget
        if b is None or logs is None:
            return
        self._val_seconds = logs.get("val_seconds")
        total, spe = self.params["total_steps"], self.params["steps"]
        if epoch * spe >= total:  # the run ends with this epoch
            return
        step_seconds = logs["seconds"] / spe  # a whole epoch, since the run goes on
        self._plan(epoch * spe, step_seconds, announce=False)
        if b.max_epochs is not None and self.params["total_steps"] < total:
            self._announce(epoch * spe, step_seconds)  # a time limit cuts in

    def _val_images(self) -> int:
        """Images each validation forwards: the validation split, and the training rows that
        recalibrate batch norm before it (batchnorm.py; the epoch logs' `val_seconds` include them)."""
        if self.plan is None:
            return len(self.x_val)
        return len(self.x_val) + batchnorm.images(self.model, self.plan.exp.train)

    def _image_seconds(self) -> float:
        """Seconds of one inference pass per image: from the last validation, or before the
        first one timed once on a few of its images."""
        if self._val_seconds is not None:  # measured on the whole validation split
            return self._val_seconds / max(1, self._val_images())
        if self._probe_seconds is None:
            x = self.x_val[:min(len(self.x_val), PROBE_IMAGES)]
            prec = self.plan.precision.precision if self.plan is not None else "fp32"
            t = time.perf_counter()
            evaluate(self.model, x, torch.zeros(len(x), dtype=torch.long), self.norm, device=self._device(),
                     precision=prec, tta=0)
            self._probe_seconds = (time.perf_counter() - t) / max(1, len(x))
        return self._probe_seconds

    def _plan(self, done: int, step_seconds: float, announce: bool) -> None:
        """Fit the total steps (and so the schedule) to the time left."""
        assert self.budget is not None
        self.params["total_steps"] = self.budget.steps(done, step_seconds, self._image_seconds(),
                                                       self._val_images(), self.params["steps"])
        if announce:
            self._announce(done, step_seconds)

    def _announce(self, done: int, step_seconds: float) -> None:
        """Say what the time budget or limit chose."""
        assert self.budget is not None
        if self.log is None:
            return
        b, plan, spe = self.budget, self.budget.plans[-1], self.params["steps"]
        total = self.params["total_steps"]
        schedule = self.plan.exp.train.schedule if self.plan is not None else "learning-rate"
        measured = (f"{b.kind} {b.seconds:g} s: {plan['seconds_left']:.1f} s left after {done} "
                    f"steps of {1000 * step_seconds:.0f} ms; final evaluation about "
                    f"{plan['final_eval_seconds']:.1f} s")
        if b.views_cut():
            measured += (f" with test-time level {b.tta} instead of {max(b.views)} (its views would "
                         f"take more than {EVAL_SHARE:.0%} of the time left)")
        fitted = f"{total} steps ({total / spe:.2f} epochs), the {schedule} schedule fitted to them"
        if b.max_epochs is None:
            self.log(f"{measured} -> {fitted}")
        elif total >= b.max_epochs * spe:
            self.log(f"{measured} -> its {b.max_epochs} epochs fit")
        else:
            self.log(f"{measured} -> its {b.max_epochs} epochs do not fit: {fitted} "
                     f"(--time-limit 0 lifts the limit)")

    def state_dict(self):
        return {"key": self._key, "summary": self.summary()}

    def load_state_dict(self, state):
        # the deadline belonged to the interrupted command: a resumed run keeps its planned steps
        self.budget = None
        self._key = state.get("key", self._key)
        self._record = state.get("summary")
