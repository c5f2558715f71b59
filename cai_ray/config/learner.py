"""Config sections of the training stages: the DeepSpeed learner group and SL-CAI SFT.

`LearnerConfig` is objective-agnostic (SFT now; the preference model and RL reuse it), `SFTConfig`
holds one and adds the SL-CAI data choices. Defaults follow the paper (arXiv 2212.08073, sec. 3):
one epoch at a constant learning rate, trained on the final revisions.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from cai_ray.config.sections import Section

LRSchedule = Literal["constant", "warmup_constant", "cosine", "linear"]


class LearnerConfig(Section):
    """How a learner group trains: ranks, ZeRO stage, batch, optimiser, schedule, checkpoints.

    The global batch is `max(num_ranks, 1) * micro_batch_size * grad_accum` sequences.
    `num_ranks: 0` runs one rank inside the driver process (tests, debugging); any ZeRO stage is
    allowed there: with one rank ZeRO partitions nothing, so it only exercises the code path.
    `gpus_per_rank` may be fractional to share a GPU with other roles (RL rollouts), but two
    ranks of one group must not land on the same GPU (NCCL refuses duplicate devices).
    """

    num_ranks: int = Field(0, ge=0, description="0 = in-process, world size 1")
    zero_stage: int = Field(
        0, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 none, 1 optimizer, 2 +grads, 3 +weights"
    )
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on CUDA if supported"
    )
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per forward pass")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    lr_schedule: LRSchedule = Field(
        "constant",
        description="after warm-up: constant (paper, SL-CAI), cosine or linear decay to 0; "
        "warmup_constant needs warmup_steps",
    )
    warmup_steps: int = Field(
        0, ge=0, description="optimizer steps of linear warm-up to lr (any schedule)"
    )
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay of 2-D+ parameters (not biases, norms)"
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2)")
    max_grad_norm: float = Field(1.0, ge=0, description="0 = no clipping")
    epochs: int = Field(
        1, ge=1, description="passes over the data (paper SL-CAI: 1); RL: set rl_train.epochs"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    max_seq_len: int = Field(
        1024,
        ge=8,
        description="longest training sequence in tokens: SFT cuts or drops (sl_train.truncation), "
        "DPO cuts the prompt, the PM keeps the last tokens; the online RL loop does not read it",
    )
    packing: bool = Field(False, description="pack several examples into one row")
    share_prefix: bool = Field(
        True,
        description="PM, DPO and RL policy rows that start alike (a pair's conversation, a "
        "group's prompt) run as one row with the prefix once (4D mask; same loss and "
        "gradients); models on attention without 4D masks run separate rows",
    )
    shuffle: bool = Field(True, description="seeded shuffle, a new order every epoch")
    group_by_length: bool = Field(
        False,
        description="micro-batches of rows of about one length (windows of 64 global batches "
        "sorted by length after the shuffle): less padding, same rows per step",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, slower"
    )
    disable_dropout: bool | None = Field(
        None,
        description="zero the model's dropout while training; None: the objective decides "
        "(off for the PM, DPO and the RL policy and critic, whose losses compare forwards or "
        "log-probs from the rollout engine; the model's own for SFT)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model (inductor; needs a C++ compiler on CPU): fused "
        "elementwise kernels, ~15 s of compiling per process and new batch shape first",
    )
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps; 0 = only at the end")
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="newest checkpoints kept (older deleted); RL: rl_train.keep_checkpoints",
    )
    hf_checkpoints: bool = Field(True, description="also write an HF dir into each checkpoint")
    seed: int = Field(0, description="the ranks' torch/numpy/random seed and the shuffle order")
    tensorboard: bool = Field(
        True, description="also log the step metrics to tensorboard/ beside metrics.jsonl"
    )
    wandb: bool = Field(False, description="also log the step metrics to Weights & Biases")
    mlflow: bool = Field(False, description="also log the step metrics to MLflow")
    cpus_per_rank: float = Field(1.0, gt=0, description="also the torch thread count (floor)")
    gpus_per_rank: float = Field(
        0.0, ge=0, le=1, description="0: train on CPU (gloo); > 0: CUDA (NCCL), fractional shares"
    )
    max_restarts: int = Field(
        1, ge=0, description="group restarts from the last checkpoint after a rank dies"
    )
    placement_timeout_s: float = Field(
        120.0, gt=0, description="seconds to wait for the cluster to place every rank"
    )
    step_timeout_s: float = Field(1800.0, gt=0, description="per call and per collective")

    @model_validator(mode="after")
    def _check(self) -> LearnerConfig:
        if self.compile and self.zero_stage == 3:
            raise ValueError(
                "compile: true works with ZeRO 0-2; ZeRO-3 gathers weights in hooks a compiled "
                "graph breaks on (set zero_stage <= 2 or compile: false)"
            )
        if self.lr_schedule == "warmup_constant" and self.warmup_steps == 0:
            raise ValueError("lr_schedule=warmup_constant needs warmup_steps >= 1")
        return self

    @property
    def world_size(self) -> int:
        return max(self.num_ranks, 1)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.world_size * self.micro_batch_size * self.grad_accum

    @property
    def threads(self) -> int:
        return max(1, math.floor(self.cpus_per_rank))

    def resolved_dtype(self, *, cuda: bool, bf16_supported: bool) -> Literal["fp32", "bf16"]:
        """`auto` is bf16 on a GPU that supports it and fp32 elsewhere (CPU bf16 is slow)."""
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if cuda and bf16_supported else "fp32"

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of `lr` for optimizer step `step` (0-based) of `total_steps`.

        >>> LearnerConfig(lr_schedule="warmup_constant", warmup_steps=4).lr_factor(1, 10)
        0.5
        """
        warm = self.warmup_steps
        if step < warm:
            return (step + 1) / warm
        if self.lr_schedule in ("constant", "warmup_constant"):
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if self.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear


