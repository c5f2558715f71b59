"""Which rows each rank trains on, in which order, every epoch.

The epoch order is a permutation of the rows seeded by (seed, epoch), the same for any number of
ranks. Optimizer step k uses order positions [k*G, (k+1)*G) (G = global batch); within it rank r
takes the r-th run of `micro_batch_size * grad_accum` rows. So a 1-rank and an N-rank run with the
same global batch train on the same rows at every step (the parity test), and a resumed run finds
its place by skipping the micro-batches it already consumed (the order is deterministic).
Rows beyond the last full global batch of an epoch are not used in that epoch (a different
remainder every epoch when shuffling).

With `learner.group_by_length` the plan also holds every row's length (its longest token
column): the permutation is cut into windows of `GROUP_WINDOW` global batches, each window is
sorted by length and its global batches are then put in a seeded random order, so a micro-batch
holds rows of about one length and pads little, while steps do not run long to short (the
bucketing of fairseq and Megatron; HF's `group_by_length` keeps each window longest first).
Still a pure function of (lengths, seed, epoch): parity and resume hold as before.

Rows need an integer `idx` column 0..N-1 (`cai_ray.sl.sft_data.build_sft_examples` adds it).
In-process a list of rows is cut in memory (`list_shards`); a Ray Dataset is materialised once
and each rank cuts its shard from the blocks itself (`BlockShard`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cai_ray.errors import DataError

ORDER_COL = "_order"
GROUP_WINDOW = 64  # global batches per length-sorted window (HF's LengthGroupedSampler: 50)


@dataclass(frozen=True)
class EpochPlan:
    """How an epoch is cut: `steps` optimizer steps of `per_rank_step` rows on each rank."""

    num_rows: int
    world_size: int
    per_rank_step: int  # rows per rank per optimizer step: micro_batch_size * grad_accum
    seed: int
    shuffle: bool
    lengths: bytes | None = None  # int32 per idx (`row_lengths`): group batches by length

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_rank_step

    @property
    def steps(self) -> int:
        return self.num_rows // self.global_batch

    @property
    def rows_per_rank(self) -> int:
        return self.steps * self.per_rank_step

    def assign(self, idx: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rank, order within the rank's shard, used this epoch) for rows with ids `idx`."""
        pos = _positions(
            self.num_rows, self.seed, epoch, self.shuffle, self.lengths, self.global_batch
        )[idx]
        step, within = np.divmod(pos, self.global_batch)
        rank = within // self.per_rank_step
        order = step * self.per_rank_step + within % self.per_rank_step
        return rank, order, pos < self.steps * self.global_batch


