"""Stage 5, pm-train: a preference model on the AI labels of stage 4 (paper section 4.1).

The PM is a scalar head on a causal LM's decoder (`cai_ray.models.value_head`). As in the paper
it starts from the pretrained LM: `models.reward` when set (e.g. `{path: <run>/sl-train/hf}` for
the SL-CAI model, or an earlier PM), else `models.base`, else `models.helpful`, with a fresh head.
The DeepSpeed learner group trains it with the Bradley-Terry loss on soft labels, optionally
mixed with human helpfulness comparisons (hh-rlhf layout). A seeded share of the pairs is held
out; every epoch ends in a checkpoint whose HF copy is scored on it (accuracy, calibration).
Resume as in stage 2.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cai_ray.config import RunConfig
from cai_ray.data.shards import ShardStore, atomic_write_text, write_manifest
from cai_ray.data.tokens import encode_batch
from cai_ray.engines import resolve_threads
from cai_ray.errors import DataError
from cai_ray.feedback.reward import pm_text
from cai_ray.layout import PM_TRAIN, RL_LABEL, part_dir
from cai_ray.pipeline.common import ModelRef, StageContext

STAGE = PM_TRAIN


def run(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) stage 5; returns its manifest."""
    from actors.learner.group import LearnerGroup
    from cai_ray.feedback.pm_objective import PreferenceObjective
    from cai_ray.models import load_tokenizer

    ctx = StageContext.open(cfg, STAGE, sections=("pm_train", "rl_label", "models"))
    if ctx.finished is not None:
        return ctx.finished
    s = cfg.pm_train
    t0 = time.perf_counter()
    pm, start = _start_model(cfg, ctx)
    comparisons, rejects = _comparisons(cfg, ctx)
    train = [c for c in comparisons if not _held_out(c["pair_id"], s.eval_fraction, cfg.seed)]
    held = [c for c in comparisons if _held_out(c["pair_id"], s.eval_fraction, cfg.seed)]
    tokenizer = load_tokenizer(pm.path)
    rows = [{"idx": i, **_encode(tokenizer, c, s.learner.max_seq_len)} for i, c in enumerate(train)]
    learner = _learner_config(s.learner, len(rows))
    objective = PreferenceObjective(
        pad_id=tokenizer.pad_token_id, share_prefix=s.learner.share_prefix
    )
    with LearnerGroup(learner, objective, pm.path, ctx.stage_dir) as group:
        result = group.fit(rows, resume=True, progress=progress)
    evals = _evaluate(cfg, ctx.stage_dir, held, learner, len(rows))
    atomic_write_text(ctx.stage_dir / "eval.json", json.dumps(evals, indent=2) + "\n")
    manifest = ctx.manifest(
        inputs={"labels": str(part_dir(cfg.run_dir, RL_LABEL, "labels"))},
        outputs={
            "hf_dir": str(result.hf_dir),
            "train_pairs": len(train),
            "held_out_pairs": len(held),
            "by_source": _by_source(train),
            "rejects": len(rejects),
            "reject_reasons": _reasons(rejects),
            "steps": result.steps,
            "final_loss": result.final_loss,
            "resumed_from": result.resumed_from,
            "learner_restarts": result.restarts,
        },
        held_out=evals,
        models={"start": start},
        timings={
            "total_s": round(time.perf_counter() - t0, 3),
            "pairs_per_s": _pairs_per_s(ctx.stage_dir, learner.global_batch),
        },
    )
    return write_manifest(ctx.stage_dir, manifest)


def _start_model(cfg: RunConfig, ctx: StageContext) -> tuple[ModelRef, dict[str, Any]]:
    """The model the PM starts from, and its manifest record; says which in a log line (issue
    14: a silent random start made the whole RL stage optimise noise)."""
    from cai_ray.models.value_head import KIND_LABELS, check_scalar_model

    m = cfg.models
    field, spec = next(
        (name, spec)
        for name, spec in (
            ("models.reward", m.reward),
            ("models.base", m.base),
            ("models.helpful", m.helpful),
        )
        if spec is not None
    )
    # A path may hold a causal LM or an earlier PM; presets and GGUF files are causal LMs.
    ref = ctx.model(spec, head=None if spec.path is not None else "causal")  # type: ignore[arg-type]
    kind = KIND_LABELS[check_scalar_model(ref.path, new_head=True)]
    random = f"; random weights: preset {spec.preset}" if spec.preset is not None else ""
    print(f"{STAGE}: the PM starts from {field} {ref.id} ({kind}{random}) at {ref.path}")
    record = {"id": ref.id, "path": str(ref.path), "kind": kind, "from": field}
    return ref, {**record, "random_preset": spec.preset}


