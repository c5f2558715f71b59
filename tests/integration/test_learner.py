"""The DeepSpeed learner group on CPU: in-process and 2 Ray ranks, ZeRO 0/2/3, checkpoints, resume.

Real tiny models, real DeepSpeed (gloo), a local Ray with 4 logical CPUs. The parity and resume
tests compare runs step by step: the global batch at each step is the same rows whatever the
number of ranks (actors/learner/data.py), so the curves agree up to float reduction order.
Ray comes from the session fixture `ray_cluster` (tests/integration/conftest.py).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from actors.learner.data import EpochPlan, list_shards
from actors.learner.group import LearnerGroup
from actors.learner.metrics import read_metrics
from cai_ray.config.learner import LearnerConfig
from cai_ray.errors import CaiRayError, ConfigError, DataError, ModelError
from cai_ray.sl.objective import SFTObjective

TOPICS = ["locks", "fire", "poison", "cars", "banks", "phones", "drugs", "knives"]


@pytest.fixture(scope="module")
def rows16(tiny_model_dir):
    """16 SFT rows built the stage-2 way: select final revisions, render, tokenize."""
    from cai_ray.data.conversation import Conversation, render
    from cai_ray.models import load_tokenizer
    from cai_ray.sl.sft_data import build_sft_examples, select_sft_pairs

    chains = [
        {
            "prompt_id": f"p{i}",
            "messages": [{"role": "user", "content": f"How do I misuse {TOPICS[i % 8]} {i}?"}],
            "rounds": [
                {"revision": "Sure."},
                {"revision": f"I can't help with harming anyone with {TOPICS[i % 8]}."},
            ],
        }
        for i in range(16)
    ]
    pairs = select_sft_pairs(chains, mode="final").pairs
    tok = load_tokenizer(tiny_model_dir)
    items = [
        (
            p.prompt_id,
            render(Conversation.from_messages(p.messages), fmt="transcript"),
            " " + p.response,
        )
        for p in pairs
    ]
    examples, rejected = build_sft_examples(tok, items, max_seq_len=64)
    assert len(examples) == 16 and not rejected
    return examples


def objective(model_dir) -> SFTObjective:
    from cai_ray.models import load_tokenizer

    return SFTObjective(pad_id=load_tokenizer(model_dir).pad_token_id)


def cfg(**kw) -> LearnerConfig:
    base = dict(micro_batch_size=4, lr=3e-3, tensorboard=False, cpus_per_rank=1, step_timeout_s=120)
    return LearnerConfig(**{**base, **kw})


def losses(out_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(out_dir)]


def hf_weights(hf_dir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def assert_same_weights(a, b, *, atol: float) -> None:
    wa, wb = hf_weights(a), hf_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_allclose(wa[key], wb[key], atol=atol, err_msg=key)


# -- pure ordering -------------------------------------------------------------------------------


def test_a_global_step_holds_the_same_rows_for_any_rank_count():
    rows = [{"idx": i} for i in range(20)]
    one = EpochPlan(20, world_size=1, per_rank_step=8, seed=3, shuffle=True)
    two = EpochPlan(20, world_size=2, per_rank_step=4, seed=3, shuffle=True)
    (single,) = list_shards(rows, one, epoch=0)
    r0, r1 = list_shards(rows, two, epoch=0)
    assert one.steps == two.steps == 2 and len(single) == 16  # 4 rows left over this epoch
    for step in range(2):
        expect = {r["idx"] for r in single[8 * step : 8 * step + 8]}
        assert {
            r["idx"] for r in r0[4 * step : 4 * step + 4] + r1[4 * step : 4 * step + 4]
        } == expect
    (next_epoch,) = list_shards(rows, one, epoch=1)
    assert [r["idx"] for r in next_epoch] != [r["idx"] for r in single]  # reshuffled
    with pytest.raises(DataError):
        list_shards([{"idx": 0}, {"idx": 0}], EpochPlan(2, 1, 1, 0, True), 0)


def _padding(shard: list, micro: int) -> int:
    """Pad tokens of a rank's micro-batches: each is padded to its longest row."""
    out = 0
    for i in range(0, len(shard), micro):
        sizes = [len(r["input_ids"]) for r in shard[i : i + micro]]
        out += max(sizes) * len(sizes) - sum(sizes)
    return out


