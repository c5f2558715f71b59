"""Pool recycling on a real local Ray cluster: a streaming stage runs in rounds of
`recycle_rows` input rows, each a fresh Ray Data execution with fresh actors, and its output is
exactly once and the same as one round's, also when it resumes from a partial store."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cai_ray.config import load_config
from cai_ray.data.shards import ShardStore
from cai_ray.pipeline import rl_label, sl_generate

ROOT = Path(__file__).resolve().parents[2]
N = 10  # rounds of 4, 4 and 2 prompts
BASE = [
    "generation.max_new_tokens=6",
    "generation.temperature=0",  # greedy: the same prompt gives the same text in any round
    "data.limit=null",
    "sl_generate.rounds=1",
    "sl_generate.few_shot=0",
    "sl_generate.helpful_samples=0",
    "sl_generate.rollout.batch_size=2",
    "sl_generate.critique.batch_size=2",
    "sl_generate.shard_rows=2",
    "rl_label.few_shot=0",
    "rl_label.labeler.batch_size=2",
    "rl_label.shard_rows=2",
    "rl_label.principles_per_label=1",
    # recycling restarts a round's actors; warm task workers (`compute: tasks`) stay by design
    "sl_generate.rollout.compute=actors",
    "sl_generate.critique.compute=actors",
    "rl_label.labeler.compute=actors",
]
RECYCLE = [f"{s}.recycle_rows=4" for s in ("sl_generate.rollout", "sl_generate.critique")]
COLUMNS = ["prompt_id", "prompt", "initial_answer", "final_revision"]


def _cfg(run_dir: Path, model_dir, src: Path, *extra):
    sets = [f"run_dir={run_dir}", f"models.helpful={{path: {model_dir}}}", f"data.red_team={src}"]
    return load_config(ROOT / "configs/local-tiny.yaml", [*sets, *BASE, *extra])


def _rows(run_dir: Path, stage: str, part: str, key: str, columns) -> pd.DataFrame:
    table = ShardStore(run_dir / stage / part, key=key).read_table(columns)
    return table.to_pandas().sort_values(key).reset_index(drop=True)


def _dead_pool_actors(ray, worker: str, before: set[str]) -> list[int]:
    """Pids of the Ray Data pool actors running `worker` that ended since `before`."""
    from ray._private import state

    return [
        a["Pid"]
        for actor_id, a in state.actors().items()
        if actor_id not in before
        and a["ActorClassName"] == f"MapWorker(MapBatches({worker}))"
        and a["State"] == "DEAD"
    ]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("recycle") / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(N)))
    return src


@pytest.fixture(scope="module")
def one_round(ray_cluster, tmp_path_factory, tiny_model_dir, prompts):
    """Stage 1 over the prompts in one round (recycling off): the reference output."""
    run_dir = tmp_path_factory.mktemp("one-round")
    sets = [f"{s}.recycle_rows=null" for s in ("sl_generate.rollout", "sl_generate.critique")]
    manifest = sl_generate.run(_cfg(run_dir, tiny_model_dir, prompts, *sets), progress=False)
    assert manifest["stream_rounds"] == {"red_team": 1}
    return _rows(run_dir, "sl-generate", "red_team", "prompt_id", COLUMNS)


def test_rounds_recycle_the_pools_and_write_each_prompt_once(
    ray_cluster, tmp_path, tiny_model_dir, prompts, one_round
):
    from ray._private import state

    before = set(state.actors())
    cfg = _cfg(tmp_path, tiny_model_dir, prompts, *RECYCLE)
    manifest = sl_generate.run(cfg, progress=False)
    assert manifest["stream_rounds"] == {"red_team": 3}
    assert manifest["outputs"]["red_team"]["rows"] == N
    df = _rows(tmp_path, "sl-generate", "red_team", "prompt_id", COLUMNS)
    assert len(df) == N and df.prompt_id.is_unique
    pd.testing.assert_frame_equal(df, one_round)
    # each round started its own actors (one per pool), which ended with the round
    for worker in ("RolloutWorker", "CritiqueWorker"):
        pids = _dead_pool_actors(ray_cluster, worker, before)
        assert len(pids) == 3 and len(set(pids)) == 3, (worker, pids)


def test_resume_from_a_partial_store_in_rounds(
    ray_cluster, tmp_path, tiny_model_dir, prompts, one_round
):
    cfg = _cfg(tmp_path, tiny_model_dir, prompts, *RECYCLE)
    sl_generate.run(cfg, progress=False)
    part = tmp_path / "sl-generate" / "red_team"
    shards = sorted(part.glob("shard-*.parquet"))
    assert len(shards) == N // 2  # shards of 2 rows
    for path in shards[1:4]:  # three shards from the middle: 6 prompts to redo
        path.unlink()
    (tmp_path / "sl-generate" / "manifest.json").unlink()
    manifest = sl_generate.run(cfg, progress=False)
    assert manifest["stream_rounds"] == {"red_team": 2}  # 4, then the last 2
    df = _rows(tmp_path, "sl-generate", "red_team", "prompt_id", COLUMNS)
    assert len(df) == N and df.prompt_id.is_unique
    pd.testing.assert_frame_equal(df, one_round)


def test_labels_in_rounds_match_one_round(ray_cluster, tmp_path, tiny_model_dir, prompts):
    """Stage 4 reads stage 3's shards, not a prompt source: the same rounds, the same labels."""
    from ray._private import state

    labels = {}
    for recycle in ("null", "4"):
        run_dir = tmp_path / f"recycle-{recycle}"
        pairs = ShardStore(run_dir / "rl-pairs" / "red_team", key="pair_id")
        for start in range(0, N, 3):  # synthetic stage-3 pairs in shards of 3
            pairs.write([_pair(i) for i in range(start, min(N, start + 3))], [])
        cfg = _cfg(run_dir, tiny_model_dir, prompts, f"rl_label.labeler.recycle_rows={recycle}")
        before = set(state.actors())
        manifest = rl_label.run(cfg, progress=False)
        rounds = 1 if recycle == "null" else 3
        assert manifest["stream_rounds"] == {"labels": rounds}
        assert len(_dead_pool_actors(ray_cluster, "LabelerWorker", before)) == rounds
        out = manifest["outputs"]["labels"]
        assert out["rows"] + out["rejects"] == N
        labels[recycle] = _rows(run_dir, "rl-label", "labels", "pair_id", ["pair_id", "label"])
        assert labels[recycle].pair_id.is_unique
    pd.testing.assert_frame_equal(labels["4"], labels["null"])


def _pair(i: int) -> dict:
    q = f"question {i}?"
    return {
        "pair_id": f"p{i}", "prompt_id": f"p{i}", "messages": [{"role": "user", "content": q}],
        "prompt": q, "source": "test", "row": i, "temperatures": [1.0, 1.0],
        "responses": [f"Carefully, step {i}.", f"Quickly, step {i + 1}."],
    }  # fmt: skip
