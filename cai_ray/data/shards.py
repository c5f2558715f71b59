"""Exactly-once stage output: Parquet shards, a rejects log and a manifest in one stage folder.

A shard is written to a temporary name and renamed, so a killed run never leaves half a file. On a
rerun the keys already present (in shards or among the rejects) are skipped by the reader, so each
prompt is processed once and appears once: resume is "process what is missing".
"""

from __future__ import annotations

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


class ShardStore:
    """The output folder of one streaming stage. `key` is the column that must be unique."""

    def __init__(self, folder: str | Path, *, key: str = "prompt_id"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = key
        self._next = self._next_index()
        self._done: set[str] | None = None  # read on first use; `write` keeps it current

    def _next_index(self) -> int:
        indexes = [int(p.stem.split("-")[1]) for p in self._files(SHARD_GLOB, REJECTS_GLOB)]
        return max(indexes, default=-1) + 1

    def _files(self, *globs: str) -> list[Path]:
        return sorted(p for g in globs for p in self.folder.glob(g))

    def done_keys(self) -> frozenset[str]:
        """Keys already written (output rows and rejects): what a resumed run must skip."""
        return frozenset(self.keys)

    @property
    def keys(self) -> set[str]:
        """The live set behind `done_keys` (`write` adds to it), for a caller that must not hold
        a copy (100k keys are about 10 MB a copy); whatever it adds counts as done. Read from
        disk on first use: a store only read (a later stage's input) never holds it."""
        if self._done is None:
            self._done = self._read_done_keys()
        return self._done

    def _read_done_keys(self) -> set[str]:
        import pyarrow.parquet as pq

        keys: set[str] = set()
        for path in self._files(SHARD_GLOB):
            keys.update(pq.read_table(path, columns=[self.key]).column(self.key).to_pylist())
        for reject in self.rejects():
            keys.add(reject["key"])
        return keys

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
