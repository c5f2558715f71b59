"""Where streaming memory grows: per-process USS over a stage-4 stream, and the same pool
worker without Ray Data, and Ray Data without cai-ray.

1. `rl-label` at each size (fresh process and local Ray cluster, as bench_stream_scale.py):
   USS (memory unique to a process) of the driver and of the labeller pool's worker, sampled
   every second; the driver also right before and after `drain` (the stream).
2. `LabelerWorker` called in this process on the same 64-row batches (no Ray at all).
3. A Ray Data actor pool with a trivial UDF (no model, no cai-ray code): its worker's USS and
   Arrow's live allocations (`pyarrow.total_allocated_bytes`) every 1000 tasks.

Writes benchmarks/results/stream_memory.json.

    .venv/bin/python benchmarks/bench_stream_memory.py [--sizes 5000,20000] [--tasks 3000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from timing import write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "stream_memory.json"


def _uss(proc: psutil.Process) -> float:
    return proc.memory_full_info().uss / 2**20


def _watch(stop: threading.Event, series: dict, match: str) -> None:
    """USS (MB) of this process and of every process whose command line contains `match`."""
    me = psutil.Process()
    t0 = time.time()
    while not stop.is_set():
        t = round(time.time() - t0, 1)
        series.setdefault("driver", []).append((t, round(_uss(me), 1)))
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(match in c for c in p.info["cmdline"] or []):
                    series.setdefault("worker", []).append((t, round(_uss(p), 1)))
            except (psutil.Error, OSError):
                pass
        time.sleep(1.0)


def stage_run(size: int, batch: int = 64) -> dict:
    """rl-label on `size` synthetic pairs, `batch` rows per pool task; USS trajectories of the
    driver and the labeller worker."""
    import bench_stream_scale as scale

    scale.SETS = [x for x in scale.SETS if not x.startswith("rl_label.labeler=")]
    scale.SETS.append(f"rl_label.labeler={{size: 1, batch_size: {batch}}}")
    from cai_ray.pipeline import rl_label

    marks: dict[str, float] = {}
    drain = rl_label.drain

    def marked_drain(*args, **kwargs):
        marks["driver_before_stream_mb"] = round(_uss(psutil.Process()), 1)
        out = drain(*args, **kwargs)
        marks["driver_after_stream_mb"] = round(_uss(psutil.Process()), 1)
        return out

    rl_label.drain = marked_drain
    scale._peak_rss = lambda stop, peaks: None  # this script samples USS itself
    series: dict = {}
    stop = threading.Event()
    threading.Thread(target=_watch, args=(stop, series, "LabelerWorker"), daemon=True).start()
    result = scale.one("rl-label", size)
    stop.set()
    worker = series.get("worker", [])
    steady = worker[len(worker) // 4 :]  # past the model load
    grow = (steady[-1][1] - steady[0][1]) if len(steady) > 1 else None
    return {
        "prompts": size,
        "rows_per_task": batch,
        "seconds": result["seconds"],
        **marks,
        "driver_stream_growth_kb_per_prompt": round(
            (marks["driver_after_stream_mb"] - marks["driver_before_stream_mb"]) * 1024 / size, 2
        ),
        "worker_peak_uss_mb": max((v for _, v in worker), default=None),
        "worker_steady_growth_mb": grow,
        "worker": worker[:: max(1, len(worker) // 12)],
    }


def in_process(batches: int) -> dict:
    """The labeller without Ray: USS every 50 batches of 64 pairs."""
    import bench_stream_scale as scale
    import pandas as pd

    from actors.labeler import LabelerWorker
    from cai_ray.config import ModelConfig, load_config
    from cai_ray.engines.base import SamplingParams
    from cai_ray.models import default_cache_dir, ensure_model

    model = ensure_model(ModelConfig(preset="tiny-1m"), run_dir=default_cache_dir())
    cfg = load_config(
        ROOT / "configs/local-tiny.yaml", [f"models.helpful={{path: {model}}}", *scale.SETS]
    )
    worker = LabelerWorker(
        model_path=str(model),
        engine=cfg.engine,
        constitution_path=str(ROOT / "constitutions/default.yaml"),
        settings=cfg.rl_label,
        seed=cfg.seed,
        rationale_sampling=SamplingParams.of(cfg.generation, seed=0),
        model_id="bench",
    )
    me, points = psutil.Process(), []
    for k in range(batches):
        df = pd.DataFrame([scale._pair(i) for i in range(k * 64, k * 64 + 64)])
        df["reject"] = ""
        worker(df)
        if k % 50 == 0:
            points.append((k, round(_uss(me), 1)))
    return {"batches": batches, "uss_mb_by_batch": points}


class _Echo:
    """A trivial Ray Data UDF: adds a 1000-character column; counts its tasks."""

    def __init__(self, report: str):
        self.k, self.report = 0, report

    def __call__(self, batch):
        import pyarrow as pa

        self.k += 1
        if self.k % 1000 == 0:
            with open(f"{self.report}/{self.k}.json", "w") as f:
                json.dump({"task": self.k, "arrow_mb": pa.total_allocated_bytes() / 2**20,
                           "uss_mb": _uss(psutil.Process())}, f)  # fmt: skip
        time.sleep(0.004)
        batch = batch.copy()
        batch["trace"] = ["x" * 1000] * len(batch)
        return batch


def ray_data_only(tasks: int) -> dict:
    import pandas as pd
    import ray
    import ray.data

    report = tempfile.mkdtemp(prefix="bench-echo-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = tasks * 64

        def source(b):
            return pd.DataFrame({"id": b["id"], "p": ["q" * 200] * len(b["id"])})

        ds = ray.data.range(rows).map_batches(source, batch_format="pandas", batch_size=64,
                                              num_cpus=0)  # fmt: skip
        ds = ds.map_batches(_Echo, fn_constructor_kwargs={"report": report}, concurrency=1,
                            batch_size=64, batch_format="pandas", num_cpus=1)  # fmt: skip
        n = sum(len(b) for b in ds.iter_batches(batch_size=1024, batch_format="pandas"))
    finally:
        ray.shutdown()
    points = [json.loads(p.read_text()) for p in sorted(Path(report).glob("*.json"),
                                                         key=lambda p: int(p.stem))]  # fmt: skip
    return {"rows": n, "tasks": tasks, "every_1000_tasks": [
        {k: round(v, 1) for k, v in p.items()} for p in points]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--batches", type=int, default=301)
    parser.add_argument("--big-batch", type=int, default=256, help="rows per task, second run")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:  # one part in a fresh process: each its own Ray cluster and baseline memory
        kind, *values = args.part.split(":")
        fn = {"stage": stage_run, "inproc": in_process, "echo": ray_data_only}[kind]
        print("RESULT " + json.dumps(fn(*map(int, values))), flush=True)
        return
    sizes = args.sizes.split(",")
    parts = [f"stage:{s}:64" for s in sizes] + [f"stage:{sizes[-1]}:{args.big_batch}"]
    parts += [f"inproc:{args.batches}", f"echo:{args.tasks}"]
    out: dict = {}
    for part in parts:
        proc = subprocess.run([sys.executable, __file__, "--part", part], cwd=ROOT,
                              capture_output=True, text=True, timeout=3600)  # fmt: skip
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{part} failed:\n{proc.stderr[-3000:]}")
        out[part] = json.loads(lines[-1][len("RESULT ") :])
        print(part, json.dumps(out[part])[:400], flush=True)
    echo = out[f"echo:{args.tasks}"]["every_1000_tasks"]
    inproc = out[f"inproc:{args.batches}"]["uss_mb_by_batch"]
    largest = out[f"stage:{sizes[-1]}:64"]
    big = out[f"stage:{sizes[-1]}:{args.big_batch}"]
    figures = [
        {"name": f"rl-label driver growth over the stream ({largest['prompts']} prompts)",
         "value": largest["driver_stream_growth_kb_per_prompt"], "unit": "KB/prompt"},
        {"name": f"rl-label worker growth ({largest['prompts']} prompts), {args.big_batch} vs 64 "
         "rows per task", "unit": "ratio",
         "value": round(big["worker_steady_growth_mb"] / largest["worker_steady_growth_mb"], 2)},
        {"name": f"LabelerWorker without Ray: USS growth over {args.batches} batches",
         "value": round(inproc[-1][1] - inproc[1][1], 1), "unit": "MB"},
    ]  # fmt: skip
    if len(echo) >= 2:
        per_task = (
            (echo[-1]["arrow_mb"] - echo[0]["arrow_mb"])
            * 1024
            / (echo[-1]["task"] - echo[0]["task"])
        )
        figures.append({"name": "trivial Ray Data actor UDF: Arrow live memory growth",
                        "value": round(per_task, 1), "unit": "KB/task"})  # fmt: skip
    report = {"parts": out, "figures": figures}
    write_results(RESULTS, report)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