def _comparisons(cfg: RunConfig, ctx: StageContext) -> tuple[list[dict], list[dict]]:
    """AI-labelled pairs of stage 4, plus human helpfulness pairs at `helpful_per_ai_pair`."""
    from cai_ray.data.sources import read_comparisons

    labels = ShardStore(part_dir(cfg.run_dir, RL_LABEL, "labels"), key="pair_id")
    table = labels.read_table(["pair_id", "messages", "response_a", "response_b", "label"])
    if table is None or table.num_rows == 0:
        raise DataError(
            "pm-train needs the AI labels of stage 4, and there are none",
            where=str(labels.folder),
            hint="run `cai-ray stage rl-label CONFIG` first (or `cai-ray run`)",
        )
    ai = [{**r, "source": "ai"} for r in table.to_pylist()]
    s = cfg.pm_train
    if s.helpful_per_ai_pair == 0:
        return ai, []
    want = max(1, round(s.helpful_per_ai_pair * len(ai)))
    read = read_comparisons(s.helpful_source, limit=want)
    human = [
        {
            "pair_id": c.pair_id,
            "messages": c.conversation.to_messages(),
            "response_a": c.chosen,
            "response_b": c.rejected,
            "label": 1.0,  # a human chose response_a
            "source": "human",
        }
        for c in read.records
    ]
    return ai + human, [r.to_row() for r in read.rejects]


def _held_out(pair_id: str, fraction: float, seed: int) -> bool:
    """A seeded, order-free split: the same pair is held out on every run and resume."""
    digest = hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _encode(tokenizer: Any, c: dict[str, Any], max_len: int) -> dict[str, Any]:
    """Token ids of both transcripts; too long keeps the end, where the responses differ."""
    texts = [pm_text(c["messages"], c[k]) for k in ("response_a", "response_b")]
    ids = [row[-max_len:] for row in encode_batch(tokenizer, texts)]  # one BOS, as scored
    return {"ids_a": ids[0], "ids_b": ids[1], "label": float(c["label"])}


def _learner_config(learner: Any, num_rows: int) -> Any:
    """Checkpoint at every epoch end (scored on the held-out pairs), keeping one per epoch."""
    steps = num_rows // learner.global_batch
    if steps == 0:
        raise DataError(
            f"{num_rows} training pairs make no batch of {learner.global_batch}",
            where="pm_train.learner.micro_batch_size",
            hint="lower micro_batch_size or grad_accum, or label more pairs",
        )
    every = learner.checkpoint_every or steps
    keep = max(learner.keep_checkpoints, learner.epochs)
    return learner.model_copy(
        update={"checkpoint_every": every, "keep_checkpoints": keep, "hf_checkpoints": True}
    )


def _evaluate(cfg: RunConfig, out: Path, held: list[dict], learner: Any, rows: int) -> list[dict]:
    """Held-out accuracy and calibration of the HF copy at each epoch end still on disk."""
    from actors.learner.checkpoint import checkpoints_dir, tag_for
    from cai_ray.feedback.preference import pair_metrics
    from cai_ray.feedback.reward import RewardScorer

    if not held:
        return []
    steps = rows // learner.global_batch
    total = min(learner.epochs * steps, learner.max_steps or learner.epochs * steps)
    results = []
    for epoch in range(1, learner.epochs + 1):
        step = min(epoch * steps, total)
        hf = checkpoints_dir(out) / tag_for(step) / "hf"
        if not hf.is_dir():
            hf = out / "hf" if step == total else None
        if hf is None:
            continue
        scorer = RewardScorer(
            hf, device=cfg.engine.device, threads=resolve_threads(cfg.engine.threads)
        )
        texts = [pm_text(c["messages"], c[k]) for c in held for k in ("response_a", "response_b")]
        scores = scorer.score(texts)
        metrics = pair_metrics(scores[0::2], scores[1::2], [float(c["label"]) for c in held])
        results.append({"epoch": epoch, "step": step, **metrics})
        if step == total:
            break
    return results


def _by_source(pairs: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in pairs:
        out[p["source"]] = out.get(p["source"], 0) + 1
    return out


def _reasons(rejects: list[dict]) -> dict[str, int]:
    from cai_ray.data.shards import reject_counts

    return reject_counts(rejects)


def _pairs_per_s(out: Path, global_batch: int) -> float | None:
    """Training throughput from the learner's metrics log (pairs per second of step time)."""
    from actors.learner.metrics import read_metrics

    history = read_metrics(out)
    seconds = sum(float(m.get("step_time_s", 0)) for m in history)
    return round(len(history) * global_batch / seconds, 2) if seconds else None
