"""Stage-1 throughput: rows/s and generated tokens/s of sl-generate against the pool size.

Runs the real stage (Ray Data -> rollout pool -> critique pool -> shards) on the sample prompts
with a tiny model, once per pool size, each in a fresh run dir on one local Ray cluster. Tokens
are the generated ones (initial answer + every critique and revision), counted with the model's
tokenizer. Writes benchmarks/results/sl_generate.json.

    .venv/bin/python benchmarks/bench_sl_generate.py [--preset tiny-1m] [--prompts 32] [--pools 1 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-1m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--pools", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/sl_generate.json"))
    args = ap.parse_args()

    import ray

    from cai_ray.config import load_config
    from cai_ray.data.shards import ShardStore
    from cai_ray.models import load_tokenizer
    from cai_ray.pipeline import sl_generate

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.pools:
            run_dir = Path(tmp) / f"pool{size}"
            cfg = load_config(
                ROOT / "configs/local-tiny.yaml",
                [
                    f"run_dir={run_dir}",
                    f"models.helpful={{preset: {args.preset}}}",
                    f"data.limit={args.prompts}",
                    f"sl_generate.rounds={args.rounds}",
                    f"generation.max_new_tokens={args.max_new_tokens}",
                    f"sl_generate.rollout.size={size}",
                    f"sl_generate.critique.size={size}",
                    "sl_generate.rollout.num_cpus=0.5",
                    "sl_generate.critique.num_cpus=0.5",
                    "sl_generate.helpful_samples=0",
                    "engine.threads=1",
                ],
            )
            t0 = time.perf_counter()
            sl_generate.run(cfg, progress=False)
            wall = time.perf_counter() - t0
            df = ShardStore(run_dir / "sl-generate/red_team").read_table().to_pandas()
            tok = load_tokenizer(next((run_dir / "models").iterdir()))
            texts = [a for a in df.initial_answer] + [
                r[k] for rounds in df.rounds for r in rounds for k in ("critique", "revision")
            ]
            tokens = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
            results.append(
                {
                    "pool_size": size,
                    "rows": len(df),
                    "wall_s": round(wall, 2),
                    "rows_per_s": round(len(df) / wall, 3),
                    "generated_tokens": tokens,
                    "tokens_per_s": round(tokens / wall, 1),
                }
            )
            print(results[-1], flush=True)
    base = results[0]["rows_per_s"]
    for r in results:
        r["speedup_vs_first"] = round(r["rows_per_s"] / base, 3)
    out = {
        "benchmark": "sl_generate",
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "preset": args.preset,
        "rounds": args.rounds,
        "max_new_tokens": args.max_new_tokens,
        "results": results,
        "note": "wall time includes actor start-up and model load (a fixed cost per pool)",
        "figures": [
            {
                "name": f"sl-generate rows/s, pool {r['pool_size']} vs pool 1",
                "value": r["speedup_vs_first"],
                "unit": "ratio",
            }
            for r in results
        ],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'pool':>4} {'rows':>5} {'wall s':>7} {'rows/s':>7} {'tok/s':>7} {'x':>6}")
    for r in results:
        print(
            f"{r['pool_size']:>4} {r['rows']:>5} {r['wall_s']:>7} {r['rows_per_s']:>7} "
            f"{r['tokens_per_s']:>7} {r['speedup_vs_first']:>6}"
        )


if __name__ == "__main__":
    main()
