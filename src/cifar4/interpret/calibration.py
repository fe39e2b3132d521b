"""Whether a model's probabilities mean what they say: the expected calibration error, the
reliability diagram's bins, and temperature scaling (Guo et al. 2017, "On Calibration of
Modern Neural Networks"), whose one parameter is fitted on the validation split and judged on
the test split, so the test images never tune what is measured on them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BINS = 15  # equal-width confidence bins, as Guo et al. report ECE


@dataclass
class Reliability:
    """Per confidence bin: its edges, images, mean confidence and accuracy (NaN when empty)."""

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: the bins' |accuracy - confidence|, weighted by images."""
        n = self.count.sum()
        if n == 0:
            return float("nan")
        full = self.count > 0
        return float((self.count[full] * np.abs(self.accuracy[full] - self.confidence[full])).sum() / n)


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> Reliability:
    """The bins of the predicted class's probability (its confidence) against being right."""
    conf = probs.max(1)
    right = probs.argmax(1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, conf, bins) / count
        accuracy = np.bincount(which, right.astype(float), bins) / count
    return Reliability(edges, count, confidence, accuracy)


def ece(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    return reliability(probs, y, bins).ece


def nll(logits: torch.Tensor, y: torch.Tensor | np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (cross-entropy) of the logits divided by `temperature`."""
    return float(F.cross_entropy(logits.float() / temperature, torch.as_tensor(y).long()))


def fit_temperature(logits: torch.Tensor, y: torch.Tensor | np.ndarray) -> float:
    """The temperature T > 0 that minimises the NLL of logits / T (L-BFGS on log T from T = 1,
    with a strong-Wolfe line search, so each step lowers the NLL). Dividing every logit by one
    number keeps each image's predicted class, so accuracy is unchanged: only confidence moves."""
    logits = logits.detach().float()
    y_t = torch.as_tensor(y).long()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y_t)
        loss.backward()
        return loss
    opt.step(closure)
    return float(log_t.detach().exp())
