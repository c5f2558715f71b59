"""Warm workers: a streaming pool's worker classes run in Ray's reused task processes.

A Ray Data actor pool starts its actors with the execution and ends them with it: every stage
(and every `recycle_rows` round) pays a process start, `import torch` / `transformers` and a model
load, 3-5 s per pool on 2 cores, while the tiny default run computes for about 1 s per stage.
With `compute: tasks` a pool is a Ray Data task pool instead, and Ray runs its tasks in worker
processes it keeps between tasks, executions and stages of one run. `warm_call` builds the
worker once per process (keyed by the driver's `warm_key` of its class and arguments) and keeps
the last `MAX_WORKERS`; workers built here share one engine per model and engine settings
(`cai_ray.engines.sharing_engines`), so a later stage that loads stage 1's model (stage 7's `helpful` checkpoint) finds it loaded.

Only inference workers run here (the streaming pools never change a model's weights), so a
shared engine is safe; the RL loop's roles, whose rollout weights change, never use this.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from cai_ray.engines import sharing_engines

MAX_WORKERS = 3  # workers (each with its engines) one process keeps: a stage's, and the last ones

_workers: OrderedDict[str, Any] = OrderedDict()


def warm_key(worker: Callable[..., Any], kwargs: dict[str, Any]) -> str:
    """The cache key of `worker(**kwargs)`: its class and its arguments' pickle, made once in the
    driver (the same arguments in two stages give the same key, so the worker is reused)."""
    from ray import cloudpickle

    blob = cloudpickle.dumps((f"{worker.__module__}.{worker.__qualname__}", kwargs))
    return hashlib.sha256(blob).hexdigest()


def warm_call(
    batch: Any,
    *,
    worker: Callable[..., Any],
    kwargs: dict[str, Any],
    key: str,
    threads: int | str = "auto",
) -> Any:
    """`worker(**kwargs)(batch)`, the worker built once per process (a Ray Data task's UDF);
    `threads` is its engine's setting, applied to this task (`auto`: its CPUs)."""
    obj = _workers.get(key)
    if obj is None:
        with sharing_engines():
            obj = worker(**kwargs)
        _workers[key] = obj
        while len(_workers) > MAX_WORKERS:
            _workers.popitem(last=False)  # its engines go with it unless a kept worker holds them
    _workers.move_to_end(key)
    _fit_threads(threads)
    return obj(batch)


def _fit_threads(threads: int | str) -> None:
    """Set torch's threads for this task: a process built under one task's CPUs may run the next
    with fewer (`auto`: one per CPU of the task, the rule of `resolve_threads`)."""
    import sys

    if "torch" not in sys.modules:
        return
    import torch

    from cai_ray.engines import resolve_threads

    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def cached_workers() -> int:
    """How many workers this process keeps (tests)."""
    return len(_workers)
