"""A reference of every config key: its path, type, default and description, from the code.

`python -m cai_ray.config.reference > configs/REFERENCE.md` writes it; a unit test regenerates
it and fails when the checked-in file is out of date, so the page never drifts from the tree.
"""

from __future__ import annotations

import json
import sys
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from cai_ray.config.run import RunConfig, _section_type

HEADER = """# Config reference

Every key of the run config, generated from the code by
`python -m cai_ray.config.reference > configs/REFERENCE.md` (a unit test keeps this file
current). A YAML file in `configs/` overrides any of them, `--set a.b=c` overrides both.
Sections are written `a.b`; `section | None` means the section is optional (null by default).
"""


def _type_name(annotation: Any) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    for noise in ("typing.", "cai_ray.config.sections.", "cai_ray.config.run.", "cai_ray.config."):
        text = text.replace(noise, "")
    for part in ("learner.", "rl.", "evaluate."):
        text = text.replace(part, "")
    return text.replace("NoneType", "None")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False)


def rows(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) of every leaf key, depth first, in field order."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _section_type(field.annotation)
        if section is not None and _is_section_field(field.annotation):
            desc = (field.description or _summary(section)).strip()
            default = "null" if field.default is None else "(section)"
            out.append((path, _type_name(field.annotation), default, desc))
            out += rows(section, prefix=f"{path}.")
            continue
        out.append((path, _type_name(field.annotation), _default(field), field.description or ""))
    return out


def _summary(section: type[BaseModel]) -> str:
    """The first paragraph of a section's docstring, as one line."""
    paragraph = (section.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(paragraph.split())


def _is_section_field(annotation: Any) -> bool:
    """A field holding one section (or an optional one), not a list or dict of them."""
    origin = typing.get_origin(annotation)
    return origin is None or all(
        isinstance(a, type) and (issubclass(a, BaseModel) or a is type(None))
        for a in typing.get_args(annotation)
    )


def render() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [HEADER, "| key | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{k}` | `{cell(t)}` | `{cell(d)}` | {cell(s)} |" for k, t, d, s in rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
