"""Stage 4, rl-label: AI feedback on the response pairs of stage 3 (paper section 4.1).

Ray Data reads stage 3's shards and streams them through the labeller pool; each output row is a
pair, its final probability P(response_a preferred) and the full trace (per principle and order,
rationales, feedback model id, constitution hash). Exactly once per pair id across a kill.
"""

from __future__ import annotations

import json
from typing import Any

from cai_ray.config import PoolConfig, RunConfig
from cai_ray.data.shards import KeyIndex, ShardStore
from cai_ray.engines.base import SamplingParams
from cai_ray.errors import DataError
from cai_ray.feedback.labeling import label_statistics
from cai_ray.layout import RL_LABEL, RL_PAIRS, part_dir
from cai_ray.pipeline.common import (
    StageContext,
    map_pool,
    shard_dataset,
    summarize,
    take,
)

STAGE = RL_LABEL


def manifest_settings(cfg: RunConfig) -> dict[str, Any]:
    """How the labels were made, as the manifest records it (the labeller's own inputs)."""
    s = cfg.rl_label
    return {
        "principles_per_label": s.principles_per_label,
        "both_orders": s.both_orders,
        "mode": s.mode,
        "clamp_range": tuple(s.clamp),
        "cot": s.cot,
        "cot_samples": s.cot_samples,
        "few_shot": s.few_shot,
        "seed": cfg.seed,
    }


def run(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) stage 4 over stage 3's pairs; returns its manifest."""
    ctx = StageContext.open(cfg, STAGE, sections=("rl_label", "rl_pairs", "models", "data"))
    if ctx.finished is not None:
        return ctx.finished
    s = cfg.rl_label
    constitution = ctx.constitution()
    constitution.require_feedback()
    feedback = ctx.model(cfg.models.feedback_model)
    pairs = ShardStore(part_dir(cfg.run_dir, RL_PAIRS, "red_team"), key="pair_id")
    if not pairs.shard_paths():
        raise DataError(
            "rl-label needs the response pairs of stage 3, and there are none",
            where=str(pairs.folder),
            hint="run `cai-ray stage rl-pairs CONFIG` first (or `cai-ray run`)",
        )
    ctx.start({"labeler": s.labeler})
    build = _label_pipeline(cfg, ctx, pairs, feedback)
    extra = dict(feedback_model_id=feedback.id, constitution_hash=constitution.content_hash)
    store = ctx.stream(
        "labels",
        build,
        pools=(s.labeler,),
        key="pair_id",
        shard_rows=s.shard_rows,
        extra=extra,
        expand=_expand,
        desc=STAGE,
        progress=progress,
    )
    columns = ["label", "flips", "order_checks", "principles", "split_options"]
    split = [0]

    def rows():  # streamed shard by shard: the driver never holds every label at once
        for row in store.iter_rows(columns):
            split[0] += bool(row["split_options"])
            yield row

    statistics = label_statistics(rows())
    return ctx.finish(
        inputs={"pairs": str(pairs.folder), "pairs_available": pairs.count_rows()},
        outputs={"labels": summarize(store)},
        statistics={**statistics, "split_option_markers": split[0]},
        settings=manifest_settings(cfg),
        models={"feedback": feedback.id},
        constitution_hash=constitution.content_hash,
    )


def _label_pipeline(cfg: RunConfig, ctx: StageContext, pairs: ShardStore, feedback):
    """`build(done)` for the labels part: stage 3's pairs not labelled yet -> the labeller pool."""
    s = cfg.rl_label

    def build(done: KeyIndex, rows: int | None):
        ds = shard_dataset(pairs.shard_paths()).map_batches(
            _todo,
            fn_kwargs=dict(done=done),
            batch_format="pandas",
            batch_size=s.labeler.batch_size,
            num_cpus=0,
        )
        return labeler_pool(take(ds, rows), s.labeler, cfg, ctx, feedback)

    return build


def labeler_pool(ds, pool: PoolConfig, cfg: RunConfig, ctx: StageContext, model):
    """`ds` (pairs with a `reject` column) through `pool` of `LabelerWorker`s on `model`, with
    stage 4's settings (`rl_label`); stage 7's reference judge relabels through it too."""
    from actors.labeler import LabelerWorker

    s = cfg.rl_label
    sampling = SamplingParams.of(cfg.generation, seed=cfg.seed, max_new_tokens=s.cot_max_new_tokens)
    return map_pool(
        ds,
        LabelerWorker,
        pool,
        cfg,
        model=model,
        constitution_path=str(ctx.constitution_path),
        settings=s,
        seed=cfg.seed,
        rationale_sampling=sampling,
        fmt=model.prompt_format(cfg.format),  # CoT asks the feedback model in this format
    )


def _todo(batch: Any, *, done: KeyIndex) -> Any:
    """Pairs not labelled yet, with an empty `reject` column for the labeller to fill."""
    batch = batch[~done.isin(batch["pair_id"])].copy()
    batch["reject"] = [""] * len(batch)
    return batch


def _expand(row: dict[str, Any]) -> dict[str, Any]:
    """JSON columns of the worker back to nested values; drop the unlabelled response list."""
    row = {**row, "principles": json.loads(row["principles"]), "trace": json.loads(row["trace"])}
    row["responses"] = [str(x) for x in row["responses"]]
    row["temperatures"] = [float(x) for x in row.get("temperatures", [])]
    row["principle_ids"] = [str(x) for x in row["principle_ids"]]
    row["flips"] = int(row["flips"])
    row["order_checks"] = int(row["order_checks"])
    row["split_options"] = bool(row["split_options"])
    row["tournament"] = row.get("tournament") or ""  # JSON of a round robin (N > 2), else ""
    return row
