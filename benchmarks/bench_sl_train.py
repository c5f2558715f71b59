"""SFT throughput of the learner group: tokens/s and MFU for 1 and 2 ranks, ZeRO 0/2/3.

MFU = model FLOPs per second / the machine's measured fp32 matmul peak (the best 1024^3 matmul
over all cores, measured before every run; not a datasheet number). Training FLOPs per token follow PaLM (Chowdhery et al. 2022,
app. B): 6 N + 12 L H T, N the non-embedding parameters, L layers, H hidden size, T sequence
length. The first step of each run is a warm-up and is not counted. Writes
benchmarks/results/sl_train.json.

    .venv/bin/python benchmarks/bench_sl_train.py [--preset tiny-20m] [--seq-len 256] [--steps 6]
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

import torch
from flops import flops_per_token, matmul_peak
from timing import write_results

from actors.learner.group import LearnerGroup
from actors.learner.metrics import read_metrics
from cai_ray.config import ModelConfig
from cai_ray.config.learner import LearnerConfig
from cai_ray.models import default_cache_dir, ensure_model
from cai_ray.sl.objective import SFTObjective

RESULTS = Path(__file__).resolve().parent / "results" / "sl_train.json"


def synthetic_rows(n: int, seq_len: int, vocab: int) -> list[dict]:
    """Random token rows, the first half a prompt (no loss), the second half the response."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(10, vocab, (seq_len,), generator=g).tolist()
        rows.append(
            {"idx": i, "input_ids": ids, "labels": [-100] * (seq_len // 2) + ids[seq_len // 2 :]}
        )
    return rows


def run(model_dir: Path, rows: list[dict], config: LearnerConfig) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-sl-train-"))
    try:
        with LearnerGroup(config, SFTObjective(), model_dir, out) as group:
            t0 = time.perf_counter()
            group.fit(rows, progress=False)
            wall = time.perf_counter() - t0
        steps = read_metrics(out)[1:]  # the first step warms up
    finally:
        shutil.rmtree(out, ignore_errors=True)
    tokens = sum(s["tokens"] for s in steps)
    seconds = sum(s["step_time_s"] for s in steps)
    return {"tokens_per_s": tokens / seconds, "steps": len(steps), "fit_wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-20m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    import ray
    import ray.data

    cores = os.cpu_count() or 1
    model_dir = ensure_model(ModelConfig(preset=args.preset), run_dir=default_cache_dir())
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    fpt = flops_per_token(model_dir, args.seq_len)
    peak = matmul_peak(cores)
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    for ranks in (0, 2):
        per_rank = max(1, cores // max(ranks, 1))  # both layouts use every core
        rows = synthetic_rows(args.steps * args.micro_batch * max(ranks, 1), args.seq_len, vocab)
        for stage in (0, 2, 3):
            config = LearnerConfig(
                num_ranks=ranks,
                zero_stage=stage,
                micro_batch_size=args.micro_batch,
                lr=1e-4,
                max_seq_len=args.seq_len,
                tensorboard=False,
                hf_checkpoints=False,
                cpus_per_rank=per_rank,
            )
            # Measured again before each run: other load on the machine moves both numbers.
            peak = max(matmul_peak(cores), peak)
            r = run(model_dir, rows, config)
            r |= {"ranks": max(ranks, 1), "in_process": ranks == 0, "zero_stage": stage}
            r["threads_per_rank"] = per_rank
            results.append(r)
            print(json.dumps(r))
    ray.shutdown()
    for r in results:  # one denominator for all runs: the best peak seen
        r["mfu"] = r["tokens_per_s"] * fpt / peak
    report = {
        "preset": args.preset,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "flops_per_token": fpt,
        "matmul_peak_flops": peak,
        "machine": f"{platform.machine()} {cores} cpus",
        "load_average_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "results": results,
        "figures": [
            {
                "name": f"SFT MFU, {r['ranks']} rank(s), ZeRO {r['zero_stage']}",
                "value": round(r["mfu"], 4),
                "unit": "ratio",
            }
            for r in results
        ],
    }
    write_results(RESULTS, report)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
