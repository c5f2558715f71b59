"""One RL step's experience: samples -> rewards, KL, advantages -> learner rows (Ray-free).

The driver gathers, per sample, the PM score, the policy's log-probs at sampling time and the
SL-CAI reference's log-probs of the response tokens (and the critic's values for PPO); this
module turns them into advantages with `cai_ray.rl.algorithms` and into the rows the policy and value
learners train on. Per-token lists are ragged (one entry per response token); tensors are
padded here and cut back to lists on the way out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cai_ray.config.rl import RLTrainConfig
from cai_ray.errors import CaiRayError
from cai_ray.rl import algorithms


@dataclass
class Sample:
    """One sampled response; `group` is its prompt's index in the step, `index` its number."""

    prompt_id: str
    source: str
    group: int
    index: int
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    response_ids: list[int]
    response: str
    finish_reason: str
    weight_version: int
    rollout_logprobs: list[float] | None = None

    def sequence(self) -> dict[str, Any]:
        """The learner-side view: all token ids and where the response starts."""
        return {
            "input_ids": self.prompt_ids + self.response_ids,
            "prompt_len": len(self.prompt_ids),
        }


@dataclass
class Experience:
    """Per-sample advantages/returns (ragged lists) and the step's statistics."""

    advantages: list[list[float]]
    returns: list[list[float]]
    rewards: list[float]  # the sequence reward the advantages saw (score - beta * KL in reward)
    kl: list[float]  # summed k1 KL(policy || ref) per response
    stats: dict[str, float]


def pad(values: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists -> (values, mask), both (B, T) float32, right-padded with 0."""
    width = max(1, max((len(v) for v in values), default=0))
    out = torch.zeros(len(values), width)
    mask = torch.zeros(len(values), width)
    for i, v in enumerate(values):
        if len(v):
            out[i, : len(v)] = torch.tensor(list(v), dtype=torch.float32)
            mask[i, : len(v)] = 1.0
    return out, mask


def unpad(values: torch.Tensor, lengths: Sequence[int]) -> list[list[float]]:
    """(B, T) -> ragged lists of the given lengths."""
    rows = values.tolist()
    return [row[:n] for row, n in zip(rows, lengths, strict=True)]


def check_finite(scores: Sequence[float], *, what: str) -> None:
    """A NaN or infinite reward is an error naming the first bad sample."""
    for i, s in enumerate(scores):
        if not isinstance(s, int | float) or not math.isfinite(s):
            raise CaiRayError(f"{what} returned {s!r}", where=f"sample {i}")


# rl_train.algorithm -> its advantage estimator in `algorithms.ADVANTAGE_ESTIMATORS` (same name else)
ESTIMATOR_OF = {"ppo": "gae"}


def compute_advantages(
    *,
    scores: Sequence[float],
    old_logprobs: Sequence[Sequence[float]],
    ref_logprobs: Sequence[Sequence[float]],
    values: Sequence[Sequence[float]] | None,
    s: RLTrainConfig,
    beta: float,
) -> Experience:
    """Advantages for one step (CAI stage 6: reward = PM score - beta * KL(policy || SL-CAI)).

    `s` is the `rl_train` section; `beta` is this step's KL coefficient (the adaptive controller
    moves it between steps).

    PPO: per-token KL-shaped rewards (kl_mode=reward) and GAE over the critic's values,
    optionally whitened. GRPO/RLOO: sequence rewards (minus beta * summed KL in reward mode)
    against the group baseline; consecutive `group_size` samples share a prompt.
    """
    lengths = [len(x) for x in old_logprobs]
    if [len(x) for x in ref_logprobs] != lengths:
        raise CaiRayError("reference log-probs do not cover the same response tokens")
    old, mask = pad(old_logprobs)  # (B, T)
    ref, _ = pad(ref_logprobs)  # (B, T)
    score = torch.tensor(list(scores), dtype=torch.float32)  # (B,)
    kl_sum = algorithms.masked_sum(algorithms.kl_k1(old, ref), mask, dim=-1)  # (B,)
    kl_tok = algorithms.pick(algorithms.KL_ESTIMATORS, s.kl_estimator, what="kl estimator")(
        old, ref
    )
    in_reward = s.kl_mode == "reward"
    if s.algorithm == "ppo":
        if values is None:
            raise CaiRayError("PPO needs the critic's values", where="rl_train.algorithm")
        v, _ = pad(values)  # (B, T)
        penalty = kl_tok if in_reward else torch.zeros_like(kl_tok)
        token_rewards = algorithms.kl_penalized_rewards(score, penalty, mask, beta=beta)  # (B, T)
        inputs = algorithms.AdvantageInputs(
            mask=mask, token_rewards=token_rewards, values=v, gamma=s.gamma, lam=s.lam
        )
        seq_reward = algorithms.masked_sum(token_rewards, mask, dim=-1)  # (B,)
    else:
        seq_kl = algorithms.masked_sum(kl_tok, mask, dim=-1)
        seq_reward = score - beta * seq_kl if in_reward else score  # (B,)
        inputs = algorithms.AdvantageInputs(
            mask=mask,
            scores=seq_reward,
            group_size=s.samples_per_prompt,
            scale_by_std=s.grpo_scale_by_std,
        )
    name = ESTIMATOR_OF.get(s.algorithm, s.algorithm)
    estimate = algorithms.pick(algorithms.ADVANTAGE_ESTIMATORS, name, what="advantage estimator")
    adv, ret = estimate(inputs)  # (B, T) each; critic-free estimators return A twice
    if s.algorithm == "ppo" and s.whiten_advantages:
        adv = algorithms.masked_whiten(adv, mask)
    stats = {
        "score_mean": float(score.mean()),
        "score_std": float(score.std()) if len(score) > 1 else 0.0,
        "reward_mean": float(seq_reward.mean()),
        "reward_std": float(seq_reward.std()) if len(score) > 1 else 0.0,
        "kl": float(kl_sum.mean()),
        "kl_k3": float(algorithms.masked_sum(algorithms.kl_k3(old, ref), mask, dim=-1).mean()),
        "advantage_mean": float(algorithms.masked_mean(adv, mask)),
        "response_tokens": float(mask.sum(-1).mean()),
    }
    return Experience(
        advantages=unpad(adv, lengths),
        returns=unpad(ret, lengths),
        rewards=seq_reward.tolist(),
        kl=kl_sum.tolist(),
        stats=stats,
    )


def policy_rows(
    samples: Sequence[Sample],
    exp: Experience,
    old_logprobs: Sequence[Sequence[float]],
    ref_logprobs: Sequence[Sequence[float]],
    *,
    kl_coef: float,
) -> list[dict[str, Any]]:
    """Rows for the policy learner; `kl_coef` > 0 adds beta * KL as a loss term."""
    return [
        {
            **smp.sequence(),
            "advantages": adv,
            "old_logprobs": list(old),
            "ref_logprobs": list(ref),
            "kl_coef": kl_coef,
        }
        for smp, adv, old, ref in zip(
            samples, exp.advantages, old_logprobs, ref_logprobs, strict=True
        )
    ]


def value_rows(
    samples: Sequence[Sample], exp: Experience, old_values: Sequence[Sequence[float]]
) -> list[dict[str, Any]]:
    """Rows for the critic: returns as targets, the sampling-time values for clipping."""
    return [
        {**smp.sequence(), "returns": ret, "old_values": list(v)}
        for smp, ret, v in zip(samples, exp.returns, old_values, strict=True)
    ]


def mean_of(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    """Mean of `key` over metric rows that have it (None when none do)."""
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None
