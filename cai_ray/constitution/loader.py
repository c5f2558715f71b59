"""Load, validate and write constitution YAML files, with errors that name the file and line.

The YAML is parsed once into nodes (yaml.compose) and then constructed with safe_load semantics,
so every validation error can be mapped back from its field path to the line that holds it.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cai_ray.config.safe_yaml import TOO_DEEP, SafeLoader, problem_of
from cai_ray.constitution.schema import Constitution, FieldIssue
from cai_ray.errors import ConstitutionError

Loc = tuple[str | int, ...]
# The project's own constitution, beside the package in a source checkout.
DEFAULT_CONSTITUTION = Path(__file__).resolve().parents[2] / "constitutions" / "default.yaml"
_MAX_LISTED = 10


def load_constitution(path: str | Path) -> Constitution:
    """Read and validate a constitution YAML file; errors are `ConstitutionError(where="file:line")`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConstitutionError(
            "constitution file not found",
            where=str(path),
            hint=f"check the path; the project's default is {DEFAULT_CONSTITUTION}",
        ) from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
        raise ConstitutionError(f"cannot read the file: {exc}", where=str(path)) from None
    return parse_constitution(text, where=str(path))


def parse_constitution(text: str, *, where: str = "<string>") -> Constitution:
    """Validate constitution YAML given as text; `where` names its origin in error messages."""
    data, lines = _read_yaml(text, where)
    if not isinstance(data, dict):
        raise ConstitutionError(
            f"the top level must be a mapping of fields, got {type(data).__name__}",
            where=f"{where}:1",
            hint="start with `name:`, `version:` and `description:` lines",
        )
    return constitution_from_dict(data, where=where, lines=lines).with_path(where)


def constitution_from_dict(
    data: dict[str, Any], *, where: str, lines: dict[Loc, int] | None = None
) -> Constitution:
    """Validate already-parsed content (e.g. from an importer); errors name `where` and the field."""
    try:
        constitution = Constitution.model_validate(data)
    except ValidationError as exc:
        raise _to_constitution_error(exc, where, lines or {}) from None
    return constitution


def _read_yaml(text: str, where: str) -> tuple[Any, dict[Loc, int]]:
    loader = None
    try:
        loader = SafeLoader(text)  # rejects control characters at once
        node = loader.get_single_node()
        if node is None:
            raise ConstitutionError(
                "the file is empty",
                where=where,
                hint="see constitutions/default.yaml for the layout",
            )
        lines: dict[Loc, int] = {}
        _map_lines(node, (), lines, where)
        return loader.construct_document(node), lines
    except yaml.YAMLError as exc:
        line, problem = problem_of(exc, text)
        at = f"{where}:{line}" if line is not None else where
        raise ConstitutionError(
            f"invalid YAML: {problem}",
            where=at,
            hint="check the indentation; write texts that contain ': ', end with ':' or start "
            "with a symbol as `>-` blocks or in quotes",
        ) from None
    except RecursionError:
        raise ConstitutionError(
            f"invalid YAML: {TOO_DEEP}", where=where, hint="see constitutions/default.yaml"
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def _map_lines(
    node: yaml.Node, loc: Loc, lines: dict[Loc, int], where: str, done: set[int] | None = None
) -> None:
    """Record the 1-based line of every field path; reject duplicate keys (safe_load keeps the last)."""
    lines.setdefault(loc, node.start_mark.line + 1)
    # An alias shares its anchor's node: map it once, so `&a [*a]` cannot recurse forever.
    done = set() if done is None else done
    if id(node) in done:
        return
    done.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: construction reports it with its line
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConstitutionError(
                    f"duplicate key {key!r} (first at line {seen[key]})",
                    where=f"{where}:{line}",
                    hint="YAML would silently keep only the last one: remove or rename one",
                )
            seen[key] = line
            lines[(*loc, key)] = line
            _map_lines(value_node, (*loc, key), lines, where, done)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _map_lines(item, (*loc, i), lines, where, done)


def _line_of(loc: Loc, lines: dict[Loc, int]) -> int | None:
    # A missing field has no line of its own: point at the nearest enclosing entry instead.
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _field_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class that owns the last key of `loc` (to list its valid fields)."""
    cls: type[BaseModel] = Constitution
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        found = _find_model(field.annotation)
        if found is None:
            return None
        cls = found
    return cls


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _describe(error: dict[str, Any]) -> tuple[Loc, str, str | None]:
    """(field path, message, hint) for one pydantic error."""
    loc: Loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    issue = ctx.get("error")
    if isinstance(issue, FieldIssue):
        return (*loc, *issue.path), issue.message, issue.hint
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        valid = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = (
            f"did you mean {close[0]!r}? " if close else ""
        ) + f"valid fields: {', '.join(valid)}"
        return loc, f"unknown field {loc[-1]!r}", hint
    if error["type"] == "missing":
        return loc, f"missing required field {loc[-1]!r}", f"add `{loc[-1]}:` to this entry"
    return loc, error["msg"], ctx.get("hint") or "see constitutions/default.yaml for the layout"


def _to_constitution_error(
    exc: ValidationError, where: str, lines: dict[Loc, int]
) -> ConstitutionError:
    problems = []
    # An unknown field is usually the cause of a "missing" one (a typo): report it first.
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    for error in errors:
        loc, message, hint = _describe(error)
        line = _line_of(loc, lines)
        at = f"{where}:{line}" if line is not None else where
        problems.append((at, f"{_field_path(loc)}: {message}" if loc else message, hint))
    at, message, hint = problems[0]
    others = [f"{a}: {m}" for a, m, _ in problems[1:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        others.append(f"... and {len(problems) - _MAX_LISTED} more")
    if others:
        message += f"\n  ({len(problems) - 1} more problem(s))\n  " + "\n  ".join(others)
    return ConstitutionError(message, where=at, hint=hint)


class _Dumper(yaml.SafeDumper):
    """Writes long texts as `>` / `|` blocks and indents lists, like a hand-written file."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # PyYAML falls back to a quoted style by itself where a block cannot hold the text exactly.
    style = "|" if "\n" in value else (">" if len(value) > 80 else None)
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def to_yaml(constitution: Constitution, *, header: str | None = None) -> str:
    """The constitution as YAML text (fields in schema order); `header` becomes # comments."""
    data = constitution.model_dump(mode="json", exclude_none=True)
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=90)
    if header:
        body = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + body
    return body


def dump_constitution(
    constitution: Constitution, path: str | Path, *, header: str | None = None
) -> Path:
    """Write the constitution as YAML that `load_constitution` reads back to the same hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(constitution, header=header), encoding="utf-8")
    return path
