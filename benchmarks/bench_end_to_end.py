"""End to end: `cai-ray run` on the default local config, its time split per stage, and the share
spent outside model compute (Ray scheduling, serialisation, process start, idle).

Each size runs `cai-ray run` as a user would (a fresh run folder, a fresh local Ray cluster) with
`CAI_RAY_PROFILE_DIR` set, so every process writes a span per model call (`cai_ray/profiling.py`).
Per stage: wall time; compute = the union over all processes of generate / score / train / infer
spans (some model is computing); start-up = stage start to the first compute (Ray start, model
build, actor start, imports, model load: the `setup` columns name the measured parts); gaps =
time between the first and last compute with no model computing (Ray Data scheduling, moving
blocks, waiting on a pool); tail = last compute to the stage's end (writes, pool shutdown).
`--limit` sizes are the prompts per source (`data.limit`): the default 16, and larger runs show
how the share of fixed costs falls. Each `--before key=value[,key=value]` is a tuning change
undone: one more run at the largest size with those settings, and its stage times over the
default's (ratio > 1: the default is faster). Writes benchmarks/results/end_to_end.json.

    .venv/bin/python benchmarks/bench_end_to_end.py [--limit 16 --limit 64] [--set key=value ...]
        [--before engine.threads=2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import write_results

from cai_ray.profiling import read_spans, split

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "end_to_end.json"
CLI = str(Path(sys.executable).parent / "cai-ray")


def run_once(limit: int, sets: list[str], config: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="cai-e2e-") as tmp:
        prof = Path(tmp) / "spans"
        run_dir = Path(tmp) / "run"
        cmd = [CLI, "run", config, "--set", f"run_dir={run_dir}", "--set", f"data.limit={limit}"]
        for item in sets:
            cmd += ["--set", item]
        env = {**os.environ, "CAI_RAY_PROFILE_DIR": str(prof)}
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.time() - t0
        if proc.returncode:
            sys.exit(f"cai-ray run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        spans = read_spans(prof)
    stages = sorted((s for s in spans if s["kind"].startswith("stage:")), key=lambda s: s["t0"])
    rows = []
    for st in stages:
        part = split((st["t0"], st["t1"]), spans)
        rows.append({"stage": st["kind"].split(":", 1)[1], **_rounded(part)})
    total = {
        key: round(sum(r[key] for r in rows), 3)
        for key in ("wall_s", "compute_s", "startup_s", "gaps_s", "tail_s")
    }
    total["compute_share"] = round(total["compute_s"] / total["wall_s"], 4)
    total["process_wall_s"] = round(wall, 3)  # includes the CLI's imports and Ray shutdown
    return {"limit": limit, "stages": rows, "total": total}


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


def table(result: dict) -> str:
    lines = [
        "| stage | wall s | compute s | compute share | start-up s | of which Ray init / model "
        "build / actor model load s | gaps s | tail s | compute by kind s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["stages"]:
        setup = r["setup_s"]
        kinds = ", ".join(f"{k} {v}" for k, v in r["compute_by_kind_s"].items() if v)
        lines.append(
            f"| {r['stage']} | {r['wall_s']:.1f} | {r['compute_s']:.2f} | "
            f"{r['compute_share']:.0%} | {r['startup_s']:.1f} | {setup['ray_init']:.1f} / "
            f"{setup['build_model']:.1f} / {setup['load']:.1f} | {r['gaps_s']:.2f} | "
            f"{r['tail_s']:.2f} | {kinds} |"
        )
    t = result["total"]
    lines.append(
        f"| **all stages** | {t['wall_s']:.1f} | {t['compute_s']:.2f} | "
        f"{t['compute_share']:.0%} | {t['startup_s']:.1f} | | {t['gaps_s']:.2f} | "
        f"{t['tail_s']:.2f} | process wall {t['process_wall_s']:.1f} s |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/local-tiny.yaml")
    parser.add_argument("--limit", type=int, action="append", help="prompts per source")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value")
    parser.add_argument("--before", action="append", help="settings a tuning change replaced")
    args = parser.parse_args()
    limits = args.limit or [16, 64]
    befores = args.before if args.before is not None else ["engine.threads=2"]
    runs = []
    for limit in limits:
        print(f"== cai-ray run, data.limit={limit}", flush=True)
        runs.append(run_once(limit, args.sets, args.config))
        print(table(runs[-1]), flush=True)
    after = runs[-1]
    comparisons = []
    for before in befores:
        print(f"== cai-ray run, data.limit={after['limit']}, before: {before}", flush=True)
        old = run_once(after["limit"], [*args.sets, *before.split(",")], args.config)
        print(table(old), flush=True)
        comparisons.append(
            {
                "before": before,
                "limit": after["limit"],
                "run": old,
                "ratio": round(old["total"]["wall_s"] / after["total"]["wall_s"], 3),
                "by_stage": {
                    o["stage"]: round(o["wall_s"] / a["wall_s"], 3)
                    for o, a in zip(old["stages"], after["stages"], strict=True)
                },
            }
        )
    report = {
        "config": args.config,
        "sets": args.sets,
        "load_average_1m": os.getloadavg()[0],
        "runs": runs,
        "before_after": comparisons,
    }
    report["figures"] = (
        [
            {
                "name": f"end to end (data.limit={r['limit']}): model-compute share of stage time",
                "value": r["total"]["compute_share"],
                "unit": "ratio",
            }
            for r in runs
        ]
        + [
            {
                "name": f"end to end (data.limit={r['limit']}): start-up share of stage time",
                "value": round(r["total"]["startup_s"] / r["total"]["wall_s"], 4),
                "unit": "ratio",
            }
            for r in runs
        ]
        + [
            {
                "name": f"end to end (data.limit={c['limit']}): stage time with {c['before']} over "
                "the default",
                "value": c["ratio"],
                "unit": "ratio",
                "target": "> 1",
            }
            for c in comparisons
        ]
    )
    write_results(RESULTS, report)
    print(json.dumps(report["figures"], indent=2))


if __name__ == "__main__":
    main()
