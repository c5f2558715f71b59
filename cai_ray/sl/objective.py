"""What a learner group trains: the model it builds and the summed loss on a batch.

The learner machinery (ranks, DeepSpeed, checkpoints, metrics) knows nothing about SFT: it asks
an `Objective` for the model, the collated batch, the loss summed over the batch's loss units and
how many units there are. The preference model (Bradley-Terry over pairs) and RL (policy/value
losses) plug in here later. An objective is a small picklable value sent to every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from cai_ray.models.loading import CausalLMObjective

if TYPE_CHECKING:
    import torch


class Objective(Protocol):
    """A training objective; `loss` returns a sum so the group can normalise globally. An
    optional `length_columns` (token-id columns) lets `learner.group_by_length` sort rows; an
    optional `keeps_dropout` (default True) is `learner.disable_dropout`'s default, negated."""

    head: Literal["causal", "classification"]

    def check_model(self, model_path: str | Path) -> None:
        """Raise ModelError for a directory this objective cannot train (driver side, cheap)."""
        ...

    def load_model(self, model_path: str | Path) -> torch.nn.Module:
        """The model in fp32 (DeepSpeed casts it when training in bf16)."""
        ...

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """One micro-batch of tensors from dataset rows."""
        ...

    def loss_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        """How many units (tokens, pairs) `loss` sums over; known before the forward pass."""
        ...

    def loss(
        self, model: Any, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss summed over the batch's units, extra metrics summed over the same units).

        The extra metrics must have the same keys on every call: ranks all-reduce them in order.
        """
        ...

    def tokens(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Tokens the batch processes (for tokens/s), padding excluded."""
        ...


@dataclass(frozen=True)
class SFTObjective(CausalLMObjective):
    """Next-token cross-entropy on response tokens only (labels are IGNORE_INDEX on prompts)."""

    pad_id: int = 0
    head: Literal["causal", "classification"] = "causal"
    length_columns: tuple[str, ...] = ("input_ids",)  # what `learner.group_by_length` sorts by

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        from cai_ray.sl.sft_data import collate

        return collate(rows, pad_id=self.pad_id)

    def loss_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        from cai_ray.sl.losses import count_label_tokens

        return count_label_tokens(batch["labels"])

    def loss(
        self, model: Any, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from cai_ray.models.loading import target_logits
        from cai_ray.sl.losses import IGNORE_INDEX, shifted_nll_sum

        inputs = {
            k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch
        }
        targets = batch["labels"][:, 1:]  # (B, T-1)
        # Logits only from the first labelled position on: the prompt's share of the LM head
        # and the softmax is skipped (the loss and the gradient are the same).
        logits, start = target_logits(model, targets != IGNORE_INDEX, **inputs)
        total, _ = shifted_nll_sum(logits, targets[:, start:])
        return total, {}

    def tokens(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["num_tokens"])
