"""Run every benchmark script in this folder in turn (`make bench`); each writes its own JSON
into benchmarks/results/. A failing benchmark is reported and the rest still run. Then the
headline figures of every result file (its `figures` list: name, value, unit, target) go into
benchmarks/results/summary.json and into the table between the summary markers of
benchmarks/README.md, with the machine and versions they were measured on. Rows of benchmarks
that have no result file here (results/ is not committed) are kept from the table as it was.

    .venv/bin/python benchmarks/run_all.py [--only bench_mfu,bench_peak] [--summary-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"


def run_scripts(only: set[str] | None) -> list[str]:
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        if only and script.stem not in only:
            continue
        t0 = time.perf_counter()
        print(f"== {script.name}", flush=True)
        rc = subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode
        print(f"== {script.name}: exit {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        if rc:
            failed.append(script.name)
    return failed


def machine() -> dict[str, str]:
    import deepspeed
    import ray
    import torch
    import transformers

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "deepspeed": deepspeed.__version__,
        "cuda": torch.version.cuda or "none",
    }


def previous_rows() -> list[dict]:
    """The summary table's rows as README.md has them (results/ is not committed: a partial run
    on a fresh checkout keeps the figures of the benchmarks it did not run)."""
    text = README.read_text()
    if BEGIN not in text or END not in text:
        return []
    rows = []
    for line in text[text.index(BEGIN) : text.index(END)].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[4].startswith("`"):
            continue
        name, value, unit, target, file, measured = cells
        try:
            number: float | str = float(value)
        except ValueError:
            number = value
        row = {"file": file.strip("`"), "measured": measured, "name": name, "value": number}
        rows.append(row | {"unit": unit} | ({"target": target} if target else {}))
    return rows


def summarise() -> dict:
    ran = {p.name for p in RESULTS.glob("*.json")}
    rows = [r for r in previous_rows() if r["file"] not in ran]
    for path in sorted(RESULTS.glob("*.json")):
        if path.name == "summary.json":
            continue
        data = json.loads(path.read_text())
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(path.stat().st_mtime))
        for fig in data.get("figures", []):
            rows.append({"file": path.name, "measured": when, **fig})
    rows.sort(key=lambda r: r["file"])  # stable: each file's figures in their own order
    summary = {"env": machine(), "figures": rows}
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_table(summary: dict) -> None:
    env = ", ".join(f"{k} {v}" for k, v in summary["env"].items())
    lines = [
        BEGIN,
        f"Written by `benchmarks/run_all.py` on: {env}.",
        "",
        "| figure | value | unit | target | from | measured (UTC) |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["figures"]:
        lines.append(
            f"| {r['name']} | {r['value']} | {r['unit']} | {r.get('target', '')} "
            f"| `{r['file']}` | {r['measured']} |"
        )
    lines.append(END)
    text = README.read_text()
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## Summary (run_all)\n\n" + block + "\n"
    README.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated script names without .py")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the table")
    args = parser.parse_args()
    failed = []
    if not args.summary_only:
        failed = run_scripts(set(args.only.split(",")) if args.only else None)
    write_table(summarise())
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
