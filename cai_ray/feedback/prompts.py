"""The multiple-choice feedback prompt and label math of RL-CAI (paper section 4.1).

A feedback model that can be a plain LM reads a conversation, a principle and two responses, and
the label is the normalised probability of the option tokens ` (A)` / ` (B)` after
"The answer is:" — one shared-prefix pass through `Engine.score_options`, no sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cai_ray.constitution.render import ANSWER_PREFIX, FEEDBACK_HEADER, render_multiple_choice

OPTIONS = (" (A)", " (B)")
HEADER = FEEDBACK_HEADER
ANSWER_CUE = ANSWER_PREFIX


def build_feedback_prompt(
    conversation: str,
    question: str,
    response_a: str,
    response_b: str,
    *,
    few_shot: str = "",
) -> str:
    """The paper's feedback prompt (`render_multiple_choice`'s layout); score `OPTIONS` after it.

    `conversation` is the transcript up to (not including) the compared assistant turn, e.g.
    "\\n\\nHuman: ...\\n\\nAssistant:"; the trailing "Assistant:" cue is dropped, since the
    responses are shown as options. `few_shot` is prepended verbatim (already-rendered examples).
    """
    convo = conversation.rstrip()
    if convo.endswith("Assistant:"):
        convo = convo[: -len("Assistant:")].rstrip()
    block = render_multiple_choice(
        convo, question=question, response_a=response_a, response_b=response_b
    )
    body = f"{block}\n{ANSWER_CUE}"
    return f"{few_shot.rstrip()}\n\n{body}" if few_shot.strip() else body


def disjoint_logprobs(
    logprobs: Sequence[float], option_token_ids: Sequence[Sequence[int]]
) -> list[float]:
    """Summed option log-probs turned into log-probs of disjoint events (issue 14).

    Scoring options as continuations makes an option whose tokens are a proper prefix of
    another's include it: on Qwen/Gemma " 1" is [" ", "1"] and " 10" is [" ", "1", "0"], so
    P(" 1") counts P(" 10"). The exact event "this option and no longer one" has
    P(i) - sum of P(j) over its minimal extensions j (options extending i with no other option
    in between), computed as l_i + log1p(-sum_j exp(l_j - l_i)); a non-positive remainder
    (rounding) gives -inf. No prefix relation (one token per option): returned unchanged.

    >>> [round(x, 6) for x in disjoint_logprobs([math.log(0.5), math.log(0.3)], [[1], [1, 0]])]
    [-1.609438, -1.203973]
    """
    ids = [tuple(t) for t in option_token_ids]
    if len(ids) != len(logprobs):
        raise ValueError(f"{len(logprobs)} log-probs for {len(ids)} options")
    out = list(map(float, logprobs))
    for i, t in enumerate(ids):
        longer = [j for j, u in enumerate(ids) if _extends(u, t)]
        minimal = [j for j in longer if not any(_extends(ids[j], ids[m]) for m in longer)]
        if not minimal:
            continue
        ratio = sum(math.exp(logprobs[j] - logprobs[i]) for j in minimal)
        out[i] = logprobs[i] + math.log1p(-ratio) if ratio < 1.0 else -math.inf
    return out


def _extends(longer: tuple[int, ...], shorter: tuple[int, ...]) -> bool:
    """True when `shorter` is a proper prefix of `longer`."""
    return len(longer) > len(shorter) and longer[: len(shorter)] == shorter


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
