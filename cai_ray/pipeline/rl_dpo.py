"""Stage 6 offline: DPO (Rafailov et al. 2023) instead of on-policy RL (`algorithm: dpo`).

Pairs come from stage 1 (the final revision preferred over the initial answer: Hugging Face's
CAI recipe) or from stage 4 (the AI-labelled winner). The frozen SL-CAI policy's summed
log-probs of both responses are computed once, then the DeepSpeed learner group trains with
the DPO loss (`LearnerGroup.fit`: epochs, checkpoints and resume as in stages 2 and 5).
Its own driver: the runner enters `run` here for rl-train when `rl_train.algorithm` is dpo; it
writes the same folder, `<run_dir>/rl-train/`, as the online loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cai_ray.config import RunConfig
from cai_ray.data.conversation import PromptFormat
from cai_ray.data.shards import ShardStore, reject_counts, write_manifest
from cai_ray.errors import DataError
from cai_ray.layout import RL_LABEL, SL_GENERATE, part_dir
from cai_ray.pipeline.common import StageContext, policy_model
from cai_ray.sl.losses import IGNORE_INDEX


def run(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) stage 6 with `algorithm: dpo`; returns its manifest."""
    from cai_ray.pipeline.rl_train import SECTIONS, STAGE

    ctx = StageContext.open(cfg, STAGE, sections=SECTIONS)
    if ctx.finished is not None:
        return ctx.finished
    return _train(cfg, ctx, progress=progress)