def test_group_by_length_pads_less_and_keeps_every_step_the_same_for_any_rank_count():
    import random

    from actors.learner.data import row_lengths

    rng = random.Random(0)
    rows = [{"idx": i, "input_ids": [1] * rng.randint(8, 512)} for i in range(1000)]
    lengths = row_lengths(rows, ("input_ids",))
    plain = EpochPlan(1000, 1, 8, seed=3, shuffle=True)
    one = EpochPlan(1000, 1, 8, seed=3, shuffle=True, lengths=lengths)
    two = EpochPlan(1000, 2, 4, seed=3, shuffle=True, lengths=lengths)
    (random_order,) = list_shards(rows, plain, epoch=0)
    (grouped,) = list_shards(rows, one, epoch=0)
    assert sorted(r["idx"] for r in grouped) == sorted(r["idx"] for r in random_order)
    assert len({r["idx"] for r in grouped}) == len(grouped) == 1000  # each row once
    assert _padding(grouped, 4) < 0.1 * _padding(random_order, 4)
    longest = [max(len(r["input_ids"]) for r in grouped[i : i + 8]) for i in range(0, 1000, 8)]
    assert longest[:64] != sorted(longest[:64], reverse=True)  # steps do not run long to short
    r0, r1 = list_shards(rows, two, epoch=0)
    for step in range(one.steps):
        expect = {r["idx"] for r in grouped[8 * step : 8 * step + 8]}
        assert {r["idx"] for r in r0[4 * step : 4 * step + 4] + r1[4 * step : 4 * step + 4]} == (
            expect
        )
    (again,) = list_shards(rows, one, epoch=0)
    (later,) = list_shards(rows, one, epoch=1)
    assert [r["idx"] for r in again] == [r["idx"] for r in grouped]  # resume finds its place
    assert [r["idx"] for r in later] != [r["idx"] for r in grouped]  # a new order each epoch


def test_dataset_lengths_are_the_rows_lengths(ray_cluster):
    import ray

    from actors.learner.data import block_lengths, row_lengths

    rows = [{"idx": i, "ids_a": [1] * (i % 7 + 1), "ids_b": [2] * (i % 5 + 1)} for i in range(50)]
    refs = ray.data.from_items(rows, override_num_blocks=4).materialize().to_arrow_refs()
    cols = ("ids_a", "ids_b")
    assert block_lengths(refs, 50, cols) == row_lengths(rows, cols)


# -- in-process (size 0) -------------------------------------------------------------------------


@pytest.mark.integration
def test_length_grouped_batches_learn(tiny_model_dir, rows16, tmp_path):
    config = cfg(epochs=3, group_by_length=True)
    with LearnerGroup(config, objective(tiny_model_dir), tiny_model_dir, tmp_path) as group:
        result = group.fit(rows16, progress=False)
    curve = losses(tmp_path)
    assert result.steps == 12 and curve[-1] < 0.8 * curve[0]


@pytest.mark.integration
def test_in_process_group_lowers_the_loss(tiny_model_dir, rows16, tmp_path):
    config = cfg(epochs=3, checkpoint_every=4, keep_checkpoints=2, tensorboard=True)
    with LearnerGroup(config, objective(tiny_model_dir), tiny_model_dir, tmp_path) as group:
        result = group.fit(rows16, progress=False)
    curve = losses(tmp_path)
    assert result.steps == 12 and len(curve) == 12
    assert curve[-1] < 0.8 * curve[0]
    row = read_metrics(tmp_path)[-1]
    assert {
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "elapsed_s",
    } <= set(row)
    assert row["lr"] == pytest.approx(3e-3) and row["grad_norm"] > 0 and row["epoch"] == 2
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-12"
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-12", "step-8"]  # keep_checkpoints=2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ConfigError, match="resume=True"):  # no silent overwrite of a finished run
        LearnerGroup(cfg(epochs=3), objective(tiny_model_dir), tiny_model_dir, tmp_path).fit(rows16)


@pytest.mark.integration
def test_an_in_process_group_leaves_the_environment_as_it_found_it(
    tiny_model_dir, rows16, tmp_path, monkeypatch
):
    """The rank's RANK/WORLD_SIZE/... are set while it trains and gone after: left behind, a
    later Trainer in the same process sets itself up as distributed (DDP)."""
    import os

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "users-own-host")
    with LearnerGroup(cfg(max_steps=1), objective(tiny_model_dir), tiny_model_dir, tmp_path) as g:
        g.fit(rows16, progress=False)
        assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0"
    assert {k: os.environ.get(k) for k in keys} == {
        **dict.fromkeys(keys),
        "MASTER_ADDR": "users-own-host",
    }


