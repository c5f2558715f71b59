"""The RL loop (stage 6): step time split and samples/s, and weight-sync time against model size.

Part 1 runs `rl_train` (PPO, a rule reward so no PM is needed) for 1 and 2 rollout workers and
1 and 2 policy learner ranks (Ray actors, gloo, ZeRO 0) and reports the mean time per step spent
generating, scoring (reward + reference + old log-probs + values), training and syncing weights,
over the steps after the first (start-up). Part 2 times one weight sync through the object
store (rank 0's full state dict -> every rollout worker's `load_weights`) for several presets.
Writes benchmarks/results/rl_train.json.

    .venv/bin/python benchmarks/bench_rl_train.py [--preset tiny-1m] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import ray
from timing import write_results

from cai_ray.config import ModelConfig, load_config
from cai_ray.models import default_cache_dir, ensure_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "rl_train.json"
SPLIT = ("time_generate_s", "time_score_s", "time_train_s", "time_sync_s", "step_time_s")


def loop_case(
    model: Path, *, rollouts: int, ranks: int, steps: int, tokens: int, extra: tuple[str, ...] = ()
) -> dict:
    """One rl_train run; `extra` are further --set overrides (bench_vllm_rollout.py's engine)."""
    from cai_ray.pipeline import rl_train

    run_dir = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    try:
        cfg = load_config(
            ROOT / "configs/local-tiny.yaml",
            [
                f"run_dir={run_dir}",
                f"models.helpful={{path: {model}}}",
                f"generation.max_new_tokens={tokens}",
                "rl_train.reward.kind=function",
                "rl_train.reward.function=cai_ray.feedback.rule_rewards:length_target",
                f"rl_train.steps={steps}",
                "rl_train.prompts_per_step=8",
                f"rl_train.checkpoint_every={steps}",
                "rl_train.snapshots=false",
                f"rl_train.rollout={{size: {rollouts}, num_cpus: 0.5}}",
                "rl_train.reward_workers.num_cpus=0.25",
                "rl_train.reference.num_cpus=0.25",
                f"rl_train.policy={{num_ranks: {ranks}, micro_batch_size: {8 // ranks}, "
                "cpus_per_rank: 0.5}",
                "rl_train.value={micro_batch_size: 8}",
                *extra,
            ],
        )
        t0 = time.perf_counter()
        rl_train.run(cfg, progress=False)
        wall = time.perf_counter() - t0
        rows = [
            json.loads(x) for x in (run_dir / "rl-train" / "metrics.jsonl").read_text().splitlines()
        ]
        timed = rows[1:]  # the first step pays the stream's and the actors' start-up
        mean = {k: sum(r[k] for r in timed) / len(timed) for k in SPLIT}
        samples = sum(r["samples"] for r in timed)
        generated = sum(r["response_len"] * r["samples"] for r in timed)
        return {
            "rollout_workers": rollouts,
            "learner_ranks": ranks,
            **{k: round(v, 4) for k, v in mean.items()},
            "samples_per_s": round(samples / sum(r["step_time_s"] for r in timed), 2),
            "rollout_tokens_per_s": round(generated / sum(r["time_generate_s"] for r in timed), 1),
            "wall_s": round(wall, 1),
        }
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def sync_case(model: Path, *, rollouts: int, repeats: int = 3) -> dict:
    """Best-of time of one weight sync: gather on rank 0, then load into every rollout worker."""
    from actors.learner.rl import RLLearnerGroup
    from actors.rl_workers import RLRolloutWorker
    from actors.role_pool import RolePool
    from cai_ray.config import EngineConfig
    from cai_ray.config.learner import LearnerConfig
    from cai_ray.rl.objectives import PolicyObjective

    out = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    group = RLLearnerGroup(
        LearnerConfig(num_ranks=1, cpus_per_rank=1, tensorboard=False),
        PolicyObjective(),
        model,
        out,
    )
    pool = None
    try:
        group.start(1)
        pool = RolePool(
            "rollout",
            RLRolloutWorker,
            str(model),
            EngineConfig(kind="hf", threads=1),
            fmt="transcript",
            model_id="bench",
            size=rollouts,
            num_cpus=0.5,
            num_gpus=0,
            max_restarts=0,
            timeout_s=600,
        )
        best = {"gather_s": float("inf"), "load_s": float("inf")}
        for version in range(1, repeats + 1):
            t0 = time.perf_counter()
            weights = group.weights()
            t1 = time.perf_counter()
            pool.broadcast(lambda h, _, w=weights, v=version: h.load_weights.remote(w, version=v))
            t2 = time.perf_counter()
            best["gather_s"] = min(best["gather_s"], t1 - t0)
            best["load_s"] = min(best["load_s"], t2 - t1)
        params = json.loads((model / "config.json").read_text())
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        total = best["gather_s"] + best["load_s"]
        return {
            "model": model.name,
            "hidden_size": params["hidden_size"],
            "weights_mb": round(size / 2**20, 1),
            "rollout_workers": rollouts,
            "gather_s": round(best["gather_s"], 3),
            "load_s": round(best["load_s"], 3),
            "total_s": round(total, 3),
            "mb_per_s": round(size / 2**20 * rollouts / total, 1),
        }
    finally:
        if pool is not None:
            pool.shutdown()
        group.shutdown()
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-1m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--sync-presets", default="tiny-1m,tiny-20m,tiny-100m")
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cache = default_cache_dir()
    model = ensure_model(ModelConfig(preset=args.preset), run_dir=cache)
    loop = [
        loop_case(model, rollouts=r, ranks=k, steps=args.steps, tokens=args.tokens)
        for r, k in ((1, 1), (2, 1), (1, 2), (2, 2))
    ]
    base = loop[0]["samples_per_s"]
    for row in loop:
        row["vs_1x1"] = round(row["samples_per_s"] / base, 2)
    sync = []
    for preset in args.sync_presets.split(","):
        path = ensure_model(ModelConfig(preset=preset), run_dir=cache)
        sync += [sync_case(path, rollouts=r) for r in (1, 2)]
    result = {
        "preset": args.preset,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "load_average_1m": os.getloadavg()[0],
        "loop": loop,
        "sync": sync,
        "figures": [
            *(
                {
                    "name": f"RL samples/s, {r['rollout_workers']} rollout x {r['learner_ranks']} ranks"
                    " vs 1 x 1",
                    "value": r["vs_1x1"],
                    "unit": "ratio",
                }
                for r in loop
            ),
            *(
                {
                    "name": f"weight sync {r['model']} to {r['rollout_workers']} worker(s)",
                    "value": r["total_s"],
                    "unit": "s",
                }
                for r in sync
            ),
        ],
    }
    write_results(RESULTS, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
