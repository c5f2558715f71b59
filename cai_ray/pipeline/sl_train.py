"""Stage 2, sl-train: fine-tune on the stage-1 revisions with the DeepSpeed learner group.

Pairs are (prompt, final revision) by default, or every round / rounds 1..n (SL-CAI-n), mixed
with helpfulness samples (paper 3.1: the helpful model's answers to helpfulness prompts) so the
model stays helpful. Loss is on response tokens only. Resume continues from the last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cai_ray.config import RunConfig
from cai_ray.data.shards import ShardStore, read_manifest, write_manifest
from cai_ray.errors import CaiRayError, DataError
from cai_ray.layout import SL_GENERATE, SL_TRAIN, stage_dir
from cai_ray.pipeline.common import StageContext, ensure_ray

STAGE = SL_TRAIN


def run(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) stage 2; returns its manifest."""
    # Over 60 lines: most of it is the manifest's 15 fields; the steps are select, encode, fit.
    from actors.learner.group import LearnerGroup
    from cai_ray.models import load_tokenizer
    from cai_ray.sl.objective import SFTObjective
    from cai_ray.sl.sft_data import build_sft_examples, mix_helpful, pack_examples, select_sft_pairs

    ctx = StageContext.open(cfg, STAGE, sections=("sl_train", "models"))
    if ctx.finished is not None:
        return ctx.finished
    t0 = time.perf_counter()
    s = cfg.sl_train
    gen_dir = stage_dir(cfg.run_dir, SL_GENERATE)
    gen = read_manifest(gen_dir)
    if not gen or not gen.get("complete"):
        raise CaiRayError(
            "sl-generate has not finished in this run directory",
            where=str(gen_dir),
            hint="run `cai-ray stage sl-generate` (or `cai-ray run`) first",
        )
    selection = select_sft_pairs(
        _rows(gen_dir / "red_team"), mode=s.pairs, up_to=s.up_to, cut=s.unfinished
    )
    if not selection.pairs:
        raise DataError("no SFT pairs in the stage-1 output", where=str(gen_dir))
    helpful, cut_helpful = _helpful_pairs(
        gen_dir / "helpful", per_prompt=s.helpful_samples_per_prompt, cut=s.unfinished
    )
    pairs = mix_helpful(selection.pairs, helpful, ratio=s.helpful_per_revision, seed=cfg.seed)

    model = ctx.model(cfg.models.base_model)
    fmt = model.prompt_format(cfg.format).load(model.path)
    tokenizer = fmt.tokenizer or load_tokenizer(model.path)
    items = [(p.prompt_id, fmt.render_messages(p.messages), p.response, p.finished) for p in pairs]
    learner = s.learner
    examples, rejected = build_sft_examples(
        tokenizer, items, max_seq_len=learner.max_seq_len, truncation=s.truncation
    )
    if learner.packing:
        examples = pack_examples(examples, max_seq_len=learner.max_seq_len)
    if learner.num_ranks > 0:
        ensure_ray(cfg.ray)
    group = LearnerGroup(
        learner, SFTObjective(pad_id=tokenizer.pad_token_id or 0), model.path, ctx.stage_dir
    )
    try:
        result = group.fit(_dataset(examples, learner.num_ranks), resume=True, progress=progress)
    finally:
        group.shutdown()

    rejects = [
        {"key": r.prompt_id, "reason": r.reason, "round": r.round}
        for r in (*selection.rejected, *cut_helpful, *rejected)
    ]
    manifest = ctx.manifest(
        inputs={"sl-generate": str(gen_dir), "pairs": s.pairs, "up_to": s.up_to},
        outputs={
            "revision_pairs": len(selection.pairs),
            "helpful_pairs": len(pairs) - len(selection.pairs),
            "helpful_available": len(helpful),
            "unfinished_trained": sum(not p.finished for p in pairs),
            "examples": len(examples),
            "rejects": len(rejects),
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "learner_restarts": result.restarts,
            "final_loss": result.final_loss,
            "hf_dir": str(result.hf_dir),
            "metrics": str(result.metrics_path),
        },
        models={"base": model.id},
        constitution_hash=gen.get("constitution_hash"),
        timings={"total_s": round(time.perf_counter() - t0, 3)},
        rejected=rejects[:100],
    )
    return write_manifest(ctx.stage_dir, manifest)


def _rows(folder: Path) -> list[dict[str, Any]]:
    table = ShardStore(folder).read_table()
    return table.to_pylist() if table is not None else []


def _helpful_pairs(folder: Path, *, per_prompt: int, cut: str) -> tuple[list, list]:
    """The helpful model's answers from stage 1 (`sl_generate.helpful_samples` > 0), and the
    ones set aside because they were cut at the token limit (with `cut="drop"`)."""
    from cai_ray.sl.sft_data import CUT_REASON, Rejected, SFTPair

    if not folder.is_dir():
        return [], []
    pairs, rejected = [], []
    for row in _rows(folder):
        finishes = list(row.get("answers_finish") or [])
        for k, answer in enumerate(list(row["answers"])[:per_prompt]):
            finished = (finishes[k] if k < len(finishes) else "stop") != "length"
            if not answer:
                continue
            if not finished and cut == "drop":
                rejected.append(Rejected(row["prompt_id"], f"helpful answer {CUT_REASON}"))
                continue
            messages = tuple(row["messages"])
            pairs.append(SFTPair(row["prompt_id"], messages, answer, None, "helpful", finished))
    return pairs, rejected


def _dataset(examples: list[dict[str, Any]], num_ranks: int):
    """Ranks read their shards through Ray Data; the in-process group takes the rows as they are."""
    if num_ranks == 0:
        return examples
    import ray.data

    return ray.data.from_items(examples)
