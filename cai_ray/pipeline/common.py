"""What every stage driver shares: its folder and manifest, Ray start-up, the prompt stream.

A streaming stage's `run` keeps only its own steps; `StageContext` owns the skeleton:
`open` (config stamp, skip when finished), `start` (clock, Ray, pools fit the cluster),
`stream` (a part's ShardStore, its Ray Data pipeline over what is not done yet, drained into
shards and rejects with a progress bar, in rounds of fresh pool actors) and `finish` (the
manifest, with the stage's time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai_ray import layout, profiling
from cai_ray.config import (
    ModelConfig,
    PoolConfig,
    RayConfig,
    RunConfig,
    WorkersConfig,
    resolve_path,
)
from cai_ray.data.conversation import PromptFormat
from cai_ray.data.shards import (
    KeyIndex,
    ShardStore,
    atomic_write_text,
    read_manifest,
    reject_counts,
    write_manifest,
)
from cai_ray.errors import CaiRayError, ConfigError, DataError, find_user_error
from cai_ray.layout import SL_TRAIN, trained_model_dir


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: its directory, content id and chat-template arguments."""

    path: Path
    id: str
    template_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)

    def prompt_format(self, kind: str) -> PromptFormat:
        """How this model reads prompts in the run's format (no tokenizer attached yet)."""
        return PromptFormat(kind, dict(self.template_kwargs))  # type: ignore[arg-type]


