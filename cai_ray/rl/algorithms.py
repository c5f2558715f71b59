"""RL-CAI math (CAI paper stage 6): pure torch, no Ray, so every formula is unit-testable on CPU.

Tensors over response tokens are (B, T) with a 0/1 response `mask` (B, T); sequence-level values
(PM scores, feedback scores) are (B,). The RL loop picks estimators by name from the registries
below (ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, KL_CONTROLLERS) via `pick`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cai_ray.errors import CaiRayError

# Monitoring helpers live in the torch-free rule_rewards (the config reads the phrases).
from cai_ray.feedback.rule_rewards import DEFAULT_BOILERPLATE_PHRASES, phrase_rate  # noqa: F401

# ---------------------------------------------------------------- masked reductions


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1 (over all elements, or along `dim`)."""
    prod = values * mask  # (B, T)
    return prod.sum() if dim is None else prod.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1; 0 where the mask is empty (no division by zero)."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over masked entries (unbiased variance); masked-out entries become 0.

    `shift_mean=False` only rescales, keeping the sign of the advantages (as TRL's PPO option).
    """
    mean = masked_mean(values, mask)
    count = mask.sum()
    var = masked_sum((values - mean) ** 2, mask) / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---------------------------------------------------------------- log-probs and entropy


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t] | logits[b, t]) per token, (B, T, V) x (B, T) -> (B, T).

    The caller aligns logits with labels (logits at t predict labels at t). Negative labels
    (padding, -100) are gathered as token 0 and must be masked by the caller.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V); fp32 for stability
    index = labels.clamp(min=0).unsqueeze(-1)  # (B, T, 1)
    return logp.gather(-1, index).squeeze(-1)  # (B, T)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each token's distribution, (B, T, V) -> (B, T): logsumexp(z) - sum(p * z)."""
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of the per-token entropy (a scalar to log: collapse shows as entropy -> 0)."""
    return masked_mean(token_entropy(logits), mask)


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of each response, (B, T) -> (B,): the quantity DPO compares."""
    return masked_sum(token_logps, mask, dim=-1)  # (B,)


# ---------------------------------------------------------------- KL estimators
# Per-token estimators of KL(policy || ref) from samples of the policy (Schulman, "Approximating
# KL divergence", 2020): k1 is unbiased but can go negative, k3 is unbiased, >= 0, lower variance.


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log(p / ref)."""
    return logp - ref_logp  # (B, T)


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * log(p / ref)^2 (biased, but its gradient is the KL's gradient at p = ref)."""
    return 0.5 * (logp - ref_logp) ** 2  # (B, T)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = ref/p - 1 - log(ref/p) = exp(-log_ratio) - 1 + log_ratio."""
    # Clamp so exp() cannot overflow when the policy has drifted far from the reference.
    log_ratio = (logp - ref_logp).clamp(-20.0, 20.0)  # (B, T)
    return torch.exp(-log_ratio) - 1.0 + log_ratio  # (B, T)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def pick(registry: dict[str, Any], name: str, *, what: str) -> Any:
    """Look `name` up in a registry; an unknown name is a CaiRayError naming the closest one."""
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise CaiRayError(
        f"unknown {what} {name!r}",
        where=what,
        hint=f"{hint}choose one of: {', '.join(sorted(registry))}",
    )


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each mask row, (B, T) -> (B,); an all-zero row is an error."""
    if bool((mask.sum(dim=-1) == 0).any()):
        raise CaiRayError(
            "a response has no tokens under its mask",
            where="response_mask",
            hint="keep at least the EOS token of every response in the mask",
        )
    positions = torch.arange(mask.size(-1), device=mask.device)  # (T,)
    return (positions * (mask > 0)).argmax(dim=-1)  # (B,)


def kl_penalized_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """Per-token reward -beta * kl_t, plus the sequence score (PM score) at the last token.

    CAI §4.2 / HH-RLHF: reward = PM score - beta * KL(policy || SL-CAI), shaped per token so GAE
    credits the KL cost where it is paid and the score where the response ends.
    """
    rewards = -beta * kl * mask  # (B, T)
    last = last_token_index(mask)  # (B,)
    rows = torch.arange(rewards.size(0), device=rewards.device)  # (B,)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards  # (B, T)


def kl_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *, estimator: str = "k3"
) -> torch.Tensor:
    """KL to the reference as a loss term (GRPO style): masked mean of the chosen estimator."""
    return masked_mean(pick(KL_ESTIMATORS, estimator, what="kl estimator")(logp, ref_logp), mask)


# ---------------------------------------------------------------- KL coefficient controllers


class FixedKLController:
    """A constant beta (HH-RLHF used about 0.001)."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    @classmethod
    def build(cls, beta: float, *, target: float, horizon: int) -> FixedKLController:
        """The `KL_CONTROLLERS` constructor; target and horizon are the adaptive one's."""
        return cls(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        """Checkpointable state."""
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from `state_dict()`."""
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """Proportional controller driving the measured KL to `target` (Ziegler et al. 2019, §2.2).

    error = clip(kl / target - 1, -0.2, 0.2); beta *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_beta: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise CaiRayError(
                f"adaptive KL needs target > 0 and horizon > 0 (got {target}, {horizon})",
                where="kl.target / kl.horizon",
                hint="e.g. target 6.0 nats and horizon 10000 samples, as in Ziegler et al.",
            )
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    @classmethod
    def build(cls, beta: float, *, target: float, horizon: int) -> AdaptiveKLController:
        """The `KL_CONTROLLERS` constructor (one signature for every controller)."""
        return cls(beta, target, horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta towards the target after `n_steps` samples that showed `current_kl`."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Checkpointable state (target and horizon too, so a resumed run can check them)."""
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from `state_dict()`."""
        self.beta = float(state["beta"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


# name -> controller class; construct one with `.build(beta, target=..., horizon=...)`.
KL_CONTROLLERS: dict[str, type] = {"fixed": FixedKLController, "adaptive": AdaptiveKLController}


# ---------------------------------------------------------------- advantages


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t; A_t = delta_t + gamma * lam * A_{t+1}; V after the
    last token is 0. Masked-out positions are skipped (as if absent) and get 0.
    """
    batch, length = rewards.shape
    mask = mask.to(rewards.dtype)
    next_value = rewards.new_zeros(batch)  # (B,)
    next_adv = rewards.new_zeros(batch)  # (B,)
    advantages = torch.zeros_like(rewards)  # (B, T)
    for t in reversed(range(length)):
        m = mask[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = delta + gamma * lam * next_adv  # (B,)
        advantages[:, t] = adv * m
        # A masked position passes the next token's value and advantage through unchanged.
        next_value = m * values[:, t] + (1 - m) * next_value
        next_adv = m * adv + (1 - m) * next_adv
    returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


def _check_groups(scores: torch.Tensor, group_size: int, *, min_size: int) -> None:
    if group_size < min_size or scores.dim() != 1 or scores.numel() % group_size:
        raise CaiRayError(
            f"{scores.numel()} scores cannot be split into groups of {group_size} "
            f"(need group_size >= {min_size} dividing the batch)",
            where="rl.group_size",
            hint="sample group_size responses per prompt and keep each prompt's group together",
        )


def group_normalized_scores(
    scores: torch.Tensor, *, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (r - mean_group) / (std_group + eps), (N,) -> (N,).

    Groups are consecutive runs of `group_size`; std is unbiased (a group of 1 gets advantage 0).
    `scale_by_std=False` is Dr. GRPO's mean-only baseline.
    """
    _check_groups(scores, group_size, min_size=1)
    grouped = scores.view(-1, group_size)  # (P, G)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)  # (P, G)
    if scale_by_std and group_size > 1:
        centred = centred / (grouped.std(dim=-1, keepdim=True) + eps)  # (P, G)
    return centred.reshape(-1)  # (N,)


def leave_one_out_scores(scores: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): r_i - mean_{j != i} r_j within each group, (N,) -> (N,)."""
    _check_groups(scores, group_size, min_size=2)
    grouped = scores.view(-1, group_size)  # (P, G)
    others = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)  # (P, G)
    return (grouped - others).reshape(-1)  # (N,)


@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator may use; each estimator reads only the fields it needs.

    `token_rewards` (B, T) feed GAE (see `kl_penalized_rewards`); `scores` (B,) are sequence
    rewards for the group estimators (subtract beta * summed KL first for KL-in-reward).
    """

    mask: torch.Tensor
    token_rewards: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    group_size: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    scale_by_std: bool = True  # GRPO only: False is Dr. GRPO's mean-only baseline


def _need(value: torch.Tensor | None, name: str, estimator: str) -> torch.Tensor:
    if value is None:
        raise CaiRayError(f"advantage estimator {estimator!r} needs {name}", where="rl.advantage")
    return value


def _gae(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = _need(inputs.token_rewards, "token_rewards", "gae")
    values = _need(inputs.values, "values (a critic)", "gae")
    return gae_advantages(rewards, values, inputs.mask, gamma=inputs.gamma, lam=inputs.lam)


def _outcome(
    fn: Callable[..., torch.Tensor], name: str, *, scaled: bool = False
) -> Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor]]:
    def estimate(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
        scores = _need(inputs.scores, "scores", name)
        extra = {"scale_by_std": inputs.scale_by_std} if scaled else {}
        per_seq = fn(scores, group_size=inputs.group_size, **extra)  # (B,)
        # An outcome reward: every response token shares its sequence's advantage.
        advantages = per_seq.unsqueeze(-1) * inputs.mask  # (B, T)
        return advantages, advantages

    return estimate


# Each maps AdvantageInputs -> (advantages, returns), both (B, T); critic-free ones return A twice.
ADVANTAGE_ESTIMATORS: dict[str, Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor]]] = {
    "gae": _gae,
    "grpo": _outcome(group_normalized_scores, "grpo", scaled=True),
    "rloo": _outcome(leave_one_out_scores, "rloo"),
}


# ---------------------------------------------------------------- PPO losses


@dataclass(frozen=True)
class PolicyLoss:
    """The loss to backprop plus detached statistics to log."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
) -> PolicyLoss:
    """PPO clipped surrogate (Schulman et al. 2017): -min(rA, clip(r, 1-eps, 1+eps)A), token mean.

    clip_fraction: share of tokens where the clipped term was the active one; approx_kl: k3
    estimate of KL(old || new) over the samples, which came from the old policy.
    """
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(kl_k3(old_logp, logp), mask)
    return PolicyLoss(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), token mean; and clip fraction.

    V_clip = V_old + clip(V - V_old, -eps, eps) keeps the critic from jumping per update.
    """
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)  # (B, T)
    err_unclipped = (values - returns) ** 2  # (B, T)
    err_clipped = (clipped_values - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((err_clipped > err_unclipped).float(), mask)
    return loss, clip_fraction


# ---------------------------------------------------------------- DPO


@dataclass(frozen=True)
class DpoLoss:
    """Mean loss plus detached implicit rewards beta * (log pi - log ref), each (B,)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margin: torch.Tensor


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> DpoLoss:
    """DPO (Rafailov et al. 2023) on summed sequence log-probs, each (B,).

    loss = -(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h), with
    h = (pi_c - ref_c) - (pi_r - ref_r); ls > 0 is conservative DPO for noisy AI labels.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise CaiRayError(
            f"label_smoothing must be in [0, 0.5), got {label_smoothing}",
            where="dpo.label_smoothing",
            hint="use 0 for plain DPO or a small value such as 0.1 for noisy labels",
        )
    chosen_logratio = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratio = rejected_logps - ref_rejected_logps  # (B,)
    logits = beta * (chosen_logratio - rejected_logratio)  # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(
        -logits
    )  # (B,)
    chosen_rewards = beta * chosen_logratio.detach()  # (B,)
    rejected_rewards = beta * rejected_logratio.detach()  # (B,)
    return DpoLoss(
        loss=losses.mean(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margin=chosen_rewards - rejected_rewards,
    )


# ---------------------------------------------------------------- direct RLAIF and monitoring


def rlaif_reward(scores: torch.Tensor, *, low: float = 1.0, high: float = 10.0) -> torch.Tensor:
    """Rescale feedback-model scores in [low, high] to [-1, 1]: (s - low) / (high - low) * 2 - 1.

    Direct RLAIF (Lee et al. 2023, §2.3): for 1..10 this is (s - 1) / 9 * 2 - 1, so 1 -> -1,
    10 -> 1; a symmetric range keeps the reward centred like a PM score. Out-of-range is an error.
    """
    if bool(((scores < low) | (scores > high)).any()):
        raise CaiRayError(
            f"feedback scores must lie in [{low}, {high}]",
            where="rlaif.scores",
            hint="check the score parser or the low/high settings of direct RLAIF",
        )
    return (scores - low) / (high - low) * 2.0 - 1.0


def expected_score(option_logprobs: torch.Tensor, score_values: torch.Tensor) -> torch.Tensor:
    """Expected score under the feedback model's distribution over score tokens.

    option_logprobs (B, K) are log-probs of the K score options (e.g. "1".."10"), renormalised
    over those K (the rest of the vocabulary is ignored); score_values (K,). Returns (B,).
    The K must be disjoint events: where one option's tokens prefix another's (" 1" and " 10"
    on Qwen/Gemma) pass them through `cai_ray.feedback.prompts.disjoint_logprobs` first (issue 14).
    """
    probs = torch.softmax(option_logprobs.float(), dim=-1)  # (B, K)
    return probs @ score_values.float()  # (B,)
