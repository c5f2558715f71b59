"""Warm workers: a streaming pool's worker classes run in Ray's reused task processes.

A Ray Data actor pool starts its actors with the execution and ends them with it: every stage
(and every `recycle_rows` round) pays a process start, `import torch` / `transformers` and a model
load, 3-5 s per pool on 2 cores, while the tiny default run computes for about 1 s per stage.
With `compute: tasks` a pool is a Ray Data task pool instead, and Ray runs its tasks in worker
processes it keeps between tasks, executions and stages of one run. `warm_call` builds the
worker once per process (keyed by the driver's `warm_key` of its class and arguments) and keeps
the last `MAX_WORKERS`; workers built here share one engine per model and engine settings
(`cai_ray.engines.sharing_engines`), so a later stage that loads stage 1's model (stage 7's
`helpful` checkpoint) finds it loaded.

Only inference workers run here (the streaming pools never change a model's weights), so a
shared engine is safe; the RL loop's roles, whose rollout weights change, never use this.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from cai_ray.config import EngineConfig
from cai_ray.engines import set_threads, sharing_engines

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
    engine: EngineConfig,
) -> Any:
    """`worker(**kwargs)(batch)`, the worker built once per process (a Ray Data task's UDF).
    `engine.threads` is applied to each task: a process built under one task's CPUs may run the
    next with fewer (`auto`: one thread per CPU of this task)."""
    obj = _workers.get(key)
    if obj is None:
        with sharing_engines():
            obj = worker(**kwargs)
        _workers[key] = obj
        while len(_workers) > MAX_WORKERS:
            _workers.popitem(last=False)  # its engines go with it unless a kept worker holds them
    _workers.move_to_end(key)
    set_threads(engine)
    return obj(batch)
