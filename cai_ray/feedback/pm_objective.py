"""PreferenceObjective: the Bradley-Terry loss of a PM, as an `Objective` of the learner group.

The PM is a scalar head on a causal LM's decoder (`cai_ray.models.value_head`), started from a
pretrained LM (paper section 4.1) or from an earlier PM. The two sides of a pair are one
conversation with two answers: by default (`share_prefix`) a micro-batch of B pairs runs as B
rows, each the pair's common token prefix once and then both answers
(`cai_ray.models.shared_prefix`: the same scores and gradients as separate rows, the prefix
computed once); else as 2B right-padded sequences (A texts then B texts). The head reads each
side's last token. The loss is summed over pairs, so the group normalises by pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from cai_ray.models.value_head import ScalarModelObjective


@dataclass(frozen=True)
class PreferenceObjective(ScalarModelObjective):
    """Rows carry `ids_a`, `ids_b` (token ids of the two full transcripts) and `label` = P(A)."""

    pad_id: int = 0
    head: Literal["causal", "classification"] = "classification"
    length_columns: tuple[str, ...] = ("ids_a", "ids_b")  # 2B sequences pad to the longest
    share_prefix: bool = True  # each pair's common prefix runs once (learner.share_prefix)

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        from cai_ray.models import shared_prefix

        seqs = [list(r["ids_a"]) for r in rows] + [list(r["ids_b"]) for r in rows]
        labels = torch.tensor([float(r["label"]) for r in rows], dtype=torch.float32)  # (B,)
        if self.share_prefix:
            packed = shared_prefix.pack(seqs, shared_prefix.pair_groups(len(rows)),
                                        pad_id=self.pad_id)  # fmt: skip
            return {**shared_prefix.to_batch(packed), "labels": labels}
        ids, mask = shared_prefix.right_pad(seqs, pad_id=self.pad_id)  # (2B, T)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def loss(
        self, model: Any, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from cai_ray.feedback.preference import agreement_count, bt_loss_sum

        rewards = pm_scores(model, batch)  # (2B,)
        r_a, r_b = rewards.chunk(2)  # (B,), (B,)
        p = batch["labels"]
        total = bt_loss_sum(r_a, r_b, p)
        return total, {
            "accuracy": float(agreement_count(r_a.detach(), r_b.detach(), p)),
            "margin": float((r_a - r_b).detach().sum()),
        }

    def tokens(self, batch: Mapping[str, torch.Tensor]) -> int:
        """The pairs' tokens (both sides in full, however many the forward ran)."""
        from cai_ray.models import shared_prefix

        return shared_prefix.data_tokens(batch)


def pm_scores(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The PM's scalar per sequence of a collated batch, read at its last token: (2B,)."""
    from cai_ray.models import shared_prefix

    if "seq_lengths" not in batch:  # right-padded rows
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], last_only=True
        )
    inputs, where = shared_prefix.forward_inputs(model, dict(batch))
    return model(**inputs, at=where.last_at())