@pytest.mark.integration
def test_a_compiled_model_trains_the_same_and_saves_the_same_names(
    tiny_model_dir, rows16, tmp_path
):
    """`compile: true` (torch.compile, inductor): the same loss curve as eager up to kernel
    rounding, and an HF dir with the eager model's parameter names."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        with LearnerGroup(cfg(max_steps=3, compile=compiled), objective(tiny_model_dir),
                          tiny_model_dir, out) as group:  # fmt: skip
            group.fit(rows16, progress=False)
        runs[compiled] = out
    np.testing.assert_allclose(losses(runs[True]), losses(runs[False]), rtol=1e-4)
    assert losses(runs[True])[-1] < losses(runs[True])[0]
    assert sorted(hf_weights(runs[True] / "hf")) == sorted(hf_weights(runs[False] / "hf"))
    assert_same_weights(runs[True] / "hf", runs[False] / "hf", atol=1e-4)
    with pytest.raises(ValueError, match="ZeRO 0-2"):
        cfg(compile=True, zero_stage=3)


@pytest.mark.integration
def test_activation_checkpointing_recomputes_every_layer_and_trains_the_same(
    tiny_model_dir, rows16, tmp_path, monkeypatch
):
    """`gradient_checkpointing: true` runs each decoder layer's forward again in the backward
    (the model trains in train mode: transformers checkpoints only then), with the same losses."""
    from transformers.models.llama import modeling_llama

    calls: list[bool] = []  # a layer's MLP: the decoder layer's own forward holds the checkpoint
    forward = modeling_llama.LlamaMLP.forward

    def counted(self, *args, **kwargs):
        calls.append(self.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    counts, runs = {}, {}
    for checkpointing in (False, True):
        calls.clear()
        out = tmp_path / f"checkpointing-{checkpointing}"
        with LearnerGroup(cfg(max_steps=2, gradient_checkpointing=checkpointing),
                          objective(tiny_model_dir), tiny_model_dir, out) as group:  # fmt: skip
            group.fit(rows16, progress=False)
        counts[checkpointing], runs[checkpointing] = len(calls), out
        assert calls and all(calls)  # every training forward in train mode
    assert counts[True] == 2 * counts[False]
    np.testing.assert_allclose(losses(runs[True]), losses(runs[False]), rtol=1e-5)


@pytest.mark.integration
def test_dropout_is_the_objectives_choice_and_can_be_turned_off(tiny_model_dir, rows16, tmp_path):
    """A model with attention dropout trains with it under SFT (the model's own), and without
    it where the objective or `learner.disable_dropout` says so: then exactly as the same
    weights with no dropout in their config."""
    import dataclasses
    import json
    import shutil

    from cai_ray.feedback.pm_objective import PreferenceObjective
    from cai_ray.rl.objectives import DPOObjective, PolicyObjective, ValueObjective

    @dataclasses.dataclass(frozen=True)
    class NoDropoutSFT(SFTObjective):
        keeps_dropout = False

    dropout_dir = tmp_path / "dropout-model"
    shutil.copytree(tiny_model_dir, dropout_dir)
    config = json.loads((dropout_dir / "config.json").read_text())
    (dropout_dir / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))

    pad = objective(tiny_model_dir).pad_id

    def run(name, model_dir, sft=None, **kw):
        sft = sft or SFTObjective(pad_id=pad)
        with LearnerGroup(cfg(max_steps=3, **kw), sft, model_dir, tmp_path / name) as group:
            group.fit(rows16, progress=False)
        return losses(tmp_path / name)

    plain = run("plain", tiny_model_dir)
    kept = run("kept", dropout_dir)  # SFT: the model's own dropout
    assert not np.allclose(kept, plain, rtol=1e-3)
    off = run("off", dropout_dir, disable_dropout=True)
    np.testing.assert_allclose(off, plain, rtol=1e-5)
    by_objective = run("by-objective", dropout_dir, NoDropoutSFT(pad_id=pad))
    np.testing.assert_allclose(by_objective, plain, rtol=1e-5)
    assert not np.allclose(
        run("forced-on", dropout_dir, NoDropoutSFT(pad_id=pad), disable_dropout=False),
        plain,
        rtol=1e-3,
    )
    assert SFTObjective.keeps_dropout
    for trains_without in (PreferenceObjective, ValueObjective, PolicyObjective, DPOObjective):
        assert not trains_without.keeps_dropout, trains_without


@pytest.mark.integration
def test_a_model_that_is_not_a_causal_lm_is_a_model_error(tiny_reward_model_dir, tmp_path):
    with pytest.raises(ModelError, match="causal"):
        LearnerGroup(cfg(), objective(tiny_reward_model_dir), tiny_reward_model_dir, tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        LearnerGroup(cfg(), SFTObjective(), tmp_path / "nowhere", tmp_path)


@pytest.mark.integration
def test_rows_must_be_numbered_by_idx(ray_cluster, tiny_model_dir, rows16, tmp_path):
    shifted = [{**row, "idx": row["idx"] + 1} for row in rows16]
    group = LearnerGroup(cfg(max_steps=1), objective(tiny_model_dir), tiny_model_dir, tmp_path)
    with pytest.raises(DataError, match="'idx' must number the 16 rows"):
        group.fit(shifted, progress=False)
    with pytest.raises(DataError, match="'idx' must number the 16 rows"):
        group.fit(ray_cluster.data.from_items(shifted), progress=False)
    with pytest.raises(DataError, match="no full global batch"):
        group.fit(rows16[:3], progress=False)


# -- 2 ranks -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_two_ranks_zero2_learn_and_save_a_loadable_model(
    ray_cluster, tiny_model_dir, rows16, tmp_path
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = cfg(num_ranks=2, zero_stage=2, micro_batch_size=2, epochs=3)
    with LearnerGroup(config, objective(tiny_model_dir), tiny_model_dir, tmp_path) as group:
        result = group.fit(rows16, progress=False)
    curve = losses(tmp_path)
    assert result.steps == 12 and curve[-1] < 0.8 * curve[0]
    model = AutoModelForCausalLM.from_pretrained(result.hf_dir)
    tok = AutoTokenizer.from_pretrained(result.hf_dir)
    ids = tok("\n\nHuman: How do I misuse fire?\n\nAssistant:", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert not torch.equal(before["lm_head.weight"], model.state_dict()["lm_head.weight"])


@pytest.mark.integration
def test_in_process_and_two_ranks_agree_step_by_step(ray_cluster, tiny_model_dir, rows16, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    dataset = ray_cluster.data.from_items(rows16)  # a Ray Dataset in-process, a list on 2 ranks
    with LearnerGroup(
        cfg(grad_accum=2, max_steps=4, epochs=2), objective(tiny_model_dir), tiny_model_dir, one
    ) as g:
        g.fit(dataset, progress=False)
    config = cfg(num_ranks=2, zero_stage=2, max_steps=4, epochs=2)  # 2 ranks x 4 rows = 8 rows too
    with LearnerGroup(config, objective(tiny_model_dir), tiny_model_dir, two) as g:
        g.fit(rows16, progress=False)
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    norms = [[row["grad_norm"] for row in read_metrics(d)] for d in (one, two)]
    np.testing.assert_allclose(norms[1], norms[0], rtol=1e-4)
    assert_same_weights(one / "hf", two / "hf", atol=1e-5)


# 16 rows / 4 per step = 4 steps per epoch: a resumed run crosses an epoch boundary.
RESUME_SHAPE = dict(
    micro_batch_size=2, max_steps=6, epochs=2, checkpoint_every=2, keep_checkpoints=5
)


def _uninterrupted(model_dir, rows, tmp_path):
    """The reference run (in-process, the same global batch as 2 ranks x 2 rows)."""
    ref = tmp_path / "ref"
    with LearnerGroup(cfg(**RESUME_SHAPE, grad_accum=2), objective(model_dir), model_dir, ref) as g:
        g.fit(rows, progress=False)
    return ref


@pytest.mark.integration
def test_killed_group_resumes_and_matches_an_uninterrupted_run(
    ray_cluster, tiny_model_dir, rows16, tmp_path
):
    ref, run = _uninterrupted(tiny_model_dir, rows16, tmp_path), tmp_path / "run"
    config = cfg(**RESUME_SHAPE, num_ranks=2, zero_stage=2, max_restarts=0)
    group = LearnerGroup(config, objective(tiny_model_dir), tiny_model_dir, run)

    def kill_after_step_3(metrics: list[dict]) -> None:
        if metrics[-1]["step"] >= 3:
            ray_cluster.kill(group.handles[1])

    with pytest.raises(CaiRayError, match="died"):
        group.fit(rows16, progress=False, on_chunk=kill_after_step_3)
    assert group.handles == []  # the failed group shut itself down
    stopped_at = (run / "checkpoints" / "latest").read_text().strip()
    assert stopped_at in ("step-2", "step-4")

    with LearnerGroup(config, objective(tiny_model_dir), tiny_model_dir, run) as group:
        result = group.fit(rows16, resume=True, progress=False)
    assert result.resumed_from == int(stopped_at.split("-")[1]) and result.steps == 6
    assert [row["step"] for row in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(losses(run), losses(ref), rtol=1e-5)
    assert_same_weights(ref / "hf", run / "hf", atol=1e-5)


@pytest.mark.integration
def test_a_rank_killed_by_pid_restarts_the_group_from_its_checkpoint(
    ray_cluster, tiny_model_dir, rows16, tmp_path
):
    import os
    import signal

    ref, run = _uninterrupted(tiny_model_dir, rows16, tmp_path), tmp_path / "run"
    group = LearnerGroup(
        cfg(**RESUME_SHAPE, num_ranks=2, zero_stage=2),
        objective(tiny_model_dir),
        tiny_model_dir,
        run,
    )
    killed: list[int] = []

    def kill_rank_1_after_step_3(metrics: list[dict]) -> None:
        if metrics[-1]["step"] >= 3 and not killed:
            killed.append(ray_cluster.get(group.handles[1].pid.remote(), timeout=60))
            os.kill(killed[0], signal.SIGKILL)

    with group:
        result = group.fit(rows16, progress=False, on_chunk=kill_rank_1_after_step_3)
    assert killed and result.restarts == 1 and result.steps == 6
    assert [row["step"] for row in read_metrics(run)] == [1, 2, 3, 4, 5, 6]  # redone, not doubled
    np.testing.assert_allclose(losses(run), losses(ref), rtol=1e-5)
    assert_same_weights(ref / "hf", run / "hf", atol=1e-5)


@pytest.mark.integration
def test_zero3_gathers_a_complete_hf_dir(ray_cluster, tiny_model_dir, rows16, tmp_path):
    config = cfg(num_ranks=2, zero_stage=3, micro_batch_size=2, max_steps=2)
    with LearnerGroup(config, objective(tiny_model_dir), tiny_model_dir, tmp_path) as group:
        result = group.fit(rows16, progress=False)
    saved, original = hf_weights(result.hf_dir), hf_weights(tiny_model_dir)
    assert saved.keys() == original.keys()
    assert all(saved[k].shape == original[k].shape for k in saved)  # not ZeRO-3 slices
    assert any(not np.array_equal(saved[k], original[k]) for k in saved)
    assert (tmp_path / "checkpoints" / "step-2" / "hf" / "model.safetensors").is_file()


@pytest.mark.integration
def test_zero3_gathers_a_complete_value_head_pm(ray_cluster, tiny_model_dir, tmp_path):
    """A PM over the causal LM's decoder (issue 14): ZeRO-3 slices gathered into a value-head
    dir that reloads whole, the decoder trained and the head written beside it."""
    import torch

    from cai_ray.feedback.pm_objective import PreferenceObjective
    from cai_ray.models.value_head import load_scalar_model

    rows = [
        {"idx": i, "ids_a": [0, 5 + i % 7, 9, 3], "ids_b": [0, 6, 20 + i % 5], "label": 1.0}
        for i in range(16)
    ]
    config = cfg(num_ranks=2, zero_stage=3, micro_batch_size=2, max_steps=2)
    with LearnerGroup(config, PreferenceObjective(pad_id=2), tiny_model_dir, tmp_path) as group:
        result = group.fit(rows, progress=False)
    saved = load_scalar_model(result.hf_dir).state_dict()
    start = load_scalar_model(tiny_model_dir, new_head=True).state_dict()
    assert saved.keys() == start.keys()
    assert all(saved[k].shape == start[k].shape for k in saved)  # not ZeRO-3 slices
    assert any(not torch.equal(saved[k], start[k]) for k in saved if k.startswith("backbone."))
    assert (tmp_path / "checkpoints" / "step-2" / "hf" / "value_head.safetensors").is_file()


@pytest.mark.integration
def test_more_ranks_than_the_cluster_holds_fail_before_starting(
    ray_cluster, tiny_model_dir, rows16, tmp_path
):
    config = cfg(num_ranks=8, micro_batch_size=1, placement_timeout_s=2)
    group = LearnerGroup(config, objective(tiny_model_dir), tiny_model_dir, tmp_path)
    began = time.monotonic()
    with pytest.raises(CaiRayError, match=r"cannot place 8 learner ranks") as err:
        group.fit(rows16, progress=False)
    assert time.monotonic() - began < 30
    assert "'CPU': 8.0" in str(err.value) and "the cluster has {'CPU': 4.0}" in str(err.value)
    assert group.handles == [] and not (tmp_path / "checkpoints").exists()
