"""HFEngine.generate vs plain `model.generate()` on the same batch (tokens per second).

The engine runs its own KV-cached loop (policy logprobs, stop strings, n samples from one
prefill, finished rows dropped); it must not be slower than transformers' own generate. Same
model, same left-padded batch, same number of new tokens; greedy decoding is also checked to
produce identical tokens. Writes benchmarks/results/generate.json.

    .venv/bin/python benchmarks/bench_generate.py [--preset tiny-20m] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import QUESTIONS, best_of, engine_run_info, write_results

from cai_ray.config import ModelConfig
from cai_ray.engines.base import SamplingParams
from cai_ray.engines.hf import HFEngine
from cai_ray.models import default_cache_dir, ensure_model

RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"


def hf_generate(engine: HFEngine, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    """transformers' generate on the same left-padded batch; returns the new tokens per row."""
    tok = engine.tokenizer
    batch = tok(prompts, return_tensors="pt", padding=True).to(engine.device)
    sampling = {"do_sample": False}
    if params.temperature > 0:
        sampling = {
            "do_sample": True,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": 0,
        }
    with torch.inference_mode():
        out = engine.model.generate(
            **batch,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            pad_token_id=tok.pad_token_id,
            **sampling,
        )
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    stop = engine._stop_ids
    rows = []
    for seq in new:  # cut after the first EOS, as the engine does
        end = next((i + 1 for i, t in enumerate(seq) if t in stop), len(seq))
        rows.append(seq[:end])
    return rows


def ours(engine: HFEngine, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    return [g.token_ids for gens in engine.generate(prompts, params) for g in gens]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-20m")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    path = ensure_model(ModelConfig(preset=args.preset), run_dir=default_cache_dir())
    prompts = [f"\n\nHuman: {q}\n\nAssistant:" for q in QUESTIONS]
    scenarios = [
        ("greedy, 8 prompts", SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)),
        (
            "sampled T=1, 8 prompts",
            SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0),
        ),
        (
            "sampled T=1, 2 prompts x n=4",
            SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, n=4, seed=0),
        ),
    ]
    rows = []
    for name, params in scenarios:
        batch = prompts if params.n == 1 else prompts[:2]
        engine = HFEngine(path, threads=args.threads, batch_size=len(batch) * params.n)
        timing = best_of(
            {
                "engine": lambda e=engine, b=batch, p=params: ours(e, b, p),
                "generate": lambda e=engine, b=batch, p=params: hf_generate(e, b, p),
            },
            args.repeats,
        )
        (t_ours, ours_tokens), (t_hf, hf_tokens) = timing.values()
        n_ours, n_hf = sum(map(len, ours_tokens)), sum(map(len, hf_tokens))
        rows.append(
            {
                "scenario": name,
                "sequences": len(batch) * params.n,
                "engine_tokens": n_ours,
                "hf_tokens": n_hf,
                "engine_tok_s": n_ours / t_ours,
                "hf_generate_tok_s": n_hf / t_hf,
                "ratio": (n_ours / t_ours) / (n_hf / t_hf),
                "same_tokens": ours_tokens == hf_tokens if params.temperature == 0 else None,
            }
        )
        engine.close()
    report = {
        "benchmark": "generate",
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        **engine_run_info(engine, threads=args.threads),
        "results": rows,
        "figures": [
            {
                "name": f"HF engine vs model.generate(): {r['scenario']}",
                "value": round(r["ratio"], 3),
                "unit": "ratio",
                "target": ">= 1",
            }
            for r in rows
        ],
    }
    write_results(RESULTS, report)
    print(f"{report['model']}, {args.max_new_tokens} new tokens, tokens/s (best of {args.repeats})")
    print(f"{'scenario':<30} {'engine':>9} {'generate()':>11} {'ratio':>6} same")
    for r in rows:
        print(
            f"{r['scenario']:<30} {r['engine_tok_s']:>9.1f} {r['hf_generate_tok_s']:>11.1f} "
            f"{r['ratio']:>6.2f} {r['same_tokens']}"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
