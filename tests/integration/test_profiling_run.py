"""`CAI_RAY_PROFILE_DIR` on a real run: the driver and the pool workers (separate processes of a
fresh local Ray cluster) write spans, and the stage's time split adds up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai_ray import profiling

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("compute", ["actors", "tasks"])
def test_stage_one_writes_spans_from_driver_and_workers(tmp_path, tiny_model_dir, compute):
    """Actors: one process per pool, each loading the model. Tasks (warm workers): the red-team
    and the helpful-answer executions run in Ray's reused processes, each loading it once."""
    prof = tmp_path / "spans"
    helpful = 0 if compute == "actors" else 2
    sets = [
        f"run_dir={tmp_path / 'run'}",
        f"models.helpful={{path: {tiny_model_dir}}}",
        "data.limit=4",
        "ray.num_cpus=2",
        "sl_generate.rounds=1",
        f"sl_generate.helpful_samples={helpful}",
        f"sl_generate.rollout.compute={compute}",
        f"sl_generate.critique.compute={compute}",
        "generation.max_new_tokens=4",
    ]
    cmd = [sys.executable, "-m", "cai_ray", "stage", "sl-generate", "configs/local-tiny.yaml"]
    cmd += ["--no-progress", *[f"--set={s}" for s in sets]]
    env = {**os.environ, profiling.ENV: str(prof)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    spans = profiling.read_spans(prof)
    stage = [s for s in spans if s["kind"] == "stage:sl-generate"]
    assert len(stage) == 1
    driver = stage[0]["pid"]
    kinds = {s["kind"] for s in spans}
    assert {"ray_init", "load", "generate"} <= kinds
    workers = {s["pid"] for s in spans if s["kind"] == "generate"}
    loads = [s["pid"] for s in spans if s["kind"] == "load"]
    assert driver not in workers and set(loads) == workers
    # 4 red-team prompts in one batch: 1 rollout call, 1 critique + 1 revision call
    red_team = 3
    if compute == "actors":  # the rollout and the critique pool: two processes, a load each
        assert len(workers) == 2 and len(loads) == 2
        assert sum(s["kind"] == "generate" for s in spans) == red_team
    else:  # one load per process for both workers, both parts (the engine is shared)
        assert len(loads) == len(workers) <= 2
        assert sum(s["kind"] == "generate" for s in spans) > red_team  # the helpful answers too

    window = (stage[0]["t0"], stage[0]["t1"])
    part = profiling.split(window, spans)
    assert 0 < part["compute_s"] < part["wall_s"]
    assert part["compute_by_kind_s"]["generate"] == pytest.approx(part["compute_s"])
    assert part["setup_s"]["ray_init"] > 0 and part["setup_s"]["load"] > 0
    total = part["startup_s"] + part["compute_s"] + part["gaps_s"] + part["tail_s"]
    assert total == pytest.approx(part["wall_s"])


def test_compute_auto_is_warm_tasks_on_a_one_node_cluster(ray_cluster):
    from cai_ray.config import EngineConfig, PoolConfig, RunConfig
    from cai_ray.pipeline.common import pool_compute

    cfg = RunConfig(engine=EngineConfig(kind="hf"))
    assert len(ray_cluster.nodes()) == 1
    assert pool_compute(PoolConfig(), cfg) == "tasks"
    assert pool_compute(PoolConfig(num_gpus=0.5), cfg) == "actors"
