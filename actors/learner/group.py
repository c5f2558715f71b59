"""LearnerGroup: N DeepSpeed ranks (Ray actors in a placement group) driven by one `fit` loop.

The driver owns the loop: it cuts each epoch into per-rank shards (actors.learner.data), asks
every rank for a chunk of optimizer steps at a time, logs the returned metrics, draws the
progress bar and says when to checkpoint. Ranks talk to each other only through
torch.distributed (gloo on CPU, nccl on GPU). `num_ranks: 0` runs one rank in the driver.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from actors.learner.checkpoint import checkpoints_dir, read_latest, tag_for
from actors.learner.data import (
    EpochPlan,
    block_lengths,
    check_dataset,
    check_rows,
    dataset_shards,
    list_shards,
    row_lengths,
)
from actors.learner.metrics import MetricsSink, check_loggers, read_metrics
from actors.learner.worker import LearnerWorker
from cai_ray.config.learner import LearnerConfig
from cai_ray.errors import CaiRayError, ConfigError, DataError, find_user_error
from cai_ray.sl.objective import Objective

__all__ = ["LearnerGroup", "LearnerWorker", "LocalHandle", "RankDiedError", "TrainResult"]

log = logging.getLogger(__name__)
CHUNK_SECONDS = 2.0  # aim for one remote call per ~2 s of training: a live bar, little overhead


class RankDiedError(CaiRayError):
    """A rank's process died: the group cannot continue without restarting every rank."""


@dataclass(frozen=True)
class TrainResult:
    """What `fit` did: steps done in total, the last step's loss, where outputs are."""

    steps: int
    final_loss: float | None
    metrics_path: Path
    hf_dir: Path
    checkpoint: Path
    resumed_from: int
    rows: int
    rows_unused_per_epoch: int
    restarts: int = 0  # group restarts after a rank died