@functools.lru_cache(maxsize=4)
def _positions(
    num_rows: int, seed: int, epoch: int, shuffle: bool, lengths: bytes | None = None, batch=1
) -> np.ndarray:
    """position[idx] in the epoch order (cached: every batch of an epoch needs the same one);
    with `lengths`, grouped by length in windows of `GROUP_WINDOW` global batches of `batch`."""
    if not shuffle and lengths is None:
        return np.arange(num_rows)
    order = (
        np.random.default_rng([seed, epoch]).permutation(num_rows)
        if shuffle
        else np.arange(num_rows)
    )  # order[p] = idx
    if lengths is not None:
        size = np.frombuffer(lengths, dtype=np.int32)
        window = batch * GROUP_WINDOW
        rng = np.random.default_rng([seed, epoch, 1])
        for start in range(0, num_rows, window):
            part = order[start : start + window]
            part = part[np.argsort(-size[part], kind="stable")]
            full = len(part) // batch * batch  # a last partial batch stays last (the remainder)
            steps = rng.permutation(full // batch)
            part[:full] = part[:full].reshape(-1, batch)[steps].reshape(-1)
            order[start : start + window] = part
    positions = np.empty(num_rows, dtype=np.int64)
    positions[order] = np.arange(num_rows)
    return positions


def row_lengths(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> bytes:
    """Each row's longest `columns` entry (token ids), as int32 bytes in `idx` order."""
    _check_columns(rows[0].keys() if rows else columns, columns)
    out = np.zeros(len(rows), dtype=np.int32)
    for r in rows:
        out[r["idx"]] = max(len(r[c]) for c in columns)
    return out.tobytes()


def block_lengths(refs: Sequence[Any], num_rows: int, columns: Sequence[str]) -> bytes:
    """`row_lengths` of a materialised dataset's Arrow blocks, one block at a time."""
    import pyarrow.compute as pc
    import ray

    out = np.zeros(num_rows, dtype=np.int32)
    for ref in refs:
        table = ray.get(ref)
        idx = _check_idx(table.column("idx").to_numpy(), num_rows, whole=False)
        _check_columns(table.column_names, columns)
        sizes = [pc.list_value_length(table.column(c)).fill_null(0).to_numpy() for c in columns]
        out[idx] = np.maximum.reduce(sizes)
    return out.tobytes()


def _check_columns(have: Any, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(f"learner rows lack {missing[0]!r}", where="learner.group_by_length")


def check_rows(rows: Sequence[Any]) -> int:
    """Row count of a list of mappings numbered 0..N-1 by `idx`, else a DataError."""
    if any(not isinstance(r, Mapping) or "idx" not in r for r in rows):
        raise DataError(
            "learner rows must be mappings with an integer 'idx' column",
            hint="build rows with cai_ray.sl.sft_data.build_sft_examples, which numbers them",
        )
    _check_idx(np.asarray([r["idx"] for r in rows]), len(rows))
    return len(rows)


def list_shards(rows: Sequence[Mapping[str, Any]], plan: EpochPlan, epoch: int) -> list[list]:
    """The epoch's shards of an in-memory list of rows, one list per rank, in training order."""
    idx = _check_idx(np.asarray([r["idx"] for r in rows]), plan.num_rows)
    rank, order, used = plan.assign(idx, epoch)
    shards: list[list] = [[None] * plan.rows_per_rank for _ in range(plan.world_size)]
    for i in np.flatnonzero(used):
        shards[rank[i]][order[i]] = rows[i]
    return shards


@dataclass(frozen=True)
class BlockShard:
    """Rank `rank`'s rows for one epoch, cut on the rank from a materialised Ray Dataset's blocks.

    Cut on the rank, not by Ray Data tasks: tasks started mid-training compete with the placement
    group for CPUs (on a full cluster they wait forever), and no global sort is needed. Each rank
    reads every block once per epoch and keeps its share, one block in memory at a time.
    """

    refs: tuple[Any, ...]  # ObjectRef[pyarrow.Table] of the dataset's blocks
    plan: EpochPlan
    epoch: int
    rank: int

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import pyarrow as pa
        import ray

        parts = [select_rows(ray.get(ref), self.plan, self.epoch, self.rank) for ref in self.refs]
        table = pa.concat_tables(parts, promote_options="default").sort_by(ORDER_COL)
        if table.num_rows != self.plan.rows_per_rank:
            raise DataError(
                f"rank {self.rank} got {table.num_rows} rows, expected {self.plan.rows_per_rank}",
                where="idx",
                hint="'idx' must number the rows 0..N-1 once each",
            )
        return (row for batch in table.to_batches(max_chunksize=1024) for row in batch.to_pylist())


def select_rows(table: Any, plan: EpochPlan, epoch: int, rank: int) -> Any:
    """The rows of one Arrow block that `rank` trains on in `epoch`, with their ORDER_COL."""
    import pyarrow as pa

    idx = _check_idx(table.column("idx").to_numpy(), plan.num_rows, whole=False)
    ranks, order, used = plan.assign(idx, epoch)
    mine = used & (ranks == rank)
    return table.append_column(ORDER_COL, pa.array(order)).filter(pa.array(mine))


def dataset_shards(refs: Sequence[Any], plan: EpochPlan, epoch: int) -> list[BlockShard]:
    """The epoch's shards of a dataset given as Arrow block refs, one per rank."""
    return [BlockShard(tuple(refs), plan, epoch, rank) for rank in range(plan.world_size)]


def check_dataset(ds: Any) -> int:
    """Row count of a materialised Ray Dataset with an `idx` column, else a DataError.

    The range of `idx` is checked on the ranks, block by block (see `select_rows`).
    """
    names = ds.schema().names
    if "idx" not in names:
        raise DataError(
            f"learner rows need an integer 'idx' column (have: {', '.join(names)})",
            hint="build rows with cai_ray.sl.sft_data.build_sft_examples, which numbers them",
        )
    return ds.count()


def _check_idx(idx: np.ndarray, n: int, *, whole: bool = True) -> np.ndarray:
    """`idx` numbers rows 0..n-1 once each (for one batch of a dataset: within range)."""
    bad = len(idx) and (idx.min() < 0 or idx.max() >= n)
    if whole:
        bad = bad or len(np.unique(idx)) != n
    if bad:
        raise DataError(f"'idx' must number the {n} rows 0..{n - 1} once each", where="idx")
    return idx
