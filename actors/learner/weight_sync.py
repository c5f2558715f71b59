"""NCCL weight sync from learner rank 0 into vLLM rollout engines (GPU clusters).

The object-store path (`RLLearnerGroup.weights` -> `load_weights`) works everywhere; on GPUs it
copies every tensor to host memory and back. It ships numpy arrays where the dtype has one
(`to_arrays`; Ray stores and reads them zero-copy, where a pickled torch tensor is copied
twice more: 0.05 against 0.2-1.2 s for tiny-20m's 80 MB) and the receiver views them as
tensors again (`to_tensors`). With `rl_train.weight_sync: nccl` rank 0 instead
forms one NCCL group with the rollout engines' workers through vLLM's weight-transfer engine
(`cai_ray.engines.vllm_worker_ext`) and broadcasts each tensor GPU to GPU: rank 0 is rank 0 of
that group, rollout worker i takes ranks 1 + i * tp .. (i + 1) * tp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cai_ray.errors import ConfigError


def to_arrays(state: Mapping[str, Any]) -> dict[str, Any]:
    """CPU tensors as numpy arrays (zero-copy in Ray's object store); a dtype numpy lacks
    (bfloat16) stays a tensor."""
    import torch

    return {
        n: t.numpy() if t.dtype != torch.bfloat16 and t.device.type == "cpu" else t
        for n, t in state.items()
    }


def to_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """`to_arrays`'s output as tensors again: views of the (read-only) arrays, to copy from."""
    import warnings

    import numpy as np
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays: only ever read here
        return {
            n: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for n, v in state.items()
        }


def resolve_weight_sync(
    mode: str,
    *,
    rollout_engine: str,
    rollout_device: str = "cuda",
    policy_gpus: float,
    ranks: int,
    colocated: bool = False,
) -> str:
    """`auto` is NCCL when vLLM rollouts on CUDA and GPU learner ranks (Ray actors) are both in
    play and the roles are not colocated; the object store otherwise (CPU engines always).

    Colocated, rollout worker i shares rank i's bundle, so with GPUs rank 0 and a vLLM worker
    can sit on one device in one NCCL group, which NCCL refuses ("Duplicate GPU detected").

    >>> resolve_weight_sync("auto", rollout_engine="hf", policy_gpus=0, ranks=2)
    'object_store'
    >>> resolve_weight_sync("auto", rollout_engine="vllm", policy_gpus=1, ranks=1, colocated=True)
    'object_store'
    """
    problems = []
    if rollout_engine != "vllm" or rollout_device != "cuda":
        problems.append(f"rollout engine {rollout_engine!r} on {rollout_device!r}")
    if not (policy_gpus > 0 and ranks >= 1):
        problems.append(f"policy.gpus_per_rank={policy_gpus}, policy.num_ranks={ranks}")
    if colocated:
        problems.append("placement=colocated")
    if mode == "auto":
        return "object_store" if problems else "nccl"
    if mode == "nccl" and problems:
        raise ConfigError(
            "weight_sync=nccl needs vLLM rollout engines on CUDA, policy ranks on GPUs and "
            f"separate placement ({'; '.join(problems)})",
            where="rl_train.weight_sync",
            hint="use weight_sync: object_store (or auto)",
        )
    return mode


class TrainerSide:
    """Rank 0's end of the group: opened once, then one broadcast per sync."""

    def __init__(self) -> None:
        self.group: Any = None

    @staticmethod
    def address() -> tuple[str, int]:
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def open(self, address: str, port: int, world_size: int) -> None:
        from cai_ray.engines.vllm_worker_ext import open_trainer_group

        self.group = open_trainer_group(
            master_address=address, master_port=port, world_size=world_size
        )

    def broadcast(self, state: dict[str, Any]) -> None:
        from cai_ray.engines.vllm_worker_ext import broadcast_named_tensors

        named = [(k, v.to("cuda")) for k, v in state.items()]
        broadcast_named_tensors(self.group, named)


def metadata(state: dict[str, Any]) -> tuple[list[str], list[str], list[list[int]]]:
    """Names, dtypes and shapes in broadcast order (what the engines expect to receive)."""
    from cai_ray.engines.vllm_worker_ext import weight_update_metadata

    return weight_update_metadata(list(state.items()))
