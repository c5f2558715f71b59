"""The constitution's data model: principles and few-shot examples, validated with pydantic.

A constitution (paper §3-§4) holds critique/revision request pairs for the supervised stage,
multiple-choice questions for AI feedback, and few-shot examples of both. Texts are stored clean
(no "CritiqueRequest:" markers, no surrounding whitespace); the `as_transcript` / `as_messages`
methods add the paper's raw-text layout or the chat-turn layout when a prompt is built.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError

from cai_ray.constitution.render import (
    COT_ANSWER_PREFIX,
    COT_PREFIX,
    cot_turns,
    critique_round_messages,
    critique_round_text,
    render_multiple_choice,
    render_turns,
)
from cai_ray.errors import ConstitutionError

_QUOTE_HINT = "YAML reads bare numbers, yes/no, on/off and true/false as non-text: quote the value"


class FieldIssue(ValueError):
    """A cross-field problem, with the path (relative to the model raising it) of the culprit.

    Pydantic keeps the original exception in the error's context, so the loader can extend the
    location with `path` and point at the exact YAML line.
    """

    def __init__(self, message: str, *, path: tuple[str | int, ...] = (), hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = path
        self.hint = hint


def _clean_text(value: Any) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError(
            "text_type",
            "expected text, got {kind}",
            {"kind": type(value).__name__, "hint": _QUOTE_HINT},
        )
    # Stripping makes `>`, `|-` and plain YAML scalars hash alike; rendering adds its own spacing.
    text = value.strip()
    if not text:
        raise PydanticCustomError(
            "text_empty", "text is empty", {"hint": "write the text or remove the entry"}
        )
    return text


def _clean_id(value: Any) -> str:
    text = _clean_text(value)
    if not all(ch.isalnum() or ch in "-_." for ch in text) or not text[0].isalnum():
        raise PydanticCustomError(
            "id_format",
            "id '{id}' may only contain letters, digits, '-', '_' and '.'",
            {"id": text, "hint": "use a short slug such as 'harm-general'"},
        )
    return text


def _clean_version(value: Any) -> str:
    if isinstance(value, bool | float):
        raise PydanticCustomError(
            "version_type",
            "version {value} is not text",
            {"value": value, "hint": 'quote it, e.g. version: "1.10" (a bare 1.10 reads as 1.1)'},
        )
    return _clean_text(str(value) if isinstance(value, int) else value)


def _clean_answer(value: Any) -> Any:
    # Accept "a", "(B)" and the like: the meaning is unambiguous and the stored form is canonical.
    if isinstance(value, str):
        return value.strip().strip("()").strip().upper()
    return value


Text = Annotated[str, BeforeValidator(_clean_text)]
Id = Annotated[str, BeforeValidator(_clean_id)]
Version = Annotated[str, BeforeValidator(_clean_version)]
Answer = Annotated[Literal["A", "B"], BeforeValidator(_clean_answer)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Turn(_Model):
    """One conversation turn; rendered "\\n\\nHuman: " (user) or "\\n\\nAssistant: " (assistant)."""

    role: Literal["user", "assistant", "system"]
    content: Text


class CritiquePrinciple(_Model):
    """A critique request and its matching revision request (paper §3.1)."""

    id: Id
    critique: Text
    revision: Text


class FeedbackPrinciple(_Model):
    """A multiple-choice question put to the feedback model (paper §4.1)."""

    id: Id
    question: Text


def _check_conversation(turns: list[Turn], *, last: str) -> None:
    for i, turn in enumerate(turns):
        if turn.role == "system" and i != 0:
            raise FieldIssue("a system turn may only come first", path=("conversation", i, "role"))
    if turns[-1].role != last:
        raise FieldIssue(
            f"the conversation must end with {'an' if last == 'assistant' else 'a'} {last} turn",
            path=("conversation", len(turns) - 1, "role"),
            hint="critique examples end with the assistant reply being critiqued; feedback "
            "examples end with the user turn that responses A and B answer",
        )


class CritiqueRound(_Model):
    """One critique -> revision step. Requests come from `principle` unless written out here."""

    principle: Id | None = None
    critique_request: Text | None = None
    revision_request: Text | None = None
    critique: Text
    revision: Text
    _principle: CritiquePrinciple | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _requests_known(self) -> CritiqueRound:
        if self.principle is None:
            for name in ("critique_request", "revision_request"):
                if getattr(self, name) is None:
                    raise FieldIssue(
                        f"a round without `principle` needs `{name}`",
                        path=(name,),
                        hint="name a critique principle id, or write both request texts",
                    )
        return self

    @property
    def resolved_critique_request(self) -> str:
        """The critique request text shown in the transcript."""
        return self.critique_request or self._linked().critique

    @property
    def resolved_revision_request(self) -> str:
        """The revision request text shown in the transcript."""
        return self.revision_request or self._linked().revision

    def _linked(self) -> CritiquePrinciple:
        if self._principle is None:
            raise ConstitutionError(
                f"round refers to principle {self.principle!r} but belongs to no constitution",
                hint="load the example as part of a constitution so its principle can be found",
            )
        return self._principle


class CritiqueExample(_Model):
    """A few-shot critique/revision transcript: a conversation, then 1+ critique/revision rounds."""

    id: Id | None = None
    conversation: list[Turn] = Field(min_length=1)
    rounds: list[CritiqueRound] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> CritiqueExample:
        _check_conversation(self.conversation, last="assistant")
        return self

    def as_transcript(self) -> str:
        """Paper layout: "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nCritiqueRequest: ..." etc."""
        rounds = "".join(
            critique_round_text(
                r.resolved_critique_request, r.critique, r.resolved_revision_request, r.revision
            )
            for r in self.rounds
        )
        return render_turns(self.conversation) + rounds

    def as_messages(self) -> list[dict[str, str]]:
        """Chat layout (Hugging Face's): the user asks for a critique, then for a revision."""
        messages = [{"role": t.role, "content": t.content} for t in self.conversation]
        for r in self.rounds:
            messages += critique_round_messages(
                r.resolved_critique_request, r.critique, r.resolved_revision_request, r.revision
            )
        return messages


class FeedbackExample(_Model):
    """A few-shot multiple-choice label: which of two final replies the principle prefers."""

    id: Id | None = None
    conversation: list[Turn] = Field(min_length=1)
    principle: Id | None = None
    question: Text | None = None
    response_a: Text
    response_b: Text
    answer: Answer
    _principle: FeedbackPrinciple | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _shape(self) -> FeedbackExample:
        _check_conversation(self.conversation, last="user")
        return self

    def resolved_question(self, question: str | None = None) -> str:
        """The question to show: `question` if given, else this example's own, else its principle's.

        Examples with neither take a principle sampled at prompt-build time (paper §4.1: each
        few-shot example gets its own sampled principle), passed here as `question`.
        """
        text = question or self.question or (self._principle.question if self._principle else None)
        if text is None:
            raise ConstitutionError(
                "this feedback example has no principle or question",
                hint="pass question= (a sampled feedback principle's question) when rendering",
            )
        return text

    def _prompt(self, question: str | None) -> str:
        return render_multiple_choice(
            self.conversation,
            question=self.resolved_question(question),
            response_a=self.response_a,
            response_b=self.response_b,
        )

    def completion(self) -> str:
        """The text that follows the prompt: "The answer is: (A)"."""
        return f"The answer is: ({self.answer})"

    def as_transcript(self, question: str | None = None) -> str:
        """The paper's multiple-choice block with the answer filled in."""
        return f"{self._prompt(question)}\n{self.completion()}"

    def as_messages(self, question: str | None = None) -> list[dict[str, str]]:
        """Chat layout: the multiple-choice prompt as a user turn, the answer as the reply."""
        return [
            {"role": "user", "content": self._prompt(question)},
            {"role": "assistant", "content": self.completion()},
        ]


class CotExample(FeedbackExample):
    """A chain-of-thought feedback example: a step-by-step rationale before the answer (§4.1)."""

    rationale: Text

    def completion(self) -> str:
        """ "Let's think step-by-step: <rationale>\\nSo the answer is: (A)"."""
        return f"{COT_PREFIX} {self.rationale}\n{COT_ANSWER_PREFIX} ({self.answer})"

    def as_transcript(self, question: str | None = None) -> str:
        """The question as a Human turn, the rationale and answer as the Assistant's (paper §4.1):
        chain of thought asks a helpful model, so its examples are framed the way the live
        query is (issue 14)."""
        return cot_turns(self._prompt(question), self.completion())


class Constitution(_Model):
    """A validated constitution. Load one with `load_constitution(path)`."""

    name: Text
    version: Version
    description: Text
    source: Text | None = None
    critique_principles: list[CritiquePrinciple] = []
    feedback_principles: list[FeedbackPrinciple] = []
    critique_examples: list[CritiqueExample] = []
    feedback_examples: list[FeedbackExample] = []
    cot_examples: list[CotExample] = []
    _path: str | None = PrivateAttr(None)
    _hash: str = PrivateAttr("")

    @model_validator(mode="after")
    def _cross_checks(self) -> Constitution:
        if not self.critique_principles and not self.feedback_principles:
            raise FieldIssue(
                "the constitution has no principles",
                hint="add `critique_principles` (id, critique, revision) and/or "
                "`feedback_principles` (id, question)",
            )
        for section in ("critique_principles", "feedback_principles"):
            _check_unique(getattr(self, section), section)
        for section in ("critique_examples", "feedback_examples", "cot_examples"):
            _check_unique([e for e in getattr(self, section) if e.id is not None], section)
        _link_examples(self)
        self._hash = hashlib.sha256(canonical_json(self).encode()).hexdigest()
        return self

    @property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the content: blind to YAML layout, comments, key order."""
        return self._hash

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of `content_hash`, for logs and file names."""
        return self._hash[:12]

    @property
    def path(self) -> str | None:
        """The file this constitution was loaded from, if any."""
        return self._path

    def counts(self) -> dict[str, int]:
        """How many principles and few-shot examples of each kind it holds."""
        return {
            "critique_principles": len(self.critique_principles),
            "feedback_principles": len(self.feedback_principles),
            "critique_examples": len(self.critique_examples),
            "feedback_examples": len(self.feedback_examples),
            "cot_examples": len(self.cot_examples),
        }

    def require_critique(self) -> list[CritiquePrinciple]:
        """The critique principles; a clear error for stages that need them when there are none."""
        if not self.critique_principles:
            raise ConstitutionError(
                f"constitution {self.name!r} has no critique principles",
                where=self._where(),
                hint="the critique/revision stage needs `critique_principles` entries "
                "(id, critique, revision); add some or use a constitution that has them",
            )
        return self.critique_principles

    def require_feedback(self) -> list[FeedbackPrinciple]:
        """The feedback principles; a clear error for stages that need them when there are none."""
        if not self.feedback_principles:
            raise ConstitutionError(
                f"constitution {self.name!r} has no feedback principles",
                where=self._where(),
                hint="AI labelling needs `feedback_principles` entries (id, question); add some "
                "(imports from the Hugging Face format have none) or use another constitution",
            )
        return self.feedback_principles

    def critique_principle(self, principle_id: str) -> CritiquePrinciple:
        """The critique principle with this id; the error suggests the closest id."""
        return _lookup(self.critique_principles, principle_id, "critique", self._where())

    def feedback_principle(self, principle_id: str) -> FeedbackPrinciple:
        """The feedback principle with this id; the error suggests the closest id."""
        return _lookup(self.feedback_principles, principle_id, "feedback", self._where())

    def with_path(self, path: str | None) -> Constitution:
        """This constitution, remembering the file it came from (for error messages)."""
        self._path = path
        return self

    def _where(self) -> str:
        return self._path or f"constitution {self.name!r}"


def canonical_json(constitution: Constitution) -> str:
    """The hashed form: sorted keys, no whitespace, None fields left out."""
    data = constitution.model_dump(mode="json", exclude_none=True)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _check_unique(items: list[Any], section: str) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            raise FieldIssue(
                f"duplicate id {item.id!r} (also entry {seen[item.id]})",
                path=(section, i, "id"),
                hint="give every entry of a section its own id",
            )
        seen[item.id] = i


def _unknown_id(kind: str, principle_id: str, known: list[str]) -> tuple[str, str]:
    close = difflib.get_close_matches(principle_id, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {kind} principle id {principle_id!r}", f"{hint}known ids: {', '.join(known)}"


def _link_examples(c: Constitution) -> None:
    # Examples may name a principle instead of repeating its text; resolve those links once here.
    critique = {p.id: p for p in c.critique_principles}
    for i, example in enumerate(c.critique_examples):
        for j, rnd in enumerate(example.rounds):
            if rnd.principle is None:
                continue
            if rnd.principle not in critique:
                msg, hint = _unknown_id("critique", rnd.principle, list(critique))
                path = ("critique_examples", i, "rounds", j, "principle")
                raise FieldIssue(msg, path=path, hint=hint)
            rnd._principle = critique[rnd.principle]
    feedback = {p.id: p for p in c.feedback_principles}
    for section in ("feedback_examples", "cot_examples"):
        for i, example in enumerate(getattr(c, section)):
            if example.principle is None:
                continue
            if example.principle not in feedback:
                msg, hint = _unknown_id("feedback", example.principle, list(feedback))
                raise FieldIssue(msg, path=(section, i, "principle"), hint=hint)
            example._principle = feedback[example.principle]


def _lookup(items: list[Any], principle_id: str, kind: str, where: str) -> Any:
    for item in items:
        if item.id == principle_id:
            return item
    msg, hint = _unknown_id(kind, principle_id, [p.id for p in items])
    raise ConstitutionError(msg, where=where, hint=hint)