def _train(cfg: RunConfig, ctx: StageContext, *, progress: bool) -> dict[str, Any]:
    from actors.learner.group import LearnerGroup
    from actors.learner.metrics import read_metrics
    from cai_ray.models import load_tokenizer
    from cai_ray.rl.experience import mean_of
    from cai_ray.rl.objectives import DPOObjective

    s = cfg.rl_train.dpo
    t0 = time.perf_counter()
    policy = ctx.model(policy_model(cfg))
    pairs, rejects = read_pairs(cfg, ctx.stage_dir.parent)
    tokenizer = load_tokenizer(policy.path)
    fmt = policy.prompt_format(cfg.format).with_tokenizer(tokenizer)
    rows, too_long = encode_pairs(tokenizer, pairs, fmt=fmt, max_seq_len=s.learner.max_seq_len)
    rejects += too_long
    if len(rows) < s.learner.global_batch:
        raise DataError(
            f"{len(rows)} DPO pairs make no batch of {s.learner.global_batch}",
            where=f"rl_train.dpo.pairs={s.pairs}",
            hint="run the stage that makes the pairs on more prompts, or lower micro_batch_size",
        )
    _reference_logps(cfg, policy.path, rows, pad_id=int(tokenizer.pad_token_id or 0))
    objective = DPOObjective(
        pad_id=int(tokenizer.pad_token_id or 0),
        beta=s.beta,
        label_smoothing=s.label_smoothing,
        share_prefix=s.learner.share_prefix,
    )
    with LearnerGroup(s.learner, objective, policy.path, ctx.stage_dir) as group:
        result = group.fit(rows, resume=True, progress=progress)
    history = read_metrics(ctx.stage_dir)
    tenth = max(1, len(history) // 10)
    manifest = ctx.manifest(
        inputs={"pairs": s.pairs},
        outputs={
            "hf_dir": str(result.hf_dir),
            "pairs": len(rows),
            "rejects": len(rejects),
            "reject_reasons": reject_counts(rejects),
            "steps": result.steps,
            "final_loss": result.final_loss,
            "margin_first": mean_of(history[:tenth], "margin"),
            "margin_last": mean_of(history[-tenth:], "margin"),
            "reward_accuracy_last": mean_of(history[-tenth:], "reward_accuracy"),
            "resumed_from": result.resumed_from,
            "learner_restarts": result.restarts,
        },
        algorithm="dpo",
        models={"policy": policy.id, "reference": policy.id},
        timings={"total_s": round(time.perf_counter() - t0, 3)},
    )
    return write_manifest(ctx.stage_dir, manifest)


def read_pairs(cfg: RunConfig, run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(pairs of {pair_id, messages, chosen, rejected}, rejects with reasons)."""
    s = cfg.rl_train.dpo
    if s.pairs == "revisions":
        store = ShardStore(part_dir(run_dir, SL_GENERATE, "red_team"), key="prompt_id")
        cols = ["prompt_id", "messages", "initial_answer", "final_revision"]
        # finish reasons (and so the rounds) are read where stage 1 recorded them
        cols += [c for c in ("rounds", "initial_answer_finish") if c in store.columns()]
        stage = SL_GENERATE
    else:
        store = ShardStore(part_dir(run_dir, RL_LABEL, "labels"), key="pair_id")
        cols = ["pair_id", "messages", "response_a", "response_b", "label"]
        stage = RL_LABEL
    table = store.read_table(cols)
    if table is None or table.num_rows == 0:
        raise DataError(
            f"DPO with pairs={s.pairs} reads the output of {stage}, and there is none",
            where=str(store.folder),
            hint=f"run `cai-ray stage {stage} CONFIG` first (or `cai-ray run`)",
        )
    pairs, rejects = [], []
    for row in table.to_pylist():
        finished = {}
        if s.pairs == "revisions":
            key, chosen, rejected = row["prompt_id"], row["final_revision"], row["initial_answer"]
            rounds = list(row.get("rounds") or [])
            # A text cut at max_new_tokens is trained without EOS, never as a finished answer.
            finished = {
                "chosen": not rounds or rounds[-1].get("revision_finish") != "length",
                "rejected": row.get("initial_answer_finish") != "length",
            }
            reason = None
        else:
            key, p = row["pair_id"], float(row["label"])
            a_wins = p > 0.5
            chosen, rejected = (
                (row["response_a"], row["response_b"])
                if a_wins
                else (row["response_b"], row["response_a"])
            )
            reason = "label too close to 0.5" if abs(p - 0.5) <= s.min_margin else None
        if reason is None and (not chosen or not rejected):
            reason = "empty response"
        if reason is None and chosen == rejected:
            reason = "identical responses"
        if reason:
            rejects.append({"key": key, "reason": reason})
            continue
        pairs.append(
            {
                "pair_id": key,
                "messages": row["messages"],
                "chosen": chosen,
                "rejected": rejected,
                "finished": finished,
            }
        )
    return pairs, rejects


def encode_pairs(
    tokenizer: Any, pairs: list[dict], *, fmt: str | PromptFormat, max_seq_len: int
) -> tuple[list[dict], list[dict]]:
    """Learner rows: token ids of prompt + chosen / + rejected and where each response starts
    (the same prompt/response boundary as SFT and sampling: `cai_ray.data.tokens`)."""
    from cai_ray.sl.sft_data import tokenize_example

    fmt = PromptFormat.of(fmt).with_tokenizer(tokenizer)
    rows, rejects = [], []
    for pair in pairs:
        prompt = fmt.render_messages(pair["messages"])
        encoded = {}
        for k in ("chosen", "rejected"):
            finished = pair.get("finished", {}).get(k, True)
            ex = tokenize_example(
                tokenizer, prompt, pair[k], max_seq_len=max_seq_len, finished=finished
            )
            if isinstance(ex, str):
                break
            start = sum(1 for label in ex["labels"] if label == IGNORE_INDEX)
            encoded[f"{k}_ids"], encoded[f"{k}_prompt_len"] = ex["input_ids"], start
        if len(encoded) < 4:
            rejects.append({"key": pair["pair_id"], "reason": "cannot tokenize within max_seq_len"})
            continue
        rows.append({"idx": len(rows), "pair_id": pair["pair_id"], **encoded})
    return rows, rejects


def _reference_logps(cfg: RunConfig, path: Path, rows: list[dict], *, pad_id: int) -> None:
    """Fill `ref_chosen` / `ref_rejected` with the frozen policy's summed response log-probs."""
    from actors.rl_workers import ReferenceWorker

    roles = cfg.rl_train.reference
    ref = ReferenceWorker(
        str(path), roles.engine or cfg.engine, batch_size=roles.batch_size, pad_id=pad_id
    )
    for k in ("chosen", "rejected"):
        seqs = [{"input_ids": r[f"{k}_ids"], "prompt_len": r[f"{k}_prompt_len"]} for r in rows]
        for r, lp in zip(rows, ref.sequence_logprobs(seqs), strict=True):
            r[f"ref_{k}"] = lp
