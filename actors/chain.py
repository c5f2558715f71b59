"""ChainWorker: several batch workers in one actor, applied in order (a colocated stretch).

Stage 7 runs one rollout pool per checkpoint, then the judge and the PM: K + 2 processes, each
importing torch and loading a model. With small models on one machine (local runs, tests, one
GPU holding every checkpoint) one process can hold them all; this wrapper makes that one pool
out of the very same worker classes, so both layouts run the same code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any


class ChainWorker:
    """Builds each `(class_or_function, kwargs)` step in-process; a call runs them in order."""

    def __init__(self, steps: Sequence[tuple[Callable[..., Any], dict[str, Any]]]):
        self.steps = [
            fn(**kwargs) if isinstance(fn, type) else functools.partial(fn, **kwargs)
            for fn, kwargs in steps
        ]

    def __call__(self, batch: Any) -> Any:
        for step in self.steps:
            batch = step(batch)
        return batch
