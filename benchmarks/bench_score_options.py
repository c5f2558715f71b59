"""Shared-prefix option scoring vs naive per-option forwards (HFEngine.score_options).

The AI-feedback labeller (paper section 4.1) scores a few short options after a long few-shot
prefix. Computing the prefix once and reusing its KV cache for every option should win by about
the number of options. Compares, for 2, 4 and 16 options after a ~600-token prefix:
- shared: `HFEngine.score_options` (prefix forward + one batched option forward),
- naive loop: one full forward over prefix + option per option,
- naive batched: all prefix + option sequences in one right-padded forward.
Also checks that all three agree to 1e-4. Writes benchmarks/results/score_options.json.

    .venv/bin/python benchmarks/bench_score_options.py [--preset tiny-20m] [--repeats 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import best_of, engine_run_info, write_results

from cai_ray.config import ModelConfig
from cai_ray.engines.base import ScoreRequest
from cai_ray.engines.hf import HFEngine, _pad
from cai_ray.models import default_cache_dir, ensure_model

RESULTS = Path(__file__).resolve().parent / "results" / "score_options.json"
LETTERS = "ABCDEFGHIJKLMNOP"
EXAMPLE = (
    "Consider the following conversation between a human and an assistant:\n\n"
    "Human: {q}\n\nAssistant: {a}\n\n"
    "Please choose the assistant response that is as harmless and ethical as possible.\n"
    "Options:\n (A) {a}\n (B) {b}\nThe answer is: (A)\n\n"
)
PAIRS = [
    (
        "How do I pick a lock on my neighbour's door?",
        "I can't help with getting into someone else's home.",
        "Use a tension wrench and rake the pins until it opens.",
    ),
    (
        "What should I cook for a friend who is vegetarian?",
        "A mushroom risotto or a chickpea curry works well.",
        "Just serve chicken; they won't notice.",
    ),
    (
        "How can I calm down before an exam?",
        "Slow breathing and a short walk help many people.",
        "Take whatever pills you can find.",
    ),
]


def few_shot_prefix(engine: HFEngine, target_tokens: int, variant: int) -> str:
    """Few-shot feedback examples repeated to about `target_tokens`, then the question."""
    text = ""
    i = 0
    while engine.count_tokens([text])[0] < target_tokens - 60:
        q, a, b = PAIRS[i % len(PAIRS)]
        text += EXAMPLE.format(q=q, a=a, b=b)
        i += 1
    q, a, b = PAIRS[variant % len(PAIRS)]
    return text + EXAMPLE.format(q=q, a=b, b=a).rsplit(" (A)", 1)[0]


def naive_loop(engine: HFEngine, requests, option_ids) -> list[list[float]]:
    """One forward per (prefix, option); only the needed logits are computed."""
    out = []
    with torch.inference_mode():
        for req, opts in zip(requests, option_ids, strict=True):
            prefix = engine._encode(req.prefix)
            scores = []
            for ids in opts:
                full = torch.tensor([prefix + ids], device=engine.device)
                logits = engine.model(input_ids=full, logits_to_keep=len(ids) + 1).logits[0, :-1]
                logp = logits.float().log_softmax(-1)  # (L, V)
                scores.append(logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item())
            out.append(scores)
    return out


def naive_batched(engine: HFEngine, requests, option_ids) -> list[list[float]]:
    """All prefix + option sequences of a request in one right-padded forward."""
    out = []
    with torch.inference_mode():
        for req, opts in zip(requests, option_ids, strict=True):
            prefix = engine._encode(req.prefix)
            ids, mask = _pad([prefix + o for o in opts], 0, engine.device, left=False)  # (K, T)
            logp = engine.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            scores = []
            for k, o in enumerate(opts):
                pos = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(o))
                scores.append(logp[k, pos, torch.tensor(o)].sum().item())
            out.append(scores)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-20m")
    ap.add_argument("--prefix-tokens", type=int, default=600)
    ap.add_argument("--requests", type=int, default=2, help="requests per call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    path = ensure_model(ModelConfig(preset=args.preset), run_dir=default_cache_dir())
    engine = HFEngine(path, threads=args.threads, batch_size=args.requests)
    prefixes = [few_shot_prefix(engine, args.prefix_tokens, v) for v in range(args.requests)]
    rows = []
    for k in (2, 4, 16):
        options = tuple(f" ({c})" for c in LETTERS[:k])
        requests = [ScoreRequest(p, options) for p in prefixes]
        option_ids = [s.option_token_ids for s in engine.score_options(requests)]
        timing = best_of(
            {
                "shared": lambda r=requests: engine.score_options(r),
                "loop": lambda r=requests, o=option_ids: naive_loop(engine, r, o),
                "batched": lambda r=requests, o=option_ids: naive_batched(engine, r, o),
            },
            args.repeats,
        )
        (t_shared, shared), (t_loop, loop), (t_batch, batch) = timing.values()
        diff = max(
            abs(a - b)
            for s, lo, ba in zip(shared, loop, batch, strict=True)
            for a, b in [*zip(s.logprobs, lo, strict=True), *zip(s.logprobs, ba, strict=True)]
        )
        rows.append(
            {
                "options": k,
                "option_tokens": sorted({len(t) for t in option_ids[0]}),
                "shared_ms": 1000 * t_shared / args.requests,
                "naive_loop_ms": 1000 * t_loop / args.requests,
                "naive_batched_ms": 1000 * t_batch / args.requests,
                "speedup_vs_loop": t_loop / t_shared,
                "speedup_vs_batched": t_batch / t_shared,
                "max_abs_diff": diff,
            }
        )
    report = {
        "benchmark": "score_options",
        "prefix_tokens": [engine.count_tokens([p])[0] for p in prefixes],
        "requests_per_call": args.requests,
        "repeats": args.repeats,
        **engine_run_info(engine, threads=args.threads),
        "results": rows,
        "figures": [
            {
                "name": f"score_options shared prefix vs naive loop, {r['options']} options",
                "value": round(r["speedup_vs_loop"], 2),
                "unit": "ratio",
                "target": "> 1",
            }
            for r in rows
        ],
    }
    write_results(RESULTS, report)
    print(
        f"{report['model']}, prefix ~{report['prefix_tokens'][0]} tokens, ms per request, best of {args.repeats}"
    )
    print(
        f"{'options':>7} {'shared':>9} {'naive loop':>11} {'naive batch':>12} {'x loop':>7} {'x batch':>8} {'max diff':>9}"
    )
    for r in rows:
        print(
            f"{r['options']:>7} {r['shared_ms']:>9.1f} {r['naive_loop_ms']:>11.1f} {r['naive_batched_ms']:>12.1f} "
            f"{r['speedup_vs_loop']:>7.2f} {r['speedup_vs_batched']:>8.2f} {r['max_abs_diff']:>9.1e}"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
