"""Classifier calibration: expected calibration error over equal-width confidence bins (Guo et al. 2017)."""

from __future__ import annotations

import torch
from torch import Tensor


def calibration_bins(log_probs: Tensor, labels: Tensor, bins: int = 15) -> dict[str, Tensor]:
    """Per bin of the confidence max_y p(y|x) (bin b holds confidences in (b/bins, (b+1)/bins]; a
    confidence of exactly 0 goes into bin 0): example count, mean confidence and accuracy (0 where empty)."""
    probs = log_probs.exp()
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    index = (torch.ceil(confidence.double() * bins) - 1).clamp(0, bins - 1).long()
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(correct))
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence.double())
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return {"count": count, "confidence": conf_sum / safe, "accuracy": acc_sum / safe,
            "edges": torch.linspace(0, 1, bins + 1, dtype=torch.float64)}


def expected_calibration_error(log_probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE = sum_b (n_b / N) |accuracy_b - confidence_b| over `bins` equal-width confidence bins."""
    stats = calibration_bins(log_probs, labels, bins)
    weights = stats["count"] / stats["count"].sum()
    return float((weights * (stats["accuracy"] - stats["confidence"]).abs()).sum())
