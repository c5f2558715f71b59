"""The learner group against plain single-process PyTorch training on the same model and rows.

Reference: a hand-written loop (AdamW, the same response-only loss, gradient clipping, the same
micro-batch) in this process. Measured against it: the learner group in-process (DeepSpeed
ZeRO 0, size 0), one rank as a Ray actor, and two ranks (gloo) with one thread each. Target: one
rank within 10% of the plain loop. Two-rank scaling efficiency = tokens/s of 2 ranks x 1 thread
/ (2 x tokens/s of the plain loop on 1 thread). Also the machine's fp32 and bf16 matmul peak and
each run's MFU. Writes benchmarks/results/train_reference.json.

    .venv/bin/python benchmarks/bench_train_reference.py [--preset tiny-20m] [--steps 8]
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
from bench_sl_train import synthetic_rows
from flops import flops_per_token, matmul_peak
from timing import write_results

from actors.learner.group import LearnerGroup
from actors.learner.metrics import read_metrics
from cai_ray.config import ModelConfig
from cai_ray.config.learner import LearnerConfig
from cai_ray.models import default_cache_dir, ensure_model
from cai_ray.sl.losses import token_nll_sum
from cai_ray.sl.objective import SFTObjective
from cai_ray.sl.sft_data import collate

RESULTS = Path(__file__).resolve().parent / "results" / "train_reference.json"


def plain_loop(model_dir: Path, rows: list[dict], *, micro: int, threads: int) -> float:
    """tokens/s of the reference loop (first step not counted)."""
    from transformers import AutoModelForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, seconds = 0, 0.0
    for i in range(len(rows) // micro):
        t0 = time.perf_counter()  # collate included, as in the learner's step time
        batch = collate(rows[i * micro : (i + 1) * micro], pad_id=0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, count = token_nll_sum(logits, batch["labels"])
        (total / max(count, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            seconds += time.perf_counter() - t0
            tokens += int(batch["num_tokens"])
    torch.set_num_threads(before)
    return tokens / seconds


def group(model_dir: Path, rows: list[dict], *, micro: int, ranks: int, threads: int) -> float:
    config = LearnerConfig(
        num_ranks=ranks,
        micro_batch_size=micro,
        lr=1e-4,
        tensorboard=False,
        hf_checkpoints=False,
        shuffle=False,
        cpus_per_rank=threads,
    )
    out = Path(tempfile.mkdtemp(prefix="bench-train-ref-"))
    try:
        with LearnerGroup(config, SFTObjective(), model_dir, out) as g:
            g.fit(rows, progress=False)
        steps = read_metrics(out)[1:]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return sum(s["tokens"] for s in steps) / sum(s["step_time_s"] for s in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-20m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    import ray

    cores = os.cpu_count() or 1
    model_dir = ensure_model(ModelConfig(preset=args.preset), run_dir=default_cache_dir())
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    micro, steps = args.micro_batch, args.steps
    one = synthetic_rows(steps * micro, args.seq_len, vocab)
    two = synthetic_rows(steps * micro * 2, args.seq_len, vocab)
    peaks = {
        "fp32_all_cores": matmul_peak(cores),
        "fp32_1_thread": matmul_peak(1),
        "bf16_all_cores": matmul_peak(cores, dtype=torch.bfloat16),
    }
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    runs = {
        "plain, all cores": plain_loop(model_dir, one, micro=micro, threads=cores),
        "plain, 1 thread": plain_loop(model_dir, one, micro=micro, threads=1),
        "group in-process": group(model_dir, one, micro=micro, ranks=0, threads=cores),
        "group 1 rank (actor)": group(model_dir, one, micro=micro, ranks=1, threads=cores),
        "group 2 ranks x 1 thread": group(model_dir, two, micro=micro, ranks=2, threads=1),
        # the 1-rank gap with one thread: is it the actor, or two threads sharing the machine
        # with Ray's own processes and the driver?
        "group 1 rank (actor), 1 thread": group(model_dir, one, micro=micro, ranks=1, threads=1),
    }
    ray.shutdown()
    fpt = flops_per_token(model_dir, args.seq_len)
    ref = runs["plain, all cores"]
    table = [
        {
            "run": name,
            "tokens_per_s": round(tps, 1),
            "vs_plain": round(tps / ref, 3),
            "mfu_fp32": round(tps * fpt / peaks["fp32_all_cores"], 4),
        }
        for name, tps in runs.items()
    ]
    efficiency = runs["group 2 ranks x 1 thread"] / (2 * runs["plain, 1 thread"])
    one_thread = runs["group 1 rank (actor), 1 thread"] / runs["plain, 1 thread"]
    report = {
        "preset": args.preset,
        "seq_len": args.seq_len,
        "micro_batch": micro,
        "machine": f"{platform.machine()} {cores} cpus",
        "load_average_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "matmul_peak_flops": peaks,
        "runs": table,
        "two_rank_scaling_efficiency": round(efficiency, 3),
        "figures": [
            {"name": "learner 1 rank vs plain PyTorch", "value": table[3]["vs_plain"],
             "unit": "ratio", "target": ">= 0.9"},
            {"name": "learner in-process vs plain PyTorch", "value": table[2]["vs_plain"],
             "unit": "ratio", "target": ">= 0.9"},
            {"name": "2-rank scaling efficiency", "value": round(efficiency, 3), "unit": "ratio"},
            {"name": "learner 1 rank, 1 thread vs plain PyTorch, 1 thread",
             "value": round(one_thread, 3), "unit": "ratio", "target": ">= 0.9"},
            {"name": "training MFU (plain, fp32)", "value": table[0]["mfu_fp32"], "unit": "ratio"},
            {"name": "matmul peak fp32", "value": round(peaks["fp32_all_cores"] / 1e9, 1),
             "unit": "GFLOP/s"},
            {"name": "matmul peak bf16", "value": round(peaks["bf16_all_cores"] / 1e9, 1),
             "unit": "GFLOP/s"},
        ],
    }  # fmt: skip
    write_results(RESULTS, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
