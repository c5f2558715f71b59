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

SL_GENERATE, SL_TRAIN, RL_PAIRS, RL_LABEL = "sl-generate", "sl-train", "rl-pairs", "rl-label"
PM_TRAIN, RL_TRAIN, EVALUATE = "pm-train", "rl-train", "evaluate"
STAGES = (SL_GENERATE, SL_TRAIN, RL_PAIRS, RL_LABEL, PM_TRAIN, RL_TRAIN, EVALUATE)


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """`<run_dir>/<stage>`; `stage` must be one of `STAGES`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return Path(run_dir) / stage


def config_path(run_dir: str | Path) -> Path:
    """`<run_dir>/config.yaml`: the resolved config every stage writes before it starts."""
    return Path(run_dir) / "config.yaml"


def manifest_path(run_dir: str | Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / "manifest.json"


def part_dir(run_dir: str | Path, stage: str, part: str) -> Path:
    """`<run_dir>/<stage>/<part>`: a stage's shard folder (red_team, labels) or model (hf)."""
    return stage_dir(run_dir, stage) / part


def trained_model_dir(run_dir: str | Path, stage: str) -> Path:
    """`<run_dir>/<stage>/hf`: the Hugging Face model a learner stage saved (sl-, pm-, rl-train)."""
    return part_dir(run_dir, stage, "hf")


def snapshots_dir(run_dir: str | Path) -> Path:
    """`<run_dir>/rl-train/snapshots`: the policy every `snapshot_every` steps (for evaluate)."""
    return part_dir(run_dir, RL_TRAIN, "snapshots")
