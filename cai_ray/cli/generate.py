"""`cai-ray generate` (sample responses) and `cai-ray score` (multiple-choice option log-probs).

Both load one model on the configured engine (`engine.kind: auto | hf | vllm`) and print a table,
or write JSONL with `-o`. Bad input rows are counted and reported, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from cai_ray.cli.options import add_set_option
from cai_ray.engines.base import SamplingParams
from cai_ray.errors import DataError

_EXCERPT = 40


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `generate` and `score` commands."""
    p = sub.add_parser(
        "generate",
        help="sample responses to prompts from a model",
        description="Render prompts as conversations (transcript or chat template) and sample.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a user message (repeatable)"
    )
    src.add_argument(
        "--prompts", metavar="SOURCE", help="prompt file (JSONL/Parquet/...) or sample:NAME"
    )
    _add_model_args(p)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, help="default: generation.max_new_tokens")
    p.add_argument("--temperature", type=float, help="default: generation.temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, help="default: generation.top_p")
    p.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")
    p.add_argument(
        "--format", choices=("transcript", "chat"), help="prompt layout (default: config format)"
    )
    p.add_argument("--limit", type=int, help="read at most this many prompts")
    p.add_argument(
        "-o", "--output", metavar="OUT.jsonl", help="write JSONL rows instead of a table"
    )
    p.set_defaults(func=_generate)

    s = sub.add_parser(
        "score",
        help="log-probabilities of options after a shared prefix",
        description="Score each option as a continuation of the prefix (the AI-feedback scorer).",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prefix", metavar="TEXT", help="the shared prefix (with --option)")
    src.add_argument("--file", metavar="FILE.jsonl", help='rows {"prefix": ..., "options": [...]}')
    s.add_argument("--option", action="append", metavar="TEXT", help="an option (repeatable)")
    _add_model_args(s)
    s.add_argument(
        "-o", "--output", metavar="OUT.jsonl", help="write JSONL rows instead of a table"
    )
    s.set_defaults(func=_score)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", metavar="PATH", help="a Hugging Face model directory")
    model.add_argument(
        "--preset", metavar="NAME", help="a tiny preset (built once in $CAI_RAY_HOME)"
    )
    p.add_argument("--config", metavar="YAML", help="run config (engine, generation, models)")
    add_set_option(p)


def _config(args: argparse.Namespace):
    from cai_ray.config import load_config, resolve_path

    return load_config(resolve_path(args.config) if args.config else None, args.overrides)


def _model_dir(args: argparse.Namespace, cfg) -> Path:
    """--model, else --preset, else the config's helpful model."""
    from cai_ray.config import ModelConfig, resolve_path
    from cai_ray.models import check_model_dir, default_cache_dir, ensure_model

    if args.model:
        return check_model_dir(resolve_path(args.model))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a preset is built at most once: the bars are noise
    if args.preset:
        return ensure_model(ModelConfig(preset=args.preset), run_dir=default_cache_dir())
    return ensure_model(cfg.models.helpful, run_dir=cfg.run_dir)


def _engine(cfg, path: Path):
    from transformers.utils import logging as hf_logging

    from cai_ray.engines import make_engine

    hf_logging.disable_progress_bar()
    return make_engine(path, cfg.engine)


# -- generate -------------------------------------------------------------------------------


def _generate(args: argparse.Namespace) -> int:

    cfg = _config(args)
    # Bad prompt files fail here, before a model is built or loaded.
    records, rejects = _read_prompts(args, turns=cfg.data.turns)
    path = _model_dir(args, cfg)
    overrides = {
        k: v
        for k, v in (
            ("max_new_tokens", args.max_new_tokens),
            ("temperature", args.temperature),
            ("top_p", args.top_p),
        )
        if v is not None
    }
    params = SamplingParams.of(
        cfg.generation, n=args.n, seed=cfg.seed if args.seed is None else args.seed, **overrides
    )
    from cai_ray.data.conversation import PromptFormat

    fmt = PromptFormat(args.format or cfg.format, cfg.models.helpful.chat_template_kwargs)
    fmt = fmt.load(path)
    texts = [fmt.render(r["conversation"]) for r in records]
    engine = _engine(cfg, path)
    try:
        # Too-long prompts are set aside with their count, not allowed to fail the whole batch.
        budget = engine.max_context - params.max_new_tokens
        counts = engine.count_tokens(texts)
        keep = [i for i, c in enumerate(counts) if c <= budget]
        for i in sorted(set(range(len(texts))) - set(keep)):
            rejects.append(f"{records[i]['prompt_id']}: prompt has {counts[i]} tokens (> {budget})")
        outputs = engine.generate([texts[i] for i in keep], params) if keep else []
        rows = [
            {
                "prompt_id": records[i]["prompt_id"],
                "prompt": records[i]["prompt"],
                "sample": k,
                "response": g.text,
                "finish_reason": g.finish_reason,
                "tokens": len(g.token_ids),
                "prompt_tokens": g.prompt_tokens,
                "model_id": engine.model_id,
            }
            for i, gens in zip(keep, outputs, strict=True)
            for k, g in enumerate(gens)
        ]
    finally:
        engine.close()
    _emit(rows, args.output, _generation_table)
    _report_rejects(rejects, what="prompts")
    return 0


def _read_prompts(
    args: argparse.Namespace, *, turns: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Prompts as {prompt_id, prompt, conversation}, plus reasons for set-aside rows."""
    from cai_ray.data.conversation import Conversation

    if args.prompt:
        records = []
        for text in args.prompt[: args.limit]:
            conv = Conversation.from_messages([{"role": "user", "content": text}])
            records.append({"prompt_id": conv.prompt_id, "prompt": text, "conversation": conv})
        return records, []
    from cai_ray.data.sources import read_prompts

    result = read_prompts(args.prompts, turns=turns, limit=args.limit)
    records = [
        {
            "prompt_id": r.prompt_id,
            "prompt": r.conversation.last_user_message,
            "conversation": r.conversation,
        }
        for r in result.records
    ]
    return records, [f"{r.where}: {r.reason}" for r in result.rejects]


def _generation_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'prompt_id':<18} {'prompt':<{_EXCERPT}} {'response':<{_EXCERPT}} {'tokens':>6} finish"
    ]
    for r in rows:
        lines.append(
            f"{r['prompt_id'][:18]:<18} {_excerpt(r['prompt']):<{_EXCERPT}} "
            f"{_excerpt(r['response']):<{_EXCERPT}} {r['tokens']:>6} {r['finish_reason']}"
        )
    return lines


# -- score ----------------------------------------------------------------------------------


def _score(args: argparse.Namespace) -> int:
    from cai_ray.engines.base import ScoreRequest

    if args.prefix is not None and not args.option:
        raise DataError(
            "--prefix needs at least one --option",
            where="--option",
            hint='e.g. --option " (A)" --option " (B)"',
        )
    if args.file and args.option:
        raise DataError(
            "--option goes with --prefix, not --file",
            where="--option",
            hint="put the options in the file's rows",
        )
    if args.file:
        items, rejects = _read_score_file(Path(args.file))
    else:
        items, rejects = [(1, ScoreRequest(args.prefix, tuple(args.option)))], []
    cfg = _config(args)
    engine = _engine(cfg, _model_dir(args, cfg))
    try:
        scores = engine.score_options([req for _, req in items])
        rows = [
            {
                "row": row,
                "prefix": req.prefix,
                "options": list(req.options),
                "logprobs": sc.logprobs,
                "probs": _softmax(sc.logprobs),
                "option_tokens": [len(t) for t in sc.option_token_ids],
                "model_id": engine.model_id,
            }
            for (row, req), sc in zip(items, scores, strict=True)
        ]
    finally:
        engine.close()
    _emit(rows, args.output, _score_table)
    _report_rejects(rejects, what="rows")
    return 0


def _read_score_file(path: Path) -> tuple[list[tuple[int, Any]], list[str]]:
    """Valid (line number, ScoreRequest) pairs and `line N: reason` for each bad row."""
    from cai_ray.engines.base import ScoreRequest

    if not path.is_file():
        raise DataError(
            "score file not found",
            where=str(path),
            hint='pass a JSONL file of {"prefix", "options"} rows',
        )
    items, rejects = [], []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            reason, row = _parse_score_row(line)
            if reason:
                rejects.append(f"{path}:{number}: {reason}")
            else:
                items.append((number, ScoreRequest(row["prefix"], tuple(row["options"]))))
    if not items:
        shown = "; ".join(rejects[:3]) or "the file is empty"
        raise DataError(
            f"no valid rows ({len(rejects)} rejected: {shown})",
            where=str(path),
            hint='rows look like {"prefix": "...", "options": [" (A)", " (B)"]}',
        )
    return items, rejects


def _parse_score_row(line: str) -> tuple[str | None, dict[str, Any]]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg})", {}
    except (ValueError, RecursionError) as exc:  # a 5000-digit number; `[[[[...` nesting
        return f"not JSON ({'nested too deeply' if isinstance(exc, RecursionError) else exc})", {}
    if not isinstance(row, dict):
        return f"not a JSON object (got {type(row).__name__})", {}
    if not isinstance(row.get("prefix"), str):
        return "missing or non-text 'prefix'", {}
    options = row.get("options")
    if not isinstance(options, list) or not options:
        return "'options' must be a non-empty list", {}
    if not all(isinstance(o, str) and o for o in options):
        return "every option must be non-empty text", {}
    return None, row


def _softmax(logprobs: list[float]) -> list[float]:
    """Normalised option probabilities, e.g. p_A = e^lA / (e^lA + e^lB) (paper section 4.1)."""
    top = max(logprobs)
    exps = [math.exp(lp - top) for lp in logprobs]
    total = sum(exps)
    return [e / total for e in exps]


def _score_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        lines.append(f"row {r['row']}: prefix {_excerpt(r['prefix'], 60)!s}")
        lines.append(f"  {'option':<{_EXCERPT}} {'logprob':>10} {'prob':>7} {'tokens':>6}")
        for opt, lp, pr, nt in zip(
            r["options"], r["logprobs"], r["probs"], r["option_tokens"], strict=True
        ):
            lines.append(f"  {_excerpt(opt):<{_EXCERPT}} {lp:>10.4f} {pr:>7.4f} {nt:>6}")
    return lines


# -- shared output --------------------------------------------------------------------------


def _excerpt(text: str, width: int = _EXCERPT) -> str:
    flat = json.dumps(text, ensure_ascii=False)[1:-1]  # newlines visible as \n, one line
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _emit(rows: list[dict[str, Any]], output: str | None, table) -> None:
    if output is None:
        print("\n".join(table(rows)))
        return
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {out}")


def _report_rejects(rejects: list[str], *, what: str) -> None:
    if not rejects:
        return
    print(f"set aside {len(rejects)} {what}:", file=sys.stderr)
    for reason in rejects[:10]:
        print(f"  {reason}", file=sys.stderr)
    if len(rejects) > 10:
        print(f"  ... and {len(rejects) - 10} more", file=sys.stderr)
