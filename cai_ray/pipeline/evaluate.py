"""Stage 7, evaluate: checkpoints answer held-out prompts, an AI judge compares them (paper 4.4).

One Ray Data stream carries both splits (harmful prompts -> harmlessness, helpful prompts ->
helpfulness): prompts -> one rollout pool per checkpoint -> the judge pool (every pair of answers
in both orders, plus each answer's evasiveness) -> the PM pool; the driver writes one row per
prompt into the split's folder. The pools stream side by side so a prompt's answers meet in one
row without a join; on a cluster each checkpoint's pool holds its own model, so size
`evaluate.rollout` for K models at once. Beside it stream the looks back at stages 1 and 4
(eval_quality.py). Then: Elo per axis (Bradley-Terry, bootstrap intervals) into elo.json and
per-checkpoint metrics into the manifest: refusal on harmful prompts (higher is more harmless) and
over-refusal on the benign ones (lower is better). The default prompts are the embedded held-out
sets; a source that a training stage also reads is a warning in the manifest's notes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from cai_ray.config import PoolConfig, RunConfig, resolve_path
from cai_ray.config.evaluate import HELD_OUT
from cai_ray.data.conversation import PromptFormat
from cai_ray.data.shards import ShardStore, atomic_write_text, reject_counts, write_manifest
from cai_ray.data.sources import sample_path
from cai_ray.engines.base import SamplingParams
from cai_ray.errors import DataError
from cai_ray.eval.metrics import (
    checkpoint_metrics,
    comparisons_of,
    elo_table,
    human_comparisons,
    refusal_summary,
)
from cai_ray.feedback.rule_rewards import has_phrase
from cai_ray.layout import EVALUATE
from cai_ray.pipeline.common import (
    ModelRef,
    StageContext,
    check_pool_fits,
    ensure_ray,
    pool_map,
    prompt_dataset,
    split_batch,
    stream_with_timeout,
    summarize,
)
from cai_ray.pipeline.eval_checkpoints import (
    Checkpoint,
    guard_checkpoints,
    models_record,
    optional_model,
    pm_model,
    resolve_checkpoints,
)

STAGE = EVALUATE
SPLITS = {"harmful": "harmlessness", "helpful": "helpfulness"}
log = logging.getLogger(__name__)


@dataclass
class _Inputs:
    """Everything stage 7 reads, resolved and checked before any actor starts."""

    checkpoints: list[Checkpoint]
    skipped: list[dict[str, str]]
    constitution: Any
    human: dict[str, list]
    human_rejects: dict[str, list]
    judge: ModelRef | None
    reference: ModelRef | None
    pm: ModelRef | None
    notes: list[str]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.checkpoints]


def _inputs(cfg: RunConfig, ctx: StageContext) -> _Inputs:
    """Checkpoints, constitution, human CSVs and models: a bad one fails here, fast and clear."""
    e = cfg.evaluate
    checkpoints, skipped = resolve_checkpoints(cfg, ctx)
    guard_checkpoints(ctx.stage_dir, checkpoints)
    constitution = ctx.constitution()
    if e.ai_judge:
        constitution.require_feedback()  # the harmlessness judge asks its feedback principles
    files = {axis: str(resolve_path(f)) for axis, f in e.human_judgements.files.items()}
    human, human_rejects = human_comparisons(files, known=[c.name for c in checkpoints])
    if e.reference_labels and not resolve_path(e.reference_labels).is_file():
        raise DataError(
            "reference labels file not found",
            where=f"evaluate.reference_labels ({e.reference_labels})",
            hint="a CSV pair_id,winner of held-out human labels of stage-4 pairs",
        )
    judge = ctx.model(cfg.models.feedback_model) if e.ai_judge else None
    judge = optional_model(ctx, e.judge_model, field="evaluate.judge_model") or judge
    reference = optional_model(ctx, e.reference_model, field="evaluate.reference_model")
    pm, pm_note = pm_model(cfg, ctx)
    overlap = training_overlap(cfg)
    for warning in overlap:
        log.warning("%s", warning)
    return _Inputs(
        checkpoints=checkpoints,
        skipped=skipped,
        constitution=constitution,
        human=human,
        human_rejects=human_rejects,
        judge=judge,
        reference=reference,
        pm=pm,
        notes=[*overlap, *([pm_note] if pm_note else [])],
    )


def _source_key(spec: str) -> str:
    """One spelling per source: a sample's file, or a path resolved as the stages resolve it."""
    try:
        path = sample_path(spec.removeprefix("sample:")) if spec.startswith("sample:") else None
    except DataError:  # an unknown sample: the stage that reads it says so
        return spec
    return str((path or resolve_path(spec)).resolve())


