"""Principle sampling: uniform, reproducible (paper §3.1 and §4.1).

The paper draws one principle at random for every critique/revision round and for every
comparison, so the same principle may repeat within a chain. Two ways to draw:
- `PrincipleSampler(principles, seed).sample(k)`: a seeded stream with replacement, for a
  single process.
- `choose_principles(principles, seed=, key=, k=)`: a pure function of (seed, key), so
  distributed workers and resumed runs pick the same principle for the same (prompt id, round)
  whatever order they see the prompts in. Its k draws are distinct by default (a K-principle
  ensemble, issue 14); each critique round draws k=1 under its own key, so rounds still repeat.
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


def choose_principles(
    principles: Sequence[T], *, seed: int, key: str, k: int = 1, replace: bool = False
) -> list[T]:
    """`k` principles drawn uniformly, fixed by (seed, key) alone.

    Without replacement (the default) the picks are distinct: a K-principle ensemble counting
    one principle twice would report it as agreement (issue 14). K above the number of
    principles takes every principle once (in a drawn order). `replace=True` draws `k`
    independently (repeats allowed). Either way draw i takes the first 8 bytes of
    sha256(f"{seed}:{key}:{i}") modulo the number of principles still in play (the modulo bias is
    below 1e-17 for any realistic count), so the first pick is the same in both modes.
    """
    pool = _require(principles)
    _check_k(k)
    picks = []
    for i in range(k if replace else min(k, len(pool))):
        digest = hashlib.sha256(f"{seed}:{key}:{i}".encode()).digest()
        at = int.from_bytes(digest[:8], "big") % len(pool)
        picks.append(pool[at] if replace else pool.pop(at))
    return picks