class LearnerGroup:
    """`fit(dataset)` trains `objective` from `model_path`, writing everything under `out_dir`.

    The model directory is checked before anything starts (a clear ModelError); ranks start on
    the first `fit` and stop in `shutdown` (also on any error, and as a context manager).
    """

    def __init__(
        self,
        config: LearnerConfig,
        objective: Objective,
        model_path: str | Path,
        out_dir: str | Path,
    ):
        objective.check_model(model_path)
        check_loggers(config)
        self.config = config
        self.objective = objective
        self.model_path = str(model_path)
        self.out_dir = Path(out_dir)
        self._handles: list[Any] = []
        self._pg: Any = None
        self._local = config.num_ranks == 0

    @property
    def handles(self) -> list[Any]:
        """The started ranks: Ray actor handles (an in-process stand-in for size 0)."""
        return list(self._handles)

    def fit(
        self,
        dataset: Any,
        *,
        resume: bool = False,
        progress: bool = True,
        on_chunk: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> TrainResult:
        """Train on `dataset` (a Ray Dataset or a list of rows with `idx`) to the configured end.

        `resume=True` continues from the newest complete checkpoint (or starts when there is
        none). `on_chunk` sees each chunk's per-step metrics as they arrive on the driver.
        """
        cfg = self.config
        rows, blocks, num_rows = self._prepare(dataset)
        plan = EpochPlan(
            num_rows,
            cfg.world_size,
            cfg.micro_batch_size * cfg.grad_accum,
            cfg.seed,
            cfg.shuffle,
            self._lengths(rows, blocks, num_rows) if cfg.group_by_length else None,
        )
        if plan.steps == 0:
            raise DataError(
                f"{num_rows} rows make no full global batch of {plan.global_batch}",
                hint="lower micro_batch_size, grad_accum or num_ranks, or add data",
            )
        total = min(cfg.epochs * plan.steps, cfg.max_steps or math.inf)
        start, tag = self._resume_point(resume, plan, total)
        first, hf_dir, restarts = start, self.out_dir / "hf", 0
        while True:
            try:
                if start < total or not hf_dir.is_dir():
                    self._start(total, resume_tag=tag)
                    last = self._train(
                        rows,
                        blocks,
                        plan,
                        start=start,
                        total=total,
                        progress=progress,
                        on_chunk=on_chunk,
                    )
                    self._finish(plan, total, saved=last == total)
                break
            except RankDiedError as exc:
                self.shutdown()
                restarts += 1
                if restarts > cfg.max_restarts:
                    raise
                # A dead rank takes the collective with it: restart every rank from the last
                # complete checkpoint (the steps after it are redone, their metrics replaced).
                log.warning("%s; restarting the group (%d of %d)", exc, restarts, cfg.max_restarts)
                start, tag = self._resume_point(True, plan, total)
            except BaseException:
                self.shutdown()
                raise
        history = read_metrics(self.out_dir)
        return TrainResult(
            steps=total,
            final_loss=history[-1]["loss"] if history else None,
            metrics_path=self.out_dir / "metrics.jsonl",
            hf_dir=hf_dir,
            checkpoint=checkpoints_dir(self.out_dir) / tag_for(total),
            resumed_from=first,
            rows=num_rows,
            rows_unused_per_epoch=num_rows - plan.steps * plan.global_batch,
            restarts=restarts,
        )

    def shutdown(self) -> None:
        """Stop the ranks and free their placement group (safe to call twice)."""
        handles, self._handles = self._handles, []
        if self._local:
            for h in handles:
                h.close.remote()
            return
        import ray
        from ray.util.placement_group import remove_placement_group

        for h in handles:
            ray.kill(h)
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def __enter__(self) -> LearnerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- data and resume ---------------------------------------------------------------------

    def _prepare(self, dataset: Any) -> tuple[list | None, Any, int]:
        """(rows for the in-process list path, or Arrow block refs of a Ray Dataset; row count).

        Ray Data runs here, before the ranks hold their CPUs; afterwards the ranks read the
        materialised blocks straight from the object store (actors.learner.data.BlockShard).
        """
        if isinstance(dataset, Sequence):
            rows = list(dataset)
            check_rows(rows)
            if self._local:
                return rows, None, len(rows)
            import ray

            # Blocks of ~4k rows: every rank reads each block once an epoch, one at a time.
            dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // 4096))
        ds = dataset.materialize()
        num_rows = check_dataset(ds)
        return None, ds.to_arrow_refs(), num_rows

    def _lengths(self, rows: list | None, blocks: Any, num_rows: int) -> bytes:
        """Every row's length for `group_by_length`, from the objective's token columns."""
        columns = getattr(self.objective, "length_columns", ())
        if not columns:
            raise ConfigError(
                f"{type(self.objective).__name__} rows have no token columns to group by",
                where="learner.group_by_length",
                hint="set group_by_length: false for this objective",
            )
        if rows is not None:
            return row_lengths(rows, columns)
        return block_lengths(blocks, num_rows, columns)

    def _resume_point(self, resume: bool, plan: EpochPlan, total: int) -> tuple[int, str | None]:
        """(step to start from, checkpoint tag to load or None)."""
        state = read_latest(self.out_dir)
        if state is None:
            return 0, None
        if not resume:
            raise ConfigError(
                "out_dir already holds checkpoints of an earlier run",
                where=str(checkpoints_dir(self.out_dir)),
                hint="pass resume=True to continue it, or use an empty out_dir",
            )
        want = {
            "world_size": plan.world_size,
            "global_batch": plan.global_batch,
            "num_rows": plan.num_rows,
        }
        have = {k: state.get(k) for k in want}
        if have != want:
            raise ConfigError(
                f"checkpoint {state['tag']} was written with {have}, this run has {want}",
                where=str(checkpoints_dir(self.out_dir) / state["tag"]),
                hint="resume with the same ranks, batch shape and data, or start in a new out_dir",
            )
        return min(int(state["step"]), total), state["tag"]

    # -- ranks -------------------------------------------------------------------------------

    def _start(self, total: int, *, resume_tag: str | None) -> None:
        if not self._handles:
            if self._local:
                worker = LearnerWorker(self.config, self.objective, self.model_path, self.out_dir)
                self._handles = [LocalHandle(worker)]
            else:
                self._handles = self._start_actors()
            addr, port = self._gather([self._handles[0].address.remote()])[0]
            self._gather([h.setup.remote(addr, port, total_steps=total) for h in self._handles])
        if resume_tag is not None:
            self._gather([h.load.remote(resume_tag) for h in self._handles])

    def _start_actors(self) -> list[Any]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.config
        if not ray.is_initialized():
            ray.init()
        self._pg = self._place()
        remote = ray.remote(LearnerWorker)
        return [
            remote.options(
                num_cpus=cfg.cpus_per_rank,
                num_gpus=cfg.gpus_per_rank,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=rank
                ),
            ).remote(
                cfg,
                self.objective,
                self.model_path,
                self.out_dir,
                rank=rank,
                world_size=cfg.num_ranks,
            )
            for rank in range(cfg.num_ranks)
        ]

    def _place(self) -> Any:
        """A placement group of one bundle per rank, or a clear error within the timeout."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        cfg = self.config
        bundle = self._bundle()
        pg = placement_group([dict(bundle) for _ in range(cfg.num_ranks)], strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=cfg.placement_timeout_s)
        if not ready:
            remove_placement_group(pg)
            need = {k: v * cfg.num_ranks for k, v in bundle.items()}
            total = {k: ray.cluster_resources().get(k, 0) for k in bundle}
            free = {k: ray.available_resources().get(k, 0) for k in bundle}
            raise CaiRayError(
                f"cannot place {cfg.num_ranks} learner ranks within {cfg.placement_timeout_s:g} s: "
                f"they need {need} (one bundle of {bundle} per rank); "
                f"the cluster has {total}, of which {free} is free",
                where="learner.num_ranks",
                hint="lower num_ranks, cpus_per_rank or gpus_per_rank, or add nodes",
            )
        return pg

    def _bundle(self) -> dict[str, float]:
        """The resources of one rank's bundle in the placement group."""
        cfg = self.config
        return {"CPU": cfg.cpus_per_rank} | (
            {"GPU": cfg.gpus_per_rank} if cfg.gpus_per_rank else {}
        )

    def _gather(self, refs: list[Any], *, timeout: float | None = None) -> list[Any]:
        """Results of one call on every rank; the first failing rank raises at once."""
        if self._local:
            return refs
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        timeout = timeout or self.config.step_timeout_s
        deadline = time.monotonic() + timeout
        pending = list(refs)
        try:
            while pending:  # one wait per rank, so a dead rank is seen before the slow ones
                ready, pending = ray.wait(
                    pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic())
                )
                if not ready:
                    raise GetTimeoutError
                ray.get(ready)
            return ray.get(refs)
        except GetTimeoutError:
            raise CaiRayError(
                f"learner ranks did not answer within {timeout:g} s",
                hint="raise learner.step_timeout_s, or check the ranks' logs for a hang",
            ) from None
        except RayTaskError as exc:
            user_error = find_user_error(exc)
            if user_error is not None:
                raise user_error from None
            raise CaiRayError(f"a learner rank failed: {exc.cause!r}") from exc
        except RayActorError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
            reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"
            raise RankDiedError(
                f"a learner rank died: {reason}",
                hint="fit(..., resume=True) continues from the last checkpoint",
            ) from None

    # -- the loop ----------------------------------------------------------------------------

    def _train(
        self,
        rows: list | None,
        blocks: Any,
        plan: EpochPlan,
        *,
        start: int,
        total: int,
        progress: bool,
        on_chunk: Callable[[list[dict[str, Any]]], None] | None,
    ) -> int:
        """Steps `start`..`total`; returns the step of the last checkpoint written."""
        from tqdm.auto import tqdm

        cfg = self.config
        sink = MetricsSink(self.out_dir, cfg, resume_step=start)
        bar = tqdm(total=total, initial=start, disable=not progress, unit="step", desc="train")
        step, epoch, chunk, saved, began = start, None, 1, start, time.monotonic()
        try:
            while step < total:
                if epoch != step // plan.steps:
                    epoch = step // plan.steps
                    self._start_epoch(rows, blocks, plan, epoch, done=step - epoch * plan.steps)
                k = min(
                    chunk,
                    total - step,
                    (epoch + 1) * plan.steps - step,
                    self._until_checkpoint(step),
                )
                t0 = time.monotonic()
                results = self._gather(
                    [h.train_steps.remote(k) for h in self._handles], timeout=cfg.step_timeout_s * k
                )
                metrics = [{**m, "elapsed_s": time.monotonic() - began} for m in results[0]]
                sink.log(metrics)
                step += k
                bar.update(k)
                bar.set_postfix(loss=f"{metrics[-1]['loss']:.4f}")
                if on_chunk is not None:
                    on_chunk(metrics)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self._checkpoint(plan, step, total)
                    saved = step
                chunk = max(1, min(64, int(CHUNK_SECONDS * k / max(time.monotonic() - t0, 1e-6))))
        finally:
            bar.close()
            sink.close()
        return saved

    def _until_checkpoint(self, step: int) -> int:
        every = self.config.checkpoint_every
        return every - step % every if every else 2**31

    def _start_epoch(
        self, rows: list | None, blocks: Any, plan: EpochPlan, epoch: int, *, done: int
    ) -> None:
        shards = (
            list_shards(rows, plan, epoch)
            if rows is not None
            else dataset_shards(blocks, plan, epoch)
        )
        skip = done * self.config.grad_accum
        self._gather(
            [
                h.start_epoch.remote(shard, epoch=epoch, skip_micro_batches=skip)
                for h, shard in zip(self._handles, shards, strict=True)
            ]
        )

    def _checkpoint(self, plan: EpochPlan, step: int, total: int) -> None:
        epoch, done = divmod(step, plan.steps)
        state = {
            "step": step,
            "epoch": epoch,
            "micro_batches_consumed": done * self.config.grad_accum,
            "total_steps": total,
            "world_size": plan.world_size,
            "global_batch": plan.global_batch,
            "num_rows": plan.num_rows,
            "seed": plan.seed,
        }
        self._gather([h.save.remote(tag_for(step), state=state) for h in self._handles])

    def _finish(self, plan: EpochPlan, total: int, *, saved: bool) -> None:
        """The final checkpoint (unless the loop just wrote it) and the model in `out_dir/hf`."""
        if not saved:
            self._checkpoint(plan, total, total)
        self._gather([h.save_hf.remote(self.out_dir / "hf") for h in self._handles])


class LocalHandle:
    """Gives an in-process worker the `handle.method.remote(...)` shape of an actor handle;
    `.remote` runs the method at once and returns its value in place of an ObjectRef. As Ray
    does for an actor, an ObjectRef passed as an argument arrives as its value (e.g. a learner
    rank's weights, an ObjectRef, loaded by a rollout worker in the driver)."""

    def __init__(self, worker: Any):
        self._worker = worker

    def __getattr__(self, name: str) -> SimpleNamespace:
        method = getattr(self._worker, name)

        def remote(*args: Any, **kwargs: Any) -> Any:
            if any(_is_ref(a) for a in (*args, *kwargs.values())):
                import ray

                args = tuple(ray.get(a) if _is_ref(a) else a for a in args)
                kwargs = {k: ray.get(v) if _is_ref(v) else v for k, v in kwargs.items()}
            return method(*args, **kwargs)

        return SimpleNamespace(remote=remote)


def _is_ref(value: Any) -> bool:
    """An ObjectRef, without importing ray where none can be (no ray loaded: no refs)."""
    ray = sys.modules.get("ray")
    return ray is not None and isinstance(value, ray.ObjectRef)
