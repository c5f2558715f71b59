"""Shared fixtures: tiny random-weight models built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny-1m causal LM directory (random weights, seed 0), built once per session."""
    from cai_ray.models import init_model

    return init_model("tiny-1m", tmp_path_factory.mktemp("models") / "tiny-1m-causal")


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory):
    """A tiny-1m sequence-classification (num_labels=1) directory, built once per session."""
    from cai_ray.models import init_model

    return init_model(
        "tiny-1m",
        tmp_path_factory.mktemp("models") / "tiny-1m-classification",
        head="classification",
    )
