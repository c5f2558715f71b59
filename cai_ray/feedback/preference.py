"""Preference-model math (paper section 4.1, CAI_METHOD.md stage 5): Bradley-Terry on soft labels.

The PM assigns a scalar r to a conversation ending in a response; P(A preferred over B) is
sigmoid(r_A - r_B). With the AI label p = P(A preferred) as a soft target the loss is
-[p log s(r_A - r_B) + (1 - p) log s(r_B - r_A)], a cross-entropy that is smallest at
s(r_A - r_B) = p. Pure torch; the learner objective lives in cai_ray/feedback/pm_objective.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def bt_loss_sum(r_a: torch.Tensor, r_b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry cross-entropy with soft labels, summed over pairs. All inputs (B,).

    >>> import torch
    >>> round(float(bt_loss_sum(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]))), 4)
    0.6931
    """
    import torch.nn.functional as F

    diff = r_a.float() - r_b.float()  # (B,)
    p = p.float()
    return -(p * F.logsigmoid(diff) + (1 - p) * F.logsigmoid(-diff)).sum()


def agreement_count(r_a: torch.Tensor, r_b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """How many pairs the PM orders as the label does (ties of the label, p = 0.5, never count)."""
    return ((r_a > r_b) & (p > 0.5) | (r_a < r_b) & (p < 0.5)).sum()


def pair_metrics(
    scores_a: Sequence[float], scores_b: Sequence[float], labels: Sequence[float], *, bins: int = 10
) -> dict[str, Any]:
    """Held-out accuracy, mean BT loss and calibration (ECE) of a PM on labelled pairs.

    Accuracy counts pairs whose label is not a tie; calibration bins the PM's predicted
    P(A preferred) = sigmoid(r_A - r_B) and compares each bin's mean prediction with its mean
    label (for hard labels: the observed frequency), weighted by bin size.
    """
    import torch

    a, b, p = (torch.tensor(list(x), dtype=torch.float64) for x in (scores_a, scores_b, labels))
    n = len(p)
    if n == 0:
        return {"pairs": 0, "accuracy": None, "loss": None, "ece": None, "calibration": []}
    decided = int((p != 0.5).sum())
    pred = torch.sigmoid(a - b)  # (N,)
    table, ece = [], 0.0
    which = torch.clamp((pred * bins).long(), max=bins - 1)
    for k in range(bins):
        sel = which == k
        if sel.any():
            mean_pred, mean_label = float(pred[sel].mean()), float(p[sel].mean())
            count = int(sel.sum())
            ece += count / n * abs(mean_pred - mean_label)
            table.append({"bin": k, "count": count, "predicted": mean_pred, "observed": mean_label})
    return {
        "pairs": n,
        "accuracy": float(agreement_count(a, b, p)) / decided if decided else None,
        "loss": float(bt_loss_sum(a, b, p)) / n,
        "ece": ece,
        "calibration": table,
    }
