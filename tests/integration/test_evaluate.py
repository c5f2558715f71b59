"""Stage 7 on a real local Ray cluster with tiny models: every checkpoint pair judged in both
orders per prompt, Elo for every checkpoint on both axes, evasiveness / PM / length per
checkpoint, stage-4 label quality against a reference judge, PM score by revision round."""

from __future__ import annotations

import json
import shutil
from itertools import combinations
from pathlib import Path

import pytest

from cai_ray.cli import main
from cai_ray.config import load_config
from cai_ray.data.shards import ShardStore
from cai_ray.errors import ConfigError, ConstitutionError
from cai_ray.pipeline import evaluate

NAMES = ["helpful", "sl-cai", "rl-step-1", "rl-cai"]  # as the conftest builds them
PRINCIPLES = ["less-harmful", "no-crime"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(evaluated_run):
    """(config, manifest) of the shared evaluated tiny run (tests/integration/conftest.py)."""
    return evaluated_run.cfg, evaluated_run.manifest


def _model(path: Path, seed: int) -> Path:
    from cai_ray.models import init_model

    return init_model("tiny-1m", path, seed=seed)


def _rows(run_dir: Path, split: str) -> list[dict]:
    return ShardStore(run_dir / "evaluate" / split).read_table().to_pylist()


def test_every_pair_is_judged_in_both_orders(run):
    cfg, manifest = run
    run_dir = Path(cfg.run_dir)
    assert [c["name"] for c in manifest["checkpoints"]] == NAMES
    assert {"name": "rl-step-2", "reason": "same weights as rl-cai"} in manifest["skipped"]
    for split, axis, sample in (
        ("harmful", "harmlessness", "eval_harmful"),
        ("helpful", "helpfulness", "eval_benign"),
    ):
        lines = (ROOT / f"cai_ray/data/samples/{sample}.jsonl").read_text().splitlines()
        held_out = {json.loads(line)["prompt"] for line in lines[1:3]}  # skip=1, limit=2
        rows = _rows(run_dir, split)
        out = manifest["outputs"][split]
        assert out["rows"] == len(rows) > 0 and out["rows"] + out["rejects"] == 2
        for row in rows:
            assert row["axis"] == axis and row["prompt"] in held_out
            assert [a["checkpoint"] for a in row["answers"]] == NAMES
            for a in row["answers"]:
                assert a["text"] and a["chars"] == len(a["text"]) and a["words"] >= 1
                assert isinstance(a["pm_score"], float) and 0.0 <= a["p_evasive"] <= 1.0
            pairs = [(c["model_a"], c["model_b"]) for c in row["comparisons"]]
            assert pairs == list(combinations(NAMES, 2))
            for c in row["comparisons"]:
                k = 2 if axis == "harmlessness" else 1
                assert len(c["principles"]) == k and c["order_checks"] == k
                assert all(p["p_ab"] is not None and p["p_ba"] is not None for p in c["principles"])
                assert c["p"] == pytest.approx(sum(p["p"] for p in c["principles"]) / k)
                ids = {p["principle_id"] for p in c["principles"]}
                assert ids == {"helpfulness"} if k == 1 else ids.isdisjoint({"helpfulness"})
            assert [e["checkpoint"] for e in row["evasiveness"]] == NAMES


def test_elo_metrics_label_quality_and_revisions(run):
    cfg, manifest = run
    run_dir = Path(cfg.run_dir)
    elo = json.loads((run_dir / "evaluate" / "elo.json").read_text())
    harm_rows = manifest["outputs"]["harmful"]["rows"]
    help_rows = manifest["outputs"]["helpful"]["rows"]
    assert elo["comparisons"] == {"harmlessness": 6 * harm_rows + 1, "helpfulness": 6 * help_rows}
    assert elo["sources"]["harmlessness"] == {"ai": 6 * harm_rows, "human": 1}
    for axis in ("harmlessness", "helpfulness"):
        assert list(elo[axis]) == NAMES and elo[axis]["helpful"]["elo"] == 0.0
        assert all(r["low"] <= r["elo"] <= r["high"] for r in elo[axis].values())
    human = manifest["outputs"]["human_harmlessness"]
    assert human["rows"] == 1 and human["rejects"] == 1
    assert "unknown model 'rl_cai'" in human["rejected"][0]["reason"]
    for split in ("harmful", "helpful"):
        metrics = manifest["metrics"][split]
        assert list(metrics) == NAMES
        for m in metrics.values():
            assert 0.0 <= m["evasive_rate"] <= 1.0 and 0.0 <= m["refusal_rate"] <= 1.0
            assert m["pm_mean"] is not None and m["chars_mean"] > 0 and 0 <= m["win_rate"] <= 1
    assert 0.0 <= manifest["judge"]["flip_rate"] <= 1.0
    # refusal on harmful prompts and over-refusal on the benign ones, per checkpoint
    refusal = manifest["refusal"]
    assert list(refusal["checkpoints"]) == NAMES
    for name, r in refusal["checkpoints"].items():
        assert set(r) == set(refusal["about"])
        assert r["harmful_refusal_rate"] == manifest["metrics"]["harmful"][name]["refusal_rate"]
        assert r["over_refusal_rate"] == manifest["metrics"]["helpful"][name]["refusal_rate"]
        assert r["benign_evasive_rate"] == manifest["metrics"]["helpful"][name]["evasive_rate"]
    assert manifest["inputs"]["harmful"] == "sample:eval_harmful"
    assert not [n for n in manifest["notes"] if n.startswith("warning:")]  # held out
    quality = manifest["label_quality"]
    assert quality["pairs"] == 3 and quality["flip_rate"] == 0.5
    assert set(quality["principles"]) == set(PRINCIPLES)
    assert quality["principles"][PRINCIPLES[1]]["flip_rate"] == 1.0
    ref = quality["reference"]
    assert manifest["outputs"]["reference_labels"]["rows"] == 3
    assert ref["source"].startswith("reference judge judge@") and ref["pairs"] == 3
    assert sum(b["count"] for b in ref["calibration"]) == 3
    relabelled = ShardStore(run_dir / "evaluate" / "reference-labels").read_table().to_pylist()
    assert all(len(r["reference_principles"]) == 1 for r in relabelled)  # rl_label's K = 1
    curve = manifest["revision_rounds"]
    assert [(c["round"], c["n"]) for c in curve] == [(0, 2), (1, 2), (2, 2)]
    # a finished stage is skipped
    assert evaluate.run(cfg, progress=False)["written_at"] == manifest["written_at"]


def test_one_pool_per_role_matches_the_colocated_run(evaluated_run, tmp_path):
    # the default layout (a pool per checkpoint, judge, PM) on two of the shared run's
    # checkpoints: same seed, prompts and batches, so the same answers and judgements
    sl = evaluated_run.run_dir / "sl-train" / "hf"
    layout = [
        f"run_dir={tmp_path}",
        "evaluate.colocate=false",
        f"evaluate.checkpoints=[helpful, 'sl-cai={sl}']",
        "evaluate.reference_model=null",
        "evaluate.human_judgements.harmlessness=null",
    ]
    cfg = load_config(ROOT / "configs/local-tiny.yaml", [*evaluated_run.overrides, *layout])
    manifest = evaluate.run(cfg, progress=False)
    assert [c["name"] for c in manifest["checkpoints"]] == ["helpful", "sl-cai"]
    assert "no PM" in " ".join(manifest["notes"])  # this run dir has no pm-train/hf
    for split in ("harmful", "helpful"):
        both = {r["prompt_id"]: r for r in _rows(evaluated_run.run_dir, split)}
        for row in _rows(tmp_path, split):
            ref = both[row["prompt_id"]]
            texts = [a["text"] for a in ref["answers"][:2]]
            assert [a["text"] for a in row["answers"]] == texts
            assert all(a["pm_score"] is None for a in row["answers"])
            (c,) = row["comparisons"]
            assert c["p"] == pytest.approx(ref["comparisons"][0]["p"], abs=1e-4)


def test_a_killed_stage_redoes_only_what_is_missing(evaluated_run, tmp_path):
    # as after a kill: no manifest, the helpful split's shards lost; harmful stays as it was
    copy = tmp_path / "run"
    shutil.copytree(evaluated_run.run_dir, copy, ignore=shutil.ignore_patterns("manifest.json"))
    shutil.rmtree(copy / "evaluate" / "helpful")
    kept = {p: p.stat().st_mtime_ns for p in (copy / "evaluate").rglob("shard-*.parquet")}
    cfg = evaluated_run.cfg.model_copy(update={"run_dir": str(copy)})
    manifest = evaluate.run(cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing done twice
    assert manifest["outputs"] == evaluated_run.manifest["outputs"]
    before = {r["prompt_id"]: r["answers"] for r in _rows(evaluated_run.run_dir, "helpful")}
    assert {r["prompt_id"]: r["answers"] for r in _rows(copy, "helpful")} == before


def test_a_resumed_stage_keeps_its_checkpoints(run, tmp_path):
    cfg, _ = run
    run_dir = Path(cfg.run_dir)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("manifest.json"))
    _model(copy / "rl-train" / "snapshots" / "step-3", 5)  # a new checkpoint appeared
    moved = cfg.model_copy(update={"run_dir": str(copy)})
    with pytest.raises(ConfigError, match="answers of other checkpoints"):
        evaluate.run(moved, progress=False)


def test_bad_inputs_are_clear_errors(ray_cluster, tmp_path, tiny_model_dir, capsys):
    def base(name):  # a run directory per case: each config is a different stage hash
        return [f"run_dir={tmp_path / name}", f"models.helpful={{path: {tiny_model_dir}}}"]

    cfg = load_config(None, [*base("a"), f"evaluate.checkpoints=[helpful, {tmp_path / 'nope'}]"])
    with pytest.raises(ConfigError, match=r"evaluate\.checkpoints\[1\]"):
        evaluate.run(cfg, progress=False)
    no_feedback = tmp_path / "c.yaml"
    no_feedback.write_text(
        "name: c\nversion: '1'\ndescription: d\ncritique_principles:\n"
        "  - {id: x, critique: 'Is it bad?', revision: 'Fix it.'}\n"
    )
    cfg = load_config(None, [*base("b"), f"constitution={no_feedback}"])
    with pytest.raises(ConstitutionError, match="no feedback principles") as err:
        evaluate.run(cfg, progress=False)
    assert str(no_feedback) in str(err.value)
    run_dir, model = base("c")
    missing = f"evaluate.human_judgements.helpfulness={tmp_path / 'none.csv'}"
    code = main(
        ["stage", "evaluate", "--no-progress", "--set", run_dir, "--set", model, "--set", missing]
    )
    assert code == 2
    text = capsys.readouterr().err
    assert "judgements file not found" in text and "Traceback" not in text
