"""Stage 1 on a real local Ray cluster: Ray Data streams prompts through the rollout and critique
actor pools; shards are exactly-once across a kill; bad rows are counted rejects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cai_ray.config import load_config
from cai_ray.data.shards import ShardStore
from cai_ray.errors import ConfigError, ConstitutionError
from cai_ray.pipeline import sl_generate

ROOT = Path(__file__).resolve().parents[2]
BASE = [
    "generation.max_new_tokens=8",
    "sl_generate.few_shot=1",
    "sl_generate.rollout.batch_size=8",
    "sl_generate.critique.batch_size=8",
]


def _cfg(tmp_path, *extra, model_dir=None):
    model = [f"models.helpful={{path: {model_dir}}}"] if model_dir else []
    return load_config(
        ROOT / "configs/local-tiny.yaml", [f"run_dir={tmp_path}", *BASE, *model, *extra]
    )


def _rows(run_dir: Path, part: str = "red_team") -> pd.DataFrame:
    return ShardStore(run_dir / "sl-generate" / part).read_table().to_pandas()


@pytest.fixture(scope="module")
def stage1(ray_cluster, tmp_path_factory, tiny_model_dir):
    """Stage 1 on 16 sample prompts (4 rounds) with helpfulness answers, run once per module."""
    run_dir = tmp_path_factory.mktemp("stage1")
    cfg = _cfg(run_dir, "data.limit=16", "sl_generate.helpful_samples=2", model_dir=tiny_model_dir)
    return cfg, sl_generate.run(cfg, progress=False)


def test_sixteen_prompts_four_rounds_every_field(stage1):
    cfg, manifest = stage1
    run_dir = Path(cfg.run_dir)
    df = _rows(run_dir)
    assert len(df) == 16 and df.prompt_id.is_unique
    out = dict(manifest["outputs"]["red_team"])
    cut = out.pop("cut_at_token_limit")
    assert out == {"rows": 16, "rejects": 0, "reject_reasons": {}}
    for row in df.itertuples():
        assert row.prompt and row.initial_answer and row.final_revision
        assert row.initial_answer_finish in ("stop", "length")
        assert len(row.rounds) == 4
        for rd in row.rounds:
            keys = ("principle_id", "critique_request", "critique", "revision_request", "revision")
            assert all(rd[k] for k in keys)
            assert rd["critique_finish"] in ("stop", "length")
            assert rd["revision_finish"] in ("stop", "length")
        assert row.final_revision == row.rounds[-1]["revision"]
        assert row.constitution_hash == manifest["constitution_hash"]
        assert row.response_model_id == row.critique_model_id == manifest["models"]["response"]
        assert row.messages[-1]["role"] == "user"
    # the manifest counts exactly the texts the rows mark as cut at max_new_tokens
    rounds = [rd for r in df.rounds for rd in r]
    assert cut == {
        "initial_answers": int((df.initial_answer_finish == "length").sum()),
        "critiques": sum(rd["critique_finish"] == "length" for rd in rounds),
        "revisions": sum(rd["revision_finish"] == "length" for rd in rounds),
        "final_revisions": sum(r[-1]["revision_finish"] == "length" for r in df.rounds),
    }
    assert cut["revisions"] > 0  # a random tiny model runs into the 32-token limit often
    helpful = _rows(run_dir, "helpful")
    assert len(helpful) == 16 and all(len(a) == 2 and all(a) for a in helpful.answers)
    assert all(len(f) == 2 and set(f) <= {"stop", "length"} for f in helpful.answers_finish)
    # a finished stage is skipped on rerun, with the same manifest
    assert sl_generate.run(cfg, progress=False)["written_at"] == manifest["written_at"]


def test_sl_train_two_ranks_zero2_lowers_the_loss_and_saves_a_model(stage1):
    import torch
    from transformers import AutoModelForCausalLM

    from cai_ray.models import load_tokenizer
    from cai_ray.pipeline import sl_train

    cfg, _ = stage1
    cfg = cfg.model_copy(deep=True)  # the local-tiny learner: 2 ranks, ZeRO-2
    assert (cfg.sl_train.learner.num_ranks, cfg.sl_train.learner.zero_stage) == (2, 2)
    manifest = sl_train.run(cfg, progress=False)
    out = manifest["outputs"]
    assert out["revision_pairs"] == 16 and out["helpful_pairs"] == 16 and out["rejects"] == 0
    steps = [json.loads(line) for line in Path(out["metrics"]).read_text().splitlines()]
    assert len(steps) == out["steps"] > 2
    assert steps[-1]["loss"] < steps[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(out["hf_dir"])
    tok = load_tokenizer(out["hf_dir"])
    ids = tok("\n\nHuman: hi\n\nAssistant:", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5


def test_bad_rows_are_counted_rejects_and_the_rest_proceeds(ray_cluster, tmp_path, tiny_model_dir):
    src = tmp_path / "prompts.jsonl"
    good = [{"prompt": f"question number {i}?"} for i in range(5)]
    lines = [json.dumps(r) for r in good[:3]]
    lines += [
        "{not json",
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": 42}),
        json.dumps(good[0]),
    ]
    lines += [json.dumps(r) for r in good[3:]]
    src.write_text("\n".join(lines) + "\n")
    cfg = _cfg(
        tmp_path / "run", f"data.red_team={src}", "sl_generate.rounds=1", model_dir=tiny_model_dir
    )
    manifest = sl_generate.run(cfg, progress=False)
    assert len(_rows(tmp_path / "run")) == 5
    out = manifest["outputs"]["red_team"]
    assert out["rejects"] == 4
    reasons = sorted(
        r["reason"].split(":")[0]
        for r in ShardStore(tmp_path / "run/sl-generate/red_team").rejects()
    )
    assert reasons == ["duplicate prompt_id", "empty prompt", "invalid JSON", "not text"]


def test_kill_and_resume_processes_each_prompt_exactly_once(tmp_path, tiny_model_dir):
    n = 200  # enough batches of 2 that the kill lands mid-stream on any machine
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(n)))
    sets = [
        f"run_dir={tmp_path / 'run'}",
        *BASE,
        f"models.helpful={{path: {tiny_model_dir}}}",
        f"data.red_team={src}",
        "data.limit=null",
        "sl_generate.rounds=1",
        "sl_generate.shard_rows=2",
        "sl_generate.rollout.batch_size=2",
        "sl_generate.critique.batch_size=2",
    ]
    cmd = [sys.executable, "-m", "cai_ray", "stage", "sl-generate", "configs/local-tiny.yaml"]
    cmd += ["--no-progress", *[f"--set={s}" for s in sets]]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    shards = tmp_path / "run" / "sl-generate" / "red_team"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(shards.glob("shard-*.parquet")):
        assert proc.poll() is None, "the stage ended before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; its local Ray cluster goes with it
    proc.wait(timeout=60)
    first = ShardStore(shards).count_rows()
    assert 0 < first < n
    assert not (tmp_path / "run" / "sl-generate" / "manifest.json").exists()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    df = _rows(tmp_path / "run")
    assert len(df) == n and df.prompt_id.is_unique


def test_pools_that_cannot_be_placed_fail_before_starting(ray_cluster, tmp_path, tiny_model_dir):
    cfg = _cfg(
        tmp_path,
        "sl_generate.rollout.size=8",
        "sl_generate.critique.size=8",
        model_dir=tiny_model_dir,
    )
    with pytest.raises(ConfigError, match=r"need 16 CPU .* cluster has 4"):
        sl_generate.run(cfg, progress=False)


def test_constitution_without_critique_principles(ray_cluster, tmp_path, tiny_model_dir):
    cfg = _cfg(
        tmp_path,
        "constitution=constitutions/examples/honesty-labeller.yaml",
        model_dir=tiny_model_dir,
    )
    with pytest.raises(ConstitutionError, match="critique"):
        sl_generate.run(cfg, progress=False)
