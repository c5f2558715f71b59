"""Exactly-once stage output: Parquet shards, a rejects log and a manifest in one stage folder.

A shard is written to a temporary name and renamed, so a killed run never leaves half a file. On a
rerun the keys already present (in shards or among the rejects) are skipped by the reader, so each
prompt is processed once and appears once: resume is "process what is missing".
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

SHARD_GLOB = "shard-*.parquet"
REJECTS_GLOB = "rejects-*.jsonl"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class KeyIndex:
    """A set of string keys held as 64-bit digests: a sorted array and the recent additions.

    What a stream must skip, at 8 bytes a key: 100k prompt ids are 0.8 MB here against 10 MB as
    a Python set (plus a 4 MB frozenset copy and its pickle for every round's reader). Two keys
    share a digest with probability about n^2 / 2^65 (3e-8 for a million keys); the keys are
    themselves 64-bit content hashes. Such a key reads as done: the reader skips it, the writer
    sets it aside as a "duplicate" reject, so it is never written twice. `frozen()` is the
    O(1) snapshot a round's reader gets (arrays are replaced, never changed in place).
    """

    def __init__(self, digests: Any = None):
        import numpy as np

        self._sorted = np.unique(np.asarray([] if digests is None else digests, dtype=np.uint64))
        self._recent: set[int] = set()

    @staticmethod
    def digest(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._has(self.digest(key))

    def _has(self, d: int) -> bool:
        import numpy as np

        if d in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, np.uint64(d)))
        return i < len(self._sorted) and int(self._sorted[i]) == d

    def add(self, key: str) -> None:
        d = self.digest(key)
        if not self._has(d):
            self._recent.add(d)
            if len(self._recent) > max(4096, len(self._sorted) // 16):  # amortised O(n log n)
                self._compact()

    def update(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.add(key)

    def isin(self, keys: Iterable[str]) -> Any:
        """A boolean array: which of `keys` are in the index (vectorised, for a batch)."""
        import numpy as np

        self._compact()
        digests = np.fromiter((self.digest(k) for k in keys), dtype=np.uint64)
        return np.isin(digests, self._sorted, assume_unique=False)

    def _compact(self) -> None:
        import numpy as np

        if self._recent:
            recent = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._sorted = np.union1d(self._sorted, recent)
            self._recent = set()

    def frozen(self) -> KeyIndex:
        """A snapshot that later `add`s do not change; it shares the sorted array."""
        self._compact()
        return _from_sorted(self._sorted)

    def __reduce__(self):  # unpickled as the array it is: no second sort in every task
        self._compact()
        return (_from_sorted, (self._sorted,))


def _from_sorted(digests: Any) -> KeyIndex:
    """A KeyIndex over `digests` that are already sorted and unique (a `_compact` result)."""
    index = KeyIndex()
    index._sorted = digests
    return index


class ShardStore:
    """The output folder of one streaming stage. `key` is the column that must be unique."""

    def __init__(self, folder: str | Path, *, key: str = "prompt_id"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = key
        self._next = self._next_index()
        self._done: KeyIndex | None = None  # read on first use; `write` keeps it current

    def _next_index(self) -> int:
        indexes = [int(p.stem.split("-")[1]) for p in self._files(SHARD_GLOB, REJECTS_GLOB)]
        return max(indexes, default=-1) + 1

    def _files(self, *globs: str) -> list[Path]:
        return sorted(p for g in globs for p in self.folder.glob(g))

    def done_keys(self) -> KeyIndex:
        """Keys already written (output rows and rejects): what a resumed run must skip; a
        snapshot (`KeyIndex.frozen`) that the writes that follow do not change."""
        return self.keys.frozen()

    @property
    def keys(self) -> KeyIndex:
        """The live index behind `done_keys` (`write` adds to it); whatever a caller adds counts
        as done. Read from disk on first use: a store only read (a later stage's input) never
        holds it."""
        if self._done is None:
            self._done = KeyIndex()
            self._done.update(self.stored_keys())
        return self._done

    def stored_keys(self) -> Iterator[str]:
        """The keys on disk, one shard at a time: output rows', then rejects'."""
        import pyarrow.parquet as pq

        for path in self._files(SHARD_GLOB):
            yield from pq.read_table(path, columns=[self.key]).column(self.key).to_pylist()
        for reject in self.rejects():
            yield reject["key"]

    def write(self, rows: list[dict[str, Any]], rejects: list[dict[str, Any]]) -> None:
        """One shard: rejects first, then rows, each renamed into place when complete."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        index = self._next
        self._next += 1
        if self._done is not None:  # else read from disk, with this shard, on first use
            self._done.update(r[self.key] for r in rows)
            self._done.update(r["key"] for r in rejects)
        if rejects:
            text = "".join(json.dumps(r, default=str) + "\n" for r in rejects)
            atomic_write_text(self.folder / f"rejects-{index:05d}.jsonl", text)
        if rows:
            path = self.folder / f"shard-{index:05d}.parquet"
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            pq.write_table(pa.Table.from_pylist(rows), tmp)
            os.replace(tmp, path)

    def rejects(self) -> list[dict[str, Any]]:
        out = []
        for path in self._files(REJECTS_GLOB):
            out.extend(json.loads(line) for line in path.read_text().splitlines() if line)
        return out

    def count_rows(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(p).metadata.num_rows for p in self._files(SHARD_GLOB))

    def columns(self) -> list[str]:
        """Column names of the shards (of the first one; [] when there is none)."""
        import pyarrow.parquet as pq

        files = self._files(SHARD_GLOB)
        return list(pq.read_schema(files[0]).names) if files else []

    def read_table(self, columns: list[str] | None = None):
        """All shards as one pyarrow Table (for small outputs and tests)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(p, columns=columns) for p in self._files(SHARD_GLOB)]
        return pa.concat_tables(tables) if tables else None

    def iter_rows(self, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every row as a dict, one shard in memory at a time (for statistics over all rows)."""
        import pyarrow.parquet as pq

        for path in self._files(SHARD_GLOB):
            yield from pq.read_table(path, columns=columns).to_pylist()

    def shard_paths(self) -> list[str]:
        return [str(p) for p in self._files(SHARD_GLOB)]


def versions() -> dict[str, str]:
    """Package versions recorded in every manifest."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("cai-ray", "torch", "transformers", "ray", "deepspeed", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def write_manifest(folder: str | Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write `manifest.json` (plus time and versions) atomically; returns what was written."""
    path = Path(folder) / "manifest.json"
    body = {**manifest, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions()}
    atomic_write_text(path, json.dumps(body, indent=2, default=str) + "\n")
    return body


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def reject_counts(rejects: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Rejects by reason category (the text before the first ':' or ' at ')."""
    return dict(Counter(str(r["reason"]).split(":")[0] for r in rejects))