@dataclass
class StageContext:
    """A stage's folder, the hash of the config it depends on, and its finished manifest."""

    cfg: RunConfig
    stage: str
    stage_dir: Path
    stage_hash: str
    finished: dict[str, Any] | None
    t0: float | None = None  # set by `start`: the stage's clock for timings.total_s
    rounds: dict[str, int] = field(default_factory=dict)  # `stream`'s rounds per part

    @classmethod
    def open(cls, cfg: RunConfig, stage: str, *, sections: tuple[str, ...]) -> StageContext:
        """Refuse to mix outputs of two configs in one folder; report a finished stage."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the stage draws its own bar; per-file bars are noise
        stage_dir = layout.stage_dir(cfg.run_dir, stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(layout.config_path(cfg.run_dir), cfg.to_yaml())
        dump = cfg.model_dump(mode="json")
        relevant = {k: dump[k] for k in (*sections, "seed", "constitution", "format")}
        digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()
        stamp = stage_dir / "stage.json"
        if stamp.is_file():
            old = json.loads(stamp.read_text()).get("stage_hash")
            if old != digest:
                raise ConfigError(
                    f"{stage_dir} holds outputs of a different config (its {', '.join(sections)} "
                    "settings changed)",
                    where=str(stamp),
                    hint="use a new run_dir, or delete that stage folder to redo the stage",
                )
        else:
            atomic_write_text(stamp, json.dumps({"stage": stage, "stage_hash": digest}) + "\n")
        manifest = read_manifest(stage_dir)
        finished = manifest if manifest and manifest.get("complete") else None
        if finished:
            print(f"{stage}: finished earlier, skipping ({stage_dir / 'manifest.json'})")
        return cls(cfg, stage, stage_dir, digest, finished)

    @property
    def constitution_path(self) -> Path:
        return resolve_path(self.cfg.constitution)

    def constitution(self):
        from cai_ray.constitution import load_constitution

        return load_constitution(self.constitution_path)

    def model(self, model: ModelConfig, *, head: str = "causal") -> ModelRef:
        from cai_ray.models import ensure_model, model_id

        path = ensure_model(model, run_dir=self.cfg.run_dir, head=head)
        return ModelRef(Path(path), model_id(path), dict(model.chat_template_kwargs))

    def start(self, pools: dict[str, PoolConfig], *, meanwhile=None):
        """Start the stage's clock, join Ray and check the actor pools fit the cluster; returns
        `meanwhile()`, run in a thread while a local Ray starts (stage 1 builds its models then:
        the start is ~3 s of waiting on Ray's own processes), else before joining Ray."""
        from concurrent.futures import ThreadPoolExecutor

        import ray

        self.t0 = time.perf_counter()
        starts_here = self.cfg.ray.address is None and "RAY_ADDRESS" not in os.environ
        if meanwhile is None or ray.is_initialized() or not starts_here:
            # joining a cluster (a `ray job submit` driver): nothing to overlap, and its
            # runtime-env set-up must not run beside model building (it moved the cwd under it)
            result = meanwhile() if meanwhile is not None else None
            ensure_ray(self.cfg.ray)
        else:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.stage) as side:
                pending = side.submit(meanwhile)
                try:
                    ensure_ray(self.cfg.ray)
                finally:
                    result = pending.result()  # its error first
        check_pool_fits(pools, ray.cluster_resources())
        return result

    def stream(
        self,
        part: str,
        build,
        *,
        pools: Iterable[PoolConfig],
        key: str = "prompt_id",
        shard_rows: int,
        extra: dict[str, Any],
        expand,
        desc: str,
        progress: bool,
    ) -> ShardStore:
        """Stream one output part, `<stage>/<part>/`, in rounds: `build(done_keys, rows)` makes
        the Ray Data pipeline over the first `rows` input rows not done yet (None: nothing is
        left); its rows become shards and rejects (`drain`).

        `rows` is the smallest `recycle_rows` of the `pools` the pipeline uses (None: all in one
        round). Each round is a fresh Ray Data execution, so its pool actors start fresh: a Ray
        Data actor worker grows with every task it runs (upstream), and recycling bounds that.
        Every input row ends as one output row (a row or a reject), so a round whose pipeline
        gives fewer than `rows` has read the rest of the input and is the last.
        """
        from tqdm import tqdm

        store = ShardStore(self.stage_dir / part, key=key)
        rows = min((p.recycle_rows for p in pools if p.recycle_rows), default=None)
        bar = tqdm(desc=desc, unit="prompt", disable=not progress)
        self.rounds[part] = 0
        while True:
            ds = build(store.done_keys(), rows)
            if ds is None:
                break
            taken = drain(
                ds, store, self.cfg, shard_rows=shard_rows, extra=extra, expand=expand,
                desc=desc, bar=bar,
            )  # fmt: skip
            del ds  # the round's dataset (and the done keys it holds) goes before the next
            self.rounds[part] += 1
            if rows is None or taken < rows:  # a round taking nothing ends it too
                break
        bar.close()
        return store

    def finish(self, **fields: Any) -> dict[str, Any]:
        """Write the finished manifest: `fields`, then the time since `start`."""
        assert self.t0 is not None, "start() the stage before finishing it"
        timings = {"total_s": round(time.perf_counter() - self.t0, 3)}
        return write_manifest(self.stage_dir, self.manifest(**fields, timings=timings))

    def manifest(self, **fields: Any) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "complete": True,
            "config_hash": self.cfg.content_hash(),
            "stage_hash": self.stage_hash,
            **({"stream_rounds": dict(self.rounds)} if self.rounds else {}),
            **fields,
        }


def policy_model(cfg: RunConfig) -> ModelConfig:
    """The policy of stages 3 and 6: the SL-CAI model of stage 2 when it exists, else
    `models.helpful`."""
    sl = trained_model_dir(cfg.run_dir, SL_TRAIN)
    if (sl / "config.json").is_file():
        return cfg.models.base_model.derived(sl)  # it reads prompts as its source
    return cfg.models.helpful


def ensure_ray(cfg: RayConfig) -> None:
    """Join the configured cluster, or start a local one; quiet, no dashboard."""
    import ray

    if ray.is_initialized():
        return
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get(profiling.ENV):  # the end-to-end benchmark's compute spans
        env[profiling.ENV] = os.environ[profiling.ENV]
    local = {}
    if cfg.address is None:
        cpus = cfg.num_cpus or len(os.sched_getaffinity(0))
        # Ray ends idle worker processes above this count (default: the CPUs). Warm pool workers
        # (`compute: tasks`) sit idle while a stage's learner or RL actors run; ending them
        # would load their models again in the next stage.
        local = dict(num_cpus=cfg.num_cpus, _system_config={"num_workers_soft_limit": 4 * cpus})
    with profiling.span("ray_init"):
        ray.init(
            address=cfg.address,
            namespace=cfg.namespace,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env},
            **local,
        )
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Data logs every dataset's start and plan at INFO; the stages draw their own bars.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


