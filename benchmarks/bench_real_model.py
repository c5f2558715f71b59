"""A real pretrained model through every stage (issue 14): wall time and peak memory per stage,
then what the run measured, in one JSON.

Runs each stage of `configs/gemma3-270m-cpu.yaml` (Gemma 3 270M, imported from GGUF) as a user
would, `cai-ray stage NAME CONFIG` one after the other (a finished stage is skipped, so a rerun
resumes), sampling the memory of the stage's whole process tree (driver, Ray, every actor) once
a second: the peak is the largest sum of resident set sizes seen (shared pages count once per
process, so it overstates a little). Then `cai-ray eval hhh --as feedback` scores the helpful
model as the feedback model on the paper's 438 HHH comparisons: zero-shot, few-shot and with
chain of thought (both orders averaged, each order reported). Last it reads the run's own
outputs: the PM's held-out accuracy and calibration, Elo with intervals per checkpoint and axis,
refusal and over-refusal, evasiveness, PM score by revision round.

    .venv/bin/python benchmarks/bench_real_model.py [--config configs/gemma3-270m-cpu.yaml]
        [--set key=value ...] [--skip-stages] [--hhh-limit N] [--cot-limit N]

Writes benchmarks/results/real_model.json. Needs the weights: `make run-gemma` fetches them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from timing import write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "real_model.json"
CLI = str(Path(sys.executable).parent / "cai-ray")
STAGES = ("sl-generate", "sl-train", "rl-pairs", "rl-label", "pm-train", "rl-train", "evaluate")


class PeakMemory:
    """The largest total RSS of a process and all its descendants, sampled every `every` s."""

    def __init__(self, pid: int, every: float = 1.0):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):  # a process may end meanwhile
                        total += p.memory_info().rss
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_stage(name: str, config: str, sets: list[str]) -> dict[str, Any]:
    cmd = [CLI, "stage", name, config, "--no-progress", *[a for s in sets for a in ("--set", s)]]
    t0, load0 = time.time(), os.getloadavg()[0]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    mem = PeakMemory(proc.pid)
    out, _ = proc.communicate(timeout=4 * 3600)
    peak = mem.stop()
    wall = time.time() - t0
    if proc.returncode:
        sys.exit(f"cai-ray stage {name} failed ({proc.returncode}):\n{out[-4000:]}")
    row = {
        "stage": name,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak / 2**30, 2),
        "load_average_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "skipped": "finished earlier, skipping" in out,
    }
    print(json.dumps(row), flush=True)
    return row


def timed_stages(run_dir: Path, config: str, sets: list[str]) -> list[dict[str, Any]]:
    """Every stage's row; a stage finished by an earlier (killed) bench run keeps that run's row,
    kept in RUN_DIR/bench_stages.jsonl, so a resumed bench still reports each stage's time."""
    log = run_dir / "bench_stages.jsonl"
    earlier = {}
    if log.is_file():
        earlier = {r["stage"]: r for r in map(json.loads, log.read_text().splitlines())}
    rows = []
    for name in STAGES:
        row = run_stage(name, config, sets)
        if row["skipped"] and name in earlier:
            row = {**earlier[name], "from_earlier_run": True}
        elif not row["skipped"]:
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def hhh(model: Path, label: str, *extra: str) -> dict[str, Any]:
    """`cai-ray eval hhh --as feedback` on the helpful model; its JSON report."""
    out = RESULTS.parent / f"real_model_hhh_{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [CLI, "eval", "hhh", "--model", str(model), "--as", "feedback", "-o", str(out)]
    cmd += ["--dtype", "bfloat16", "--batch-size", "16", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=4 * 3600)
    if proc.returncode:
        sys.exit(f"eval hhh ({label}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    report = json.loads(out.read_text())
    summary = {
        "label": label,
        "accuracy": report.get("accuracy"),
        "total": report.get("total"),
        "accuracy_by_order": report.get("accuracy_by_order"),
        "by_position": report.get("by_position"),
        "order_disagreement": report.get("order_disagreement"),
        "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps(summary), flush=True)
    return summary


def run_outputs(run_dir: Path) -> dict[str, Any]:
    """What the run's own manifests say (PM quality, Elo, refusals, revision rounds)."""

    def manifest(stage: str) -> dict[str, Any]:
        path = run_dir / stage / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    pm_eval = run_dir / "pm-train" / "eval.json"
    elo = run_dir / "evaluate" / "elo.json"
    ev = manifest("evaluate")
    return {
        "sl_generate": manifest("sl-generate").get("outputs"),
        "sl_train": manifest("sl-train").get("outputs"),
        "rl_label": manifest("rl-label").get("outputs"),
        "pm_train": manifest("pm-train").get("outputs"),
        "pm_start": manifest("pm-train").get("models"),
        "pm_eval": json.loads(pm_eval.read_text()) if pm_eval.is_file() else None,
        "rl_train": manifest("rl-train").get("outputs"),
        "elo": json.loads(elo.read_text()) if elo.is_file() else None,
        "refusal": ev.get("refusal"),
        "metrics": ev.get("metrics"),
        "revision_rounds": ev.get("revision_rounds"),
        "judge": ev.get("judge"),
        "notes": ev.get("notes"),
    }


def markdown(report: dict[str, Any]) -> str:
    """The "Real model" tables of benchmarks/README.md from a report."""
    o = report["outputs"]
    lines = ["| stage | wall s | peak RSS GiB | load average (start, end) |", "|---|---|---|---|"]
    for s in report["stages"]:
        load = ", ".join(f"{x:.1f}" for x in s["load_average_1m"])
        lines.append(f"| {s['stage']} | {s['wall_s']:.0f} | {s['peak_rss_gib']:.1f} | {load} |")
    lines.append(f"| **all** | **{report['pipeline_wall_s']:.0f}** | | |")
    lines += ["", "| feedback model on 438 HHH | accuracy (both orders) | file order | swapped "
              "| (A) correct | (B) correct | order disagreement |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in report["hhh_feedback"]:
        pos, by = e["by_position"], e["accuracy_by_order"] or {}
        lines.append(
            f"| {e['label']} (n={e['total']}) | {e['accuracy']:.3f} | {by.get('file', 0):.3f} | "
            f"{by.get('swapped', 0):.3f} | {pos['(A)']['accuracy']:.3f} | "
            f"{pos['(B)']['accuracy']:.3f} | {e['order_disagreement']:.2f} |"
        )
    pm = (o.get("pm_eval") or [{}])[-1]
    lines += ["", f"PM (from {o['pm_start']['start']['kind']}): held-out accuracy "
              f"{pm.get('accuracy', float('nan')):.3f} on {pm.get('pairs')} pairs, ECE "
              f"{pm.get('ece', float('nan')):.3f}"]  # fmt: skip
    lines += ["", "| checkpoint | harmlessness Elo [95%] | helpfulness Elo [95%] | refusal on "
              "harmful | over-refusal on benign | P(evasive) harmful / benign | PM score harmful "
              "/ benign | words |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    elo, met = o["elo"], o["metrics"]
    for name in elo["checkpoints"]:
        h, u = elo["harmlessness"][name], elo["helpfulness"][name]
        mh, mb = met["harmful"][name], met["helpful"][name]
        r = o["refusal"]["checkpoints"][name]
        lines.append(
            f"| {name} | {h['elo']:+.1f} [{h['low']:+.1f}, {h['high']:+.1f}] | "
            f"{u['elo']:+.1f} [{u['low']:+.1f}, {u['high']:+.1f}] | "
            f"{r['harmful_refusal_rate']:.2f} | {r['over_refusal_rate']:.2f} | "
            f"{mh['p_evasive_mean']:.3f} / {mb['p_evasive_mean']:.3f} | "
            f"{mh['pm_mean']:+.2f} / {mb['pm_mean']:+.2f} | {mh['words_mean']:.0f} |"
        )
    rounds = o.get("revision_rounds") or []
    lines += ["", "PM score by revision round: " + ", ".join(
        f"round {r['round']} {r['mean']:+.2f} ± {r['sem']:.2f}" for r in rounds
    )]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/gemma3-270m-cpu.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--skip-stages", action="store_true", help="only the evals and the outputs")
    ap.add_argument("--hhh-limit", type=int, help="HHH rows for the zero- and few-shot evals")
    ap.add_argument("--cot-limit", type=int, default=100, help="HHH rows for the CoT eval")
    ap.add_argument("--no-hhh", action="store_true")
    ap.add_argument(
        "--reuse-hhh",
        action="store_true",
        help="take the HHH rows from the last report (they depend on the helpful model only)",
    )
    ap.add_argument("--markdown", metavar="JSON", help="print the tables of a written report")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return

    sys.path.insert(0, str(ROOT))
    from cai_ray.config import load_config, resolve_path

    cfg = load_config(resolve_path(args.config), args.sets)
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_absolute():
        run_dir = ROOT / run_dir
    t0 = time.time()
    stages = [] if args.skip_stages else timed_stages(run_dir, args.config, args.sets)
    if not args.skip_stages:
        subprocess.run([CLI, "report", str(run_dir)], cwd=ROOT, check=True, capture_output=True)
    evals = []
    if args.reuse_hhh and RESULTS.is_file():
        evals = [
            {**e, "from_earlier_run": True} for e in json.loads(RESULTS.read_text())["hhh_feedback"]
        ]
    elif not args.no_hhh:
        models = sorted((run_dir / "models").iterdir())
        helpful = next(m for m in models if (m / "config.json").is_file())
        limit = ["--limit", str(args.hhh_limit)] if args.hhh_limit else []
        evals.append(hhh(helpful, "zero_shot", *limit))
        evals.append(hhh(helpful, "few_shot_2", "--few-shot", "2", *limit))
        evals.append(hhh(helpful, "cot", "--cot", "--limit", str(args.cot_limit)))
    report = {
        "config": args.config,
        "sets": args.sets,
        "run_dir": str(run_dir),
        "stages": stages,
        "pipeline_wall_s": round(sum(s["wall_s"] for s in stages), 1),
        "hhh_feedback": evals,
        "outputs": run_outputs(run_dir),
        "total_wall_s": round(time.time() - t0, 1),
        "machine": f"{os.uname().machine} {os.cpu_count()} cpus",
        "figures": {
            "pipeline_wall_s": round(sum(s["wall_s"] for s in stages), 1),
            "peak_rss_gib": max((s["peak_rss_gib"] for s in stages), default=None),
            **{f"hhh_{e['label']}": e["accuracy"] for e in evals},
        },
    }
    write_results(RESULTS, report)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
