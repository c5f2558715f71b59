"""Stage 7's looks back at earlier stages: stage-4 label quality and PM score by revision round.

- Label quality (CAI_METHOD.md stage 7: "calibration of AI labels"): stage 4's labels against a
  reference, either a second feedback model that re-labels a sample of the same pairs with the
  same principles and orders (Ray Data through the labeller pool), or held-out human labels.
- Revision rounds (paper Fig. 5): the PM scores a sample of stage-1 chains, the initial answer
  and every revision, streamed through the PM pool.
Each writes shards under `evaluate/` that a resumed run does not redo.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cai_ray.config import PoolConfig, RunConfig, resolve_path
from cai_ray.data.shards import SHARD_GLOB, KeyIndex, ShardStore, reject_counts
from cai_ray.eval.metrics import label_quality, read_reference_labels, revision_curve
from cai_ray.layout import RL_LABEL, SL_GENERATE, part_dir
from cai_ray.pipeline.common import (
    ModelRef,
    StageContext,
    map_pool,
    shard_dataset,
    summarize,
    take,
)

LABEL_COLUMNS = ["pair_id", "label", "label_raw", "flips", "order_checks", "principles"]


def _sample(ids: list[str], n: int, seed: int) -> list[str]:
    """`n` ids fixed by (seed, id) alone: a resumed run picks the same sample."""
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())[:n]


def _shards(folder: Path) -> list[str]:
    # listed without ShardStore, which would create the folder of a stage that never ran
    return sorted(str(p) for p in folder.glob(SHARD_GLOB)) if folder.is_dir() else []


def side_pools(
    cfg: RunConfig, *, reference: ModelRef | None, pm: ModelRef | None
) -> dict[str, PoolConfig]:
    """The pools these parts start (beside the main stream's), for the cluster-fit check."""
    run_dir = Path(cfg.run_dir)
    pools = {}
    if reference is not None and _shards(part_dir(run_dir, RL_LABEL, "labels")):
        pools["reference-judge"] = cfg.evaluate.judge
    if pm is not None and _shards(part_dir(run_dir, SL_GENERATE, "red_team")):
        pools["revisions-pm"] = cfg.evaluate.pm
    return pools


def label_quality_part(
    cfg: RunConfig, ctx: StageContext, *, reference: ModelRef | None
) -> dict[str, Any]:
    """Stage-4 label quality: `result`, manifest `outputs`, `timings`, or a `note` why not."""
    import pyarrow.parquet as pq

    e, t0 = cfg.evaluate, time.perf_counter()
    shards = _shards(part_dir(cfg.run_dir, RL_LABEL, "labels"))
    if not shards:
        return {"note": "rl-label has not run: no label quality"}
    labels = []
    for path in shards:
        cols = [c for c in LABEL_COLUMNS if c in pq.read_schema(path).names]
        labels.extend(pq.read_table(path, columns=cols).to_pylist())
    known = {r["pair_id"] for r in labels}
    ref_p, source, outputs = None, None, {}
    if e.reference_labels:
        ref_p, bad = read_reference_labels(resolve_path(e.reference_labels), known=known)
        source = f"human labels {e.reference_labels}"
        outputs["reference_labels"] = {
            "rows": len(ref_p),
            "rejects": len(bad),
            "reject_reasons": reject_counts(bad),
            "rejected": bad[:20],
        }
    elif reference is not None:
        keep = set(_sample(sorted(known), e.label_sample, cfg.seed))
        store = _relabel(cfg, ctx, reference, shards, keep)
        outputs["reference_labels"] = summarize(store)
        table = store.read_table(["pair_id", "reference_p"])
        ref_p = {r["pair_id"]: r["reference_p"] for r in (table.to_pylist() if table else [])}
        source = f"reference judge {reference.id}"
    result = label_quality(labels, reference=ref_p, source=source, bins=e.calibration_bins)
    return {
        "result": result,
        "outputs": outputs,
        "note": None if ref_p is not None else "no reference judge or labels: no calibration",
        "timings": {"label_quality_s": round(time.perf_counter() - t0, 3)},
    }


def _relabel(
    cfg: RunConfig, ctx: StageContext, ref: ModelRef, shards: list[str], keep: set[str]
) -> ShardStore:
    """The reference judge labels the sampled stage-4 pairs with stage 4's own settings (the
    principles are drawn by pair id, so both judges answer the same questions)."""
    from cai_ray.pipeline.rl_label import labeler_pool

    judge_pool = cfg.evaluate.judge

    def build(done: KeyIndex, rows: int | None):
        todo = frozenset(k for k in keep if k not in done)
        if not todo:
            return None
        ds = shard_dataset(shards).map_batches(
            _pairs_to_label,
            fn_kwargs=dict(keep=todo),
            batch_format="pandas",
            batch_size=judge_pool.batch_size,
            num_cpus=0,
        )
        return labeler_pool(take(ds, rows), judge_pool, cfg, ctx, ref)  # stage 4's framing

    return ctx.stream(
        "reference-labels",
        build,
        pools=(judge_pool,),
        key="pair_id",
        shard_rows=cfg.evaluate.shard_rows,
        extra=dict(reference_model_id=ref.id),
        expand=_reference_row,
        desc="evaluate reference labels",
        progress=False,  # the main stream draws the stage's bar
    )


def _pairs_to_label(batch: Any, *, keep: frozenset[str]) -> Any:
    """Stage-4 rows as labeller input: the kept pair (response_a, response_b) and no label."""
    batch = batch[batch["pair_id"].isin(keep)]
    out = batch[["pair_id", "response_a", "response_b"]].copy()
    out["prompt_id"] = out["pair_id"]
    out["messages"] = [
        m if isinstance(m, str) else json.dumps(_plain(m)) for m in batch["messages"]
    ]
    out["responses"] = [[a, b] for a, b in zip(out["response_a"], out["response_b"], strict=True)]
    out["prompt"] = batch.get("prompt", "")
    out["source"] = batch.get("source", "rl-label")
    out["row"] = batch.get("row", 0)
    out["reject"] = ""
    return out.drop(columns=["response_a", "response_b"])


def _plain(messages: Any) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in list(messages)]


