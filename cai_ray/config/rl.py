"""Config of stage 6, rl-train: the RL-CAI loop (PPO, GRPO, RLOO) and offline DPO.

Defaults follow CAI_METHOD.md stage 6: PPO from the SL-CAI model against the PM, the KL penalty
to the SL-CAI policy inside the reward with a small fixed coefficient. GRPO and RLOO sample a
group of responses per prompt and need no critic; DPO trains offline on stage-1 or stage-4 pairs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cai_ray.config.learner import LearnerConfig
from cai_ray.config.sections import Section, WorkersConfig

Algorithm = Literal["ppo", "grpo", "rloo", "dpo"]

# Keys of `rl_train.policy` / `rl_train.value` (a LearnerConfig) that the online loop owns: setting
# them there would do nothing, so it is an error naming the key that does it.
LOOP_OWNS = {
    "epochs": "set rl_train.epochs",
    "max_steps": "set rl_train.steps",
    "checkpoint_every": "set rl_train.checkpoint_every",
    "keep_checkpoints": "set rl_train.keep_checkpoints",
    "hf_checkpoints": "set rl_train.snapshots",
    "tensorboard": "its metrics are rl-train/metrics.jsonl",
    "max_seq_len": "a sample is its prompt plus at most rl_train.max_new_tokens",
    "packing": "every sample is its own row",
}
_LEARNER_DEFAULTS = {k: LearnerConfig.model_fields[k].default for k in LOOP_OWNS}


class RLWorkersConfig(WorkersConfig):
    """A pool of long-lived role actors (rollout, reward, reference): the pool shape of the other
    stages, with `size: 0` running the role inside the driver (tests, debugging) and restarts.

    A role worker gets one call per RL step for its share of the samples and runs it in forward
    passes of `batch_size` sequences. `engine` None uses the run's top-level `engine`.
    """

    size: int = Field(1, ge=0, description="0: the role runs inside the driver")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    max_restarts: int = Field(2, ge=0, description="restarts of a killed worker before failing")


# A section written in YAML or --set starts from its class's defaults, so a learner whose
# defaults differ from LearnerConfig's is its own class: `policy: {micro_batch_size: 8}` keeps
# the policy's lr.
class PolicyLearnerConfig(LearnerConfig):
    """The RL policy's learner group: LearnerConfig with a smaller learning rate (1e-6)."""

    lr: float = Field(1e-6, gt=0, description="peak learning rate (the RL policy's: 1e-6)")


class DPOLearnerConfig(LearnerConfig):
    """The DPO learner group: LearnerConfig with lr 5e-7 and micro-batches of 4 pairs."""

    lr: float = Field(5e-7, gt=0, description="peak learning rate (DPO's: 5e-7)")
    micro_batch_size: int = Field(4, ge=1, description="pairs per rank per forward pass")


class KLConfig(Section):
    """The KL(policy || SL-CAI reference) term (CAI_METHOD.md stage 6).

    `mode: reward` subtracts beta * KL per token from the reward (PPO as in the paper);
    `loss` adds beta * KL to the policy loss (GRPO style). None picks reward for PPO, loss for
    GRPO/RLOO. `controller: adaptive` moves beta towards `target` nats (Ziegler et al. 2019).
    """

    mode: Literal["reward", "loss"] | None = Field(
        None,
        description="reward: -beta * KL per token in the reward; loss: beta * KL in the policy "
        "loss (None: reward for PPO, loss for GRPO/RLOO)",
    )
    estimator: Literal["k1", "k2", "k3"] | None = Field(
        None, description="None: k1 in the reward, k3 as a loss"
    )
    controller: Literal["fixed", "adaptive"] = Field(
        "fixed", description="adaptive: beta moves towards `target` (Ziegler et al. 2019)"
    )
    beta: float = Field(0.001, ge=0, description="HH-RLHF used about 0.001")
    target: float = Field(6.0, gt=0, description="adaptive: KL per response to aim at (nats)")
    horizon: int = Field(10000, ge=1, description="adaptive: samples per full correction")


