"""Faults a real cluster brings: worker processes killed by pid mid-stage (stages 1, 3, 4), and
workers that hang (stages fail with a clear error after their timeout instead of hanging)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cai_ray.config import load_config
from cai_ray.data.shards import ShardStore
from cai_ray.errors import CaiRayError

ROOT = Path(__file__).resolve().parents[2]
N = 60  # prompts: enough batches of 2 that a kill lands mid-stream


def worker_pids(ray, fragment: str) -> list[int]:
    """Pids of this cluster's worker processes whose title names `fragment` (a Ray Data pool
    worker is titled `ray::MapWorker(MapBatches(CritiqueWorker))`): what `pgrep` on a node
    would find, but only under this test's own raylet."""
    import psutil

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            if fragment in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:  # exited or a zombie meanwhile
            continue
    return pids


def run_and_kill(
    ray, stage_run, *, folder: Path, fragment: str, after_shard: bool = True
) -> tuple[dict, int]:
    """Run a stage in a thread; SIGKILL one `fragment` worker once the first shard is out
    (`after_shard`), else once it has worked for 0.2 s. A stream this small is one Ray Data
    block (`STREAM_BLOCK_BYTES`), so a warm task holds all of it and shards come when it ends:
    its kill is mid-block, and Ray runs the task again."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(m=stage_run()))
    thread.start()
    killed, seen = 0, None
    deadline = time.monotonic() + 300
    while thread.is_alive() and not killed and time.monotonic() < deadline:
        pids = worker_pids(ray, fragment)
        seen = (seen or time.monotonic()) if pids else None
        ready = (
            list(folder.glob("shard-*.parquet"))
            if after_shard
            else seen and (time.monotonic() - seen > 0.2)
        )
        if pids and ready:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.05)
    thread.join(timeout=600)
    assert "m" in result, "the stage did not finish"
    return result["m"], killed


def _cfg(tmp_path, model_dir, prompts: Path, *extra):
    sets = [
        f"run_dir={tmp_path}",
        f"models.helpful={{path: {model_dir}}}",
        f"data.red_team={prompts}",
        "data.limit=null",
        "generation.max_new_tokens=8",
        *extra,
    ]
    return load_config(ROOT / "configs/local-tiny.yaml", sets)


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(N)))
    return path


def _check_exactly_once(folder: Path, key: str, manifest_part: dict) -> None:
    table = ShardStore(folder, key=key).read_table().to_pandas()
    assert len(table) == N and table[key].is_unique, (len(table), table[key].duplicated().sum())
    assert manifest_part["rows"] == N and manifest_part["rejects"] == 0


# A pool's worker process by title: an actor names its class, a warm task its function.
FRAGMENT = {"actors": "CritiqueWorker", "tasks": "warm_call"}


@pytest.mark.slow
@pytest.mark.parametrize("compute", ["actors", "tasks"])
def test_stage1_survives_a_killed_critique_worker(
    ray_cluster, tmp_path, tiny_model_dir, prompts, compute
):
    from cai_ray.pipeline import sl_generate

    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        prompts,
        "sl_generate.rounds=1",
        "sl_generate.few_shot=1",
        "sl_generate.shard_rows=2",
        "sl_generate.rollout.batch_size=2",
        "sl_generate.critique.batch_size=2",
        "sl_generate.helpful_samples=0",
        f"sl_generate.rollout.compute={compute}",
        f"sl_generate.critique.compute={compute}",
    )
    folder = tmp_path / "sl-generate" / "red_team"
    manifest, killed = run_and_kill(
        ray_cluster, lambda: sl_generate.run(cfg, progress=False), folder=folder,
        fragment=FRAGMENT[compute], after_shard=compute == "actors",
    )  # fmt: skip
    assert killed
    _check_exactly_once(folder, "prompt_id", manifest["outputs"]["red_team"])


@pytest.mark.slow
def test_stage3_survives_a_killed_rollout_worker(ray_cluster, tmp_path, tiny_model_dir, prompts):
    from cai_ray.pipeline import rl_pairs

    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        prompts,
        "rl_pairs.shard_rows=2",
        "rl_pairs.rollout.batch_size=2",
        "rl_pairs.rollout.compute=actors",
    )
    folder = tmp_path / "rl-pairs" / "red_team"
    manifest, killed = run_and_kill(
        ray_cluster, lambda: rl_pairs.run(cfg, progress=False), folder=folder,
        fragment="RolloutWorker",
    )  # fmt: skip
    assert killed
    _check_exactly_once(folder, "pair_id", manifest["outputs"]["red_team"])


@pytest.mark.slow
def test_stage4_survives_a_killed_labeler_worker(ray_cluster, tmp_path, tiny_model_dir, prompts):
    from cai_ray.pipeline import rl_label

    pairs = ShardStore(tmp_path / "rl-pairs" / "red_team", key="pair_id")
    rows = [
        {
            "pair_id": f"p{i}",
            "prompt_id": f"p{i}",
            "messages": [{"role": "user", "content": f"question {i}?"}],
            "prompt": f"question {i}?",
            "source": "t",
            "row": i,
            "responses": [f"answer {i}", f"other answer {i}"],
            "temperatures": [1.0, 1.0],
        }
        for i in range(N)
    ]
    pairs.write(rows, [])
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        prompts,
        "rl_label.shard_rows=2",
        "rl_label.labeler.batch_size=2",
        "rl_label.few_shot=1",
        "rl_label.labeler.compute=tasks",  # a warm worker (one block: killed mid-block)
    )
    folder = tmp_path / "rl-label" / "labels"
    manifest, killed = run_and_kill(
        ray_cluster, lambda: rl_label.run(cfg, progress=False), folder=folder,
        fragment="warm_call", after_shard=False,
    )  # fmt: skip
    assert killed
    _check_exactly_once(folder, "pair_id", manifest["outputs"]["labels"])


def test_a_hung_reward_worker_fails_the_step_after_its_timeout(
    ray_cluster, tmp_path, tiny_model_dir, prompts
):
    from cai_ray.pipeline import rl_train

    hang = tmp_path / "hang.py"
    hang.write_text("import time\ndef reward(prompts, responses):\n    time.sleep(3600)\n")
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        prompts,
        "rl_train.reward.kind=function",
        f"rl_train.reward.function={hang}:reward",
        "rl_train.reward.max_bad_batches=0",
        "rl_train.call_timeout_s=5",
        "rl_train.steps=2",
        "rl_train.rollout={size: 1, num_cpus: 0.5}",
        "rl_train.reward_workers={size: 1, num_cpus: 0.5}",
        "rl_train.reference={size: 1, num_cpus: 0.5}",
    )
    t0 = time.monotonic()
    with pytest.raises(CaiRayError, match=r"reward_workers worker did not answer .* within 5 s"):
        rl_train.run(cfg, progress=False)
    assert time.monotonic() - t0 < 120


def test_a_stalled_prompt_source_fails_stage1_after_the_batch_timeout(tmp_path, tiny_model_dir):
    # Through the CLI, in its own process and cluster: the stream it abandons still holds its
    # actor pools until the driver exits, which it does right after printing the error.
    fifo = tmp_path / "stalled.jsonl"
    os.mkfifo(fifo)  # a reader blocks on it forever, as on a hung network mount
    sets = [
        f"run_dir={tmp_path}",
        f"models.helpful={{path: {tiny_model_dir}}}",
        f"data.red_team={fifo}",
        "ray.batch_timeout_s=5",
        "ray.num_cpus=2",
        "sl_generate.rounds=1",
    ]
    cmd = [sys.executable, "-m", "cai_ray", "stage", "sl-generate", "configs/local-tiny.yaml"]
    cmd += ["--no-progress", *[f"--set={s}" for s in sets]]
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no result for 5s; a worker may be hung" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - t0 < 240
