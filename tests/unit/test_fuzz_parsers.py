"""Property-based fuzzing (hypothesis) of the parsers that read user files (issue 8).

Whatever the input, the constitution loader returns a Constitution or raises ConstitutionError,
the config loader a RunConfig or ConfigError, and the row parsers return records or a Reject:
never another exception (which the CLI would show as a traceback).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cai_ray.config import RunConfig, load_config
from cai_ray.constitution import Constitution, parse_constitution
from cai_ray.constitution.loader import DEFAULT_CONSTITUTION
from cai_ray.data.conversation import Conversation
from cai_ray.data.sources import (
    TURNS,
    Comparison,
    PromptRecord,
    Reject,
    parse_comparison_row,
    parse_prompt_row,
    read_prompts,
)
from cai_ray.errors import ConfigError, ConstitutionError, DataError

# A few seconds per property in the suite; CAI_RAY_FUZZ_EXAMPLES=5000 fuzzes for longer.
EXAMPLES = int(os.environ.get("CAI_RAY_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
DEFAULT_TEXT = DEFAULT_CONSTITUTION.read_text(encoding="utf-8")
DEFAULT_DATA = yaml.safe_load(DEFAULT_TEXT)

# -- strategies ------------------------------------------------------------------------------

# Characters and words that steer YAML's scanner into its corners: flow brackets, anchors and
# aliases, tags, block scalars, tabs, document markers, dates and numbers.
YAML_TOKENS = st.sampled_from(
    [
        *"-:?[]{},&*!|>'\"#%@`\t\n ",
        "---",
        "...",
        "name: ",
        "version: ",
        "description: ",
        "critique_principles:\n",
        "  - id: a\n",
        "    critique: ",
        "    revision: ",
        "feedback_principles:\n",
        "&x ",
        "*x",
        "!!str ",
        "!!binary ",
        "!!python/object ",
        "2001-13-45",
        "1.10",
        "0x1f",
        "9" * 5000,
        "yes",
        "~",
        "null",
        ".inf",
        "[" * 400,
    ]
)
yaml_ish = st.lists(st.one_of(YAML_TOKENS, st.text(max_size=8)), max_size=40).map("".join)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["", "  ", "a", "harm-general", "user", "assistant", "system", "A", "(b)"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested dict/list document."""
    out = [prefix]
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        out += _paths(value, (*prefix, key))
    return out


@st.composite
def mutated_default(draw) -> str:
    """constitutions/default.yaml with 1-3 structural edits (drop, replace, duplicate, rename)."""
    data = copy.deepcopy(DEFAULT_DATA)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(data)[1:]))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        action = draw(st.sampled_from(["drop", "replace", "duplicate", "rename", "empty"]))
        if action == "drop":
            del parent[last]
        elif action == "replace":
            parent[last] = draw(json_values)
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = parent.pop(last)
        else:
            parent[last] = "" if isinstance(parent[last], str) else []
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@st.composite
def text_edits_of_default(draw) -> str:
    """constitutions/default.yaml with a few characters deleted, replaced or inserted."""
    text = DEFAULT_TEXT
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 40))
        text = text[:at] + draw(st.one_of(YAML_TOKENS, st.text(max_size=3))) + text[at + cut :]
    return text


def _check_constitution(text: str) -> None:
    try:
        result = parse_constitution(text, where="fuzz.yaml")
    except ConstitutionError as exc:
        assert str(exc).startswith("fuzz.yaml"), str(exc)  # every error names the file
        return
    assert isinstance(result, Constitution)
    assert result.critique_principles or result.feedback_principles


# -- the constitution loader ---------------------------------------------------------------


@FUZZ
@given(yaml_ish)
def test_constitution_loader_on_yaml_ish_text(text):
    _check_constitution(text)


@FUZZ
@given(st.one_of(mutated_default(), text_edits_of_default()))
def test_constitution_loader_on_mutations_of_the_default(text):
    _check_constitution(text)


@FUZZ
@given(st.dictionaries(st.sampled_from([*DEFAULT_DATA, "extra"]), json_values, max_size=6))
def test_constitution_loader_on_random_documents(data):
    _check_constitution(yaml.safe_dump(data))


# -- the config loader ---------------------------------------------------------------------

CONFIG_KEYS = st.sampled_from(
    ["seed", "engine", "threads", "kind", "rl_train", "algorithm", "group_size", "serve", "x"]
)


@FUZZ
@given(st.one_of(yaml_ish, st.dictionaries(CONFIG_KEYS, json_values, max_size=4).map(yaml.dump)))
def test_config_loader_on_random_files(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            assert isinstance(load_config(path), RunConfig)
        except ConfigError as exc:
            assert str(path) in str(exc)


@FUZZ
@given(st.lists(st.tuples(CONFIG_KEYS, CONFIG_KEYS, yaml_ish), max_size=3))
def test_config_overrides(items):
    overrides = [f"{a}.{b}={value}" for a, b, value in items]
    try:
        assert isinstance(load_config(None, overrides), RunConfig)
    except ConfigError as exc:
        assert str(exc)


# -- the prompt and comparison row parsers -------------------------------------------------

TRANSCRIPT_PARTS = st.sampled_from(
    ["\n\nHuman:", "\n\nAssistant:", "Human:", " hi", " there", "\n", "", "Assistant: x"]
)
transcripts = st.lists(st.one_of(TRANSCRIPT_PARTS, st.text(max_size=5)), max_size=8).map("".join)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "assistant", "system", "human", "robot", 1]),
                "content": st.one_of(st.text(max_size=10), scalars),
            }
        ),
        json_values,
    ),
    max_size=4,
)
COLUMNS = ["prompt", "messages", "chosen", "rejected", "transcript", "id", "prompt_id", "pair_id"]
rows = st.dictionaries(
    st.one_of(st.sampled_from(COLUMNS), st.text(max_size=6)),
    st.one_of(transcripts, messages, json_values),
    max_size=5,
)


@FUZZ
@given(st.one_of(rows, json_values), st.sampled_from(TURNS))
def test_prompt_row_parser(row, turns):
    out = parse_prompt_row(row, source="fuzz", index=3, turns=turns)
    if isinstance(out, Reject):
        assert out.reason and out.row == 3
        json.dumps(out.to_row())  # a reject is always writable to rejects-*.jsonl
        return
    assert out and all(isinstance(r, PromptRecord) for r in out)
    for record in out:
        assert record.conversation.turns[-1].role == "user"
        assert PromptRecord.from_row(record.to_row()) == record
        assert isinstance(Conversation.from_messages(record.to_row()["messages"]), Conversation)


@FUZZ
@given(st.one_of(rows, json_values))
def test_comparison_row_parser(row):
    out = parse_comparison_row(row, source="fuzz", index=5)
    if isinstance(out, Reject):
        assert out.reason and out.row == 5
        return
    assert isinstance(out, Comparison)
    assert out.chosen != out.rejected and out.chosen.strip() and out.rejected.strip()


@settings(max_examples=max(1, EXAMPLES // 3), deadline=None, database=None)
@given(st.lists(st.one_of(st.binary(max_size=30), rows.map(json.dumps).map(str.encode))))
def test_prompt_file_reader_on_random_lines(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            result = read_prompts(path)
        except DataError as exc:
            assert str(path) in str(exc)
            return
        assert result.n_records >= 1