class SFTConfig(Section):
    """Stage 2 (SL-CAI): which (prompt, revision) pairs to train on, the helpful mix, the learner.

    `pairs`: `final` trains on each chain's last revision (the default), `all_rounds` on every
    revision, `up_to` on the revisions of rounds 1..`up_to` (the paper's SL-CAI-n). Paper sec. 3.1
    mixes in helpfulness samples (2 responses per helpfulness prompt from the helpful model) so the
    model stays helpful: `helpful_per_revision` is helpful examples per revision example (0 = none).
    """

    learner: LearnerConfig = Field(LearnerConfig(), description="the SFT learner group")
    pairs: Literal["final", "all_rounds", "up_to"] = Field(
        "final",
        description="revisions trained on: each chain's final one, every round's, or rounds "
        "1..up_to (SL-CAI-n)",
    )
    up_to: int | None = Field(
        None, ge=1, description="pairs up_to only: the last revision round trained on"
    )
    helpful_per_revision: float = Field(
        1.0, ge=0, description="helpfulness examples mixed in per revision example (0 = none)"
    )
    helpful_samples_per_prompt: int = Field(
        2,
        ge=1,
        description="stage 1's helpful answers used per prompt, at most (paper: 2; stage 1 "
        "writes sl_generate.helpful_samples)",
    )
    truncation: Literal["left", "drop"] = Field(
        "left", description="left: cut the prompt's start to fit max_seq_len; drop: set aside"
    )
    unfinished: Literal["drop", "keep"] = Field(
        "drop",
        description="revisions and helpful answers cut at max_new_tokens: drop (set aside, "
        "counted) or keep (trained without EOS, never as a finished answer)",
    )

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if self.pairs == "up_to" and self.up_to is None:
            raise ValueError("pairs=up_to needs up_to: the last revision round to train on")
        if self.pairs != "up_to" and self.up_to is not None:
            raise ValueError(f"up_to is only read with pairs=up_to (pairs is {self.pairs!r})")
        return self