def training_overlap(cfg: RunConfig) -> list[str]:
    """A warning for each evaluation source that a training stage also reads: its prompts are
    not held out. `data.*` sources do not count when `evaluate.skip` passes over the
    `data.limit` prompts that training read."""
    e = cfg.evaluate
    training: dict[str, str] = {}
    if cfg.data.limit is None or e.skip < cfg.data.limit:
        training = {"data.red_team": cfg.data.red_team, "data.helpful": cfg.data.helpful}
    if cfg.pm_train.helpful_per_ai_pair > 0:
        training["pm_train.helpful_source"] = cfg.pm_train.helpful_source
    keys = {field: _source_key(spec) for field, spec in training.items()}
    warnings = []
    for split in SPLITS:
        spec = getattr(e, split)
        shared = [field for field, key in keys.items() if key == _source_key(spec)]
        if shared:
            warnings.append(
                f"warning: evaluate.{split} ({spec}) is also {', '.join(shared)}, which training "
                "reads: its prompts are not held out (use held-out prompts, e.g. the default "
                f"{HELD_OUT[split]}, or skip past what training read)"
            )
    return warnings


def run(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) stage 7; returns its manifest."""
    # Over 60 lines: its three parts run side by side on shared pools, started here together.
    from concurrent.futures import ThreadPoolExecutor

    from cai_ray.pipeline.eval_quality import label_quality_part, revision_part, side_pools

    sections = ("evaluate", "models", "generation", "rl_label", "data")
    ctx = StageContext.open(cfg, STAGE, sections=sections)
    if ctx.finished is not None:
        return ctx.finished
    e, t0 = cfg.evaluate, time.perf_counter()
    x = _inputs(cfg, ctx)
    import ray

    ensure_ray(cfg.ray)
    if e.colocate:
        pools = {"evaluate (every model)": e.rollout}
    else:
        pools = {f"rollout:{c.name}": e.rollout for c in x.checkpoints}
        pools.update({"judge": e.judge} if x.judge else {})
        pools.update({"pm": e.pm} if x.pm else {})
    pools.update(side_pools(cfg, reference=x.reference, pm=x.pm))
    check_pool_fits(pools, ray.cluster_resources())
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix=STAGE) as side:
        # the looks back at stages 1 and 4 need no answers: they stream alongside (own pools)
        quality = side.submit(label_quality_part, cfg, ctx, reference=x.reference)
        revisions = side.submit(revision_part, cfg, ctx, pm=x.pm)
        stores = _judged_stream(cfg, ctx, x.checkpoints, judge=x.judge, pm=x.pm, progress=progress)
        timings = {"answers_and_judging_s": round(time.perf_counter() - t0, 3)}
        quality, revisions = quality.result(), revisions.result()
    notes = [*x.notes, *(n for n in (quality.get("note"), revisions.get("note")) if n)]
    outputs = {split: summarize(store) for split, store in stores.items()}
    empty = [s for s, out in outputs.items() if out["rows"] == 0 and out["rejects"] == 0]
    if len(empty) == len(outputs):
        raise DataError(
            f"no held-out prompts: skip={e.skip} passes over every prompt of both sources",
            where="evaluate.skip",
            hint="lower evaluate.skip, or point evaluate.harmful / evaluate.helpful at more prompts",
        )
    notes += [f"evaluate.{s}: no prompts after skip={e.skip}" for s in empty]
    outputs.update(quality.get("outputs", {}) | revisions.get("outputs", {}))
    outputs.update(_human_outputs(x.human, x.human_rejects))
    rows = {split: _read_rows(store) for split, store in stores.items()}
    elo = _elo_part(ctx, rows, x.human, x.names, notes=notes)
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    phrases = cfg.refusal_phrases
    metrics = {s: checkpoint_metrics(rows[s], x.names, phrases=phrases) for s in rows}
    manifest = ctx.manifest(
        inputs={"harmful": e.harmful, "helpful": e.helpful, "skip": e.skip, "limit": e.limit},
        checkpoints=[c.to_dict() for c in x.checkpoints],
        skipped=x.skipped,
        outputs=outputs,
        metrics=metrics,
        refusal=refusal_summary(metrics, x.names),
        judge=_judge_summary(rows),
        elo=elo,
        label_quality=quality.get("result"),
        revision_rounds=revisions.get("result"),
        models=models_record(judge=x.judge, pm=x.pm, reference=x.reference),
        constitution_hash=x.constitution.content_hash,
        notes=notes,
        timings={**timings, **quality.get("timings", {}), **revisions.get("timings", {})},
    )
    return write_manifest(ctx.stage_dir, manifest)


def _read_rows(store: ShardStore) -> list[dict[str, Any]]:
    table = store.read_table()
    return table.to_pylist() if table is not None else []


def _judged_stream(
    cfg: RunConfig,
    ctx: StageContext,
    checkpoints: list[Checkpoint],
    *,
    judge: ModelRef | None,
    pm: ModelRef | None,
    progress: bool,
) -> dict[str, ShardStore]:
    """Both splits in one stream (each actor starts once): answers of every checkpoint, judged
    and PM-scored, one row per prompt, written to the split's own folder."""
    e = cfg.evaluate
    stores = {split: ShardStore(ctx.stage_dir / split) for split in SPLITS}
    parts = [
        prompt_dataset(
            getattr(e, split),
            turns=cfg.data.turns,
            limit=e.limit,
            done=stores[split].done_keys(),
            block_rows=e.rollout.batch_size,
            skip=e.skip,
        ).map_batches(_tag, fn_kwargs=dict(split=split), batch_format="pandas", num_cpus=0)
        for split in SPLITS
    ]
    ds = parts[0].union(*parts[1:])
    steps = _steps(cfg, ctx, checkpoints, judge=judge, pm=pm)
    if e.colocate:  # one pool whose actors hold every model: K + 2 fewer process start-ups
        from actors.chain import ChainWorker

        chain = dict(steps=[(fn, kwargs) for fn, kwargs, _ in steps])
        ds = pool_map(ds, ChainWorker, chain, e.rollout, cfg)
    else:
        for fn, kwargs, section in steps:
            if section is None:  # a light reshaping step: a 0-CPU task, never behind the pools
                ds = ds.map_batches(fn, fn_kwargs=kwargs, batch_format="pandas", num_cpus=0)
            else:
                ds = pool_map(ds, fn, kwargs, section, cfg)
    names = [c.name for c in checkpoints]
    _drain_splits(ds, stores, cfg, expand=_expander(names, cfg.refusal_phrases), progress=progress)
    return stores


