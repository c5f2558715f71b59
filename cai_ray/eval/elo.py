"""Elo ratings from pairwise comparisons: a Bradley-Terry fit with bootstrap intervals.

The paper (arXiv 2212.08073, section 4.4, figure 2) reports harmlessness and helpfulness Elo of
each checkpoint from crowdworker comparisons; here comparisons may be soft (an AI judge's
probability that A wins) or hard (human wins, losses and ties imported from a CSV).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cai_ray.errors import DataError

# natural-log strength -> Elo points: P(A beats B) = 1 / (1 + 10 ** ((elo_b - elo_a) / 400))
ELO_SCALE = 400.0 / math.log(10.0)
WINNER_P = {"a": 1.0, "b": 0.0, "tie": 0.5}

Comparison = tuple[str, str, float]


@dataclass(frozen=True)
class EloRating:
    """A model's Elo point estimate and the bootstrap interval around it."""

    elo: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"elo": self.elo, "low": self.low, "high": self.high}


def _index(comparisons: Sequence[Comparison]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Models in first-seen order, the (n, 2) index pairs and the (n,) P(A wins)."""
    models: dict[str, int] = {}
    pairs, probs = [], []
    for a, b, p in comparisons:
        if a == b:
            raise ValueError(f"a model compared with itself: {a!r}")
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"P(A wins) must lie in [0, 1], got {p!r} for {a!r} vs {b!r}")
        pairs.append((models.setdefault(a, len(models)), models.setdefault(b, len(models))))
        probs.append(float(p))
    return list(models), np.asarray(pairs, dtype=np.int64).reshape(-1, 2), np.asarray(probs)


def _log_posterior(r: np.ndarray, pairs: np.ndarray, p: np.ndarray, prior: float) -> float:
    d = r[pairs[:, 0]] - r[pairs[:, 1]]
    # log sigmoid(d) = -logaddexp(0, -d), stable for large |d|
    ll = -(p * np.logaddexp(0.0, -d) + (1.0 - p) * np.logaddexp(0.0, d)).sum()
    return float(ll - 0.5 * prior * (r @ r))


def _newton(pairs: np.ndarray, p: np.ndarray, k: int, *, prior: float, tol: float) -> np.ndarray:
    """Maximise the (concave) log posterior over natural-log strengths by damped Newton steps."""
    r = np.zeros(k)
    a, b = pairs[:, 0], pairs[:, 1]
    for _ in range(200):
        s = 1.0 / (1.0 + np.exp(-(r[a] - r[b])))  # P(A wins) under the current ratings
        resid = p - s
        grad = np.bincount(a, resid, k) - np.bincount(b, resid, k) - prior * r
        w = s * (1.0 - s)
        hess = np.zeros((k, k))  # the comparison graph's weighted Laplacian, plus the prior
        np.add.at(hess, (a, a), w)
        np.add.at(hess, (b, b), w)
        np.add.at(hess, (a, b), -w)
        np.add.at(hess, (b, a), -w)
        hess += max(prior, 1e-12) * np.eye(k)
        step = np.linalg.solve(hess, grad)
        # backtrack so each step raises the objective (Newton can overshoot on separated data)
        base, t = _log_posterior(r, pairs, p, prior), 1.0
        while t > 1e-6 and _log_posterior(r + t * step, pairs, p, prior) < base - 1e-12:
            t *= 0.5
        r = r + t * step
        if np.max(np.abs(t * step)) < tol:
            break
    return r


def fit_bradley_terry(
    comparisons: Iterable[Comparison],
    *,
    anchor: str | None = None,
    prior: float = 1e-4,
    tol: float = 1e-10,
) -> dict[str, float]:
    """Maximum-likelihood Elo of each model from `(model_a, model_b, p_a_wins)` comparisons.

    `p_a_wins` is a probability in [0, 1] (1 = A won, 0.5 = a tie or an unsure judge). `prior`
    is the precision of a Gaussian prior on natural-log strengths: it keeps ratings finite when a
    model wins every comparison and fixes the scale's offset. Ratings have mean 0, or `anchor`
    at 0. Raises ValueError on an empty list, a self-comparison or a probability outside [0, 1].
    """
    models, pairs, p = _index(list(comparisons))
    if not models:
        raise ValueError("no comparisons to fit")
    if anchor is not None and anchor not in models:
        raise ValueError(f"anchor {anchor!r} is not among the compared models")
    r = _newton(pairs, p, len(models), prior=prior, tol=tol) * ELO_SCALE
    r -= r[models.index(anchor)] if anchor is not None else r.mean()
    return {m: float(v) for m, v in zip(models, r, strict=True)}


def bootstrap_elo(
    comparisons: Iterable[Comparison],
    *,
    n: int = 200,
    seed: int = 0,
    ci: float = 0.95,
    anchor: str | None = None,
    prior: float = 1e-4,
) -> dict[str, EloRating]:
    """The point fit plus a percentile interval from `n` resamples of the comparisons.

    A model absent from a resample has no rating there; its interval uses the resamples it is in.
    """
    data = list(comparisons)
    point = fit_bradley_terry(data, anchor=anchor, prior=prior)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in point}
    for _ in range(n):
        resample = [data[i] for i in rng.integers(0, len(data), len(data))]
        names = {m for a, b, _ in resample for m in (a, b)}
        use_anchor = anchor if anchor in names else None
        for model, elo in fit_bradley_terry(resample, anchor=use_anchor, prior=prior).items():
            samples[model].append(elo)
    tail = 100.0 * (1.0 - ci) / 2.0
    out = {}
    for model, elo in point.items():
        values = np.asarray(samples[model]) if samples[model] else np.asarray([elo])
        low, high = np.percentile(values, [tail, 100.0 - tail])
        # a skewed bootstrap can leave the point just outside; the interval always holds it
        out[model] = EloRating(elo, float(min(low, elo)), float(max(high, elo)))
    return out


def read_judgements_csv(
    path: str | Path, *, models: Collection[str] | None = None
) -> tuple[list[Comparison], list[dict[str, Any]]]:
    """Human comparisons from a CSV with `model_a,model_b,winner` (winner: a | b | tie).

    Returns the comparisons and the rejected rows (`row`, `reason`); the header is row 1. With
    `models`, a row naming any other model is a reject (a typo must not become a new model).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("judgements file not found", where=str(path), hint="pass a CSV file")
    try:
        return _read_judgements(path, models)
    except (UnicodeDecodeError, csv.Error) as exc:
        # not UTF-8, a NUL byte or an over-long field: no row after it can be trusted
        raise DataError(
            f"unreadable CSV: {exc}",
            where=str(path),
            hint="save it as UTF-8 CSV with the header model_a,model_b,winner",
        ) from None


def _read_judgements(
    path: Path, models: Collection[str] | None
) -> tuple[list[Comparison], list[dict[str, Any]]]:
    # utf-8-sig: spreadsheet programs start their CSV exports with a byte-order mark
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = {"model_a", "model_b", "winner"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"missing columns: {', '.join(sorted(missing))}",
                where=f"{path}:1",
                hint="the header must be model_a,model_b,winner",
            )
        comparisons, rejects = [], []
        for n, row in enumerate(reader, start=2):
            reason = _bad_row(row, models)
            if reason:
                rejects.append({"row": n, "reason": reason})
                continue
            a, b = row["model_a"].strip(), row["model_b"].strip()
            comparisons.append((a, b, WINNER_P[row["winner"].strip().lower()]))
    return comparisons, rejects


def _bad_row(row: dict[str, Any], models: Collection[str] | None = None) -> str | None:
    a, b, winner = (str(row.get(k) or "").strip() for k in ("model_a", "model_b", "winner"))
    if not a or not b:
        return "empty model name"
    if a == b:
        return f"a model compared with itself: {a}"
    unknown = [m for m in (a, b) if models is not None and m not in models]
    if unknown:
        return f"unknown model {unknown[0][:50]!r} (known: {', '.join(models)})"
    if winner.lower() not in WINNER_P:
        return f"winner must be a, b or tie, got {winner[:50]!r}"
    return None
