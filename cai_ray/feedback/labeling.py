"""AI-feedback labels for response pairs (paper section 4.1): prompts, combination, statistics.

Pure functions: the labeller actor (actors/labeler.py) builds `LabelQuery`s here, scores them
with one `Engine.score_options` call, and folds the option log-probabilities back into a
`PairLabel`. For a pair (A, B) and K principles drawn by pair id, each principle is asked in
both orders; every probability below is P(response A is preferred), whatever order it was shown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean
from typing import TYPE_CHECKING, Any, Literal

from cai_ray.config import RLLabelConfig
from cai_ray.constitution import (
    ANSWER_PREFIX,
    COT_ANSWER_PREFIX,
    COT_PREFIX,
    choose_principles,
    cot_turns,
    render_multiple_choice,
)
from cai_ray.data.tokens import response_separator
from cai_ray.errors import ModelError
from cai_ray.feedback.prompts import OPTIONS, clamp, disjoint_logprobs, prob_first_preferred

if TYPE_CHECKING:
    from cai_ray.data.conversation import PromptFormat

Order = Literal["ab", "ba"]
LabelMode = Literal["soft", "hard", "clamped"]
# Where a sampled rationale ends: the answer line, or the model starting a new transcript.
RATIONALE_STOP = (COT_ANSWER_PREFIX, "\n\nHuman:", "\n\nConsider the following conversation")


@dataclass(frozen=True)
class LabelQuery:
    """One prompt to score: principle `slot` of the pair, responses shown in `order`."""

    slot: int
    principle_id: str
    order: Order
    prefix: str  # ends with "The answer is:" (or "Let's think step-by-step:" for CoT)


@dataclass(frozen=True)
class QueryResult:
    """A scored query: P(first shown preferred), the token ids scored, the rationale if any."""

    query: LabelQuery
    p_first: float
    option_token_ids: list[list[int]]
    rationale: str | None = None

    @property
    def p_a(self) -> float:
        """P(response A preferred): the first option is A in order "ab", B in order "ba"."""
        return self.p_first if self.query.order == "ab" else 1.0 - self.p_first


@dataclass
class PairLabel:
    """The final label of a pair and the trace behind it."""

    p: float  # after the label mode: the training target P(A preferred)
    p_raw: float  # before the label mode
    principles: list[dict[str, Any]]  # per slot: principle_id, p, p_ab, p_ba
    trace: list[dict[str, Any]]  # per scored query: slot, principle_id, order, p_a, rationale
    flips: int = 0  # principles whose preferred response changed with the order
    order_checks: int = 0
    split_options: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def few_shots(
    constitution: Any, *, key: str, settings: RLLabelConfig, seed: int = 0
) -> list[tuple[Any, str | None]]:
    """The few-shot examples (chain-of-thought ones with `settings.cot`) and the question each
    is shown under (paper 4.1: each its own).

    An example without a principle of its own gets one drawn by (seed, key, example index), so a
    resumed run builds the same prompt; None means the example's own question.
    """
    examples = constitution.cot_examples if settings.cot else constitution.feedback_examples
    if settings.few_shot is not None:
        examples = examples[: settings.few_shot]
    principles = constitution.feedback_principles
    shots = []
    for j, ex in enumerate(examples):
        question = None
        if ex.principle is None and ex.question is None:
            drawn = choose_principles(principles, seed=seed, key=f"{key}#ex{j}")
            question = drawn[0].question
        shots.append((ex, question))
    return shots


def cot_prompt(
    question_block: str,
    *,
    shots: Sequence[tuple[Any, str | None]] = (),
    fmt: PromptFormat | None = None,
) -> str:
    """The chain-of-thought prompt: the helpful model is asked the multiple-choice question.

    Paper 4.1 asks it as the human and lets the assistant answer "Let's think step-by-step:"
    (issue 14: not raw text after the options). Transcript: "\\n\\nHuman: <question block>
    \\n\\nAssistant: Let's think step-by-step:", after the few-shot examples framed the same way.
    Chat (`fmt.kind == "chat"`): the examples as earlier user/assistant turns and the question as
    the last user turn, through the feedback model's chat template with the generation prompt,
    the cue appended after it. The turns alternate strictly (Gemma's template requires it).
    """
    if fmt is None or fmt.kind != "chat":
        return "".join(ex.as_transcript(question=q) for ex, q in shots) + cot_turns(question_block)
    messages = [m for ex, q in shots for m in ex.as_messages(question=q)]
    messages.append({"role": "user", "content": question_block.strip()})
    text = fmt.render_messages(messages, add_generation_prompt=True)
    return f"{text}{response_separator(text)}{COT_PREFIX}"


def build_queries(
    constitution: Any,
    *,
    pair_id: str,
    messages: Sequence[Mapping[str, str]],
    response_a: str,
    response_b: str,
    settings: RLLabelConfig,
    seed: int = 0,
    fmt: PromptFormat | None = None,
) -> list[LabelQuery]:
    """K distinct principles keyed by `pair_id`, each in one or both orders, after the few-shot
    block. `fmt` (the run's format, with the feedback model's tokenizer for "chat") only shapes
    chain-of-thought prompts: the plain query is raw text a base LM can answer."""
    principles = choose_principles(
        constitution.require_feedback(),
        seed=seed,
        key=pair_id,
        k=settings.principles_per_label,
    )
    shots = few_shots(constitution, key=pair_id, settings=settings, seed=seed)
    answered = "\n\n".join(ex.as_transcript(question=q) for ex, q in shots)  # non-CoT shots
    orders: tuple[Order, ...] = ("ab", "ba") if settings.both_orders else ("ab",)
    queries = []
    for slot, principle in enumerate(principles):
        for order in orders:
            first, second = (response_a, response_b) if order == "ab" else (response_b, response_a)
            body = render_multiple_choice(
                list(messages), question=principle.question, response_a=first, response_b=second
            )
            if settings.cot:
                prefix = cot_prompt(body, shots=shots, fmt=fmt)
            else:
                asked = f"{body}\n{ANSWER_PREFIX}"
                prefix = f"{answered}\n\n{asked}" if shots else asked
            queries.append(LabelQuery(slot, principle.id, order, prefix))
    return queries


def clean_rationale(text: str) -> str:
    """The sampled rationale up to "So the answer is:" (or a new transcript), trimmed."""
    cut = len(text)
    for stop in RATIONALE_STOP:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut].strip()


def cot_scoring_prefix(prefix: str, rationale: str) -> str:
    """After a rationale the options are scored following "So the answer is:" (paper 4.1)."""
    return (
        f"{prefix} {rationale}\n{COT_ANSWER_PREFIX}"
        if rationale
        else f"{prefix}\n{COT_ANSWER_PREFIX}"
    )


def option_token_issue(option_token_ids: Sequence[Sequence[int]]) -> str | None:
    """How the feedback tokenizer split the option markers: None when each is one token.

    Several tokens per option are handled (the summed log-prob is the joint probability of the
    marker) and reported as "split"; an option whose tokens are a proper prefix of another's is
    reported as "prefix" (`scored` has made them disjoint events, issue 14); options with
    identical tokens cannot be told apart.
    """
    ids = [tuple(t) for t in option_token_ids]
    if len(set(ids)) < len(ids):
        raise ModelError(
            f"the feedback tokenizer encodes the options {OPTIONS} to the same tokens {ids[0]}",
            where="rl_label feedback model tokenizer",
            hint="use a feedback model whose tokenizer distinguishes ' (A)' from ' (B)'",
        )
    if any(len(u) > len(t) and u[: len(t)] == t for t in ids for u in ids):
        return "prefix"
    return "split" if any(len(t) != 1 for t in ids) else None


def apply_mode(p: float, mode: LabelMode, clamp_range: tuple[float, float]) -> float:
    """soft: p as is (paper: trains best); hard: 1, 0 or 0.5 on a tie; clamped: into the range."""
    if mode == "hard":
        return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5
    if mode == "clamped":
        return clamp(p, *clamp_range)
    return p


def combine(results: Sequence[QueryResult], settings: RLLabelConfig) -> PairLabel:
    """Average rationales, then orders (position bias), then principles; apply the label mode.

    Chain-of-thought probabilities are near 0 or 1, so each is clamped first (paper: [0.4, 0.6]).
    """
    by_slot: dict[int, dict[str, list[float]]] = {}
    ids: dict[int, str] = {}
    trace, split = [], False
    for r in results:
        p_a = clamp(r.p_a, *settings.clamp) if settings.cot else r.p_a
        by_slot.setdefault(r.query.slot, {}).setdefault(r.query.order, []).append(p_a)
        ids[r.query.slot] = r.query.principle_id
        split = split or option_token_issue(r.option_token_ids) is not None
        trace.append(
            {
                "slot": r.query.slot,
                "principle_id": r.query.principle_id,
                "order": r.query.order,
                "p_first": r.p_first,
                "p_a": p_a,
                "rationale": r.rationale,
                "option_token_ids": [list(t) for t in r.option_token_ids],
            }
        )
    principles, flips, checks = [], 0, 0
    for slot in sorted(by_slot):
        orders = {o: fmean(ps) for o, ps in by_slot[slot].items()}
        if "ab" in orders and "ba" in orders:
            checks += 1
            flips += (orders["ab"] > 0.5) != (orders["ba"] > 0.5)
        p = fmean(orders.values())
        principles.append(
            {"principle_id": ids[slot], "p": p, "p_ab": orders.get("ab"), "p_ba": orders.get("ba")}
        )
    p_raw = fmean(x["p"] for x in principles)
    p = apply_mode(p_raw, settings.mode, settings.clamp)
    return PairLabel(p, p_raw, principles, trace, flips, checks, split)


def scored(query: LabelQuery, logprobs: Sequence[float], token_ids, rationale=None) -> QueryResult:
    """A QueryResult from the two options' summed log-probabilities, as disjoint events (an
    option whose tokens prefix the other's would otherwise include it: issue 14)."""
    exact = disjoint_logprobs(logprobs, token_ids)
    return QueryResult(query, prob_first_preferred(exact[0], exact[1]), token_ids, rationale)


def label_statistics(labels: Iterable[Mapping[str, Any]], *, bins: int = 10) -> dict[str, Any]:
    """Manifest statistics over label rows (`label`, `flips`, `order_checks`, `principles`).

    One pass, so `labels` may stream from disk shard by shard (memory stays flat at 100k+).
    - distribution: counts of the final label in `bins` equal bins of [0, 1];
    - flip_rate: share of (pair, principle) checks whose winner changed with the order;
    - mean_confidence: mean of max(p, 1 - p) of the final labels;
    - principle_agreement: share of principle pairs (within a pair) that pick the same winner.
    """
    hist = [0] * bins
    n = checks = flips = agree = total = prefers = 0
    sum_p = sum_conf = 0.0
    for r in labels:
        p = float(r["label"])
        n += 1
        hist[min(int(p * bins), bins - 1)] += 1
        sum_p += p
        sum_conf += max(p, 1 - p)
        prefers += p > 0.5
        checks += int(r["order_checks"])
        flips += int(r["flips"])
        wins = [float(x["p"]) > 0.5 for x in r["principles"]]
        for i in range(len(wins)):
            for j in range(i + 1, len(wins)):
                total += 1
                agree += wins[i] == wins[j]
    return {
        "labels": n,
        "distribution": {"bins": bins, "counts": hist},
        "mean_label": sum_p / n if n else None,
        "prefers_a": prefers / n if n else None,
        "flip_rate": flips / checks if checks else None,
        "mean_confidence": sum_conf / n if n else None,
        "principle_agreement": agree / total if total else None,
    }


def best_and_worst(n: int, wins: Mapping[tuple[int, int], float]) -> tuple[int, int]:
    """The responses with the highest and lowest mean win probability in a round robin.

    `wins[(i, j)]` (i < j) is P(i preferred over j). The NeMo-Aligner variant of paper 4.1:
    N candidates per prompt, the best and the worst are kept as the training pair.
    """
    score = [0.0] * n
    for (i, j), p in wins.items():
        score[i] += p
        score[j] += 1.0 - p
    best = max(range(n), key=lambda i: (score[i], -i))
    worst = min((i for i in range(n) if i != best), key=lambda i: (score[i], i))
    return best, worst
