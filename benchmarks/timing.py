"""Timing shared by the benchmark scripts (imported as `timing`: scripts run from this folder)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Helpfulness questions of mixed length, for the generation benchmarks
QUESTIONS = [
    "How do I bake bread at home?",
    "What is a good way to save money each month?",
    "Can you explain why the sky is blue, in simple words for a child who is curious?",
    "hi",
    "Write a short note thanking my team for a busy quarter of work.",
    "How do I fix a flat bicycle tyre?",
    "What should I pack for a week of hiking in the mountains in early spring?",
    "Is it safe to eat raw eggs?",
]


def best_of(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, Any]]:
    """Best time and last result of each fn, run interleaved (A, B, A, B, ...) after a warm-up.

    The minimum, not the median: on a shared machine contention only ever adds time, and
    interleaving exposes every method to the same background load.
    """
    results = {name: fn() for name, fn in fns.items()}  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], results[name]) for name in fns}


def engine_run_info(engine: Any, *, threads: int) -> dict[str, Any]:
    """What every engine benchmark records beside its figures: model, device, machine, load."""
    import os
    import platform

    import torch

    return {
        "model": engine.model_id,
        "device": str(engine.device),
        "dtype": str(engine.dtype),
        "threads": threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "load_average_1m": os.getloadavg()[0],  # other work on the machine while measuring
    }


def write_results(path: Path, report: dict[str, Any]) -> None:
    """A benchmark's JSON (with its `figures` for run_all) under benchmarks/results/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
