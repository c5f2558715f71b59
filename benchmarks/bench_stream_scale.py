"""Streaming scale: stages 1 and 4 with 1k, 10k and 100k prompts (tiny model, few new tokens).

Each (stage, size) runs in a fresh process with its own local Ray cluster, so peak memory is
that run's: the driver's peak RSS and the largest worker process's peak RSS (the driver sampled
every 50 ms, the workers every 0.5 s). Time should grow linearly with size (seconds per 1k prompts flat) and memory stay flat,
since Ray Data streams the prompts with back-pressure and the driver writes shards as they come.
Stage 4 labels synthetic stage-3 pairs, written into the run dir by a child process (so the
driver's peak is the stage's own). Writes benchmarks/results/stream_scale.json.

    .venv/bin/python benchmarks/bench_stream_scale.py [--sizes 1000,10000,100000]
        [--compute actors|tasks]

`--compute` sets the three pools' `compute` (default `actors`, whose rounds of `recycle_rows`
restart the pools; `tasks`: warm task workers, which rounds do not restart; written to
stream_scale-tasks.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from timing import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "stream_scale.json"
SETS = [
    "generation.max_new_tokens=2",
    "data.limit=null",
    "sl_generate.rounds=1",
    "sl_generate.few_shot=0",
    "sl_generate.helpful_samples=0",
    "sl_generate.rollout={size: 1, batch_size: 64}",
    "sl_generate.critique={size: 1, batch_size: 64}",
    "sl_generate.shard_rows=1024",
    "rl_label.few_shot=0",
    "rl_label.labeler={size: 1, batch_size: 64}",
    "rl_label.shard_rows=1024",
]


def _peak_rss(stop: threading.Event, peaks: dict) -> None:
    import psutil
    import ray

    def sample(key: str, proc) -> None:
        # RSS counts the object store's shared pages a process has touched; RSS - shared is
        # the process's own memory, the figure that must stay flat.
        mem = proc.memory_info()
        peaks[key] = max(peaks[key], mem.rss)
        peaks[f"{key}_private"] = max(peaks[f"{key}_private"], mem.rss - mem.shared)

    me = psutil.Process()
    tick = 0
    while not stop.is_set():
        sample("driver", me)  # every 50 ms: the stage's finishing work peaks for under 0.5 s
        tick += 1
        time.sleep(0.05)
        if tick % 10:
            continue
        try:
            node = ray._private.worker._global_node
            raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
            for child in raylet.children(recursive=True):
                sample("worker", child)
        except Exception:  # before Ray is up, or a worker exited meanwhile
            pass


def one(stage: str, size: int, compute: str = "actors") -> dict:
    import ray

    from cai_ray.config import ModelConfig, load_config
    from cai_ray.models import default_cache_dir, ensure_model
    from cai_ray.pipeline import rl_label, sl_generate

    run_dir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    prompts = run_dir / "prompts.jsonl"
    with prompts.open("w") as f:
        for i in range(size):
            f.write(json.dumps({"prompt": f"How do I do task number {i} safely?"}) + "\n")
    model = ensure_model(ModelConfig(preset="tiny-1m"), run_dir=default_cache_dir())
    sets = [f"run_dir={run_dir}", f"models.helpful={{path: {model}}}", f"data.red_team={prompts}"]
    pools = ("sl_generate.rollout", "sl_generate.critique", "rl_label.labeler")
    sets += [f"{pool}.compute={compute}" for pool in pools]
    cfg = load_config(ROOT / "configs/local-tiny.yaml", [*sets, *SETS])
    if stage == "rl-label":
        # in a child process: the driver's peak is the stage's, not this set-up's (the store's
        # 100k keys and the row dicts stayed in the driver's heap before)
        writer = multiprocessing.get_context("spawn").Process(
            target=_write_pairs, args=(run_dir, size)
        )
        writer.start()
        writer.join()
        if writer.exitcode:
            raise SystemExit(f"writing the synthetic pairs failed (exit code {writer.exitcode})")
    peaks = dict.fromkeys(("driver", "worker", "driver_private", "worker_private"), 0)
    stop = threading.Event()
    threading.Thread(target=_peak_rss, args=(stop, peaks), daemon=True).start()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    module = sl_generate if stage == "sl-generate" else rl_label
    manifest = module.run(cfg, progress=False)
    seconds = time.perf_counter() - t0
    stop.set()
    part = manifest["outputs"]["red_team" if stage == "sl-generate" else "labels"]
    return {
        "stage": stage,
        "compute": compute,
        "prompts": size,
        "rows": part["rows"],
        "rejects": part["rejects"],
        "seconds": round(seconds, 1),
        "s_per_1k": round(seconds / size * 1000, 2),
        "driver_peak_rss_mb": round(peaks["driver"] / 2**20),
        "worker_peak_rss_mb": round(peaks["worker"] / 2**20),
        "driver_peak_private_mb": round(peaks["driver_private"] / 2**20),
        "worker_peak_private_mb": round(peaks["worker_private"] / 2**20),
    }


def _write_pairs(run_dir: Path, size: int) -> None:
    from cai_ray.data.shards import ShardStore

    store = ShardStore(run_dir / "rl-pairs" / "red_team", key="pair_id")
    for start in range(0, size, 4096):
        store.write([_pair(i) for i in range(start, min(size, start + 4096))], [])


def _pair(i: int) -> dict:
    q = f"How do I do task number {i} safely?"
    return {
        "pair_id": f"p{i}", "prompt_id": f"p{i}", "messages": [{"role": "user", "content": q}],
        "prompt": q, "source": "bench", "row": i, "temperatures": [1.0, 1.0],
        "responses": [f"Carefully, step {i}.", f"Quickly, step {i + 1}."],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--stages", default="sl-generate,rl-label")
    parser.add_argument("--compute", choices=("actors", "tasks"), default="actors")
    parser.add_argument("--one", nargs=2, metavar=("STAGE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one[0], int(args.one[1]), args.compute)), flush=True)
        return
    rows = []
    for stage in args.stages.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            cmd = [sys.executable, __file__, "--one", stage, str(size), "--compute", args.compute]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not lines:
                print(out.stderr[-3000:])
                raise SystemExit(f"{stage} at {size} failed")
            rows.append(json.loads(lines[-1][len("RESULT ") :]))
            print(json.dumps(rows[-1]), flush=True)
    figures = []
    for stage in args.stages.split(","):
        mine = [r for r in rows if r["stage"] == stage]
        small, large = mine[0], mine[-1]
        figures += [
            {"name": f"{stage}: s per 1k prompts, {large['prompts']} vs {small['prompts']}",
             "value": round(large["s_per_1k"] / small["s_per_1k"], 2), "unit": "ratio",
             "target": "~1 (linear)"},
            {"name": f"{stage}: worker peak private memory, {large['prompts']} vs "
             f"{small['prompts']}", "unit": "ratio", "target": "~1 (flat)",
             "value": round(large["worker_peak_private_mb"] / small["worker_peak_private_mb"], 2)},
            {"name": f"{stage}: driver peak private memory, {large['prompts']} vs "
             f"{small['prompts']}", "unit": "ratio", "target": "~1 (flat)",
             "value": round(large["driver_peak_private_mb"] / small["driver_peak_private_mb"], 2)},
        ]  # fmt: skip
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "load_average_1m": os.getloadavg()[0],
        "compute": args.compute,
        "runs": rows,
        "figures": figures,
    }
    write_results(
        RESULTS.with_stem(f"{RESULTS.stem}-tasks") if args.compute == "tasks" else RESULTS, report
    )


if __name__ == "__main__":
    main()
