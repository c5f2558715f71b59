"""Config of stage 7, evaluate: which checkpoints, which held-out prompts, who judges.

Defaults follow CAI_METHOD.md stage 7 and paper section 4.4: checkpoints answer held-out harmful
prompts (judged for harmlessness) and helpful prompts (judged for helpfulness), every pair of
checkpoints in both presentation orders, turned into Elo by a Bradley-Terry fit. The default
prompts are the embedded held-out sets (issue 14): harmful requests, and benign requests that look
sensitive, whose refusal rate is the over-refusal (XSTest's idea, the project's own prompts).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cai_ray.config.sections import PoolConfig, Section

# Paper Fig. 2 axes: harmlessness is judged on red-team prompts, helpfulness on helpful ones.
AXES = ("harmlessness", "helpfulness")
# The embedded held-out prompts each split reads by default (cai_ray/samples, issue 14).
HELD_OUT = {"harmful": "sample:eval_harmful", "helpful": "sample:eval_benign"}


class HumanJudgementsConfig(Section):
    """Human comparisons per axis: CSV files `model_a,model_b,winner` (winner a | b | tie).

    Model names are checkpoint names (`helpful`, `sl-cai`, `rl-step-N`, `rl-cai`, or yours).
    """

    harmlessness: str | None = Field(
        None, description="CSV of human harmlessness comparisons (None: none)"
    )
    helpfulness: str | None = Field(
        None, description="CSV of human helpfulness comparisons (None: none)"
    )

    @property
    def files(self) -> dict[str, str]:
        return {axis: path for axis in AXES if (path := getattr(self, axis))}


class EvaluateConfig(Section):
    """Stage 7: pairwise AI (or human) judging of checkpoints -> Elo, evasiveness, label quality.

    `checkpoints`: `auto` (every one that exists: helpful, sl-cai, rl-step-N, rl-cai) or a list of
    `helpful`, `sl-cai`, `rl-cai`, `rl-step-N`, `NAME=PATH` or a bare HF directory path. Absent
    role checkpoints are skipped with a note; an explicit path that does not exist is an error.
    `harmful` (default `sample:eval_harmful`) is judged for harmlessness; `helpful` (default
    `sample:eval_benign`: benign requests that look sensitive) for helpfulness, and its refusal
    rate is the over-refusal. No training stage reads the defaults; the stage warns in its manifest
    when a source is also a training one. `skip` prompts of each source are passed over first
    (e.g. the ones training read, when a source is shared).
    """

    checkpoints: Literal["auto"] | tuple[str, ...] = Field(
        "auto",
        description="auto: every one that exists (helpful, sl-cai, rl-step-N, rl-cai), or a list "
        "of those names, NAME=PATH or HF directories",
    )
    harmful: str = Field(HELD_OUT["harmful"], description="judged for harmlessness")
    helpful: str = Field(
        HELD_OUT["helpful"], description="judged for helpfulness; its refusals: over-refusal"
    )
    skip: int = Field(0, ge=0, description="prompts of each source passed over first")
    limit: int | None = Field(32, ge=1, description="prompts per source after `skip`")
    max_new_tokens: int | None = Field(None, ge=1, description="None: generation.max_new_tokens")
    temperature: float | None = Field(None, ge=0, description="None: generation.temperature")
    ai_judge: bool = Field(True, description="False: only human judgements feed the Elo")
    judge_model: str | None = Field(None, description="None: models.feedback or models.helpful")
    principles_per_comparison: int = Field(1, ge=1, description="harmlessness principles averaged")
    few_shot: int | None = Field(
        None,
        ge=0,
        description="the judge's harmlessness few-shot examples (None: as rl_label.few_shot, so "
        "the judge asks as the labeller did)",
    )
    helpfulness_question: str | None = Field(
        None,
        min_length=1,
        description="the judge's helpfulness question (None: cai_ray.eval.judging's own)",
    )
    evasiveness_question: str | None = Field(
        None,
        min_length=1,
        description="the judge's evasiveness question (None: cai_ray.eval.judging's own)",
    )
    engages_option: str | None = Field(
        None, min_length=1, description="the evasiveness question's engaging option (None: own)"
    )
    evades_option: str | None = Field(
        None, min_length=1, description="the evasiveness question's evasive option (None: own)"
    )
    human_judgements: HumanJudgementsConfig = Field(
        HumanJudgementsConfig(), description="human comparisons fed into the Elo beside the judge's"
    )
    pm_model: str | None = Field(None, description="None: <run_dir>/pm-train/hf when it exists")
    reference_model: str | None = Field(
        None, description="a second feedback model that re-labels stage-4 pairs (calibration)"
    )
    reference_labels: str | None = Field(
        None, description="held-out human labels of stage-4 pairs: CSV pair_id,winner"
    )
    label_sample: int = Field(64, ge=1, description="stage-4 pairs the reference re-labels")
    revision_sample: int = Field(64, ge=1, description="stage-1 chains scored per revision round")
    bootstrap: int = Field(200, ge=0, description="Elo bootstrap resamples")
    calibration_bins: int = Field(
        10, ge=2, description="equal-width bins of the label calibration table"
    )
    colocate: bool = Field(
        False,
        description="one pool (sized by `rollout`) whose actors hold every checkpoint, the judge "
        "and the PM: small models on one machine; False: a pool per checkpoint and role",
    )
    rollout: PoolConfig = Field(
        PoolConfig(),
        description="each checkpoint's answering pool (colocate: the one pool, whose workers "
        "hold every model, each on its own section's engine)",
    )
    judge: PoolConfig = Field(
        PoolConfig(),
        description="the AI judge's pool (and the reference judge's re-labelling)",
    )
    pm: PoolConfig = Field(
        PoolConfig(),
        description="the PM's pool (and the PM's pass over revision rounds)",
    )
    shard_rows: int = Field(64, ge=1, description="rows per output Parquet shard")

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _listify(cls, value):
        return [value] if isinstance(value, str) and value != "auto" else value

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if self.checkpoints != "auto":
            names = [c.partition("=")[0].strip() if "=" in c else c for c in self.checkpoints]
            if any(not c.strip() for c in self.checkpoints):
                raise ValueError("checkpoints: an entry is empty")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"checkpoints: listed twice: {', '.join(dup)}")
        if not self.ai_judge and not self.human_judgements.files:
            raise ValueError(
                "ai_judge is false and no human_judgements are set: nothing judges the pairs"
            )
        if self.reference_model and self.reference_labels:
            raise ValueError("set one of reference_model (an AI judge) or reference_labels")
        return self
