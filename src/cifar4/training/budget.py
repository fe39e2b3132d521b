"""`--time-budget SECONDS`: the user says how long they can wait, from the command's start to
metrics.json; training fits its length to that. `--time-limit SECONDS` (train.time_limit, which
the `fast` preset sets) is the same measurement used as a ceiling: the experiment's epochs run
as set where they fit, and are shortened (the schedule fitted to the steps that fit) where not.

The trainer measures its own speed (seconds per training step over the first steps, and the
seconds of one inference pass per image, timed on validation images), then sets the number of
steps so that what remains fits: the training steps, the validation after each epoch, the
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
from dataclasses import dataclass, field
from typing import Any

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
        per_step = step_seconds + val_images * image_seconds / steps_per_epoch
        more = max(0, math.floor(left / per_step)) if per_step > 0 else 0
        total = max(done, done + more, 1)
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
