"""RL objectives of the learner group: the PPO/GRPO policy loss, the PPO critic, and DPO.

Each is an `Objective` (cai_ray/sl/objective.py) plus `infer`, the no-grad pass the RL loop asks
for before an update (the policy's log-probs at sampling time, the critic's values). Rows hold
`input_ids` (prompt + response) and `prompt_len`; per-token fields (`advantages`,
`old_logprobs`, ...) have one entry per response token. In a (B, T) batch, logits at position t
predict token t + 1, so response token j sits at target position `prompt_len - 1 + j` of the
(B, T - 1) tensors built here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cai_ray.models.loading import CausalLMObjective, target_logits
from cai_ray.models.value_head import ScalarModelObjective

if TYPE_CHECKING:
    import torch


def collate_responses(
    rows: Sequence[Mapping[str, Any]], *, pad_id: int, fields: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask (B, T) right-padded; response_mask and `fields` (B, T - 1)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)  # (B, T)
    attn = torch.zeros((b, width), dtype=torch.long)  # (B, T)
    resp = torch.zeros((b, width - 1))  # (B, T-1) over target positions
    per_token = {f: torch.zeros((b, width - 1)) for f in fields}
    for i, r in enumerate(rows):
        seq, start = list(r["input_ids"]), int(r["prompt_len"]) - 1
        n = len(seq) - start - 1  # response tokens
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[i, : len(seq)] = 1
        resp[i, start : start + n] = 1.0
        for f in fields:
            per_token[f][i, start : start + n] = _response_field(r, f, n)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp, **per_token}


def _response_field(row: Mapping[str, Any], field: str, n: int) -> torch.Tensor:
    """A row's per-response-token `field` as float32 (n,), checked against its n tokens."""
    import torch

    values = list(row[field])
    if len(values) != n:
        raise ValueError(f"row field {field!r} has {len(values)} values for {n} tokens")
    return torch.tensor(values, dtype=torch.float32)


def collate_shared_responses(
    rows: Sequence[Mapping[str, Any]], *, pad_id: int, fields: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """The rows as shared-prefix rows (`cai_ray.models.shared_prefix`): rows with the same
    prompt tokens (a GRPO group, a DPO pair) run as one row, the prompt once. Response-aligned
    (S, R) tensors (R: the longest response): `target_pos` (the sequence position whose logits
    predict response token j: prompt_len - 1 + j), `targets`, `response_mask` and `fields`."""
    import torch

    from cai_ray.models import shared_prefix

    seqs = [list(r["input_ids"]) for r in rows]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (r, seq) in enumerate(zip(rows, seqs, strict=True)):
        groups.setdefault(tuple(seq[: int(r["prompt_len"])]), []).append(i)
    packed = shared_prefix.pack(seqs, list(groups.values()), pad_id=pad_id)
    sizes = [len(seq) - int(r["prompt_len"]) for r, seq in zip(rows, seqs, strict=True)]
    b, width = len(rows), max(max(sizes), 1)
    pos = torch.zeros((b, width), dtype=torch.long)  # (S, R)
    targets = torch.zeros((b, width), dtype=torch.long)
    resp = torch.zeros((b, width))
    per_token = {f: torch.zeros((b, width)) for f in fields}
    for i, (r, seq, n) in enumerate(zip(rows, seqs, sizes, strict=True)):
        start = int(r["prompt_len"]) - 1
        pos[i] = start  # padding reads the prompt's last position, masked out
        pos[i, :n] = torch.arange(start, start + n)
        targets[i, :n] = torch.tensor(seq[start + 1 :], dtype=torch.long)
        resp[i, :n] = 1.0
        for f in fields:
            per_token[f][i, :n] = _response_field(r, f, n)
    return {**shared_prefix.to_batch(packed), "target_pos": pos, "targets": targets,
            "response_mask": resp, **per_token}  # fmt: skip


def _shared_response_logprobs(
    model: Any, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, logits) of the response tokens of a shared-prefix batch, (S, R) and
    (S, R, V): the LM head runs from the first column any sequence needs (`logits_to_keep`)."""
    from cai_ray.models import shared_prefix
    from cai_ray.rl import algorithms

    inputs, where = shared_prefix.forward_inputs(model, dict(batch))
    cols = where.columns(batch["target_pos"])  # (S, R) columns in the packed rows
    width = inputs["input_ids"].shape[1]
    start = int(cols.min())
    out = model(**inputs, use_cache=False, logits_to_keep=width - start)
    logits = out.logits[where.row[:, None], cols - start].float()  # (S, R, V)
    return algorithms.token_logprobs(logits, batch["targets"]), logits


def _response_values(values: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """(B, T-1) values under the response mask -> one ragged list per row."""
    return [row[m > 0].tolist() for row, m in zip(values, mask, strict=True)]


def _response_logprobs(
    model: Any, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(log-probs of the next tokens, logits), both from `start` on, and `start` (0 for a
    shared-prefix batch: its tensors are response-aligned already)."""
    from cai_ray.rl import algorithms

    if "target_pos" in batch:
        logp, logits = _shared_response_logprobs(model, batch)
        return logp, logits, 0
    logits, start = target_logits(
        model,
        batch["response_mask"],
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
    )
    return algorithms.token_logprobs(logits, batch["input_ids"][:, 1 + start :]), logits, start


@dataclass(frozen=True)
class _PolicyModel(CausalLMObjective):
    """What the objectives that train the policy itself share: the causal LM loaded as in SFT."""

    # dropout off (TRL's DPO and reward trainers, OpenRLHF): the loss compares this forward's
    # log-probs with the rollout engine's or the reference's, both computed without dropout
    keeps_dropout = False

    pad_id: int = 0
    head: Literal["causal", "classification"] = "causal"
    share_prefix: bool = True  # rows with one prompt run as one row, the prompt once

    def tokens(self, batch: Mapping[str, torch.Tensor]) -> int:
        from cai_ray.models.shared_prefix import data_tokens

        return data_tokens(batch)

    def _collate(self, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] = ()) -> dict:
        how = collate_shared_responses if self.share_prefix else collate_responses
        return how(rows, pad_id=self.pad_id, fields=fields)