class RewardConfig(Section):
    """Where the reward comes from.

    - `pm`: the preference model's score (`model`, else the run's `pm-train/hf`);
    - `rlaif`: direct RLAIF (Lee et al. 2023): the feedback model rates each response 1-10 under
      `criterion` (expected rating over the ten option tokens), rescaled to [-1, 1];
    - `function`: a Python reward `fn(prompts, responses, **kwargs) -> list[float]`, named as
      `package.module:fn` or `path/to/file.py:fn` (built-ins live in `cai_ray.feedback.rule_rewards`).
    `refusal_penalty` is subtracted from any of them for responses with one of the run's
    `refusal_phrases`.
    """

    kind: Literal["pm", "rlaif", "function"] = Field(
        "pm",
        description="pm: the PM's score; rlaif: the feedback model's 1-10 rating, in [-1, 1]; "
        "function: `function`",
    )
    model: str | None = Field(None, description="pm: a PM directory; rlaif: a feedback model")
    function: str | None = Field(
        None, description="kind function: `package.module:fn` or `path/to/file.py:fn`"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="kind function: keyword arguments passed to it"
    )
    criterion: str = Field(
        "How harmless, honest and helpful is the assistant's last response? "
        "1 is harmful or evasive, 10 is harmless and genuinely helpful.",
        description="kind rlaif: what the feedback model rates",
    )
    clip: float | None = Field(None, gt=0, description="clip rewards to [-clip, clip]")
    refusal_penalty: float = Field(
        0.0, ge=0, description="subtracted for a response with a refusal phrase (0: off)"
    )
    max_bad_batches: int = Field(
        3, ge=0, description="batches with a failing or NaN reward skipped before the run stops"
    )

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if self.kind == "function" and not self.function:
            raise ValueError("reward.kind=function needs reward.function: 'module:fn' or 'f.py:fn'")
        if self.function and ":" not in self.function:
            raise ValueError(f"reward.function {self.function!r} is not 'module:fn' or 'f.py:fn'")
        return self


class DPOConfig(Section):
    """Offline DPO (Rafailov et al. 2023) on pairs from stage 1 or stage 4.

    `pairs: revisions` prefers each chain's final revision over its initial answer (Hugging
    Face's CAI recipe); `labels` prefers the AI-labelled winner of stage 4, keeping pairs whose
    label is at least `min_margin` from 0.5.
    """

    pairs: Literal["revisions", "labels"] = Field(
        "revisions",
        description="revisions: stage 1's final revision over the initial answer; labels: "
        "stage 4's winner",
    )
    beta: float = Field(0.1, gt=0, description="DPO's beta: strength of the implicit KL")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="share of the loss given to the flipped preference"
    )
    min_margin: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="pairs labels: drop pairs whose |label - 0.5| <= this (0: exact ties only)",
    )
    learner: DPOLearnerConfig = Field(
        DPOLearnerConfig(), description="the DPO learner group (lr 5e-7, micro_batch_size 4)"
    )


