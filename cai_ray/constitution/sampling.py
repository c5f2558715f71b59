"""Principle sampling: uniform, with replacement, reproducible (paper §3.1 and §4.1).

The paper draws one principle at random for every critique/revision round and for every
comparison, so the same principle may repeat within a chain. Two ways to draw:
- `PrincipleSampler(principles, seed).sample(k)`: a seeded stream, for a single process.
- `choose_principles(principles, seed=, key=, k=)`: a pure function of (seed, key), so
  distributed workers and resumed runs pick the same principle for the same (prompt id, round)
  whatever order they see the prompts in.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Generic, TypeVar

from cai_ray.errors import ConstitutionError

T = TypeVar("T")


def _require(principles: Sequence[T]) -> list[T]:
    if not principles:
        raise ConstitutionError(
            "cannot sample from an empty list of principles",
            hint="the constitution needs principles of the kind this stage uses",
        )
    return list(principles)


def _check_k(k: int) -> None:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")


class PrincipleSampler(Generic[T]):
    """Seeded uniform draws with replacement; the same seed gives the same sequence."""

    def __init__(self, principles: Sequence[T], seed: int):
        self._principles = _require(principles)
        self._rng = random.Random(seed)

    def sample(self, k: int = 1) -> list[T]:
        """The next `k` principles of the stream (repeats allowed)."""
        _check_k(k)
        return self._rng.choices(self._principles, k=k)


def choose_principles(principles: Sequence[T], *, seed: int, key: str, k: int = 1) -> list[T]:
    """`k` principles drawn uniformly with replacement, fixed by (seed, key) alone.

    Draw i takes the first 8 bytes of sha256(f"{seed}:{key}:{i}") modulo the number of
    principles (the modulo bias is below 1e-17 for any realistic count).
    """
    items = _require(principles)
    _check_k(k)
    picks = []
    for i in range(k):
        digest = hashlib.sha256(f"{seed}:{key}:{i}".encode()).digest()
        picks.append(items[int.from_bytes(digest[:8], "big") % len(items)])
    return picks