def _steps(
    cfg: RunConfig,
    ctx: StageContext,
    checkpoints: list[Checkpoint],
    *,
    judge: ModelRef | None,
    pm: ModelRef | None,
) -> list[tuple[Any, dict[str, Any], Any]]:
    """The stream's steps after the prompts, in order: (worker class or function, its kwargs,
    its pool section, None for a light function). One list for both layouts (`colocate`)."""
    from actors.judge import JudgeWorker, PMScoreWorker
    from actors.rollout import RolloutWorker

    e = cfg.evaluate

    def model(ref: ModelRef, pool: PoolConfig) -> dict[str, Any]:
        """A worker's model arguments; its pool section's engine, else the run's."""
        return dict(model_path=str(ref.path), engine=pool.engine or cfg.engine, model_id=ref.id)

    # one seed for every checkpoint: answers differ by model, not by sampling noise
    sampling = SamplingParams.of(
        cfg.generation,
        seed=cfg.seed,
        max_new_tokens=e.max_new_tokens or cfg.generation.max_new_tokens,
        temperature=cfg.generation.temperature if e.temperature is None else e.temperature,
    )
    steps: list[tuple[Any, dict[str, Any], Any]] = []
    # Trained checkpoints read prompts as the model they came from (chat-template arguments).
    source = cfg.models.base_model.chat_template_kwargs
    for i, ck in enumerate(checkpoints):
        fmt = PromptFormat(cfg.format, ck.ref.template_kwargs or dict(source))  # type: ignore[arg-type]
        kwargs = dict(sampling=sampling, fmt=fmt, answer_col=f"answer_{i}")
        steps.append((RolloutWorker, {**model(ck.ref, e.rollout), **kwargs}, e.rollout))
    steps.append((_pack_answers, dict(n=len(checkpoints)), None))
    if judge is not None:
        kwargs = dict(
            constitution_path=str(ctx.constitution_path),
            settings=cfg.judge_settings,
            seed=cfg.seed,
            names=[c.name for c in checkpoints],
        )
        steps.append((JudgeWorker, {**model(judge, e.judge), **kwargs}, e.judge))
    if pm is not None:
        steps.append((PMScoreWorker, {**model(pm, e.pm), "text_col": "answers"}, e.pm))
    return steps


