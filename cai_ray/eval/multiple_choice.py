"""Multiple-choice evaluations of the paper's `evals/` files (section 4 and Fig. 4).

All three files share one layout: `prompt` (ending "The answer is:"), `corrects` and
`incorrects` (option strings such as " (B)"); the HHH file also has `text_correct` and
`text_incorrect`, the two full transcripts, for scoring with a preference model. Scoring needs
only what it is given: an `Engine` (feedback model) or a `score(texts)` callable (PM).

A feedback model's choice depends on which response it is shown first (Gemma 3 270M: 0.693 where
(A) is correct, 0.243 where (B) is; issue 14), so by default each two-option question is asked
in both orders and P(correct) is the mean of the two, as stage 4 labels are.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cai_ray.constitution import cot_turns
from cai_ray.errors import DataError
from cai_ray.feedback.labeling import RATIONALE_STOP, clean_rationale, cot_scoring_prefix
from cai_ray.feedback.prompts import disjoint_logprobs, option_probabilities

Order = Literal["file", "both"]
Tally = dict[str, dict[str, int]]  # correct option's position -> {"total": n, "correct": k}
EVAL_FILES = {
    "hhh": "438HHHEvaluations.jsonl",
    "harmful-vs-ethical": "HarmfulVsEthical.jsonl",
    "harm-classification": "HarmfulnessClassification.jsonl",
}


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
    """Accuracy overall and by the correct option's position; rows set aside with reasons.

    `by_position` counts the decisions that make `accuracy` (with both orders: the mean
    probability of the two, keyed by the correct option's position in the file); `orders` counts
    each order on its own ("file", "swapped"), keyed by the position the correct option was
    shown in, and `disagreements` the questions whose two orders picked different responses.
    """

    name: str
    method: str
    total: int
    correct: int
    by_position: Tally
    rejects: list[dict[str, Any]]
    order: Order | None = None  # None: a PM, which reads no options
    orders: dict[str, Tally] = field(default_factory=dict)
    disagreements: int | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: counts, accuracy, per-position accuracy, per-order accuracy, rejects."""
        out = {
            "eval": self.name,
            "method": self.method,
            "order": self.order,
            "total": self.total,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "by_position": _positions(self.by_position),
        }
        if self.orders:
            out["orders"] = {name: _tally_dict(t) for name, t in self.orders.items()}
            out["accuracy_by_order"] = {k: v["accuracy"] for k, v in out["orders"].items()}
            out["order_disagreement"] = self.disagreements / self.total if self.total else None
        return {**out, "rejects": self.rejects}

    def table(self) -> str:
        """A small text table for the terminal: each order, then the decision that counts."""
        head = f"{self.name} ({self.method}" + (", both orders)" if self.orders else ")")
        lines = [head, f"{'order':<10}{'position':<10}{'n':>6}{'accuracy':>10}"]
        final = "average" if self.orders else (self.order or self.method)
        for name, tally in [*self.orders.items(), (final, self.by_position)]:
            for key, v in sorted(tally.items()):
                lines.append(f"{name:<10}{key:<10}{v['total']:>6}{_ratio(v):>10.3f}")
            n = sum(v["total"] for v in tally.values())
            k = sum(v["correct"] for v in tally.values())
            lines.append(f"{name:<10}{'all':<10}{n:>6}{k / n if n else float('nan'):>10.3f}")
        if self.orders and self.total:
            lines.append(
                "(position: where the correct option was shown; for the average, in the file)"
            )
            lines.append(f"orders disagree on {self.disagreements}/{self.total} questions")
        if self.rejects:
            lines.append(f"({len(self.rejects)} rows set aside; see the JSON output)")
        return "\n".join(lines)


def _ratio(v: dict[str, int]) -> float:
    return v["correct"] / v["total"] if v["total"] else float("nan")


def _positions(tally: Tally) -> dict[str, dict[str, Any]]:
    return {
        k: {**v, "accuracy": v["correct"] / v["total"] if v["total"] else None}
        for k, v in sorted(tally.items())
    }


def _tally_dict(tally: Tally) -> dict[str, Any]:
    total = sum(v["total"] for v in tally.values())
    correct = sum(v["correct"] for v in tally.values())
    return {
        "total": total,
        "correct": correct,
        "accuracy": correct / total if total else None,
        "by_position": _positions(tally),
    }


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


def _tally(items: Sequence[EvalItem], hits: Sequence[bool]) -> Tally:
    by_pos: dict[str, Counter] = {}
    for item, hit in zip(items, hits, strict=True):
        c = by_pos.setdefault(item.correct_label, Counter())
        c["total"] += 1
        c["correct"] += int(hit)
    return {k: dict(v) for k, v in by_pos.items()}


def _report(name: str, method: str, items, hits, rejects, **extra: Any) -> EvalReport:
    return EvalReport(
        name,
        method,
        total=len(items),
        correct=sum(int(h) for h in hits),
        by_position=_tally(items, hits),
        rejects=rejects,
        **extra,
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


def swap_options(item: EvalItem) -> EvalItem | None:
    """The question with its two responses exchanged: the correct one is now shown in the other
    position. None when the prompt does not list each option once as a line "\\n (A) ...".

    The markers stay where they are, only the texts after them move, so "(A)" still comes first.
    """
    if len(item.options) != 2:
        return None
    head, cue, tail = item.prompt.rpartition("The answer is:")
    marks = [f"\n{o} " for o in item.options]  # e.g. "\n (A) "
    if not cue or any(head.count(m) != 1 for m in marks):
        return None
    a, b = head.index(marks[0]), head.index(marks[1])
    if a > b:
        return None
    text_a = head[a + len(marks[0]) : b]
    rest = head[b + len(marks[1]) :]
    text_b = rest.rstrip()
    swapped = f"{head[:a]}{marks[0]}{text_b}{marks[1]}{text_a}{rest[len(text_b) :]}{cue}{tail}"
    return dataclasses.replace(item, prompt=swapped, correct=1 - item.correct)


def eval_with_feedback_model(
    name: str,
    items: Sequence[EvalItem],
    engine: Any,
    *,
    cot: bool = False,
    order: Order = "both",
    sampling: Any = None,
    rejects: list[dict[str, Any]] | None = None,
    shots: Sequence[tuple[Any, str | None]] = (),
) -> EvalReport:
    """The model answers each multiple-choice prompt: P(option) is the normalised probability of
    its marker (disjoint events, as stage 4 scores them).

    order="both" (two-option files) also asks every question with the responses swapped; a
    question is answered correctly when the mean P(correct) of the two orders is above 0.5, and
    each order's own accuracy is reported beside it. order="file": the file's order only, right
    when the correct option scores best. With `cot` a rationale is sampled first after "Let's
    think step-by-step:" in the Human/Assistant framing, then the options are scored after
    "So the answer is:" (paper Fig. 4). `shots` are few-shot examples and the question each is
    shown under (`cai_ray.feedback.labeling.few_shots`), prepended as stage 4 prepends them.
    """
    from cai_ray.engines.base import SamplingParams

    rejects = list(rejects or [])
    params = sampling or SamplingParams(temperature=0.0, max_new_tokens=128)
    params = dataclasses.replace(params, n=1, stop=RATIONALE_STOP)
    prefix = _shot_prefix(shots, cot=cot)
    extra = 8 + (params.max_new_tokens if cot else 0)
    extra += engine.count_tokens([prefix])[0] if prefix else 0
    items, too_long = _fitting(items, engine, extra=extra)
    rejects += too_long
    method = "feedback-cot" if cot else "feedback"
    if order == "file":
        probs = _choice_probabilities(engine, items, cot=cot, params=params, shots=shots)
        hits = [_best(p) == it.correct for p, it in zip(probs, items, strict=True)]
        return _report(name, method, items, hits, rejects, order="file")
    items, swapped, unswappable = _both_orders(items)
    rejects += unswappable
    probs = _choice_probabilities(engine, [*items, *swapped], cot=cot, params=params, shots=shots)
    first, second = probs[: len(items)], probs[len(items) :]
    hits_file = [_best(p) == it.correct for p, it in zip(first, items, strict=True)]
    hits_swap = [_best(p) == it.correct for p, it in zip(second, swapped, strict=True)]
    # P(correct) = mean of P(correct shown first) and P(correct shown second), as stage 4 does
    mean = [
        0.5 * (p[it.correct] + q[sw.correct])
        for p, q, it, sw in zip(first, second, items, swapped, strict=True)
    ]
    return _report(
        name,
        method,
        items,
        [m > 0.5 for m in mean],
        rejects,
        order="both",
        orders={"file": _tally(items, hits_file), "swapped": _tally(swapped, hits_swap)},
        disagreements=sum(a != b for a, b in zip(hits_file, hits_swap, strict=True)),
    )


def _both_orders(items: Sequence[EvalItem]) -> tuple[list[EvalItem], list[EvalItem], list]:
    """Items that can be swapped, their swapped versions, and rejects for the rest."""
    if any(len(it.options) != 2 for it in items):
        raise DataError(
            "asking both orders needs questions with two options",
            hint="score this file in its own order (--order file)",
        )
    kept, swapped, rejects = [], [], []
    for it in items:
        sw = swap_options(it)
        if sw is None:
            rejects.append({"row": it.row, "reason": "options not found in the prompt to swap"})
        else:
            kept.append(it)
            swapped.append(sw)
    return kept, swapped, rejects


def _shot_prefix(shots: Sequence[tuple[Any, str | None]], *, cot: bool) -> str:
    """The answered few-shot examples before a question, in stage 4's layout."""
    if cot:
        return "".join(ex.as_transcript(question=q) for ex, q in shots)
    answered = "\n\n".join(ex.as_transcript(question=q) for ex, q in shots)
    return f"{answered}\n\n" if answered else ""


def _choice_probabilities(
    engine: Any, items: Sequence[EvalItem], *, cot: bool, params: Any, shots=()
) -> list[list[float]]:
    """Per item, its options' probabilities: one `generate` (CoT) and one `score_options`."""
    from cai_ray.engines.base import ScoreRequest

    head = _shot_prefix(shots, cot=cot)
    prefixes = [it.prompt.rstrip() for it in items]
    if cot:
        prompts = [head + _cot_prompt(p) for p in prefixes]
        gens = engine.generate(prompts, params) if prompts else []
        prefixes = [
            cot_scoring_prefix(p, clean_rationale(g[0].text))
            for p, g in zip(prompts, gens, strict=True)
        ]
    elif head:
        prefixes = [head + p.lstrip("\n") for p in prefixes]
    requests = [ScoreRequest(p, it.options) for p, it in zip(prefixes, items, strict=True)]
    scores = engine.score_options(requests) if requests else []
    return [option_probabilities(disjoint_logprobs(s.logprobs, s.option_token_ids)) for s in scores]


def _best(probs: Sequence[float]) -> int:
    return max(range(len(probs)), key=probs.__getitem__)


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
    """The question as a Human turn and "Let's think step-by-step:" as the Assistant's (paper
    4.1's chain-of-thought framing, as stage 4 asks it; issue 14)."""
    head, sep, _ = prompt.rpartition("The answer is:")
    return cot_turns(head if sep else prompt)