def _reference_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "pair_id": row["pair_id"],
        "prompt_id": row["prompt_id"],
        "reference_p": float(row["label_raw"]),
        "reference_principles": json.loads(row["principles"]),
        "reference_flips": int(row["flips"]),
    }


def revision_part(cfg: RunConfig, ctx: StageContext, *, pm: ModelRef | None) -> dict[str, Any]:
    """Mean PM score by revision round of stage-1 chains: `result`, `outputs`, `timings`, or a
    `note` why not."""
    import pyarrow.parquet as pq

    from actors.judge import PMScoreWorker

    t0 = time.perf_counter()
    shards = _shards(part_dir(cfg.run_dir, SL_GENERATE, "red_team"))
    if pm is None or not shards:
        why = "no PM" if pm is None else "sl-generate has not run"
        return {"note": f"{why}: no PM score by revision round"}
    ids = [
        i for p in shards for i in pq.read_table(p, columns=["prompt_id"])["prompt_id"].to_pylist()
    ]
    sample = set(_sample(ids, cfg.evaluate.revision_sample, cfg.seed))

    pm_pool = cfg.evaluate.pm

    def build(done: KeyIndex, rows: int | None):
        todo = frozenset(k for k in sample if k not in done)
        if not todo:
            return None
        ds = shard_dataset(shards).map_batches(
            _chains_to_score,
            fn_kwargs=dict(keep=todo),
            batch_format="pandas",
            batch_size=pm_pool.batch_size,
            num_cpus=0,
        )
        return map_pool(take(ds, rows), PMScoreWorker, pm_pool, cfg, model=pm, text_col="texts")

    store = ctx.stream(
        "revisions",
        build,
        pools=(pm_pool,),
        shard_rows=cfg.evaluate.shard_rows,
        extra=dict(pm_model_id=pm.id),
        expand=_revision_row,
        desc="evaluate revisions",
        progress=False,
    )
    table = store.read_table(["pm_scores"])
    return {
        "result": revision_curve(table.to_pylist() if table is not None else []),
        "outputs": {"revisions": summarize(store)},
        "timings": {"revisions_s": round(time.perf_counter() - t0, 3)},
    }


def _chains_to_score(batch: Any, *, keep: frozenset[str]) -> Any:
    """Stage-1 rows as PM input: texts = [initial answer, revision 1, ..., revision N]."""
    batch = batch[batch["prompt_id"].isin(keep)]
    out = batch[["prompt_id", "prompt", "source", "row"]].copy()
    out["messages"] = [
        m if isinstance(m, str) else json.dumps(_plain(m)) for m in batch["messages"]
    ]
    texts, principles = [], []
    for answer, rounds in zip(batch["initial_answer"], batch["rounds"], strict=True):
        rounds = list(rounds)
        texts.append(json.dumps([str(answer), *(str(r["revision"]) for r in rounds)]))
        principles.append(json.dumps([str(r["principle_id"]) for r in rounds]))
    out["texts"], out["principle_ids"], out["reject"] = texts, principles, ""
    return out


def _revision_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt_id": row["prompt_id"],
        "prompt": row["prompt"],
        "principle_ids": json.loads(row["principle_ids"]),
        "pm_scores": json.loads(row["pm_scores"]),
    }