STREAM_BLOCK_BYTES = 1 << 20  # the prompt stream's Ray Data block size (see `prompt_dataset`)


def run_prompts(
    cfg: RunConfig, spec: str, *, done: KeyIndex, block_rows: int, rows: int | None = None
):
    """`prompt_dataset` of a training stage: the run's `data.turns` and `data.limit`; at most
    `rows` rows (a `stream` round's input; None: all)."""
    return prompt_dataset(
        spec, turns=cfg.data.turns, limit=cfg.data.limit, done=done, block_rows=block_rows,
        rows=rows,
    )  # fmt: skip


def prompt_dataset(
    spec: str,
    *,
    turns: str,
    limit: int | None,
    done: KeyIndex,
    block_rows: int,
    skip: int = 0,
    rows: int | None = None,
):
    """A Ray Data stream of parsed prompts; the source is read inside a Ray task, not the driver.

    Rows carry `prompt_id`, `messages` (JSON), `prompt`, `source`, `row` and `reject` (empty or the
    reason). Keys in `done` (finished prompt ids, or `source#row` of rejects) are skipped.
    The source is parsed in batches of `block_rows` (the first pool's batch size), which Ray
    Data joins into blocks of about `STREAM_BLOCK_BYTES`.
    The first `skip` valid prompts are passed over (stage 7: prompts that training read).
    The source stops being read after `rows` output rows (prompts and rejects not done yet; a
    `stream` round's share): a downstream `limit` would let it parse the whole source each round.
    """
    import ray.data

    from cai_ray.data.sources import resolve_source

    resolve_source(spec)  # a missing source is a clear error here, before anything starts
    items = [{"spec": str(spec)}]
    ds = ray.data.from_items(items).map_batches(
        _read_source,
        fn_kwargs=dict(
            read=SourceRead(turns, limit, block_rows, skip=skip, rows=rows), done=done.frozen()
        ),
        batch_size=1,
        batch_format="pandas",
        num_cpus=0,  # parsing is light; never wait behind the actor pools for a CPU
    )
    # Ray Data joins a task's yields into blocks of up to 128 MiB: the whole source was one
    # block, so one actor of a pool got every prompt and no shard was written before the end.
    # Blocks of ~1 MiB stream and spread over a pool; far smaller ones cost Ray ~10 ms each
    # (5000 rows through two pools: 5.4 s at 1 MiB, 6.9 s at 128 MiB, 121 s at 4 KiB).
    ds.context.target_max_block_size = STREAM_BLOCK_BYTES
    return ds


def shard_dataset(paths: Iterable[str | Path]):
    """A Ray Data stream of Parquet shard files (one block each), read in 0-CPU tasks.

    Not `ray.data.read_parquet`, even with num_cpus=0: the stream then waits for a free CPU
    before its first read, so a stage whose pools hold every CPU of the cluster never starts
    (measured: a labeller pool asking for all CPUs hung rl-label until ray.batch_timeout_s).
    """
    import ray.data

    items = [{"path": str(p)} for p in paths]
    ds = ray.data.from_items(items).map_batches(
        _read_shard, batch_size=1, batch_format="pandas", num_cpus=0
    )
    ds.context.target_max_block_size = STREAM_BLOCK_BYTES  # as `prompt_dataset`'s stream
    return ds


def _read_shard(item) -> Iterator[Any]:
    import pyarrow.parquet as pq

    yield pq.read_table(item["path"].iloc[0])


@dataclass(frozen=True)
class SourceRead:
    """How `_read_source` reads a prompt source (see `prompt_dataset`)."""

    turns: str
    limit: int | None
    block_rows: int
    skip: int = 0
    rows: int | None = None


