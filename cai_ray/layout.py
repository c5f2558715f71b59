"""The run directory's layout: the stage names, in pipeline order, and where each stage writes.

```
<run_dir>/config.yaml           the resolved config of the run
<run_dir>/<stage>/              one folder per stage: Parquet shards, rejects, manifest.json
<run_dir>/report.html           `cai-ray report`
```
Every module that names a stage or its folder asks this one.
"""

from __future__ import annotations

from pathlib import Path

STAGES = ("sl-generate", "sl-train", "rl-pairs", "rl-label", "pm-train", "rl-train", "evaluate")


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """`<run_dir>/<stage>`; `stage` must be one of `STAGES`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return Path(run_dir) / stage


def manifest_path(run_dir: str | Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / "manifest.json"
