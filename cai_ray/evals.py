"""Multiple-choice evaluations of the paper's `evals/` files (section 4 and Fig. 4).

All three files share one layout: `prompt` (ending "The answer is:"), `corrects` and
`incorrects` (option strings such as " (B)"); the HHH file also has `text_correct` and
`text_incorrect`, the two full transcripts, for scoring with a preference model. Scoring needs
only what it is given: an `Engine` (feedback model) or a `score(texts)` callable (PM).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.errors import DataError
from cai_ray.labeling import RATIONALE_STOP, clean_rationale, cot_scoring_prefix

EVAL_FILES = {
    "hhh": "438HHHEvaluations.jsonl",
    "harmful-vs-ethical": "HarmfulVsEthical.jsonl",
    "harm-classification": "HarmfulnessClassification.jsonl",
}
_COT_CUE = "Let's think step-by-step:"


@dataclass(frozen=True)
class EvalItem:
    """One question: its prompt, the options in file order and which one is correct."""

    row: int
    prompt: str
    options: tuple[str, ...]  # corrects + incorrects, sorted by the option letter
    correct: int  # index into options
    text_correct: str | None = None
    text_incorrect: str | None = None

    @property
    def correct_label(self) -> str:
        """The correct option's marker, e.g. "(B)": its position in the prompt."""
        return self.options[self.correct].strip()


@dataclass
class EvalReport:
    """Accuracy overall and by the correct option's position; rows set aside with reasons."""

    name: str
    method: str
    total: int
    correct: int
    by_position: dict[str, dict[str, int]]
    rejects: list[dict[str, Any]]

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: counts, accuracy, per-position accuracy, rejects."""
        return {
            "eval": self.name,
            "method": self.method,
            "total": self.total,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "by_position": {
                k: {**v, "accuracy": v["correct"] / v["total"] if v["total"] else None}
                for k, v in sorted(self.by_position.items())
            },
            "rejects": self.rejects,
        }

    def table(self) -> str:
        """A small text table for the terminal."""
        lines = [f"{self.name} ({self.method})", f"{'position':<10}{'n':>6}{'accuracy':>10}"]
        for key, v in sorted(self.by_position.items()):
            lines.append(f"{key:<10}{v['total']:>6}{v['correct'] / max(v['total'], 1):>10.3f}")
        acc = self.accuracy if self.accuracy is not None else float("nan")
        lines.append(f"{'all':<10}{self.total:>6}{acc:>10.3f}")
        if self.rejects:
            lines.append(f"({len(self.rejects)} rows set aside; see the JSON output)")
        return "\n".join(lines)


def read_eval_file(path: str | Path) -> tuple[list[EvalItem], list[dict[str, Any]]]:
    """Items and rejected rows (`row`, `reason`) of a file in the paper's eval layout."""
    path = Path(path)
    if not path.is_file():
        raise DataError("eval file not found", where=str(path), hint="pass a JSONL file")
    items, rejects = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(_parse(json.loads(line), n))
        except (ValueError, TypeError, KeyError) as exc:
            rejects.append({"row": n, "reason": str(exc).strip("'\"")[:200]})
    if not items:
        reasons = "; ".join(f"row {r['row']}: {r['reason']}" for r in rejects[:3])
        raise DataError(
            f"no valid rows in the eval file ({len(rejects)} rejected: {reasons})",
            where=str(path),
            hint="rows need 'prompt', 'corrects' and 'incorrects' (the paper's evals/ layout)",
        )
    return items, rejects


