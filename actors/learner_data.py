"""Which rows each rank trains on, in which order, every epoch.

The epoch order is a permutation of the rows seeded by (seed, epoch), the same for any number of
ranks. Optimizer step k uses order positions [k*G, (k+1)*G) (G = global batch); within it rank r
takes the r-th run of `micro_batch_size * grad_accum` rows. So a 1-rank and an N-rank run with the
same global batch train on the same rows at every step (the parity test), and a resumed run finds
its place by skipping the micro-batches it already consumed (the order is deterministic).
Rows beyond the last full global batch of an epoch are not used in that epoch (a different
remainder every epoch when shuffling).

Rows need an integer `idx` column 0..N-1 (`cai_ray.sft_data.build_sft_examples` adds it).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cai_ray.errors import DataError

RANK_COL = "_rank"
ORDER_COL = "_order"


@dataclass(frozen=True)
class EpochPlan:
    """How an epoch is cut: `steps` optimizer steps of `per_rank_step` rows on each rank."""

    num_rows: int
    world_size: int
    per_rank_step: int  # rows per rank per optimizer step: micro_batch_size * grad_accum
    seed: int
    shuffle: bool

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
        pos = _positions(self.num_rows, self.seed, epoch, self.shuffle)[idx]
        step, within = np.divmod(pos, self.global_batch)
        rank = within // self.per_rank_step
        order = step * self.per_rank_step + within % self.per_rank_step
        return rank, order, pos < self.steps * self.global_batch


@functools.lru_cache(maxsize=4)
def _positions(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """position[idx] in the epoch order (cached: every batch of an epoch needs the same one)."""
    if not shuffle:
        return np.arange(num_rows)
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)  # order[p] = idx
    positions = np.empty(num_rows, dtype=np.int64)
    positions[order] = np.arange(num_rows)
    return positions


def list_shards(rows: Sequence[Mapping[str, Any]], plan: EpochPlan, epoch: int) -> list[list]:
    """The epoch's shards of an in-memory list of rows, one list per rank, in training order."""
    idx = _check_idx(np.asarray([r["idx"] for r in rows]), plan.num_rows)
    rank, order, used = plan.assign(idx, epoch)
    shards: list[list] = [[None] * plan.rows_per_rank for _ in range(plan.world_size)]
    for i in np.flatnonzero(used):
        shards[rank[i]][order[i]] = rows[i]
    return shards


class BlockShard:
    """A rank's shard as Ray object refs of Arrow blocks, read one block at a time.

    Reading the materialised blocks directly spares every rank a Ray Data executor per epoch.
    """

    def __init__(self, refs: list[Any]):
        self.refs = refs

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import ray

        for ref in self.refs:
            yield from ray.get(ref).to_pylist()


def dataset_shards(ds: Any, plan: EpochPlan, epoch: int) -> list[BlockShard]:
    """The epoch's shards of a Ray Dataset, one per rank, each in training order."""

    def tag(table: Any) -> Any:
        import pyarrow as pa

        idx = _check_idx(table.column("idx").to_numpy(), plan.num_rows, whole=False)
        rank, order, used = plan.assign(idx, epoch)
        table = table.append_column(RANK_COL, pa.array(rank)).append_column(
            ORDER_COL, pa.array(order)
        )
        return table.filter(pa.array(used))

    ordered = ds.map_batches(tag, batch_format="pyarrow").sort([RANK_COL, ORDER_COL])
    cuts = [plan.rows_per_rank * r for r in range(1, plan.world_size)]
    parts = ordered.split_at_indices(cuts) if cuts else [ordered.materialize()]
    return [BlockShard(part.to_arrow_refs()) for part in parts]


def check_dataset(ds: Any) -> int:
    """Row count of a Ray Dataset whose `idx` column spans 0..N-1, else a DataError."""
    names = ds.schema().names
    if "idx" not in names:
        raise DataError(
            f"learner rows need an integer 'idx' column (have: {', '.join(names)})",
            hint="build rows with cai_ray.sft_data.build_sft_examples, which numbers them",
        )
    from ray.data.aggregate import Max, Min

    n = ds.count()
    # Checked here: an error raised inside a Ray Data task reaches the driver without its type.
    bounds = ds.aggregate(Min("idx"), Max("idx")) if n else {}
    if n and (bounds["min(idx)"] != 0 or bounds["max(idx)"] != n - 1):
        raise DataError(f"'idx' must number the {n} rows 0..{n - 1}", where="idx")
    return n


def _check_idx(idx: np.ndarray, n: int, *, whole: bool = True) -> np.ndarray:
    """`idx` numbers rows 0..n-1 once each (for one batch of a dataset: within range)."""
    bad = len(idx) and (idx.min() < 0 or idx.max() >= n)
    if whole:
        bad = bad or len(np.unique(idx)) != n
    if bad:
        raise DataError(f"'idx' must number the {n} rows 0..{n - 1} once each", where="idx")
    return idx
