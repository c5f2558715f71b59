"""Stage 1, sl-generate: prompts -> initial answers -> N critique/revision rounds (paper 3.1).

Ray Data reads the prompt source inside a task and streams it through two actor pools (rollout,
then critique); the driver only writes the finished batches as Parquet shards, so memory stays
flat however many prompts there are. A rerun skips what the shards and rejects already hold.
"""

from __future__ import annotations

import json
from typing import Any

from cai_ray.config import RunConfig
from cai_ray.data.shards import KeyIndex, ShardStore
from cai_ray.engines.base import SamplingParams
from cai_ray.layout import SL_GENERATE
from cai_ray.pipeline.common import (
    StageContext,
    map_pool,
    run_prompts,
    summarize,
)
from cai_ray.sl.critique import CritiqueSettings

STAGE = SL_GENERATE


def run(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) stage 1; returns its manifest."""
    ctx = StageContext.open(cfg, STAGE, sections=("sl_generate", "models", "data", "generation"))
    if ctx.finished is not None:
        return ctx.finished
    constitution = ctx.constitution()
    constitution.require_critique()
    s = cfg.sl_generate
    helpful, critic = ctx.start(
        {"rollout": s.rollout, "critique": s.critique},
        meanwhile=lambda: (ctx.model(cfg.models.helpful), ctx.model(cfg.models.critique_model)),
    )
    build = _revision_pipeline(cfg, ctx, helpful, critic)
    extra = dict(
        response_model_id=helpful.id,
        critique_model_id=critic.id,
        constitution_hash=constitution.content_hash,
    )
    store = ctx.stream(
        "red_team",
        build,
        pools=(s.rollout, s.critique),
        shard_rows=s.shard_rows,
        extra=extra,
        expand=_expand_rounds,
        desc=STAGE,
        progress=progress,
    )

    outputs = {"red_team": {**summarize(store), "cut_at_token_limit": _cut_counts(store)}}
    if s.helpful_samples > 0:
        outputs["helpful"] = _helpful_answers(cfg, ctx, helpful, progress=progress)
    return ctx.finish(
        inputs={"red_team": cfg.data.red_team, "helpful": cfg.data.helpful},
        outputs=outputs,
        models={"response": helpful.id, "critique": critic.id},
        constitution_hash=constitution.content_hash,
    )


def _revision_pipeline(cfg: RunConfig, ctx: StageContext, helpful, critic):
    """`build(done)` for the red-team part: prompts -> initial answers -> critique rounds."""
    from actors.reviser import CritiqueWorker
    from actors.rollout import RolloutWorker

    s = cfg.sl_generate
    sampling = SamplingParams.of(cfg.generation, seed=cfg.seed)
    settings = CritiqueSettings(
        section=s, fmt=critic.prompt_format(cfg.format), seed=cfg.seed, sampling=sampling
    )

    def build(done: KeyIndex, rows: int | None):
        ds = run_prompts(
            cfg, cfg.data.red_team, done=done, block_rows=s.rollout.batch_size, rows=rows
        )
        ds = map_pool(
            ds,
            RolloutWorker,
            s.rollout,
            cfg,
            model=helpful,
            sampling=sampling,
            fmt=helpful.prompt_format(cfg.format),
            too_long=s.too_long,
        )
        return map_pool(
            ds,
            CritiqueWorker,
            s.critique,
            cfg,
            model=critic,
            constitution_path=str(ctx.constitution_path),
            settings=settings,
            too_long=s.too_long,
        )

    return build


def _helpful_answers(cfg: RunConfig, ctx: StageContext, model, *, progress: bool) -> dict:
    """Helpfulness prompts answered by the helpful model, for the SFT mix (paper: 2 each)."""
    from actors.rollout import RolloutWorker

    s = cfg.sl_generate
    sampling = SamplingParams.of(cfg.generation, n=s.helpful_samples, seed=cfg.seed)

    def build(done: KeyIndex, rows: int | None):
        ds = run_prompts(
            cfg, cfg.data.helpful, done=done, block_rows=s.rollout.batch_size, rows=rows
        )
        return map_pool(
            ds,
            RolloutWorker,
            s.rollout,
            cfg,
            model=model,
            sampling=sampling,
            fmt=model.prompt_format(cfg.format),
            too_long=s.too_long,
            answer_col="answers",
        )

    store = ctx.stream(
        "helpful",
        build,
        pools=(s.rollout,),
        shard_rows=s.shard_rows,
        extra=dict(response_model_id=model.id),
        expand=_expand_answers,
        desc="helpful answers",
        progress=progress,
    )
    return summarize(store)


def _cut_counts(store: ShardStore) -> dict[str, int]:
    """How many answers, critiques and revisions stopped at max_new_tokens (finish reason
    `length`): stage 2 does not train on a cut revision as if it were finished (issue 14).
    Counted in Arrow, one shard's two columns at a time, not as Python rows of every shard."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def cut(values) -> int:
        return int(pc.sum(pc.equal(values, "length")).as_py() or 0)

    counts = {"initial_answers": 0, "critiques": 0, "revisions": 0, "final_revisions": 0}
    for path in store.shard_paths():
        names = set(pq.read_schema(path).names)
        table = pq.read_table(
            path, columns=[c for c in _CUT_COLUMNS if c in names], use_threads=False
        )
        if "initial_answer_finish" in names:
            counts["initial_answers"] += cut(table.column("initial_answer_finish"))
        if "rounds" not in names:
            continue
        for chunk in table.column("rounds").chunks:  # list<struct<..., *_finish>>
            items = chunk.flatten()
            fields = {f.name for f in items.type} if pa.types.is_struct(items.type) else set()
            if "critique_finish" in fields:
                counts["critiques"] += cut(items.field("critique_finish"))
            if "revision_finish" not in fields:
                continue
            revision = items.field("revision_finish")
            counts["revisions"] += cut(revision)
            lengths = pc.list_value_length(chunk).fill_null(0).to_numpy()
            last = np.cumsum(lengths)[lengths > 0] - 1  # each non-empty row's last round
            counts["final_revisions"] += cut(revision.take(pa.array(last)))
        del table
        pa.default_memory_pool().release_unused()  # Arrow's mimalloc keeps freed buffers
    return counts


_CUT_COLUMNS = ("initial_answer_finish", "rounds")


def _expand_rounds(row: dict[str, Any]) -> dict[str, Any]:
    rounds = json.loads(row.pop("rounds"))
    answer = row["initial_answer"]
    return {**row, "rounds": rounds, "final_revision": rounds[-1]["revision"] if rounds else answer}


def _expand_answers(row: dict[str, Any]) -> dict[str, Any]:
    answers, finish = row.pop("answers"), row.pop("answers_finish", "")
    return {
        **row,
        "answers": json.loads(answers) if answers.startswith("[") else [answers],
        "answers_finish": json.loads(finish) if finish.startswith("[") else [finish],
    }
