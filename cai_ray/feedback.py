"""The multiple-choice feedback prompt and label math of RL-CAI (paper section 4.1).

A feedback model that can be a plain LM reads a conversation, a principle and two responses, and
the label is the normalised probability of the option tokens ` (A)` / ` (B)` after
"The answer is:" — one shared-prefix pass through `Engine.score_options`, no sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

OPTIONS = (" (A)", " (B)")
HEADER = "Consider the following conversation between a human and an assistant:"
ANSWER_CUE = "The answer is:"


def build_feedback_prompt(
    conversation: str,
    question: str,
    response_a: str,
    response_b: str,
    *,
    few_shot: str = "",
) -> str:
    """The paper's feedback prompt; score `OPTIONS` as continuations of it.

    `conversation` is the transcript up to (not including) the compared assistant turn, e.g.
    "\\n\\nHuman: ...\\n\\nAssistant:"; the trailing "Assistant:" cue is dropped, since the
    responses are shown as options. `few_shot` is prepended verbatim (already-rendered examples).
    """
    convo = conversation.rstrip()
    if convo.endswith("Assistant:"):
        convo = convo[: -len("Assistant:")].rstrip()
    q = question.strip()
    if not q.endswith("Options:"):
        q += "\nOptions:"
    body = (
        f"{HEADER}\n{convo.strip()}\n\n{q}\n"
        f"(A) {response_a.strip()}\n(B) {response_b.strip()}\n{ANSWER_CUE}"
    )
    return f"{few_shot.rstrip()}\n\n{body}" if few_shot.strip() else body


def option_probabilities(logprobs: Sequence[float]) -> list[float]:
    """Softmax over the options' log-probabilities: p_i = exp(l_i) / sum_j exp(l_j)."""
    m = max(logprobs)
    exps = [math.exp(lp - m) for lp in logprobs]
    total = sum(exps)
    return [e / total for e in exps]


def prob_first_preferred(logprob_a: float, logprob_b: float) -> float:
    """P(response shown as (A) is preferred) = exp(lA) / (exp(lA) + exp(lB))."""
    return option_probabilities([logprob_a, logprob_b])[0]


def combine_orders(p_a_first: float, p_a_second: float) -> float:
    """Average the two presentation orders to cancel position bias.

    `p_a_first` is P(A preferred) with A shown first; `p_a_second` is P(A preferred) with A shown
    second (i.e. 1 - P(first option) in the swapped prompt). Both are about the same response A.
    """
    return 0.5 * (p_a_first + p_a_second)


def clamp(p: float, low: float = 0.4, high: float = 0.6) -> float:
    """Chain-of-thought labels are near 0/1; the paper clamps them to [0.4, 0.6]."""
    return min(max(p, low), high)


# Direct RLAIF (Lee et al. 2023, sec. 2.3): the feedback model rates one response, no PM.
RATING_OPTIONS = tuple(f" {k}" for k in range(1, 11))
RATING_CUE = "Rating (1-10):"


def build_rating_prompt(conversation: str, response: str, *, criterion: str) -> str:
    """Ask the feedback model to rate `response` under `criterion`; score `RATING_OPTIONS` after it.

    `conversation` is the transcript up to the assistant's turn, as in `build_feedback_prompt`.
    """
    convo = conversation.rstrip()
    if convo.endswith("Assistant:"):
        convo = convo[: -len("Assistant:")].rstrip()
    return (
        f"{HEADER}\n{convo.strip()}\n\nAssistant: {response.strip()}\n\n"
        f"{criterion.strip()}\n{RATING_CUE}"
    )
