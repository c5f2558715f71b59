"""The cluster configs hold what README "Running on a Ray cluster" says they hold."""

from pathlib import Path

import pytest

from cai_ray.config import PROJECT_ROOT, load_config
from cai_ray.errors import ConfigError

CONFIGS = PROJECT_ROOT / "configs"


def test_cluster_tiny_joins_the_cluster_and_spreads_over_two_small_nodes():
    cfg = load_config(CONFIGS / "cluster-tiny.yaml")
    assert cfg.ray.address == "auto" and cfg.ray.num_cpus is None
    # `ray job submit --working-dir .` runs in a temporary copy: only an absolute path survives
    assert Path(cfg.run_dir).is_absolute()
    learner = cfg.sl_train.learner
    assert (learner.num_ranks, learner.zero_stage) == (2, 3)
    # two of these never fit one 2-CPU node: the test's nodes each take one
    assert 2 * learner.cpus_per_rank > 2
    assert cfg.sl_generate.rollout.num_cpus + cfg.sl_generate.critique.num_cpus > 2


def test_gpu_example_uses_vllm_tensor_parallel_and_zero3_on_gpus():
    cfg = load_config(CONFIGS / "gpu-cluster.example.yaml")
    assert cfg.ray.address == "auto" and Path(cfg.run_dir).is_absolute()
    assert cfg.engine.kind == "vllm"
    labeler = cfg.rl_label.labeler
    assert labeler.engine.kind == "vllm"
    assert labeler.engine.vllm.tensor_parallel_size == labeler.num_gpus > 1
    groups = [
        cfg.sl_train.learner,
        cfg.pm_train.learner,
        cfg.rl_train.policy,
        cfg.rl_train.value,
    ]
    for group in groups:
        assert group.zero_stage == 3 and group.gpus_per_rank == 1 and group.num_ranks > 1
    assert cfg.sl_train.learner.num_ranks > 8  # more ranks than one 8-GPU node: across nodes
    rl = cfg.rl_train
    for role in (rl.rollout, rl.reward_workers, rl.reference):
        assert role.num_gpus >= 1
    gpus = sum(r.size * r.num_gpus for r in (rl.rollout, rl.reward_workers, rl.reference))
    gpus += rl.policy.num_ranks + rl.value.num_ranks
    assert gpus <= 16  # the example's 2 nodes x 8 GPUs


@pytest.mark.parametrize("uri", ["s3://bucket/runs/x", "gs://bucket/x", "file:///tmp/x"])
def test_run_dir_uri_is_an_error_not_a_local_folder(uri):
    with pytest.raises(ConfigError, match="run_dir must be a file system path"):
        load_config(None, [f"run_dir={uri}"])