def _read_source(item, *, read: SourceRead, done: KeyIndex) -> Iterator[Any]:
    """Generator UDF: stream one source's rows as parsed batches of `read.block_rows`, at most
    `read.rows` of them (None: all)."""
    import pandas as pd

    from cai_ray.data.sources import Reject, iter_prompt_rows, parse_prompt_row

    spec = item["spec"].iloc[0]
    turns, limit, block_rows, skip, rows = (
        read.turns, read.limit, read.block_rows, read.skip, read.rows
    )  # fmt: skip
    seen = KeyIndex()  # the source's prompt ids so far: 8 bytes each, not a set of strings
    out: list[dict[str, Any]] = []
    valid = sent = 0

    def full() -> bool:
        return (limit is not None and valid - skip >= limit) or (
            rows is not None and sent + len(out) >= rows
        )

    for raw in iter_prompt_rows(spec):
        index = raw.get("_row", 0)
        parsed = parse_prompt_row(raw, source=spec, index=index, turns=turns)
        key = f"{spec}#{index}"
        if isinstance(parsed, Reject):
            if valid >= skip and key not in done:
                out.append(_reject_row(key, spec, index, parsed.reason, parsed.raw))
        else:
            for rec in parsed:
                if rec.prompt_id in seen:
                    if valid >= skip and key not in done:
                        out.append(
                            _reject_row(key, spec, index, "duplicate prompt_id", rec.prompt_id)
                        )
                    continue
                seen.add(rec.prompt_id)
                valid += 1
                if valid > skip and rec.prompt_id not in done:
                    out.append(_prompt_row(rec))
                if full():
                    break
        if full():
            break
        if len(out) >= block_rows:
            yield pd.DataFrame(out)
            sent += len(out)
            out = []
    if out:
        yield pd.DataFrame(out)


def _prompt_row(rec) -> dict[str, Any]:
    return {
        "prompt_id": rec.prompt_id,
        "messages": json.dumps(rec.conversation.to_messages()),
        "prompt": rec.conversation.last_user_message,
        "source": rec.source,
        "row": int(rec.row),
        "reject": "",
    }


def _reject_row(key: str, source: str, row: int, reason: str, raw: str) -> dict[str, Any]:
    return {
        "prompt_id": key,
        "messages": "[]",
        "prompt": str(raw)[:500],
        "source": source,
        "row": int(row),
        "reject": reason,
    }


def split_batch(batch, seen: KeyIndex) -> tuple[list[dict], list[dict]]:
    """Finished rows and rejects of one output batch; ids already in `seen` become rejects."""
    rows, rejects = [], []
    for row in batch.to_dict("records"):
        key = row["prompt_id"]
        reason = row.pop("reject")
        if not reason and key in seen:
            reason = "duplicate prompt_id"
            key = f"{row['source']}#{row['row']}"
        if reason:
            rejects.append(
                {
                    "key": key,
                    "source": row["source"],
                    "row": row["row"],
                    "reason": reason,
                    "prompt": row["prompt"][:500],
                }
            )
        else:
            row["messages"] = json.loads(row["messages"])
            rows.append(row)
        seen.add(key)
    return rows, rejects


def stream_with_timeout(items: Iterable[Any], timeout_s: float, *, what: str) -> Iterator[Any]:
    """Iterate `items` in a thread; fail clearly when nothing arrives for `timeout_s`."""
    q: queue.Queue = queue.Queue(maxsize=2)
    done = object()

    def pump() -> None:
        try:
            for item in items:
                q.put(("item", item))
            q.put(("done", done))
        except BaseException as exc:  # re-raised in the driver thread
            q.put(("error", exc))

    threading.Thread(target=pump, daemon=True, name=f"{what}-stream").start()
    while True:
        start = time.monotonic()
        try:
            kind, value = q.get(timeout=timeout_s)
        except queue.Empty:
            raise CaiRayError(
                f"{what}: no result for {time.monotonic() - start:.0f}s; a worker may be hung",
                hint="raise ray.batch_timeout_s for slow models, or check `ray status` and worker logs",
            ) from None
        if kind == "done":
            return
        if kind == "error":
            raise find_user_error(value) or value
        yield value


