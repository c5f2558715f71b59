"""Model FLOPs utilisation of generation and scoring with the HF engine (the ~20M preset).

Generation: 8 prompts x `--new` tokens, greedy; FLOPs = prompt tokens x forward FLOPs (the
prefill) + each new token's forward FLOPs at its context length. Scoring: `score_options`
with 4 requests of a ~600-token shared prefix and 2 options. MFU = FLOP/s / the fp32 matmul
peak measured in the same run with the same threads (on the engine's device: a CUDA GPU when
there is one). Then both again in bf16 (on this 2-core CPU the bf16 matmul peak is about 4x
fp32): speed ratio, MFU against the bf16 peak, and how far bf16 results are from fp32's. Training MFU is in bench_train_reference.py. Writes
benchmarks/results/mfu.json.

    .venv/bin/python benchmarks/bench_mfu.py [--preset tiny-20m] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from flops import forward_flops_per_token, matmul_peak
from timing import best_of, engine_run_info, write_results

from cai_ray.config import ModelConfig
from cai_ray.engines.base import SamplingParams, ScoreRequest
from cai_ray.engines.hf import HFEngine
from cai_ray.models import default_cache_dir, ensure_model

RESULTS = Path(__file__).resolve().parent / "results" / "mfu.json"
PROMPT = "\n\nHuman: How do I bake bread at home, step by step?\n\nAssistant:"


def measure(model_dir: Path, dtype: str, threads: int, new: int, repeats: int) -> dict:
    """tokens/s and MFU of generate and score_options in one dtype, against that dtype's peak."""
    import torch

    engine = HFEngine(model_dir, threads=threads, batch_size=8, dtype=dtype)
    peak = matmul_peak(
        threads,
        dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32,
        device=str(engine.device),
    )
    prompts = [PROMPT + " " * i for i in range(8)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=new, stop=())
    prefix = PROMPT * 20  # a few-shot-length prefix
    requests = [ScoreRequest(prefix + f" {i}", (" (A)", " (B)")) for i in range(4)]
    timed = best_of(
        {
            "generate": lambda: engine.generate(prompts, greedy),
            "score": lambda: engine.score_options(requests),
        },
        repeats,
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
    return {
        **engine_run_info(engine, threads=threads),
        "matmul_peak_flops": peak,
        "generate": {
            "new_tokens": new_tokens,
            "seconds": round(gen_s, 4),
            "tokens_per_s": round(new_tokens / gen_s, 1),
            "mfu": round(flops / gen_s / peak, 4),
            "token_ids": [g[0].token_ids for g in gens],
        },
        "score_options": {
            "tokens": score_tokens,
            "seconds": round(score_s, 4),
            "tokens_per_s": round(score_tokens / score_s, 1),
            "mfu": round(score_flops / score_s / peak, 4),
            "logprobs": [list(s.logprobs) for s in scored],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-20m")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir = ensure_model(ModelConfig(preset=args.preset), run_dir=default_cache_dir())
    fp32 = measure(model_dir, "float32", args.threads, args.new, args.repeats)
    bf16 = measure(model_dir, "bfloat16", args.threads, args.new, args.repeats)
    same = sum(
        a == b
        for a, b in zip(fp32["generate"]["token_ids"], bf16["generate"]["token_ids"], strict=True)
    )
    diff = max(
        abs(a - b)
        for ra, rb in zip(
            fp32["score_options"]["logprobs"], bf16["score_options"]["logprobs"], strict=True
        )
        for a, b in zip(ra, rb, strict=True)
    )
    for r in (fp32, bf16):
        r["generate"].pop("token_ids")
        r["score_options"].pop("logprobs")
    report = {
        **fp32,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "bf16": {**bf16, "greedy_sequences_equal_to_fp32": f"{same} of 8",
                 "max_option_logprob_diff_vs_fp32": round(diff, 4)},
    }  # fmt: skip
    speed = {
        k: round(bf16[k]["tokens_per_s"] / fp32[k]["tokens_per_s"], 3)
        for k in ("generate", "score_options")
    }
    report["bf16_vs_fp32_tokens_per_s"] = speed
    report["figures"] = [
        {"name": "generation MFU (HF engine, fp32)", "value": fp32["generate"]["mfu"],
         "unit": "ratio"},
        {"name": "scoring MFU (score_options, fp32)", "value": fp32["score_options"]["mfu"],
         "unit": "ratio"},
        {"name": "CPU bf16 vs fp32 tokens/s: generate", "value": speed["generate"],
         "unit": "ratio"},
        {"name": "CPU bf16 vs fp32 tokens/s: score_options", "value": speed["score_options"],
         "unit": "ratio"},
    ]  # fmt: skip
    write_results(RESULTS, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
