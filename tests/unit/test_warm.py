"""Warm workers (`actors/warm.py`): a worker built once per process and key, engines shared by
model and settings only while a warm worker is built, and which pools run as warm tasks."""

from __future__ import annotations

import pandas as pd
import pytest

from actors import warm
from cai_ray.config import EngineConfig, PoolConfig, RunConfig
from cai_ray.engines import make_engine, sharing_engines


class Counting:
    built = 0

    def __init__(self, tag: str):
        Counting.built += 1
        self.tag = tag

    def __call__(self, batch):
        batch = batch.copy()
        batch["tag"] = self.tag
        return batch


@pytest.fixture(autouse=True)
def _fresh_cache():
    warm._workers.clear()
    Counting.built = 0
    yield
    warm._workers.clear()


def _call(tag: str):
    kwargs = {"tag": tag}
    key = warm.warm_key(Counting, kwargs)
    batch = pd.DataFrame({"x": [1, 2]})
    return warm.warm_call(batch, worker=Counting, kwargs=kwargs, key=key, engine=EngineConfig())


def test_a_worker_is_built_once_per_key_and_the_oldest_goes_first():
    assert list(_call("a").tag) == ["a", "a"]
    _call("a")
    assert Counting.built == 1
    for tag in "bcd":  # MAX_WORKERS = 3: "a" is evicted by the fourth key
        _call(tag)
    assert Counting.built == 4 and len(warm._workers) == warm.MAX_WORKERS
    _call("d")
    assert Counting.built == 4
    _call("a")
    assert Counting.built == 5


def test_the_key_is_the_class_and_its_arguments():
    assert warm.warm_key(Counting, {"tag": "a"}) == warm.warm_key(Counting, {"tag": "a"})
    assert warm.warm_key(Counting, {"tag": "a"}) != warm.warm_key(Counting, {"tag": "b"})


def test_engines_are_shared_only_while_a_warm_worker_is_built(tiny_model_dir):
    cfg = EngineConfig(kind="hf", threads=1)
    assert make_engine(tiny_model_dir, cfg) is not make_engine(tiny_model_dir, cfg)
    with sharing_engines():
        first = make_engine(tiny_model_dir, cfg, model_id="m")
        assert make_engine(tiny_model_dir, cfg, model_id="m") is first
        other = make_engine(tiny_model_dir, EngineConfig(kind="hf", threads=1, batch_size=2))
        assert other is not first  # other settings: its own engine
    assert make_engine(tiny_model_dir, cfg, model_id="m") is not first


def test_compute_auto_is_actors_for_gpu_pools_and_vllm():
    from cai_ray.pipeline.common import pool_compute

    cfg = RunConfig()
    assert pool_compute(PoolConfig(compute="tasks"), cfg) == "tasks"
    assert pool_compute(PoolConfig(compute="actors"), cfg) == "actors"
    assert pool_compute(PoolConfig(num_gpus=1), cfg) == "actors"
    assert pool_compute(PoolConfig(engine=EngineConfig(kind="vllm")), cfg) == "actors"