def _parse(row: Any, n: int) -> EvalItem:
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    prompt, corrects, incorrects = row["prompt"], row["corrects"], row["incorrects"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: empty or not text")
    if not (isinstance(corrects, list) and len(corrects) == 1):
        raise ValueError("corrects: expected a list of one option")
    if not (isinstance(incorrects, list) and incorrects):
        raise ValueError("incorrects: expected a non-empty list of options")
    options = [*corrects, *incorrects]
    if not all(isinstance(o, str) and o.strip() for o in options) or len(set(options)) != len(
        options
    ):
        raise ValueError("options: empty, not text or repeated")
    ordered = sorted(options)  # " (A)" < " (B)" < ...: the order they appear in the prompt
    texts = [row.get("text_correct"), row.get("text_incorrect")]
    texts = [t if isinstance(t, str) and t.strip() else None for t in texts]
    return EvalItem(n, prompt, tuple(ordered), ordered.index(corrects[0]), *texts)


def _report(name: str, method: str, items, hits, rejects) -> EvalReport:
    by_pos: dict[str, Counter] = {}
    for item, hit in zip(items, hits, strict=True):
        c = by_pos.setdefault(item.correct_label, Counter())
        c["total"] += 1
        c["correct"] += int(hit)
    return EvalReport(
        name,
        method,
        total=len(items),
        correct=sum(int(h) for h in hits),
        by_position={k: dict(v) for k, v in by_pos.items()},
        rejects=rejects,
    )


def eval_with_pm(
    name: str,
    items: Sequence[EvalItem],
    score: Callable[[list[str]], list[float]],
    *,
    rejects: list[dict[str, Any]] | None = None,
) -> EvalReport:
    """A PM is right when it scores `text_correct` above `text_incorrect` (HHH layout only)."""
    rejects = list(rejects or [])
    usable = [it for it in items if it.text_correct and it.text_incorrect]
    rejects += [
        {"row": it.row, "reason": "no text_correct/text_incorrect for a PM"}
        for it in items
        if not (it.text_correct and it.text_incorrect)
    ]
    if not usable:
        raise DataError(
            f"{name}: no row has text_correct/text_incorrect, so a PM cannot be scored on it",
            hint="evaluate this file with --as feedback",
        )
    texts = [t for it in usable for t in (it.text_correct, it.text_incorrect)]
    scores = score(texts)
    hits = [scores[2 * i] > scores[2 * i + 1] for i in range(len(usable))]
    return _report(name, "pm", usable, hits, rejects)


def eval_with_feedback_model(
    name: str,
    items: Sequence[EvalItem],
    engine: Any,
    *,
    cot: bool = False,
    sampling: Any = None,
    rejects: list[dict[str, Any]] | None = None,
) -> EvalReport:
    """The model answers each multiple-choice prompt; right when the correct option scores best.

    With `cot`, "The answer is:" becomes "Let's think step-by-step:", a rationale is sampled,
    and the options are scored after "So the answer is:" (paper Fig. 4).
    """
    from cai_ray.engines.base import SamplingParams, ScoreRequest

    rejects = list(rejects or [])
    params = sampling or SamplingParams(temperature=0.0, max_new_tokens=128)
    params = dataclasses.replace(params, n=1, stop=RATIONALE_STOP)
    items, too_long = _fitting(items, engine, extra=8 + (params.max_new_tokens if cot else 0))
    rejects += too_long
    prefixes = [it.prompt.rstrip() for it in items]
    if cot:
        prompts = [_cot_prompt(p) for p in prefixes]
        gens = engine.generate(prompts, params)
        prefixes = [
            cot_scoring_prefix(p, clean_rationale(g[0].text))
            for p, g in zip(prompts, gens, strict=True)
        ]
    requests = [ScoreRequest(p, it.options) for p, it in zip(prefixes, items, strict=True)]
    scores = engine.score_options(requests) if requests else []
    hits = [
        max(range(len(s.logprobs)), key=s.logprobs.__getitem__) == it.correct
        for s, it in zip(scores, items, strict=True)
    ]
    return _report(name, "feedback-cot" if cot else "feedback", items, hits, rejects)


def _fitting(items: Sequence[EvalItem], engine: Any, *, extra: int) -> tuple[list, list]:
    """Items whose prompt fits the model's context, and rejects for the rest."""
    counts = engine.count_tokens([it.prompt for it in items])
    budget = engine.max_context - extra
    keep = [it for it, n in zip(items, counts, strict=True) if n <= budget]
    rejects = [
        {"row": it.row, "reason": f"prompt too long: {n} tokens, the model takes {budget}"}
        for it, n in zip(items, counts, strict=True)
        if n > budget
    ]
    return keep, rejects


def _cot_prompt(prompt: str) -> str:
    head, sep, _ = prompt.rpartition("The answer is:")
    return f"{head}{_COT_CUE}" if sep else f"{prompt}\n{_COT_CUE}"
