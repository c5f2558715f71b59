"""Both ends of the vLLM weight sync that run outside the `LLM` frontend (RL stage 6).

vLLM 0.33 runs its model in worker processes; the frontend reaches them only through
`LLM.collective_rpc`, whose arguments travel as msgpack. Two paths, read from the 0.33 wheel:

- In-process state dict (`VLLMEngine.load_weights`): tensors do not survive vLLM's untyped
  msgpack decode, so the frontend packs them into `bytes` (`pack_tensors`) and the worker mixin
  `WeightSyncWorkerExtension` (passed as `LLM(worker_extension_cls=...)`) stages the chunks and
  applies them with the worker's own `reload_weights` (vLLM's layerwise in-place reload).
- NCCL (clusters, learner on other GPUs): vLLM's built-in weight-transfer engine
  (`weight_transfer_config={"backend": "nccl"}`) receives; the trainer side here opens the
  matching group with vLLM's `trainer_init` and broadcasts in the announced order.

Nothing here imports vLLM at module level: the worker imports this module by qualified name, and
the unit tests import it where vLLM is absent.

A failed reload is not undone: vLLM's layerwise reload moves each layer to the meta device until
all its tensors arrive, and restores nothing when `load_weights` raises midway (0.32/0.33
`model_loader/reload/layerwise.py`). So `check_state_dict` refuses a wrong state dict before any
worker is touched, and `VLLMEngine` marks itself unusable when a reload fails after that.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

WORKER_EXTENSION = "cai_ray.engines.vllm_worker_ext.WeightSyncWorkerExtension"
DEFAULT_CHUNK_BYTES = 512 * 1024 * 1024  # per RPC; msgpack bin objects cap at 4 GiB


def pack_tensors(named: Iterable[tuple[str, Any]]) -> bytes:
    """Serialise (name, tensor) pairs to bytes, loadable with `unpack_tensors` (weights only)."""
    import torch

    # clone() detaches views from larger storages so only the tensor's own bytes travel.
    state = {name: t.detach().to("cpu").contiguous().clone() for name, t in named}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def unpack_tensors(payload: bytes) -> list[tuple[str, Any]]:
    """Inverse of `pack_tensors`; `weights_only=True` refuses anything but tensors."""
    import torch

    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return list(state.items())


def chunk_named_tensors(
    named: Iterable[tuple[str, Any]], max_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[list[tuple[str, Any]]]:
    """Group (name, tensor) pairs into chunks of at most `max_bytes` (a lone larger tensor
    forms its own chunk), keeping the original order."""
    chunk: list[tuple[str, Any]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nbytes
    if chunk:
        yield chunk


def checkpoint_shapes(model_path: str | Path) -> dict[str, tuple[int, ...]] | None:
    """{HF tensor name: shape} of a model directory's safetensors files, read from the headers
    (no weights loaded); None when the weights are not safetensors."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


def check_state_dict(
    named: Iterable[tuple[str, Any]], shapes: Mapping[str, tuple[int, ...]], *, tied: bool
) -> str | None:
    """What is wrong with sending `named` to a model whose checkpoint has `shapes` (None: all
    good): every checkpoint tensor must come, with its shape, and nothing else. The rule is
    HFEngine.load_weights': vLLM itself would keep the old values of a missing layer silently."""
    sent = {name: tuple(t.shape) for name, t in named}
    missing = sorted(set(shapes) - set(sent))
    unexpected = sorted(set(sent) - set(shapes) - ({"lm_head.weight"} if tied else set()))
    reshaped = sorted(n for n in set(sent) & set(shapes) if sent[n] != tuple(shapes[n]))
    if not (missing or unexpected or reshaped):
        return None
    return (
        f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
        f"wrong shape {[(n, sent[n], tuple(shapes[n])) for n in reshaped[:5]]}"
    )


def dtype_name(dtype: Any) -> str:
    """`torch.bfloat16` or "torch.bfloat16" -> "bfloat16", the form vLLM's update_info takes."""
    return str(dtype).removeprefix("torch.")


def weight_update_metadata(
    named: Sequence[tuple[str, Any]],
) -> tuple[list[str], list[str], list[list[int]]]:
    """Names, dtype names and shapes announced to `VLLMEngine.update_weights_from_group`, in
    the order `broadcast_named_tensors` sends them."""
    names = [name for name, _ in named]
    dtypes = [dtype_name(t.dtype) for _, t in named]
    shapes = [list(t.shape) for _, t in named]
    return names, dtypes, shapes


def open_trainer_group(*, master_address: str, master_port: int, world_size: int) -> Any:
    """Trainer side of the NCCL group (rank 0; the engine's workers join from `rank_offset`).

    Blocks until every worker has joined, so run it while the engine's
    `init_weight_update_group` call is in flight. Needs vLLM and CUDA on the trainer.
    """
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    info = {"master_address": master_address, "master_port": master_port}
    return trainer_init({**info, "world_size": world_size}, rank=0)


def broadcast_named_tensors(group: Any, named: Iterable[tuple[str, Any]]) -> None:
    """Broadcast each tensor from rank 0, one by one (the unpacked wire format the engine's
    group is initialised with), then wait for the sends to land."""
    import torch

    stream = torch.cuda.current_stream()
    for _, tensor in named:
        # NCCL sends numel elements from data_ptr(): a non-contiguous view would send garbage.
        group.broadcast(tensor.contiguous(), src=0, stream=stream)
    stream.synchronize()


def exit_when_gone(pid: int, *, interval_s: float = 1.0, grace_s: float = 10.0) -> None:
    """End this process soon after process `pid` ends: SIGTERM to itself (vLLM's handler shuts
    the engine down), then a hard exit after `grace_s`. Runs on a daemon thread.

    vLLM's engine core does not watch its frontend: a script or driver holding an engine that
    is SIGKILLed (or OOM-killed) left both its VLLM processes and their KV cache running
    (measured, issue 15). Ray kills a dead actor's child processes itself; this covers the rest.
    """

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:  # alive, another user's
                pass
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class (GPU or CPU); methods are called via `LLM.collective_rpc`.

    vLLM refuses an extension whose attribute names clash with the worker's, hence the
    `cai_` prefix. `self.reload_weights` is the worker's own method (0.32/0.33 gpu_worker.py;
    the CPU worker inherits it).
    """

    def cai_exit_with(self, pid: int) -> int:
        """Exit once the frontend process `pid` is gone (`exit_when_gone`); returns this pid.
        With one worker it runs in the engine core's process; with several, a worker's exit
        makes the core shut down."""
        if getattr(self, "_cai_watching", None) != pid:
            self._cai_watching = pid
            exit_when_gone(pid)
        return os.getpid()

    def cai_stage_weights(self, payload: bytes) -> int:
        """Keep one packed chunk until `cai_apply_staged_weights`; returns tensors staged."""
        tensors = unpack_tensors(payload)
        staged = getattr(self, "_cai_staged", None)
        if staged is None:
            staged = self._cai_staged = []
        staged.extend(tensors)
        return len(tensors)

    def cai_apply_staged_weights(self) -> int:
        """Load every staged tensor in one layerwise in-place reload; returns tensors loaded."""
        staged = getattr(self, "_cai_staged", None) or []
        self._cai_staged = []
        # Checkpoint (HF) names and layouts: the model's load_weights fuses qkv etc. itself.
        self.reload_weights(weights_iterator=iter(staged), is_checkpoint_format=True)
        return len(staged)

    def cai_clear_staged_weights(self) -> None:
        """Drop staged chunks after a failed transfer."""
        self._cai_staged = []