class RLTrainConfig(Section):
    """Stage 6: the RL loop. One step = sample, score, update, sync weights.

    A step samples `group_size` responses to each of `prompts_per_step` prompts
    (`helpful_fraction` of them from `data.helpful`, the rest red-team), so each step holds
    `prompts_per_step * group_size` samples, which must split into whole policy mini-batches of
    `micro_batch_size * grad_accum * ranks`; `epochs` passes over them per step (PPO epochs).
    Of `policy` / `value` (LearnerConfig), the loop owns epochs, steps, checkpoints and metrics
    (`LOOP_OWNS`): setting one there is an error that names the `rl_train` key to set instead.
    """

    algorithm: Algorithm = Field(
        "ppo", description="ppo (the paper), grpo, rloo, or dpo (offline, see `dpo`)"
    )
    steps: int = Field(20, ge=1, description="RL steps (online algorithms)")
    prompts_per_step: int = Field(8, ge=1, description="prompts sampled per RL step")
    group_size: int | None = Field(None, ge=1, description="None: 1 for PPO, 4 for GRPO/RLOO")
    helpful_fraction: float = Field(
        0.5, ge=0, le=1, description="share of each step's prompts from data.helpful"
    )
    epochs: int = Field(1, ge=1, description="passes over each step's samples")
    max_new_tokens: int | None = Field(None, ge=1, description="None: generation.max_new_tokens")
    temperature: float | None = Field(None, gt=0, description="None: generation.temperature")
    clip_eps: float = Field(
        0.2, gt=0, description="the policy ratio's clip range (PPO, GRPO, RLOO)"
    )
    value_clip_eps: float = Field(
        0.2, gt=0, description="PPO: the critic's clip range around its old values"
    )
    gamma: float = Field(1.0, ge=0, le=1, description="PPO: GAE discount per token")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda")
    whiten_advantages: bool = Field(True, description="PPO: normalise advantages per step")
    grpo_scale_by_std: bool = Field(True, description="False: Dr. GRPO's mean-only baseline")
    entropy_coef: float = Field(
        0.0, ge=0, description="weight of an entropy bonus in the policy loss (0: off)"
    )
    old_logprobs: Literal["recompute", "rollout"] = Field(
        "recompute", description="the learner's log-probs, or the rollout engine's (vLLM: bf16)"
    )
    kl: KLConfig = Field(KLConfig(), description="the KL term to the SL-CAI policy")
    reward: RewardConfig = Field(RewardConfig(), description="where the reward comes from")
    rollout: RLWorkersConfig = Field(
        RLWorkersConfig(), description="workers that sample the policy's responses"
    )
    reward_workers: RLWorkersConfig = Field(
        RLWorkersConfig(), description="workers that score the responses (`reward`)"
    )
    reference: RLWorkersConfig = Field(
        RLWorkersConfig(),
        description="workers of the frozen SL-CAI policy's log-probs (the KL); DPO reads its "
        "engine and batch_size",
    )
    policy: PolicyLearnerConfig = Field(
        PolicyLearnerConfig(), description="the policy's learner group (lr 1e-6)"
    )
    value: LearnerConfig = Field(LearnerConfig(), description="PPO: the critic's learner group")
    value_init: Literal["auto", "reward", "policy"] = Field(
        "auto",
        description="the critic's start: the PM, the policy; auto = PM if it shares "
        "the policy's tokenizer",
    )
    placement: Literal["separate", "colocated"] = Field(
        "separate", description="colocated: rollout worker i shares learner rank i's bundle"
    )
    weight_sync: Literal["auto", "object_store", "nccl"] = Field(
        "auto",
        description="nccl: GPU to GPU into vLLM engines; auto picks it when possible (vLLM on "
        "CUDA, policy ranks on GPUs, placement separate), else the object store",
    )
    checkpoint_every: int = Field(
        10, ge=1, description="RL steps between checkpoints (and snapshots); the last step too"
    )
    keep_checkpoints: int = Field(2, ge=1, description="newest RL checkpoints kept")
    rollout_log: bool = Field(True, description="write every sample to rollouts/step-*.parquet")
    snapshots: bool = Field(
        True, description="the policy as an HF dir at every checkpoint (snapshots/step-N)"
    )
    call_timeout_s: float = Field(600, gt=0, description="per role call (generate, score, sync)")
    dpo: DPOConfig = Field(DPOConfig(), description="algorithm dpo: offline DPO")

    @model_validator(mode="after")
    def _check(self) -> RLTrainConfig:
        for role in ("policy", "value"):
            learner = getattr(self, role)
            # A value other than the default (a resolved config.yaml repeats every default).
            owned = [k for k in LOOP_OWNS if getattr(learner, k) != _LEARNER_DEFAULTS[k]]
            if owned:
                key = owned[0]
                raise ValueError(
                    f"rl_train.{role}.{key} is not read by the RL loop ({LOOP_OWNS[key]}): "
                    "remove it"
                )
        g = self.samples_per_prompt
        if self.algorithm in ("grpo", "rloo") and g < 2:
            raise ValueError(f"{self.algorithm} needs group_size >= 2 (a group baseline)")
        if self.algorithm != "dpo":
            batch = self.policy.global_batch
            if (self.prompts_per_step * g) % batch:
                raise ValueError(
                    f"prompts_per_step * group_size = {self.prompts_per_step * g} samples per "
                    f"step do not split into policy mini-batches of {batch} "
                    "(micro_batch_size * grad_accum * ranks): change one of them"
                )
            if self.algorithm == "ppo" and (self.prompts_per_step * g) % self.value.global_batch:
                raise ValueError(
                    f"{self.prompts_per_step * g} samples per step do not split into value "
                    f"mini-batches of {self.value.global_batch}"
                )
        if self.placement == "colocated" and not (
            self.policy.num_ranks >= 1 and self.rollout.size == self.policy.num_ranks
        ):
            raise ValueError(
                "placement=colocated pairs rollout worker i with policy rank i: set "
                "rollout.size equal to policy.num_ranks (>= 1)"
            )
        if self.placement == "colocated" and self.weight_sync == "nccl":
            # Rollout worker i sits in rank i's bundle: rank 0 and a vLLM worker could share
            # one GPU in one NCCL group, which NCCL refuses (issue 15).
            raise ValueError(
                "weight_sync=nccl cannot run with placement=colocated (rank 0 and a rollout "
                "engine may share a GPU in one NCCL group): use weight_sync: object_store or auto"
            )
        return self

    @property
    def samples_per_prompt(self) -> int:
        if self.group_size is not None:
            return self.group_size
        return 4 if self.algorithm in ("grpo", "rloo") else 1

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def kl_mode(self) -> Literal["reward", "loss"]:
        if self.kl.mode is not None:
            return self.kl.mode
        return "reward" if self.algorithm == "ppo" else "loss"

    @property
    def kl_estimator(self) -> str:
        if self.kl.estimator is not None:
            return self.kl.estimator
        return "k1" if self.kl_mode == "reward" else "k3"

    def updates_per_step(self) -> int:
        """Policy optimizer steps per RL step."""
        return self.epochs * self.samples_per_step // self.policy.global_batch
