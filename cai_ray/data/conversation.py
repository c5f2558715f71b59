"""Conversations (turns with roles) and their two renderings.

The paper's models read raw transcripts in the hh-rlhf layout, `\\n\\nHuman: ...\\n\\nAssistant: ...`
(arXiv 2212.08073, Sec. 3); instruction-tuned models read their own chat template instead. One
`Conversation` value renders to either, so every stage builds prompts the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from cai_ray.errors import ConfigError, DataError

Role = Literal["system", "user", "assistant"]
Format = Literal["transcript", "chat"]
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

    def render_chat(
        self, tokenizer: Any, *, add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """The model's own chat template (with `template_kwargs`, e.g. Qwen 3's
        `enable_thinking=False`); the transcript when the tokenizer has none."""
        if not getattr(tokenizer, "chat_template", None):
            return self.render_transcript(add_generation_prompt=add_generation_prompt)
        return apply_chat_template(
            tokenizer,
            self.to_messages(),
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )


def apply_chat_template(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """`tokenizer.apply_chat_template` as text; a template's refusal is a DataError, not a raw
    jinja2 error (Gemma's raises unless user and assistant turns alternate)."""
    import jinja2  # transformers renders templates with jinja2

    try:
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        roles = "/".join(str(m.get("role")) for m in messages)
        raise DataError(
            f"the tokenizer's chat template rejected the conversation ({roles}): {exc}",
            where=str(getattr(tokenizer, "name_or_path", "") or "chat template"),
            hint="some templates need alternating user/assistant turns or no system turn; "
            "use the transcript format for this model",
        ) from exc


@dataclass(frozen=True)
class PromptFormat:
    """How one model reads conversations: the paper's transcript or the model's chat template,
    with that model's template arguments (`models.<role>.chat_template_kwargs`).

    Built light (picklable, no tokenizer) where a stage is wired; a worker calls `load` with its
    model directory to attach the tokenizer the chat format needs.
    """

    kind: Format = "transcript"
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, fmt: str | PromptFormat) -> PromptFormat:
        """A PromptFormat from a format name or itself."""
        if isinstance(fmt, PromptFormat):
            return fmt
        if fmt not in ("transcript", "chat"):
            raise ConfigError(
                f"unknown prompt format {fmt!r}", where="format", hint="use 'transcript' or 'chat'"
            )
        return cls(fmt)  # type: ignore[arg-type]

    def load(self, model_path: str | Path) -> PromptFormat:
        """This format with `model_path`'s tokenizer attached (the chat format needs it)."""
        if self.kind != "chat" or self.tokenizer is not None:
            return self
        from cai_ray.models import load_tokenizer

        return replace(self, tokenizer=load_tokenizer(model_path))

    def with_tokenizer(self, tokenizer: Any) -> PromptFormat:
        return replace(self, tokenizer=tokenizer)

    def render(self, conversation: Conversation, *, add_generation_prompt: bool = True) -> str:
        """The prompt text of `conversation` (the generation cue appended by default)."""
        if self.kind == "transcript":
            return conversation.render_transcript(add_generation_prompt=add_generation_prompt)
        return conversation.render_chat(
            self._tokenizer(), add_generation_prompt=add_generation_prompt, **self.template_kwargs
        )

    def render_messages(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """`render` of plain chat messages."""
        convo = Conversation.from_messages([dict(m) for m in messages])
        return self.render(convo, add_generation_prompt=add_generation_prompt)

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ConfigError(
                "prompt format 'chat' needs a tokenizer",
                where="prompt format",
                hint="load the model's tokenizer (PromptFormat.load), or use 'transcript'",
            )
        return self.tokenizer


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
    pf = PromptFormat.of(fmt).with_tokenizer(tokenizer)
    return pf.render(conversation, add_generation_prompt=add_generation_prompt)


def _speaker(role: str) -> str:
    return {"user": "Human", "assistant": "Assistant"}.get(role, role)
