"""Greedy decoding with several samples (issue 15): one answer, so `n` copies on every engine,
and the stages whose samples must differ refuse it up front."""

from __future__ import annotations

import pytest

from cai_ray.config import EngineConfig, load_config
from cai_ray.errors import ConfigError


def test_rl_pairs_refuses_a_greedy_pool_with_several_samples():
    from cai_ray.pipeline.rl_pairs import temperature_groups

    with pytest.raises(ConfigError, match="temperature 0 is greedy") as info:
        temperature_groups(load_config(None, ["generation.temperature=0"]))
    assert info.value.where == "generation.temperature"
    with pytest.raises(ConfigError, match="its 2 samples"):
        temperature_groups(
            load_config(None, ["rl_pairs.samples_per_prompt=4", "rl_pairs.temperatures=[0, 1]"])
        )
    # One greedy answer beside sampled ones is a fine pair.
    cfg = load_config(None, ["rl_pairs.temperatures=[0, 1.0]"])
    assert temperature_groups(cfg) == [(0.0, 1), (1.0, 1)]


def test_rl_train_refuses_greedy_groups():
    from cai_ray.pipeline.rl_train import check_group_sampling

    grpo = ["rl_train.algorithm=grpo", "generation.temperature=0"]
    with pytest.raises(ConfigError, match="group_size"):
        check_group_sampling(load_config(None, grpo))
    check_group_sampling(load_config(None, [*grpo, "rl_train.temperature=0.8"]))
    ppo = ["rl_train.algorithm=ppo", "generation.temperature=0"]
    check_group_sampling(load_config(None, ppo))  # one sample per prompt: greedy is allowed


def test_two_vllm_engines_in_one_serve_replica_share_its_gpu():
    from cai_ray.serve.backends import split_gpu_memory

    engine = EngineConfig(kind="vllm", vllm={"gpu_memory_utilization": 0.8})
    half = split_gpu_memory(engine, 2)
    assert half.vllm.gpu_memory_utilization == pytest.approx(0.4)
    assert half.kind == "vllm" and engine.vllm.gpu_memory_utilization == 0.8
