"""YAML reading for user files (configs, constitutions): every failure is a `yaml.YAMLError`.

PyYAML's safe loader raises plain `ValueError`s for values its resolver recognises but cannot
build (`seed: 2001-13-45` reads as a date, a 5000-digit number hits Python's int limit) and
`RecursionError` for deeply nested input; here those become errors with the line of the value.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.reader import ReaderError


class SafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` whose value errors carry the mark of the value at fault."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            shown = node.value if isinstance(node, yaml.ScalarNode) else node.tag
            raise ConstructorError(
                None,
                None,
                f"cannot read the value {str(shown)[:60]!r}: {exc}; quote it to keep it as text",
                node.start_mark,
            ) from None


TOO_DEEP = "nested too deeply to read (lists or mappings inside each other)"


def safe_load(text: str) -> Any:
    """`yaml.safe_load` with `SafeLoader`; raises only `yaml.YAMLError`."""
    try:
        return yaml.load(text, Loader=SafeLoader)  # a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError(TOO_DEEP) from None


def problem_of(exc: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """(1-based line, or None, and what is wrong) for a YAML error raised reading `text`."""
    if isinstance(exc, ReaderError):  # raised before any parsing: no mark, only a position
        line = text[: exc.position].count("\n") + 1
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return line, f"character {char} is not allowed in YAML (a control character or binary data)"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    return (mark.line + 1 if mark is not None else None), problem
