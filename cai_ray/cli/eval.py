"""`cai-ray eval hhh|harmful-vs-ethical|harm-classification`: the paper's multiple-choice evals.

A preference model (`--as pm`) is right when it scores the correct transcript higher (HHH file
only); a feedback model (`--as feedback`) answers the multiple-choice prompt, zero-shot or with
chain-of-thought (`--cot`), in both orders averaged (`--order both`, the default for two-option
files: position bias would otherwise decide, issue 14) or the file's order only (`--order file`).
Prints a table by order and by the correct option's position; `-o` writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cai_ray.errors import CaiRayError

# The paper's files, where this checkout sits beside a `shared/data` folder; else pass --file.
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared/data/anthropic-cai/evals"


def register(sub: argparse._SubParsersAction) -> None:
    from cai_ray.eval.multiple_choice import EVAL_FILES

    parser = sub.add_parser("eval", help="score a PM or a feedback model on the paper's evals")
    parser.add_argument("name", choices=list(EVAL_FILES), help="which evaluation")
    parser.add_argument("--model", required=True, help="an HF model directory")
    parser.add_argument("--as", dest="kind", choices=("pm", "feedback"), default="feedback")
    parser.add_argument("--file", help=f"the JSONL file (default: {DEFAULT_DATA}/<the file>)")
    parser.add_argument("--cot", action="store_true", help="chain of thought (feedback model)")
    parser.add_argument(
        "--order",
        choices=("both", "file"),
        help="feedback model: ask each question in both orders and average (default where every "
        "question has two options), or in the file's order only (default otherwise)",
    )
    parser.add_argument(
        "--few-shot",
        type=int,
        default=0,
        help="feedback model: prepend N of the constitution's answered feedback examples (CoT "
        "examples with --cot), as stage 4 does (default 0: zero-shot)",
    )
    parser.add_argument(
        "--constitution",
        default="constitutions/default.yaml",
        help="where the few-shot examples come from",
    )
    parser.add_argument("--limit", type=int, help="only the first N rows")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="rationale length (CoT)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="engine dtype"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("-o", "--output", help="write the report as JSON here")
    parser.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from cai_ray.eval.multiple_choice import (
        EVAL_FILES,
        eval_with_feedback_model,
        eval_with_pm,
        read_eval_file,
    )

    if args.limit is not None and args.limit < 1:
        raise CaiRayError("--limit must be at least 1", where="--limit")
    if args.cot and args.kind == "pm":
        raise CaiRayError("--cot needs --as feedback", hint="a PM has no chain of thought")
    if args.order and args.kind == "pm":
        raise CaiRayError("--order needs --as feedback", hint="a PM reads no options")
    if args.few_shot < 0 or (args.few_shot and args.kind == "pm"):
        raise CaiRayError("--few-shot needs --as feedback and N >= 0", where="--few-shot")
    if args.batch_size < 1:
        raise CaiRayError("--batch-size must be at least 1", where="--batch-size")
    path = Path(args.file) if args.file else DEFAULT_DATA / EVAL_FILES[args.name]
    items, rejects = read_eval_file(path)
    items = items[: args.limit] if args.limit else items
    if args.kind == "pm":
        from cai_ray.feedback.reward import RewardScorer

        scorer = RewardScorer(args.model, device=args.device, threads=args.threads)
        report = eval_with_pm(args.name, items, scorer.score, rejects=rejects)
    else:
        from cai_ray.config import EngineConfig
        from cai_ray.engines import make_engine
        from cai_ray.engines.base import SamplingParams

        engine = make_engine(
            args.model,
            EngineConfig(
                device=args.device,
                threads=args.threads,
                dtype=args.dtype,
                batch_size=args.batch_size,
            ),
        )
        sampling = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
        order = args.order or ("both" if all(len(it.options) == 2 for it in items) else "file")
        report = eval_with_feedback_model(
            args.name,
            items,
            engine,
            cot=args.cot,
            order=order,
            sampling=sampling,
            rejects=rejects,
            shots=_shots(args),
        )
    print(report.table())
    if args.output:
        out = {**report.to_dict(), "file": str(path), "model": args.model}
        if args.kind == "feedback":
            out["few_shot"] = args.few_shot
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


def _shots(args: argparse.Namespace) -> list:
    """The few-shot examples and their questions, drawn as stage 4 draws them."""
    if not args.few_shot:
        return []
    from cai_ray.config import RLLabelConfig, resolve_path
    from cai_ray.constitution import load_constitution
    from cai_ray.feedback.labeling import few_shots

    constitution = load_constitution(resolve_path(args.constitution))
    settings = RLLabelConfig(few_shot=args.few_shot, cot=args.cot)
    shots = few_shots(constitution, key="eval", settings=settings)
    if len(shots) < args.few_shot:
        kind = "chain-of-thought" if args.cot else "feedback"
        raise CaiRayError(
            f"the constitution has {len(shots)} {kind} examples, --few-shot asks {args.few_shot}",
            where=str(args.constitution),
            hint="lower --few-shot or add examples to the constitution",
        )
    return shots
