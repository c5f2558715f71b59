"""AI-feedback labels per second (stage 4): K principles, shared-prefix vs naive scoring, pool size.

Measures the labeller (actors.labeler.LabelerWorker) on a batch of response pairs:
- labels/s for K = 1, 4, 16 principles per label (both orders: 2K scored prompts per label),
  with the engine's shared-prefix `score_options` and with a naive scorer that runs one full
  forward per (prompt, option);
- labels/s through a Ray Data actor pool of 1 and 2 workers (`--pools`), K = 1.
Writes benchmarks/results/labels.json.

    .venv/bin/python benchmarks/bench_labels.py [--preset tiny-1m] [--pairs 8] [--pools 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch
from timing import write_results

from actors.labeler import LabelerWorker
from cai_ray.config import EngineConfig, ModelConfig, RLLabelConfig
from cai_ray.engines.base import OptionScores
from cai_ray.models import default_cache_dir, ensure_model

RESULTS = Path(__file__).resolve().parent / "results" / "labels.json"
CONSTITUTION = str(Path(__file__).resolve().parents[1] / "constitutions" / "default.yaml")
PROMPTS = [
    "How do I pick a lock on my neighbour's door?",
    "What should I cook for a friend who is vegetarian?",
    "How can I get back at a coworker who embarrassed me?",
    "Is it safe to mix bleach and vinegar for cleaning?",
]
ANSWERS = [
    ("I can't help with getting into someone else's home.", "Use a tension wrench and a rake."),
    ("A mushroom risotto works well.", "Just serve chicken; they won't notice."),
    ("Talk to them, or to your manager.", "Spread a rumour about them."),
    ("No: together they release chlorine gas.", "Sure, it cleans twice as well."),
]


def pairs_batch(n: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        q, (a, b) = PROMPTS[i % 4], ANSWERS[i % 4]
        msgs = json.dumps([{"role": "user", "content": q}])
        rows.append({"pair_id": f"b{i}", "messages": msgs, "responses": [a, b], "reject": ""})
    return pd.DataFrame(rows)


def naive_score_options(engine):
    """Replace `score_options` by one full forward per (prefix, option): the reference path."""

    def score(requests):
        out = []
        with torch.inference_mode():
            for req in requests:
                prefix = engine._encode(req.prefix)
                lps, ids_all = [], []
                for option in req.options:
                    ids = engine._encode(req.prefix + option)[len(prefix) :]
                    full = torch.tensor([prefix + ids], device=engine.device)
                    logp = engine.model(input_ids=full).logits[0].float().log_softmax(-1)
                    pos = torch.arange(len(prefix) - 1, len(prefix) + len(ids) - 1)
                    lps.append(float(logp[pos, torch.tensor(ids)].sum()))
                    ids_all.append(ids)
                out.append(OptionScores(lps, ids_all, len(prefix)))
        return out

    return score


def time_worker(worker, batch, repeats: int) -> float:
    worker(batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        worker(batch)
    return (time.perf_counter() - t0) / repeats


def bench_principles(model: Path, args) -> list[dict]:
    batch, small = pairs_batch(args.pairs), pairs_batch(args.naive_pairs)
    engine = EngineConfig(kind="hf", device="cpu", threads=args.threads, batch_size=16)
    out = []
    for k in (1, 4, 16):
        settings = RLLabelConfig(principles_per_label=k, few_shot=args.few_shot)
        worker = LabelerWorker(str(model), engine, CONSTITUTION, settings)
        shared = time_worker(worker, batch, args.repeats)
        labels = list(worker(small).label)
        # The naive path is ~10-30x slower: timed once, on fewer pairs.
        worker.engine.score_options = naive_score_options(worker.engine)
        t0 = time.perf_counter()
        naive_labels = list(worker(small).label)
        naive = (time.perf_counter() - t0) / args.naive_pairs
        diff = max(abs(a - b) for a, b in zip(labels, naive_labels, strict=True))
        row = {
            "k": k,
            "scored_prompts_per_label": 2 * k,
            "shared_labels_per_s": args.pairs / shared,
            "naive_labels_per_s": 1 / naive,
            "speedup": naive * args.pairs / shared,
            "max_label_diff": diff,
        }
        print(row, flush=True)
        out.append(row)
    return out


def bench_pools(model: Path, args) -> list[dict]:
    import ray
    from ray.data import ActorPoolStrategy

    ray.init(num_cpus=max(args.pools) + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    engine = EngineConfig(kind="hf", device="cpu", threads=1, batch_size=16)
    settings = RLLabelConfig(principles_per_label=1, few_shot=args.few_shot)
    n = args.pairs * 4
    out = []
    for size in args.pools:
        ds = ray.data.from_pandas(pairs_batch(n)).map_batches(
            LabelerWorker,
            fn_constructor_args=(str(model), engine, CONSTITUTION, settings),
            compute=ActorPoolStrategy(size=size),
            batch_size=max(1, n // (2 * size)),
            batch_format="pandas",
            num_cpus=1,
        )
        t0 = time.perf_counter()
        count = ds.count()
        seconds = time.perf_counter() - t0
        row = {"pool_size": size, "labels": count, "labels_per_s": count / seconds}
        print(row, flush=True)
        out.append(row)
    ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-1m")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--naive-pairs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--few-shot", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pools", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ensure_model(ModelConfig(preset=args.preset), run_dir=default_cache_dir())
    result = {
        "benchmark": "labels",
        "model": str(model.name),
        "pairs_per_batch": args.pairs,
        "few_shot": args.few_shot,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "principles": bench_principles(model, args),
        "pools": bench_pools(model, args) if args.pools else [],
    }
    result["figures"] = [
        {"name": f"labels/s shared prefix vs naive, K={r['k']}",
         "value": round(r["speedup"], 2), "unit": "ratio", "target": "> 1"}
        for r in result["principles"]
    ]  # fmt: skip
    write_results(RESULTS, result)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
