"""PreferenceObjective: the Bradley-Terry loss of a PM, as an `Objective` of the learner group.

The PM is a sequence-classification head (num_labels = 1) on a causal LM. A micro-batch of B
pairs runs as one forward of 2B right-padded sequences (A texts then B texts); the head reads
the last non-pad token. The loss is summed over pairs, so the group normalises by pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cai_ray.errors import ModelError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PreferenceObjective:
    """Rows carry `ids_a`, `ids_b` (token ids of the two full transcripts) and `label` = P(A)."""

    pad_id: int = 0
    head: Literal["causal", "classification"] = "classification"

    def check_model(self, model_path: str | Path) -> None:
        from cai_ray.models import check_model_dir

        check_model_dir(model_path, head="classification")

    def load_model(self, model_path: str | Path) -> torch.nn.Module:
        import torch
        from transformers import AutoModelForSequenceClassification

        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_path), dtype=torch.float32
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(
                f"cannot load a sequence-classification model: {exc}".splitlines()[0],
                where=str(model_path),
                hint="a PM is a *ForSequenceClassification directory with num_labels=1",
            ) from None
        if model.config.num_labels != 1:
            raise ModelError(
                f"a PM has one output, this model has {model.config.num_labels}",
                where=str(Path(model_path) / "config.json"),
                hint="build it with num_labels=1 (e.g. a preset with head=classification)",
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.pad_id  # the head finds the last token by it
        return model

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
        from cai_ray.preference import agreement_count, bt_loss_sum

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
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits[:, 0].float()
