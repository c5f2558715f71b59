"""The paper's text layouts for constitution prompts, shared by few-shot examples and live queries.

Kept separate from cai_ray.data.conversation on purpose: the constitution package renders its own small
transcripts so it depends on nothing else in the project. Prompt builders that render the live
query should call these functions, so the query and its few-shot examples look the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Paper §3.1: the raw-text markers of a critique/revision step.
CRITIQUE_REQUEST = "CritiqueRequest:"
CRITIQUE = "Critique:"
REVISION_REQUEST = "RevisionRequest:"
REVISION = "Revision:"
# Paper §4.1: the multiple-choice feedback prompt.
FEEDBACK_HEADER = "Consider the following conversation between a human and an assistant:"
ANSWER_PREFIX = "The answer is:"
COT_PREFIX = "Let's think step-by-step:"
COT_ANSWER_PREFIX = "So the answer is:"

_SPEAKERS = {"user": "Human", "assistant": "Assistant"}


def _role_content(turn: Any) -> tuple[str, str]:
    if isinstance(turn, Mapping):
        return turn["role"], turn["content"]
    return turn.role, turn.content


def render_turns(turns: Sequence[Any]) -> str:
    """Turns (objects or dicts with role/content) in the hh-rlhf layout "\\n\\nHuman: ...".

    A leading system turn has no speaker in that layout, so its text comes first, bare.
    """
    parts = []
    for turn in turns:
        role, content = _role_content(turn)
        parts.append(content if role == "system" else f"\n\n{_SPEAKERS[role]}: {content}")
    return "".join(parts)


def critique_round_text(
    critique_request: str, critique: str, revision_request: str, revision: str
) -> str:
    """One critique/revision round in the paper layout, to append after the conversation."""
    return (
        f"\n\n{CRITIQUE_REQUEST} {critique_request}\n\n{CRITIQUE} {critique}"
        f"\n\n{REVISION_REQUEST} {revision_request}\n\n{REVISION} {revision}"
    )


def critique_round_messages(
    critique_request: str, critique: str, revision_request: str, revision: str
) -> list[dict[str, str]]:
    """One round as chat turns (Hugging Face llm-swarm layout): user asks, assistant answers."""
    return [
        {"role": "user", "content": critique_request},
        {"role": "assistant", "content": critique},
        {"role": "user", "content": revision_request},
        {"role": "assistant", "content": revision},
    ]


def options_question(question: str) -> str:
    """`question` stripped, ending with "Options:" (added on a line of its own when missing)."""
    q = question.strip()
    return q if q.endswith("Options:") else f"{q}\nOptions:"


def render_multiple_choice(
    conversation: str | Sequence[Any], *, question: str, response_a: str, response_b: str
) -> str:
    """The feedback prompt up to the options (paper §4.1); append "\\nThe answer is:" to score.

    The one layout of every multiple-choice prompt (live queries, few-shot examples, serve)::

        Consider the following conversation between a human and an assistant:
        Human: ...
        <blank line>
        <question> Options:
        (A) ...
        (B) ...

    `conversation` is a rendered transcript or a list of turns; its surrounding blank lines are
    dropped. The blank line before the question keeps it from reading as part of the human's
    last message (the paper's files have it; issue 14).
    """
    text = conversation if isinstance(conversation, str) else render_turns(conversation)
    return (
        f"{FEEDBACK_HEADER}\n{text.strip()}\n\n{options_question(question)}\n"
        f"(A) {response_a.strip()}\n(B) {response_b.strip()}"
    )


def cot_turns(question_block: str, completion: str = "") -> str:
    """A chain-of-thought question asked of a helpful model as a Human turn (paper §4.1).

    "\\n\\nHuman: <multiple-choice block>\\n\\nAssistant: Let's think step-by-step: ...";
    with no `completion`, the prompt ends at the cue and the model writes the rationale.
    """
    answer = completion.strip() or COT_PREFIX
    return f"\n\nHuman: {question_block.strip()}\n\nAssistant: {answer}"
