"""Conversations (turns with roles) and their two renderings.

The paper's models read raw transcripts in the hh-rlhf layout, `\\n\\nHuman: ...\\n\\nAssistant: ...`
(arXiv 2212.08073, Sec. 3); instruction-tuned models read their own chat template instead. One
`Conversation` value renders to either, so every stage builds prompts the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from cai_ray.errors import ConfigError, DataError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
# Names other datasets use for the same roles (hh-rlhf says "Human").
_ROLE_ALIASES = {"human": "user"}

HUMAN_MARKER = "\n\nHuman:"
ASSISTANT_MARKER = "\n\nAssistant:"
# A marker opens a turn at the very start of the text or after a blank line.
_MARKER_RE = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_TRANSCRIPT_ROLE = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class Turn:
    """One message: who speaks (`system`, `user` or `assistant`) and what they say."""

    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DataError(
                f"role {self.role!r} is not one of {', '.join(ROLES)}",
                hint="use system/user/assistant (hh-rlhf 'Human' maps to user)",
            )
        if not isinstance(self.content, str):
            raise DataError(
                f"{self.role} content is not text (got {type(self.content).__name__})",
                hint="message content must be a string",
            )


@dataclass(frozen=True)
class Conversation:
    """An immutable sequence of turns; a system turn may only come first."""

    turns: tuple[Turn, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "turns", tuple(self.turns))
        if not self.turns:
            raise DataError("conversation has no turns", hint="give at least one user message")
        for i, turn in enumerate(self.turns):
            if not isinstance(turn, Turn):
                raise DataError(f"turn {i} is not a Turn (got {type(turn).__name__})")
            if turn.role == "system" and i > 0:
                raise DataError(
                    f"system turn at position {i}",
                    hint="a system message may only be the first turn",
                )

    @classmethod
    def from_messages(cls, messages: Any) -> Conversation:
        """Build from chat messages `[{"role": ..., "content": ...}, ...]`; raises DataError."""
        if hasattr(messages, "tolist") and not isinstance(messages, str):
            messages = messages.tolist()  # numpy arrays from pandas / Ray Data batches
        if not isinstance(messages, list | tuple):
            raise DataError(
                f"messages is not a list (got {type(messages).__name__})",
                hint='give a list of {"role": ..., "content": ...} objects',
            )
        turns = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(
                    f"message {i} is not an object with 'role' and 'content'",
                    hint='each message must look like {"role": "user", "content": "..."}',
                )
            role = str(message["role"]).lower()
            try:
                turn = Turn(_ROLE_ALIASES.get(role, role), message["content"])  # type: ignore[arg-type]
            except DataError as exc:
                raise DataError(exc.message, where=f"message {i}", hint=exc.hint) from None
            if not turn.content.strip():
                raise DataError(f"{turn.role} content is empty", where=f"message {i}")
            turns.append(turn)
        return cls(tuple(turns))

    @classmethod
    def from_transcript(cls, text: str) -> Conversation:
        """Parse a `\\n\\nHuman: ...\\n\\nAssistant: ...` transcript; raises DataError if malformed.

        A trailing empty `Assistant:` (the generation cue) is dropped; text before the first
        marker becomes a system turn, which is how `render_transcript` writes one.
        """
        turns = [Turn(role, content) for role, content in split_transcript(text)]
        if turns and turns[-1].role == "assistant" and not turns[-1].content:
            turns.pop()
        for i, turn in enumerate(turns):
            if not turn.content:
                raise DataError(f"empty {_speaker(turn.role)} turn at position {i}")
        return cls(tuple(turns))

    @classmethod
    def from_prompt(cls, text: str) -> Conversation:
        """A one-turn conversation: the user says `text`."""
        return cls((Turn("user", text),))

    def to_messages(self) -> list[dict[str, str]]:
        """The turns as chat messages (plain dicts, JSON-able)."""
        return [{"role": t.role, "content": t.content} for t in self.turns]

    def append(self, role: Role, content: str) -> Conversation:
        """A new conversation with one more turn."""
        return Conversation((*self.turns, Turn(role, content)))

    @property
    def last_user_message(self) -> str:
        """The text of the last user turn (the request a prompt asks the model to answer)."""
        for turn in reversed(self.turns):
            if turn.role == "user":
                return turn.content
        raise DataError("conversation has no user turn", hint="add a user message")

    @cached_property
    def prompt_id(self) -> str:
        """A stable id from the content alone: "p" + 16 hex digits of sha256(canonical JSON)."""
        canonical = json.dumps(
            self.to_messages(), ensure_ascii=False, sort_keys=True, separators=(",", ":")
        )
        return "p" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def render_transcript(self, *, add_generation_prompt: bool = True) -> str:
        """The paper's layout, e.g. `"\\n\\nHuman: hi\\n\\nAssistant:"`.

        A system turn is written as a preamble before the first `Human:` marker.
        `add_generation_prompt` appends the `\\n\\nAssistant:` cue (no trailing space), as a
        chat template does, whatever the last turn is.
        """
        parts = []
        for turn in self.turns:
            if turn.role == "system":
                parts.append(turn.content)
            else:
                marker = HUMAN_MARKER if turn.role == "user" else ASSISTANT_MARKER
                parts.append(f"{marker} {turn.content}" if turn.content else marker)
        if add_generation_prompt:
            parts.append(ASSISTANT_MARKER)
        return "".join(parts)

    def render_chat(self, tokenizer: Any, *, add_generation_prompt: bool = True) -> str:
        """The model's own chat template; the transcript when the tokenizer has none."""
        if not getattr(tokenizer, "chat_template", None):
            return self.render_transcript(add_generation_prompt=add_generation_prompt)
        import jinja2  # transformers renders templates with jinja2

        try:
            return tokenizer.apply_chat_template(
                self.to_messages(), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            raise DataError(
                f"the tokenizer's chat template rejected the conversation: {exc}",
                where=str(getattr(tokenizer, "name_or_path", "") or "chat template"),
                hint="some templates need alternating user/assistant turns or no system turn; "
                "use the transcript format for this model",
            ) from exc


def split_transcript(text: str) -> list[tuple[Role, str]]:
    """Split a transcript into (role, stripped content) pairs, empty contents kept.

    Raises DataError when the text has no `Human:` turn or does not start with one (after an
    optional preamble, returned as a system turn). Comparison parsing needs the empty final
    `Assistant:` that `Conversation.from_transcript` drops, hence this lower-level helper.
    """
    if not isinstance(text, str):
        raise DataError(f"transcript is not text (got {type(text).__name__})")
    parts = _MARKER_RE.split(text)
    preamble, rest = parts[0].strip(), parts[1:]
    pairs: list[tuple[Role, str]] = [("system", preamble)] if preamble else []
    for name, content in zip(rest[::2], rest[1::2], strict=True):
        pairs.append((_TRANSCRIPT_ROLE[name], content.strip()))  # type: ignore[arg-type]
    first = next((role for role, _ in pairs if role != "system"), None)
    if first != "user":
        problem = "has no 'Human:' turn" if first is None else "starts with an Assistant turn"
        raise DataError(
            f"transcript {problem}",
            hint='expected "\\n\\nHuman: ...\\n\\nAssistant: ..." (the hh-rlhf layout)',
        )
    return pairs


def render(
    conversation: Conversation,
    *,
    fmt: Literal["transcript", "chat"],
    tokenizer: Any = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render `conversation` as a transcript or with `tokenizer`'s chat template."""
    if fmt == "transcript":
        return conversation.render_transcript(add_generation_prompt=add_generation_prompt)
    if fmt == "chat":
        if tokenizer is None:
            raise ConfigError(
                "prompt format 'chat' needs a tokenizer",
                where="prompt format",
                hint="load the model's tokenizer, or use the 'transcript' format",
            )
        return conversation.render_chat(tokenizer, add_generation_prompt=add_generation_prompt)
    raise ConfigError(
        f"unknown prompt format {fmt!r}",
        where="prompt format",
        hint="use 'transcript' or 'chat'",
    )


def _speaker(role: str) -> str:
    return {"user": "Human", "assistant": "Assistant"}.get(role, role)
