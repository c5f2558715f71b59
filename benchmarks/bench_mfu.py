"""Model FLOPs utilisation of generation and scoring with the HF engine (the ~20M preset).

Generation: 8 prompts x `--new` tokens, greedy; FLOPs = prompt tokens x forward FLOPs (the
prefill) + each new token's forward FLOPs at its context length. Scoring: `score_options`
with 4 requests of a ~600-token shared prefix and 2 options. MFU = FLOP/s / the fp32 matmul
peak measured in the same run with the same threads. Training MFU is in
bench_train_reference.py. Writes benchmarks/results/mfu.json.

    .venv/bin/python benchmarks/bench_mfu.py [--preset tiny-20m] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from flops import forward_flops_per_token, matmul_peak
from timing import best_of, engine_run_info

from cai_ray.config import ModelConfig
from cai_ray.engines.base import SamplingParams, ScoreRequest
from cai_ray.engines.hf import HFEngine
from cai_ray.models import default_cache_dir, ensure_model

RESULTS = Path(__file__).resolve().parent / "results" / "mfu.json"
PROMPT = "\n\nHuman: How do I bake bread at home, step by step?\n\nAssistant:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-20m")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir = ensure_model(ModelConfig(preset=args.preset), run_dir=default_cache_dir())
    engine = HFEngine(model_dir, threads=args.threads, batch_size=8)
    peak = matmul_peak(args.threads)
    prompts = [PROMPT + " " * i for i in range(8)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new, stop=())
    prefix = PROMPT * 20  # a few-shot-length prefix
    requests = [ScoreRequest(prefix + f" {i}", (" (A)", " (B)")) for i in range(4)]
    timed = best_of(
        {
            "generate": lambda: engine.generate(prompts, greedy),
            "score": lambda: engine.score_options(requests),
        },
        args.repeats,
    )
    gen_s, gens = timed["generate"]
    flops = 0.0
    for gen in (g[0] for g in gens):
        p = gen.prompt_tokens
        flops += p * forward_flops_per_token(model_dir, p // 2)  # prefill: mean context p / 2
        flops += sum(forward_flops_per_token(model_dir, p + t) for t in range(len(gen.token_ids)))
    new_tokens = sum(len(g[0].token_ids) for g in gens)
    score_s, scored = timed["score"]
    score_tokens = sum(s.prefix_tokens + sum(len(o) for o in s.option_token_ids) for s in scored)
    score_flops = sum(
        s.prefix_tokens * forward_flops_per_token(model_dir, s.prefix_tokens // 2) for s in scored
    )
    report = {
        **engine_run_info(engine, threads=args.threads),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "matmul_peak_flops": peak,
        "generate": {
            "new_tokens": new_tokens,
            "seconds": round(gen_s, 4),
            "tokens_per_s": round(new_tokens / gen_s, 1),
            "mfu": round(flops / gen_s / peak, 4),
        },
        "score_options": {
            "tokens": score_tokens,
            "seconds": round(score_s, 4),
            "tokens_per_s": round(score_tokens / score_s, 1),
            "mfu": round(score_flops / score_s / peak, 4),
        },
    }
    report["figures"] = [
        {"name": "generation MFU (HF engine, fp32)", "value": report["generate"]["mfu"],
         "unit": "ratio"},
        {"name": "scoring MFU (score_options, fp32)", "value": report["score_options"]["mfu"],
         "unit": "ratio"},
    ]  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