def _tag(batch: Any, *, split: str) -> Any:
    batch = batch.copy()
    batch["split"], batch["axis"] = split, SPLITS[split]
    return batch


def _drain_splits(ds, stores: dict[str, ShardStore], cfg: RunConfig, *, expand, progress: bool):
    """`common.drain` for a stream of several splits: each batch's rows go to their split's
    store, and ids are unique within a split (the same prompt may sit in both sources)."""
    from tqdm import tqdm

    bar = tqdm(desc=STAGE, unit="prompt", disable=not progress)
    batches = ds.iter_batches(batch_size=cfg.evaluate.shard_rows, batch_format="pandas")
    for batch in stream_with_timeout(batches, cfg.ray.batch_timeout_s, what=STAGE):
        for split, part in batch.groupby("split", sort=False):
            rows, rejects = split_batch(part, stores[split].keys)  # the store's own set
            stores[split].write([expand(r) for r in rows], rejects)
        bar.update(len(batch))
    bar.close()


def _pack_answers(batch: Any, *, n: int) -> Any:
    """The K answer columns as one JSON list, in checkpoint order."""
    batch = batch.copy()
    cols = [f"answer_{i}" for i in range(n)]
    batch["answers"] = [json.dumps([str(x) for x in row]) for row in batch[cols].itertuples(False)]
    return batch.drop(columns=cols)


def _expander(names: list[str], phrases: tuple[str, ...]):
    """Row expander: answers as one struct per checkpoint, with its PM score and evasiveness."""

    def expand(row: dict[str, Any]) -> dict[str, Any]:
        texts = json.loads(row.pop("answers"))
        pm = json.loads(row.pop("pm_scores", "") or "null") or [None] * len(texts)
        judged = json.loads(row.pop("judged", "") or "null") or {}
        evasive = {x["checkpoint"]: x for x in judged.get("evasiveness", [])}
        answers = [
            {
                "checkpoint": name,
                "text": text,
                "chars": len(text),
                "words": len(text.split()),
                "refusal": has_phrase(text, phrases),
                "pm_score": score,
                "p_evasive": evasive.get(name, {}).get("p_evasive"),
            }
            for name, text, score in zip(names, texts, pm, strict=True)
        ]
        comparisons = judged.get("comparisons", [])
        return {
            **row,
            "answers": answers,
            "comparisons": comparisons,
            "evasiveness": list(evasive.values()),
        }

    return expand


def _elo_part(ctx, rows, human, names, *, notes: list[str]) -> dict[str, Any] | None:
    """elo.json (AI and human comparisons per axis) for the report's frontier; None (and a note)
    when nothing was compared."""
    by_axis = {axis: comparisons_of(rows[split]) for split, axis in SPLITS.items()}
    sources = {a: {"ai": len(c), "human": len(human.get(a, []))} for a, c in by_axis.items()}
    for axis, comps in human.items():
        by_axis[axis] = by_axis[axis] + comps
    if not any(by_axis.values()):
        notes.append("no comparisons (fewer than 2 checkpoints, no human judgements): no Elo")
        return None
    e = ctx.cfg.evaluate
    table = elo_table(by_axis, order=names, n=e.bootstrap, seed=ctx.cfg.seed, sources=sources)
    atomic_write_text(ctx.stage_dir / "elo.json", json.dumps(table, indent=2) + "\n")
    return {"file": "elo.json", "comparisons": table["comparisons"], "sources": sources}


def _human_outputs(human, rejects) -> dict[str, Any]:
    """Manifest outputs of the imported human CSVs: rows kept, rejects by reason."""
    return {
        f"human_{axis}": {
            "rows": len(human.get(axis, [])),
            "rejects": len(bad),
            "reject_reasons": reject_counts(bad),
            "rejected": bad[:20],
        }
        for axis, bad in rejects.items()
    }


def _judge_summary(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The judge's own position bias: share of (pair, principle) checks whose winner flipped."""
    flips = checks = 0
    for split_rows in rows.values():
        for row in split_rows:
            for c in row.get("comparisons") or []:
                flips += int(c["flips"])
                checks += int(c["order_checks"])
    return {"order_checks": checks, "flip_rate": flips / checks if checks else None}