def map_pool(ds, worker, pool: PoolConfig, cfg: RunConfig, *, model, **kwargs):
    """`pool_map` of a worker that loads `model` on the pool's engine."""
    kwargs = dict(
        model_path=str(model.path), engine=pool.engine or cfg.engine, model_id=model.id, **kwargs
    )
    return pool_map(ds, worker, kwargs, pool, cfg)


def pool_map(ds, worker, kwargs: dict[str, Any], pool: PoolConfig, cfg: RunConfig):
    """`ds` through `worker(**kwargs)` in `pool`: a Ray Data actor pool, or with `compute: tasks`
    a task pool whose worker stays built in Ray's reused worker processes (`actors/warm.py`)."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    common = dict(
        batch_size=pool.batch_size,
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        batch_format="pandas",
    )
    if pool_compute(pool, cfg) == "actors":
        return ds.map_batches(
            worker,
            fn_constructor_kwargs=kwargs,
            compute=ActorPoolStrategy(size=pool.size),
            **common,
        )
    from actors.warm import warm_call, warm_key

    engine = pool.engine or cfg.engine
    warm = dict(worker=worker, kwargs=kwargs, key=warm_key(worker, kwargs), engine=engine)
    return ds.map_batches(
        warm_call, fn_kwargs=warm, compute=TaskPoolStrategy(size=pool.size), **common
    )


def pool_compute(pool: PoolConfig, cfg: RunConfig) -> str:
    """`actors` or `tasks`; `auto` is tasks on a one-node cluster for a pool without GPUs whose
    engine is HF (a local run: warm workers), else actors."""
    if pool.compute != "auto":
        return pool.compute
    import ray

    from cai_ray.engines import resolve_engine_kind

    if pool.num_gpus or resolve_engine_kind(pool.engine or cfg.engine) != "hf":
        return "actors"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return "tasks" if len(nodes) == 1 else "actors"


def drain(
    ds, store: ShardStore, cfg: RunConfig, *, shard_rows: int, extra, expand, desc: str, bar
) -> int:
    """Stream finished rows into shards of `shard_rows`; duplicate ids are rejects, never rows.
    `bar` (tqdm) counts the prompts. Returns how many rows `ds` gave."""
    taken = 0
    batches = ds.iter_batches(batch_size=shard_rows, batch_format="pandas")
    for batch in stream_with_timeout(batches, cfg.ray.batch_timeout_s, what=desc):
        rows, rejects = split_batch(batch, store.keys)  # the store's own index: no copy of it
        store.write([{**expand(r), **extra} for r in rows], rejects)
        bar.update(len(batch))
        taken += len(batch)
    return taken


def take(ds, rows: int | None):
    """The first `rows` rows of `ds` (None: all of them): a `stream` round's input."""
    return ds if rows is None else ds.limit(rows)


def summarize(store: ShardStore) -> dict[str, Any]:
    rejects = store.rejects()
    if rejects and store.count_rows() == 0:
        reasons = "; ".join(f"{r['source']} row {r['row']}: {r['reason']}" for r in rejects[:3])
        raise DataError(
            f"no prompt made it through ({len(rejects)} rejected: {reasons})",
            where=str(store.folder),
            hint="see the rejects-*.jsonl files there; fix the source or the model/context",
        )
    return {
        "rows": store.count_rows(),
        "rejects": len(rejects),
        "reject_reasons": reject_counts(rejects),
    }


def check_pool_fits(pools: dict[str, WorkersConfig], cluster: dict[str, float]) -> None:
    """A pool larger than the cluster can place is an error before anything starts."""
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = sum(p.size * getattr(p, key) for p in pools.values())
        have = cluster.get(resource, 0.0)
        if need > have:
            detail = ", ".join(f"{n}: {p.size} x {getattr(p, key)}" for n, p in pools.items())
            raise ConfigError(
                f"the actor pools need {need:g} {resource} ({detail}) but the cluster has {have:g}",
                where="actor pools",
                hint="lower the pools' size or num_cpus/num_gpus, or add nodes",
            )
