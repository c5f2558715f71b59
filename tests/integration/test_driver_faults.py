"""The driver (`cai-ray run`) killed with SIGKILL during each stage in turn: the same command
resumes every time, and the final outputs equal those of an uninterrupted run (counts, ids)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai_ray import profiling
from cai_ray.data.shards import ShardStore
from cai_ray.pipeline.runner import IMPLEMENTED

ROOT = Path(__file__).resolve().parents[2]
SETS = [  # the default local run, cut to what still gives every stage work to interrupt
    "data.limit=8",
    "generation.max_new_tokens=8",
    "sl_generate.rounds=1",
    "sl_generate.helpful_samples=0",
    "sl_train.helpful_per_revision=0",
    "evaluate.limit=2",
    "evaluate.bootstrap=20",
    "sl_generate.rollout.batch_size=2",
    "sl_generate.critique.batch_size=2",
    "sl_generate.shard_rows=2",
    "rl_pairs.shard_rows=2",
    "rl_label.shard_rows=2",
    "rl_train.steps=4",
    "rl_train.checkpoint_every=1",
    "ray.num_cpus=4",
]
# Folders of rows keyed by id, per stage: what "the same outputs" compares.
KEYED = {
    "sl-generate": [("red_team", "prompt_id")],
    "rl-pairs": [("red_team", "pair_id")],
    "rl-label": [("labels", "pair_id")],
}


def _cmd(run_dir: Path, model_dir: Path) -> list[str]:
    sets = [f"run_dir={run_dir}", f"models.helpful={{path: {model_dir}}}", *SETS]
    return [
        sys.executable, "-m", "cai_ray", "run", "configs/local-tiny.yaml", "--no-progress",
        *[f"--set={s}" for s in sets],
    ]  # fmt: skip


def _reap_session(sid: int, timeout: float = 60) -> None:
    """Kill and wait out every process left in the killed driver's session (Ray workers run in
    their own process groups): the rerun then starts its cluster on a quiet machine, as a user's
    rerun would, instead of racing the old cluster's processes for ports."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        if not left:
            return
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        time.sleep(0.2)


def _started_work(stage_dir: Path, spans: Path) -> bool:
    """The stage opened its folder and wrote something beyond its stamp (a shard, a
    checkpoint, a metrics line), or one of its model calls finished (a profiling span after
    the stamp: a small stage may write all its shards in one burst just before its manifest):
    killing now lands in the middle of its work."""
    stamp = stage_dir / "stage.json"
    if not stamp.is_file() or (stage_dir / "manifest.json").exists():
        return False
    if any(p.is_file() and p.name != "stage.json" for p in stage_dir.rglob("*")):
        return True
    since = stamp.stat().st_mtime
    return any(
        s["t1"] >= since and profiling.is_compute(s["kind"]) for s in profiling.read_spans(spans)
    )


def _summary(run_dir: Path) -> dict:
    out: dict = {}
    for stage in IMPLEMENTED:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        counts = {
            k: v.get("rows") if isinstance(v, dict) else v
            for k, v in manifest.get("outputs", {}).items()
            if isinstance(v, int | dict) and not isinstance(v, bool)
        }
        ids = {
            f"{part}/{key}": sorted(ShardStore(run_dir / stage / part, key=key).stored_keys())
            for part, key in KEYED.get(stage, [])
        }
        out[stage] = {"counts": counts, "ids": ids}
    steps = [
        json.loads(x)["step"]
        for x in (run_dir / "rl-train/metrics.jsonl").read_text().split("\n")
        if x
    ]
    out["rl-train"]["metric_steps"] = steps
    return out


@pytest.mark.slow
def test_the_driver_killed_in_every_stage_resumes_to_the_same_outputs(tmp_path, tiny_model_dir):
    reference = tmp_path / "reference"
    done = subprocess.run(
        _cmd(reference, tiny_model_dir), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    env = {**os.environ, profiling.ENV: str(tmp_path / "spans")}
    killed_in = []
    for stage in IMPLEMENTED:
        log = tmp_path / f"driver-{stage}.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                _cmd(run, tiny_model_dir), cwd=ROOT, start_new_session=True, env=env,
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if _started_work(run / stage, tmp_path / "spans"):
                    killed_in.append(stage)
                    break
                time.sleep(0.02)
            if proc.poll() is not None:  # it ended on its own: say how, with its log
                pytest.fail(f"driver ended before {stage} (exit {proc.returncode}): "
                            f"{log.read_text()[-3000:]}")  # fmt: skip
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
            proc.wait(timeout=60)
            _reap_session(proc.pid)
        assert not (run / stage / "manifest.json").exists() or stage not in killed_in
    # Every stage was interrupted in the middle of its work (none finished in under a poll).
    assert killed_in == list(IMPLEMENTED)
    done = subprocess.run(
        _cmd(run, tiny_model_dir), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = _summary(reference), _summary(run)
    for stage in IMPLEMENTED:
        assert got[stage] == want[stage], stage