@dataclass(frozen=True)
class PolicyObjective(_PolicyModel):
    """PPO's clipped surrogate on per-token advantages (GRPO/RLOO: one advantage per response),
    plus beta * KL(policy || ref) as a loss term when rows carry `kl_coef` > 0, minus an entropy
    bonus. Summed over response tokens, so the group normalises by tokens (a token mean)."""

    clip_eps: float = 0.2
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        fields = [f for f in ("advantages", "old_logprobs", "ref_logprobs") if f in rows[0]]
        batch = self._collate(rows, fields)
        coef = [float(r.get("kl_coef", 0.0)) for r in rows]
        return {**batch, "kl_coef": torch.tensor(coef, dtype=torch.float32)}  # (B,)

    def loss_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["response_mask"].sum())

    def loss(
        self, model: Any, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from cai_ray.rl import algorithms

        logp, logits, start = _response_logprobs(model, batch)  # (B, T') T' = T-1-start
        mask = batch["response_mask"][:, start:]  # (B, T')
        units = mask.sum()
        old, adv = batch["old_logprobs"][:, start:], batch["advantages"][:, start:]
        pl = algorithms.ppo_policy_loss(logp, old, adv, mask, clip_eps=self.clip_eps)
        total = pl.loss * units  # the masked mean times the count: a masked sum
        kl_fn = algorithms.pick(algorithms.KL_ESTIMATORS, self.kl_estimator, what="kl estimator")
        kl = kl_fn(logp, batch["ref_logprobs"][:, start:]) * mask  # (B, T')
        coef = batch["kl_coef"][:, None]  # (B, 1)
        if bool((coef > 0).any()):
            total = total + (coef * kl).sum()
        entropy = algorithms.masked_sum(algorithms.token_entropy(logits), mask)
        if self.entropy_coef:
            total = total - self.entropy_coef * entropy
        return total, {
            "policy_loss": float(pl.loss.detach() * units),
            "clip_fraction": float(pl.clip_fraction * units),
            "approx_kl": float(pl.approx_kl * units),
            "entropy": float(entropy.detach()),
            "kl_loss_term": float(kl.detach().sum()),
        }

    def infer(self, model: Any, batch: Mapping[str, torch.Tensor]) -> list[list[float]]:
        """Log-probs of each row's response tokens under the current weights."""
        logp, _, start = _response_logprobs(model, batch)
        return _response_values(logp, batch["response_mask"][:, start:])


@dataclass(frozen=True)
class ValueObjective(ScalarModelObjective):
    """PPO's critic: a scalar head on the LM's decoder (`cai_ray.models.value_head`), a value per
    token, for any causal family (Gemma 3 has no *ForTokenClassification: issue 14).

    Started from the PM (its head is the value head: InstructGPT's choice) or from the policy
    (a fresh head). Loss: the clipped value loss against GAE returns.
    """

    pad_id: int = 0
    clip_eps: float = 0.2
    head: Literal["causal", "classification"] = "classification"

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        fields = [f for f in ("returns", "old_values") if f in rows[0]]
        return collate_responses(rows, pad_id=self.pad_id, fields=fields)

    def loss_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["response_mask"].sum())

    def _values(self, model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        values = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return values[:, :-1]  # (B, T-1): V of the state before token t + 1

    def loss(
        self, model: Any, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from cai_ray.rl import algorithms

        mask = batch["response_mask"]
        units = mask.sum()
        values = self._values(model, batch)
        loss, clip = algorithms.ppo_value_loss(
            values, batch["old_values"], batch["returns"], mask, clip_eps=self.clip_eps
        )
        return loss * units, {"value_clip_fraction": float(clip * units)}

    def infer(self, model: Any, batch: Mapping[str, torch.Tensor]) -> list[list[float]]:
        return _response_values(self._values(model, batch), batch["response_mask"])

    def tokens(self, batch: Mapping[str, torch.Tensor]) -> int:
        from cai_ray.models.shared_prefix import data_tokens

        return data_tokens(batch)


@dataclass(frozen=True)
class DPOObjective(_PolicyModel):
    """DPO on (chosen, rejected) rows with the reference's summed log-probs precomputed.

        Rows: `chosen_ids`, `rejected_ids`, `chosen_prompt_len`, `rejected_prompt_len`,
        `ref_chosen`, `ref_rejected`. One forward of 2B sequences (with `share_prefix`, each pair's
    prompt once); the loss is summed over pairs.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    length_columns: tuple[str, ...] = ("chosen_ids", "rejected_ids")

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        seqs = [{"input_ids": r[f"{k}_ids"], "prompt_len": r[f"{k}_prompt_len"]} for k in
                ("chosen", "rejected") for r in rows]  # fmt: skip
        batch = self._collate(seqs)
        ref = [float(r["ref_chosen"]) for r in rows] + [float(r["ref_rejected"]) for r in rows]
        return {**batch, "ref_logps": torch.tensor(ref, dtype=torch.float32)}  # (2B,)

    def loss_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["ref_logps"].shape[0] // 2)

    def loss(
        self, model: Any, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from cai_ray.rl import algorithms

        logp, _, start = _response_logprobs(model, batch)
        seq = algorithms.sequence_logprobs(logp, batch["response_mask"][:, start:])  # (2B,)
        chosen, rejected = seq.chunk(2)
        ref_c, ref_r = batch["ref_logps"].chunk(2)
        out = algorithms.dpo_loss(
            chosen, rejected, ref_c, ref_r, beta=self.beta, label_smoothing=self.label_smoothing
        )
        n = chosen.shape[0]
        return out.loss * n, {
            "margin": float(out.margin.sum()),
            "reward_accuracy": float((out.margin > 0).float().sum()),
            "chosen_reward": float(out.chosen_rewards.sum()),
            "rejected_reward": float(out.rejected_rewards.sum()),
        }

    def infer(self, model: Any, batch: Mapping[str, torch.Tensor]) -> list[float]:
        """Summed response log-probs of each sequence (chosen rows, then rejected)."""
        from cai_ray.rl import algorithms

        logp, _, start = _response_logprobs(model, batch)
        return algorithms.sequence_logprobs(logp, batch["response_mask"][:, start:]).tolist()
