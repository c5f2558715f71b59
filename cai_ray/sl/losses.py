"""Training losses, summed rather than averaged, with the count they were summed over.

A learner group normalises by the count over the whole global batch (all ranks, all accumulated
micro-batches), so every token weighs the same whatever the split into ranks and micro-batches:
that is what makes 1-rank and N-rank runs agree on the same data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label of a position that carries no loss (prompt, padding)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Positions that carry loss after the next-token shift: labels[:, 1:] != IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over labelled positions, and their count.

    logits (B, T, V) predict the token at t+1 from position t; labels (B, T) hold the target token
    id or IGNORE_INDEX. Ignored positions contribute exactly zero loss and zero gradient.
    """
    # fp32 for a stable log-softmax
    return shifted_nll_sum(logits[:, :-1, :].float(), labels[:, 1:])


def shifted_nll_sum(
    shift_logits: torch.Tensor, shift_labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """`token_nll_sum` on logits already shifted: shift_logits (B, N, V) predict shift_labels
    (B, N), the target token ids or IGNORE_INDEX."""
    import torch.nn.functional as F

    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((shift_labels != IGNORE_INDEX).sum())


def token_nll_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over labelled positions (0 when there are none)."""
    total, count = token_nll_sum(logits, labels)
    return total / max(count, 1)
