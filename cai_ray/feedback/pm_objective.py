"""PreferenceObjective: the Bradley-Terry loss of a PM, as an `Objective` of the learner group.

The PM is a scalar head on a causal LM's decoder (`cai_ray.models.value_head`), started from a
pretrained LM (paper section 4.1) or from an earlier PM. A micro-batch of B pairs runs as one
forward of 2B right-padded sequences (A texts then B texts); the head reads the last non-pad
token. The loss is summed over pairs, so the group normalises by pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cai_ray.models.value_head import ScalarModelObjective

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PreferenceObjective(ScalarModelObjective):
    """Rows carry `ids_a`, `ids_b` (token ids of the two full transcripts) and `label` = P(A)."""

    pad_id: int = 0
    head: Literal["causal", "classification"] = "classification"
    length_columns: tuple[str, ...] = ("ids_a", "ids_b")  # 2B sequences pad to the longest

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        seqs = [list(r["ids_a"]) for r in rows] + [list(r["ids_b"]) for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)  # (2B, T)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        labels = torch.tensor([float(r["label"]) for r in rows], dtype=torch.float32)  # (B,)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def loss(
        self, model: Any, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from cai_ray.feedback.preference import agreement_count, bt_loss_sum

        rewards = pm_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
        r_a, r_b = rewards.chunk(2)  # (B,), (B,)
        p = batch["labels"]
        total = bt_loss_sum(r_a, r_b, p)
        return total, {
            "accuracy": float(agreement_count(r_a.detach(), r_b.detach(), p)),
            "margin": float((r_a - r_b).detach().sum()),
        }

    def tokens(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())


def pm_scores(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The PM's scalar per sequence, read at the last non-pad token. (N, T) -> (N,)."""
    return model(input_ids=ids, attention_mask=mask, last_only=True)
