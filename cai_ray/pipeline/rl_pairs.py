"""Stage 3, rl-pairs: the SL-CAI model answers each red-team prompt several times (paper 4.1).

Ray Data streams the prompts through rollout pools (one per sampling temperature); each output
row holds a prompt and its responses (2 by default), keyed by `pair_id` (= the prompt id), so
stage 4 labels each once. Exactly once across a kill, as stage 1.
"""

from __future__ import annotations

import json
from typing import Any

from cai_ray.config import RunConfig
from cai_ray.data.shards import KeyIndex
from cai_ray.engines.base import SamplingParams
from cai_ray.errors import ConfigError
from cai_ray.layout import RL_PAIRS
from cai_ray.pipeline.common import (
    StageContext,
    map_pool,
    policy_model,
    run_prompts,
    summarize,
)

STAGE = RL_PAIRS


def temperature_groups(cfg: RunConfig) -> list[tuple[float, int]]:
    """(temperature, samples) per rollout pool: samples spread round robin over temperatures.
    A greedy (temperature 0) pool may take one sample only: more would be copies of it."""
    s = cfg.rl_pairs
    temps = s.temperatures or (cfg.generation.temperature,)
    counts: dict[float, int] = {}
    for i in range(s.samples_per_prompt):
        t = float(temps[i % len(temps)])
        counts[t] = counts.get(t, 0) + 1
    if counts.get(0.0, 0) > 1:
        raise ConfigError(
            f"temperature 0 is greedy: its {counts[0.0]} samples per prompt would be one "
            "response copied, and a pair of equal responses teaches the PM nothing",
            where="rl_pairs.temperatures" if s.temperatures else "generation.temperature",
            hint="sample at a temperature > 0 (the paper uses 1.0), or list temperature 0 once "
            "among rl_pairs.temperatures",
        )
    return list(counts.items())


def run(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) stage 3; returns its manifest."""
    from actors.rollout import RolloutWorker

    ctx = StageContext.open(cfg, STAGE, sections=("rl_pairs", "models", "data", "generation"))
    if ctx.finished is not None:
        return ctx.finished
    s = cfg.rl_pairs
    policy = ctx.model(policy_model(cfg))
    groups = temperature_groups(cfg)
    ctx.start({f"rollout-t{t}": s.rollout for t, _ in groups})

    def build(done: KeyIndex, rows: int | None):
        ds = run_prompts(
            cfg, cfg.data.red_team, done=done, block_rows=s.rollout.batch_size, rows=rows
        )
        for g, (temperature, n) in enumerate(groups):
            sampling = SamplingParams.of(
                cfg.generation, n=n, seed=cfg.seed + g, temperature=temperature
            )
            ds = map_pool(
                ds,
                RolloutWorker,
                s.rollout,
                cfg,
                model=policy,
                sampling=sampling,
                fmt=policy.prompt_format(cfg.format),
                answer_col=f"answers_{g}",
            )
        return ds

    store = ctx.stream(
        "red_team",
        build,
        pools=(s.rollout,),
        key="pair_id",
        shard_rows=s.shard_rows,
        extra=dict(response_model_id=policy.id),
        expand=_responses(groups),
        desc=STAGE,
        progress=progress,
    )
    return ctx.finish(
        inputs={"red_team": cfg.data.red_team},
        outputs={"red_team": summarize(store)},
        models={"policy": policy.id},
        sampling={"groups": [{"temperature": t, "samples": n} for t, n in groups]},
    )


def _responses(groups: list[tuple[float, int]]):
    """Row expander: every pool's answers as one `responses` list with its temperatures."""

    def expand(row: dict[str, Any]) -> dict[str, Any]:
        responses, temps = [], []
        for g, (temperature, n) in enumerate(groups):
            raw = row.pop(f"answers_{g}")
            answers = json.loads(raw) if n > 1 else [raw]
            responses += answers
            temps += [temperature] * len(answers)
        return {**row, "pair_id": row["prompt_id"], "responses": responses, "temperatures": temps}

    return expand
