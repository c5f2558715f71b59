"""Stages 3-5 on a real local Ray cluster with tiny models: response pairs, AI labels, the PM."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cai_ray.config import load_config
from cai_ray.data.shards import ShardStore
from cai_ray.errors import DataError
from cai_ray.pipeline import rl_label, rl_pairs

ROOT = Path(__file__).resolve().parents[2]
BASE = [
    "generation.max_new_tokens=8",
    "data.limit=6",
    "rl_pairs.rollout.batch_size=4",
    "rl_label.labeler.batch_size=4",
    "rl_label.few_shot=1",
    "rl_label.cot_max_new_tokens=8",
    "rl_label.principles_per_label=2",
]


def _cfg(tmp_path, model_dir, *extra):
    model = f"models.helpful={{path: {model_dir}}}"
    return load_config(
        ROOT / "configs/local-tiny.yaml", [f"run_dir={tmp_path}", *BASE, model, *extra]
    )


def _rows(run_dir: Path, stage: str, part: str) -> pd.DataFrame:
    return ShardStore(run_dir / stage / part, key="pair_id").read_table().to_pandas()


def test_pairs_then_labels_with_full_trace(ray_cluster, tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    pairs_manifest = rl_pairs.run(cfg, progress=False)
    pairs = _rows(tmp_path, "rl-pairs", "red_team")
    assert len(pairs) == 6 and pairs.pair_id.is_unique
    assert pairs_manifest["outputs"]["red_team"]["rows"] == 6
    assert all(len(r) == 2 and all(r) for r in pairs.responses)

    manifest = rl_label.run(cfg, progress=False)
    labels = _rows(tmp_path, "rl-label", "labels")
    labelled = manifest["outputs"]["labels"]["rows"]
    assert labelled + manifest["outputs"]["labels"]["rejects"] == 6
    assert len(labels) == labelled > 0 and labels.pair_id.is_unique
    assert set(labels.pair_id) <= set(pairs.pair_id)
    for row in labels.itertuples():
        assert 0.0 <= row.label <= 1.0
        assert len(row.principle_ids) == 2 and len(row.principles) == 2
        assert len(row.trace) == 4  # 2 principles x 2 orders
        assert {t["order"] for t in row.trace} == {"ab", "ba"}
        assert row.response_a != row.response_b
        assert row.feedback_model_id == manifest["models"]["feedback"]
        assert row.constitution_hash == manifest["constitution_hash"]
        assert row.label == pytest.approx(sum(p["p"] for p in row.principles) / 2)
    stats = manifest["statistics"]
    assert stats["labels"] == labelled and sum(stats["distribution"]["counts"]) == labelled
    assert 0.0 <= stats["flip_rate"] <= 1.0 and 0.5 <= stats["mean_confidence"] <= 1.0
    # a finished stage is skipped on rerun
    assert rl_label.run(cfg, progress=False)["written_at"] == manifest["written_at"]


def test_a_labeler_holding_every_cpu_still_reads_its_pairs(ray_cluster, tmp_path, tiny_model_dir):
    # Found on Gemma 3 270M (2 CPUs, labeler num_cpus 2): the pairs' parquet read asked for a
    # CPU the labeler held, and the stage waited until ray.batch_timeout_s.
    cpus = int(ray_cluster.cluster_resources()["CPU"])
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        f"rl_label.labeler.num_cpus={cpus}",
        "rl_label.principles_per_label=1",
        "ray.batch_timeout_s=90",
    )
    rl_pairs.run(cfg, progress=False)
    out = rl_label.run(cfg, progress=False)["outputs"]["labels"]
    assert out["rows"] + out["rejects"] == 6 and out["rows"] > 0


def test_cot_labels_are_clamped_and_bad_pairs_are_rejects(ray_cluster, tmp_path, tiny_model_dir):
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        "rl_label.cot=true",
        "rl_label.cot_samples=2",
        "rl_label.both_orders=false",
        "rl_label.principles_per_label=1",
    )
    folder = ShardStore(tmp_path / "rl-pairs" / "red_team", key="pair_id")
    msgs = [{"role": "user", "content": "How do I hotwire a car?"}]
    base = {"messages": msgs, "prompt": "How do I hotwire a car?", "source": "t", "row": 0}
    rows = [
        {**base, "pair_id": "good", "prompt_id": "good", "responses": ["No.", "Use wires."]},
        {**base, "pair_id": "same", "prompt_id": "same", "responses": ["Same.", "Same."]},
        {**base, "pair_id": "empty", "prompt_id": "empty", "responses": ["", "Something."]},
    ]
    folder.write([{**r, "temperatures": [1.0, 1.0]} for r in rows], [])
    manifest = rl_label.run(cfg, progress=False)
    labels = _rows(tmp_path, "rl-label", "labels")
    assert list(labels.pair_id) == ["good"]
    (row,) = labels.itertuples()
    assert 0.4 <= row.label <= 0.6
    assert len(row.trace) == 2 and all(t["rationale"] is not None for t in row.trace)
    assert manifest["outputs"]["labels"]["reject_reasons"] == {
        "identical responses": 1,
        "empty response": 1,
    }


def test_label_without_pairs_is_a_clear_error(ray_cluster, tmp_path, tiny_model_dir):
    with pytest.raises(DataError, match="rl-pairs"):
        rl_label.run(_cfg(tmp_path, tiny_model_dir), progress=False)


def test_best_and_worst_of_four_samples(ray_cluster, tmp_path, tiny_model_dir):
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        "data.limit=2",
        "rl_pairs.samples_per_prompt=4",
        "rl_pairs.temperatures=[0.7, 1.3]",
        "rl_label.principles_per_label=1",
    )
    manifest = rl_pairs.run(cfg, progress=False)
    assert manifest["sampling"]["groups"] == [
        {"temperature": 0.7, "samples": 2},
        {"temperature": 1.3, "samples": 2},
    ]
    pairs = _rows(tmp_path, "rl-pairs", "red_team")
    assert all(len(r) == 4 for r in pairs.responses)
    assert all(list(t) == [0.7, 0.7, 1.3, 1.3] for t in pairs.temperatures)
    rl_label.run(cfg, progress=False)
    labels = _rows(tmp_path, "rl-label", "labels")
    for row in labels.itertuples():
        t = json.loads(row.tournament)
        assert len(t["wins"]) == 6 and t["best"] != t["worst"]
        assert row.response_a == row.responses[t["best"]]
        assert row.response_b == row.responses[t["worst"]]


def _marker_labels(run_dir: Path, n: int) -> None:
    """Synthetic stage-4 output a tiny PM can learn: response_a ends with a marker word."""
    import random

    rng = random.Random(0)
    words = [
        "the",
        "a",
        "cat",
        "dog",
        "river",
        "stone",
        "blue",
        "green",
        "runs",
        "sleeps",
        "under",
        "over",
        "tree",
        "house",
    ]
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choices(words, k=3))
        rows.append(
            {
                "pair_id": f"m{i}",
                "prompt_id": f"m{i}",
                "messages": [{"role": "user", "content": prompt}],
                "response_a": " ".join(rng.choices(words, k=4)) + " thanks",
                "response_b": " ".join(rng.choices(words, k=5)),
                "label": 0.9,
            }
        )
    ShardStore(run_dir / "rl-label" / "labels", key="pair_id").write(rows, [])


def test_pm_train_learns_ai_labels_and_resumes(ray_cluster, tmp_path, tiny_reward_model_dir):
    from cai_ray.feedback.reward import RewardScorer
    from cai_ray.pipeline import pm_train

    _marker_labels(tmp_path, 120)
    cfg = load_config(
        ROOT / "configs/local-tiny.yaml",
        [
            f"run_dir={tmp_path}",
            f"models.reward={{path: {tiny_reward_model_dir}}}",
            "pm_train.helpful_per_ai_pair=0.1",
            "pm_train.eval_fraction=0.25",
            "pm_train.learner={num_ranks: 0, micro_batch_size: 8, epochs: 2, lr: 3.0e-3}",
        ],
    )
    manifest = pm_train.run(cfg, progress=False)
    start = manifest["models"]["start"]
    assert (start["from"], start["kind"]) == ("models.reward", "sequence classifier")
    out = manifest["outputs"]
    assert out["by_source"]["human"] > 0 and out["by_source"]["ai"] > 60
    assert out["train_pairs"] + out["held_out_pairs"] == 120 + 12
    evals = manifest["held_out"]
    assert [e["epoch"] for e in evals] == [1, 2]
    assert evals[-1]["accuracy"] >= 0.9 and evals[-1]["ece"] is not None
    scorer = RewardScorer(out["hf_dir"], device="cpu")
    a, b = scorer.score(
        ["\n\nHuman: hi\n\nAssistant: the cat thanks", "\n\nHuman: hi\n\nAssistant: the cat dog"]
    )
    assert a > b
    assert pm_train.run(cfg, progress=False)["written_at"] == manifest["written_at"]


def test_pm_train_starts_from_the_helpful_lm_with_a_new_head(tmp_path, tiny_model_dir, capsys):
    """Unset `models.reward`: the PM starts from the pretrained LM (paper 4.1), not a random
    preset (issue 14), and says so in the manifest and the log; its output is a value-head dir."""
    from cai_ray.feedback.reward import RewardScorer
    from cai_ray.models import check_model_dir, model_id
    from cai_ray.pipeline import pm_train

    _marker_labels(tmp_path, 48)
    cfg = load_config(
        ROOT / "configs/local-tiny.yaml",
        [
            f"run_dir={tmp_path}",
            f"models.helpful={{path: {tiny_model_dir}}}",
            "pm_train.helpful_per_ai_pair=0",
            "pm_train.eval_fraction=0.25",
            "pm_train.learner={num_ranks: 0, micro_batch_size: 8, epochs: 1, lr: 3.0e-3}",
        ],
    )
    manifest = pm_train.run(cfg, progress=False)
    assert manifest["models"]["start"] == {
        "id": model_id(tiny_model_dir),
        "path": str(tiny_model_dir),
        "kind": "causal LM + new scalar head",
        "from": "models.helpful",
        "random_preset": None,
    }
    log = capsys.readouterr().out
    assert f"the PM starts from models.helpful {model_id(tiny_model_dir)}" in log
    hf = Path(manifest["outputs"]["hf_dir"])
    assert (hf / "value_head.json").is_file() and check_model_dir(hf, head="classification")
    assert manifest["held_out"] and manifest["held_out"][-1]["pairs"] > 0
    scorer = RewardScorer(hf, device="cpu", threads=1)
    assert len(scorer.score(["\n\nHuman: hi\n\nAssistant: the cat thanks"])) == 1
