"""Opt-in spans of model compute, for the end-to-end time split (`benchmarks/bench_end_to_end.py`).

With `CAI_RAY_PROFILE_DIR` set, every process (driver, Ray workers, learner ranks) appends one
JSON line per span to `<dir>/spans-<pid>.jsonl`: `{"kind", "t0", "t1", "pid"}` in wall-clock
seconds. Spans wrap whole model calls (a `generate` of a batch, a training step, a model load),
never single tokens, so the cost is one small write per batch. Unset, `span` is a no-op.

`split` turns spans into a stage's time budget: the union of compute spans (some model is
computing), start-up (stage start to the first compute, which includes actor start and model
loading), gaps between computes (Ray scheduling, serialisation, waiting) and the tail (last
compute to stage end: writes and pool shutdown).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENV = "CAI_RAY_PROFILE_DIR"
COMPUTE = ("generate", "score", "train", "infer")  # kinds counted as model compute
SETUP = ("ray_init", "build_model", "load")  # start-up work that is not model compute


@contextmanager
def span(kind: str) -> Iterator[None]:
    """Record the wall-clock interval of the block under `kind` when profiling is on."""
    out = os.environ.get(ENV)
    if not out:
        yield
        return
    t0 = time.time()
    try:
        yield
    finally:
        _record(kind, t0, time.time(), out)


def is_compute(kind: str) -> bool:
    return kind.split(":")[0] in COMPUTE


def _record(kind: str, t0: float, t1: float, out: str) -> None:
    line = json.dumps({"kind": kind, "t0": t0, "t1": t1, "pid": os.getpid()})
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / f"spans-{os.getpid()}.jsonl", "a") as f:
            f.write(line + "\n")
    except OSError:
        pass  # profiling never breaks a run


def read_spans(directory: str | Path) -> list[dict[str, Any]]:
    spans = []
    for path in sorted(Path(directory).glob("spans-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                spans.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed process
    return spans


def union_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [t0, t1] intervals."""
    total, end = 0.0, float("-inf")
    for t0, t1 in sorted(intervals):
        if t1 <= end:
            continue
        total += t1 - max(t0, end)
        end = t1
    return total


def _clipped(spans: Iterable[dict[str, Any]], window: tuple[float, float], keep) -> list:
    s0, s1 = window
    return [
        (max(s["t0"], s0), min(s["t1"], s1))
        for s in spans
        if keep(s["kind"]) and s["t1"] > s0 and s["t0"] < s1
    ]


def split(window: tuple[float, float], spans: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Time budget of one stage window from the spans that overlap it (seconds)."""
    spans = list(spans)
    s0, s1 = window
    wall = s1 - s0
    compute = _clipped(spans, window, is_compute)
    out: dict[str, Any] = {
        "wall_s": wall,
        "setup_s": {
            k: union_seconds(_clipped(spans, window, lambda kind, k=k: kind == k)) for k in SETUP
        },
    }
    if not compute:
        return {
            **out,
            "compute_s": 0.0,
            "startup_s": wall,
            "gaps_s": 0.0,
            "tail_s": 0.0,
            "compute_share": 0.0,
            "compute_by_kind_s": {},
        }
    first = min(t0 for t0, _ in compute)
    last = max(t1 for _, t1 in compute)
    busy = union_seconds(compute)
    kinds = sorted({s["kind"] for s in spans if is_compute(s["kind"])})
    return {
        **out,
        "compute_s": busy,
        "startup_s": first - s0,
        "gaps_s": (last - first) - busy,
        "tail_s": s1 - last,
        "compute_share": busy / wall if wall > 0 else 0.0,
        "compute_by_kind_s": {
            k: union_seconds(_clipped(spans, window, lambda kind, k=k: kind == k)) for k in kinds
        },
    }
