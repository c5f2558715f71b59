"""LearnerWorker: one rank of a learner group, a DeepSpeed engine on its shard of the data.

A plain class: `LearnerGroup` wraps it in `ray.remote` for N ranks, or runs one in the driver
(size 0). It knows DeepSpeed, torch.distributed and checkpoints, and nothing about the loss: the
`Objective` builds the model and computes a summed loss per micro-batch.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from actors.learner.checkpoint import (
    checkpoints_dir,
    prune,
    rng_path,
    rng_state,
    set_rng_state,
    write_latest,
    write_trainer_state,
)
from cai_ray.config.learner import LearnerConfig
from cai_ray.errors import CaiRayError, ConfigError
from cai_ray.models.loading import disable_dropout
from cai_ray.profiling import span
from cai_ray.sl.objective import Objective


class LearnerWorker:
    """Rank `rank` of `world_size`: setup, then train_steps / save / load as the group says."""

    def __init__(
        self,
        config: LearnerConfig,
        objective: Objective,
        model_path: str | Path,
        out_dir: str | Path,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.config = config
        self.objective = objective
        self.model_path = str(model_path)
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.world_size = world_size
        self.engine: Any = None
        self._rows: Iterable[Mapping[str, Any]] = iter(())
        self._step = 0
        self._epoch = 0
        self._threads_before: int | None = None
        self._env_before: dict[str, str | None] = {}

    def pid(self) -> int:
        return os.getpid()

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port: rank 0 hosts the torch.distributed rendezvous."""
        if self.world_size == 1:
            return "127.0.0.1", _free_port()
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    @span("load")
    def setup(self, master_addr: str, master_port: int, *, total_steps: int) -> dict[str, Any]:
        """Join the process group and build the DeepSpeed engine; returns device facts."""
        import torch

        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        cuda = self.config.gpus_per_rank > 0
        if cuda and not torch.cuda.is_available():
            raise ConfigError(
                "gpus_per_rank > 0 but this process sees no CUDA device",
                where="learner.gpus_per_rank",
                hint="set gpus_per_rank: 0 to train on CPU",
            )
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        # Read by DeepSpeed when it is first imported: its CPU accelerator uses gloo here.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
        env = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": "0",  # Ray shows each rank only its own GPU, as device 0
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
        }
        # restored by close: in-process, a later library in the driver would read them as a
        # distributed launch (Accelerate wraps a Trainer's model in DDP)
        self._env_before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        if cuda:
            torch.cuda.set_device(self.device)
        self._init_process_group(master_addr, master_port, backend="nccl" if cuda else "gloo")
        _seed_everything(self.config.seed)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file load/save bars would break the step bar
        model = self.objective.load_model(self.model_path)
        # from_pretrained returns a model in eval mode, where transformers skips activation
        # checkpointing (it recomputes only when `self.training`) and dropout.
        model.train()
        off = self.config.disable_dropout
        if off is None:  # the objective's choice: the model's own dropout for SFT only
            off = not getattr(self.objective, "keeps_dropout", True)
        if off:
            disable_dropout(model)
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.config.compile:
            model.compile()  # in place: parameter names and checkpoints stay as they are
        self.dtype = self.config.resolved_dtype(
            cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported()
        )
        self.engine = self._build_engine(model, total_steps)
        if self.rank == 0:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return {"device": str(self.device), "dtype": self.dtype}

    def _init_process_group(self, addr: str, port: int, *, backend: str) -> None:
        import datetime

        import torch.distributed as dist

        if dist.is_initialized():
            # In-process (size 0) groups reuse the driver's world of one: DeepSpeed caches its
            # groups per process, so a destroyed and re-created group would break the next run.
            if dist.get_world_size() != 1 or self.world_size != 1:
                raise CaiRayError("torch.distributed is already initialised with other ranks")
            return
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=self.config.step_timeout_s),
        )

    def _build_engine(self, model: Any, total_steps: int) -> Any:
        import deepspeed
        import torch

        _quiet_deepspeed()
        cfg = self.config
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        # A torch optimizer: DeepSpeed's fused Adam needs a compiler toolchain we cannot assume.
        # torch's own fused kernel (CPU and CUDA) does the step in one pass over each tensor:
        # 4% faster SFT steps on tiny-20m (benchmarks/README.md, "Against a peer").
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=cfg.adam_betas,
            fused=True,
        )
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            # ZeRO-0 fp32: the rank clips itself, with the norm it reports (`_train_step`)
            "gradient_clipping": 0.0 if self._own_clip else cfg.max_grad_norm,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": self.dtype == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: cfg.lr_factor(s, total_steps)
            ),
            config=ds_config,
            dist_init_required=False,
        )
        if self.world_size == 1 and cfg.zero_stage == 0:
            # One rank has nothing to all-reduce, yet DeepSpeed's ZeRO-0 backward flattens every
            # gradient into buckets, all-reduces them over gloo and copies them back: 0.1 s of
            # a 0.5 s GRPO step on tiny-20m (benchmarks/README.md, "The RL step").
            engine.enable_backward_allreduce = False
        return engine

    @property
    def _own_clip(self) -> bool:
        """ZeRO-0 fp32 steps clip here: one foreach norm gives the clip and the logged norm
        (DeepSpeed would compute its own a second time, and reports none there)."""
        return self.config.zero_stage == 0 and self.dtype == "fp32"

    def start_epoch(self, shard: Any, *, epoch: int, skip_micro_batches: int = 0) -> None:
        """Read `shard` (rows in training order) from micro-batch `skip_micro_batches` on."""
        skip = skip_micro_batches * self.config.micro_batch_size
        self._rows = itertools.islice(iter(shard), skip, None)
        self._epoch = epoch

    def train_steps(self, k: int) -> list[dict[str, Any]]:
        """Run `k` optimizer steps; each returns the group-wide metrics of that step."""
        return [self._train_step() for _ in range(k)]

    @span("train")
    def _train_step(self) -> dict[str, Any]:
        import torch

        cfg = self.config
        start = time.perf_counter()
        batches = [self.objective.collate(self._take()) for _ in range(cfg.grad_accum)]
        units = self._all_reduce([sum(self.objective.loss_units(b) for b in batches)])[0]
        # Summed loss / global unit count, times the factors DeepSpeed divides by (grad_accum,
        # data-parallel size): the step's gradient is that of the mean over the global batch.
        scale = self.world_size * cfg.grad_accum / max(units, 1.0)
        lr = float(self.engine.get_lr()[0])
        loss_sum, tokens, extra, norm = 0.0, 0, {}, None
        for i, batch in enumerate(batches):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss, metrics = self.objective.loss(self.engine, batch)
            self.engine.backward(loss * scale)
            if self._own_clip and i == len(batches) - 1:  # the step's gradient, all-reduced
                params = [p for p in self.engine.module.parameters() if p.grad is not None]
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
            self.engine.step()
            loss_sum += float(loss.detach())
            tokens += self.objective.tokens(batch)
            for key, value in metrics.items():
                extra[key] = extra.get(key, 0.0) + float(value)
        if not self._own_clip:
            reported = self.engine.get_global_grad_norm()
            norm = None if reported is None else float(reported)
        totals = self._all_reduce([loss_sum, tokens, *extra.values()])
        self._step += 1
        seconds = time.perf_counter() - start
        return {
            "step": self._step,
            "epoch": self._epoch,
            "loss": totals[0] / max(units, 1.0),
            "lr": lr,
            "grad_norm": norm,
            "tokens": int(totals[1]),
            "loss_tokens": int(units),
            "tokens_per_s": totals[1] / seconds,
            "step_time_s": seconds,
            **{k: v / max(units, 1.0) for k, v in zip(extra, totals[2:], strict=True)},
        }

    # -- the RL loop's calls: train on rows it sends, forward passes, weights for sync --------

    def update(self, rows: list[Mapping[str, Any]], *, epochs: int, seed: int) -> list[dict]:
        """`epochs` seeded passes over this rank's `rows` in mini-batches of
        micro_batch_size * grad_accum; returns each optimizer step's group-wide metrics."""
        import random

        per_step = self.config.micro_batch_size * self.config.grad_accum
        if not rows or len(rows) % per_step:
            raise CaiRayError(
                f"rank {self.rank} got {len(rows)} rows: not a whole number of mini-batches "
                f"of {per_step}"
            )
        rng = random.Random(seed * 1_000_003 + self.rank)
        out = []
        for _ in range(epochs):
            order = list(range(len(rows)))
            rng.shuffle(order)
            self._rows = iter([rows[i] for i in order])
            out.extend(self._train_step() for _ in range(len(rows) // per_step))
        return out

    @span("infer")
    def infer(self, rows: list[Mapping[str, Any]]) -> list[Any]:
        """The objective's no-grad pass (`objective.infer`) over `rows`, micro-batch by micro-batch.

        Under ZeRO-3 a forward gathers parameters from every rank, so the group sends every
        rank the same number of rows.
        """
        import torch

        out: list[Any] = []
        size = self.config.micro_batch_size
        with torch.no_grad():
            for start in range(0, len(rows), size):
                batch = self.objective.collate(rows[start : start + size])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out.extend(self.objective.infer(self.engine, batch))
        return out

    def full_state_dict(self) -> dict[str, Any] | None:
        """The full weights (HF names, CPU tensors) on rank 0, None elsewhere: for weight sync.

        Under ZeRO-3 every rank takes part in gathering the partitioned parameters.
        """
        if self.config.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        if self.rank != 0:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def shipped_state_dict(self) -> dict[str, Any] | None:
        """`full_state_dict` for the object store: numpy arrays where the dtype has them
        (`weight_sync.to_arrays`), which Ray stores and reads without copies."""
        from actors.learner.weight_sync import to_arrays

        state = self.full_state_dict()
        return None if state is None else to_arrays(state)

    def weight_group_address(self) -> tuple[str, int]:
        """Where rank 0 hosts the NCCL weight group (actors.learner.weight_sync)."""
        from actors.learner.weight_sync import TrainerSide

        return TrainerSide.address()

    def open_weight_group(self, address: str, port: int, world_size: int) -> list[Any] | None:
        """Rank 0 joins the NCCL weight group (blocks until the engines join); returns the
        metadata of what each sync broadcasts. Other ranks only take part in the gather."""
        from actors.learner.weight_sync import TrainerSide, metadata

        state = self.full_state_dict()
        if self.rank != 0:
            return None
        self._sender = TrainerSide()
        self._sender.open(address, port, world_size)
        return list(metadata(state))

    def broadcast_weights(self) -> None:
        """Gather the full weights (every rank, for ZeRO-3) and broadcast them from rank 0."""
        state = self.full_state_dict()
        if self.rank == 0:
            self._sender.broadcast(state)

    def _take(self) -> list[Mapping[str, Any]]:
        rows = list(itertools.islice(self._rows, self.config.micro_batch_size))
        if len(rows) < self.config.micro_batch_size:
            raise RuntimeError(f"rank {self.rank}: shard ended inside epoch {self._epoch}")
        return rows

    def _all_reduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def save(self, tag: str, *, state: dict[str, Any]) -> None:
        """Write checkpoint `tag` (every rank its part); rank 0 then marks it complete."""
        import torch
        import torch.distributed as dist

        root = checkpoints_dir(self.out_dir)
        self.engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
        path = rng_path(self.out_dir, tag, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), path)
        if self.config.hf_checkpoints:
            self.save_hf(root / tag / "hf")
        dist.barrier()
        if self.rank == 0:
            write_trainer_state(self.out_dir, tag, state)
            write_latest(self.out_dir, tag)
            prune(self.out_dir, keep=self.config.keep_checkpoints)

    def save_hf(self, path: str | Path) -> None:
        """The model as an HF directory (safetensors + tokenizer), written by rank 0.

        Under ZeRO-3 every rank holds a slice of each parameter, so all ranks take part in
        gathering the full weights onto rank 0 first.
        """
        import torch.distributed as dist

        state_dict = None
        if self.config.zero_stage == 3:
            state_dict = self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank == 0:
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.engine.module.save_pretrained(tmp, state_dict=state_dict)
            self._tokenizer.save_pretrained(tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        dist.barrier()

    def load(self, tag: str) -> int:
        """Restore checkpoint `tag` (weights, optimizer, scheduler, RNG); returns its step."""
        import torch

        root = checkpoints_dir(self.out_dir)
        loaded, client = self.engine.load_checkpoint(str(root), tag=tag)
        if loaded is None:
            raise CaiRayError(f"cannot load checkpoint {tag!r}", where=str(root / tag))
        set_rng_state(torch.load(rng_path(self.out_dir, tag, self.rank), weights_only=False))
        self._step = int(client["step"])
        return self._step

    def close(self) -> None:
        """Free the engine; restore the thread count and environment (matters in-process)."""
        import torch

        self.engine = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
        for key, value in self._env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._env_before = {}


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _quiet_deepspeed() -> None:
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    try:
        import deepspeed.ops

        # The shared-memory op DeepSpeed compiles on first use (~40 s, needs a C++ compiler)
        # serves only inference all-reduce, which training never calls.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError, KeyError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
