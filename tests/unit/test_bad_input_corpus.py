"""The bad-input corpus (issue 8): malformed configs, constitutions, prompt, comparison and
judgement files, each with the clear error or counted reject it must get.

CLI cases run the real command in a subprocess: exit 2, one `error:` line naming the file, row
or field, no traceback. API cases (readers the CLI has no command for, and single bad rows) must
raise the project's own error naming the file, or set the bad row aside with its reason while
the good rows proceed. HTTP cases sit beside the running app in tests/integration/test_serve.py.
Cases marked "bug" failed before the fix that came with them (a traceback or a wrong reject).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cai_ray.data.sources import read_comparisons, read_prompts
from cai_ray.errors import DataError
from cai_ray.eval.elo import read_judgements_csv

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONSTITUTION = (ROOT / "constitutions" / "default.yaml").read_text(encoding="utf-8")
DEEP = "[" * 3000 + "]" * 3000  # nested past Python's recursion limit
HUGE_INT = "9" * 5000  # past Python's 4300-digit int <-> str limit

MINI = """\
name: mini
version: "1"
description: a small constitution
critique_principles:
  - id: harm
    critique: Point out anything harmful in the last reply.
    revision: Rewrite the reply without the harm.
feedback_principles:
  - id: kind
    question: Which response is kinder?
"""
EXAMPLE = """\
critique_examples:
  - conversation:
      - {role: user, content: hi}
      - {role: assistant, content: hello}
    rounds:
      - {principle: harn, critique: It is fine., revision: hello}
"""
HH = "\n\nHuman: How do I bake bread?\n\nAssistant: "

Content = str | bytes | Callable[[Path], None]


def _parquet(columns: dict[str, list]) -> Callable[[Path], None]:
    return lambda path: pq.write_table(pa.table(columns), path)


@dataclass(frozen=True)
class CliCase:
    """A command that must fail with exit 2 and an `error:` naming what is wrong."""

    id: str
    argv: tuple[str, ...]  # "{tmp}" is the case's folder, "{model}" a tiny model directory
    expect: tuple[str, ...]  # fragments of stderr
    files: dict[str, Content] = field(default_factory=dict)


def _run_config(text: Content, *expect: str, name: str = "bad.yaml") -> dict:
    return {"argv": ("run", f"{{tmp}}/{name}"), "files": {name: text}, "expect": expect}


def _constitution(text: Content, *expect: str) -> dict:
    argv = ("constitution", "validate", "{tmp}/c.yaml")
    return {"argv": argv, "files": {"c.yaml": text}, "expect": ("c.yaml", *expect)}


def _prompts(name: str, content: Content, *expect: str) -> dict:
    argv = ("generate", "--model", "{model}", "--prompts", f"{{tmp}}/{name}")
    return {"argv": argv, "files": {name: content}, "expect": (name, *expect)}


CLI_CASES = [
    # -- run configs ------------------------------------------------------------------------
    CliCase(
        "config-malformed-yaml",
        **_run_config("engine:\n  threads: [1, 2\n", "bad.yaml:3", "malformed YAML"),
    ),
    CliCase(
        "config-missing-file", ("run", "{tmp}/nope.yaml"), ("nope.yaml", "config file not found")
    ),
    CliCase("config-not-a-mapping", **_run_config("- seed\n- 1\n", "expected a mapping")),
    CliCase(
        "config-not-utf8",
        **_run_config(b"seed: \xff\xfe\x00\x01", "bad.yaml", "cannot read config"),
    ),
    CliCase(
        "config-unknown-top-key",
        **_run_config("seeed: 1\n", "seeed: unknown key", "did you mean 'seed'"),
    ),
    CliCase(
        "config-unknown-key-depth-3",
        **_run_config(
            "sl_generate:\n  rollout:\n    sizee: 2\n", "did you mean 'sl_generate.rollout.size'"
        ),
    ),
    CliCase(
        "config-unknown-key-depth-4",
        **_run_config(
            "sl_generate:\n  rollout:\n    engine:\n      kindd: hf\n",
            "sl_generate.rollout.engine.kindd: unknown key",
            "did you mean 'sl_generate.rollout.engine.kind'",
        ),
    ),
    CliCase(
        "config-wrong-type",
        **_run_config("engine:\n  threads: many\n", 'engine.threads = "many"', ">= 1, or 'auto'"),
    ),
    CliCase(
        "config-out-of-range",
        ("run", "--set", "engine.batch_size=0"),
        ("engine.batch_size = 0", "greater than or equal to 1"),
    ),
    CliCase(
        "config-grpo-group-size-1",
        ("run", "--set", "rl_train.algorithm=grpo", "--set", "rl_train.group_size=1"),
        ("rl_train", "grpo needs group_size >= 2"),
    ),
    CliCase(
        "config-vllm-cpu-kv-cache-zero",
        **_run_config(
            "engine: {kind: vllm, device: cpu, vllm: {cpu_kvcache_space_gib: 0}}\n",
            "engine.vllm.cpu_kvcache_space_gib",
            "greater than 0",
        ),
    ),
    CliCase(
        "config-model-preset-and-path",
        **_run_config(
            "models:\n  helpful: {preset: tiny-1m, path: /x}\n", "models.helpful", "exactly one of"
        ),
    ),
    CliCase(
        "config-autoscaling-min-over-max",
        **_run_config(
            "serve:\n  policy:\n    autoscaling: {min_replicas: 3, max_replicas: 1}\n",
            "serve.policy.autoscaling",
            "min_replicas must be <= max_replicas",
        ),
    ),
    CliCase("config-set-not-key-value", ("run", "--set", "engine.threads"), ("is not KEY=VALUE",)),
    CliCase(
        "config-set-into-a-value",
        ("run", "--set", "seed.x=1"),
        ("'seed' is a value, not a section",),
    ),
    # bug: PyYAML reads 2001-13-45 as a date and raised ValueError (a traceback)
    CliCase(
        "config-impossible-date",
        **_run_config("seed: 2001-13-45\n", "bad.yaml:1", "'2001-13-45'", "quote it"),
    ),
    CliCase(
        "config-set-impossible-date", ("run", "--set", "seed=2001-13-45"), ('seed = "2001-13-45"',)
    ),
    # bug: ValueError (Python's int digit limit) and RecursionError were tracebacks
    CliCase("config-huge-int", **_run_config(f"seed: {HUGE_INT}\n", "bad.yaml:1", "4300 digits")),
    CliCase(
        "config-deep-nesting", **_run_config(f"seed: {DEEP}\n", "bad.yaml", "nested too deeply")
    ),
    # bug: a control character was a traceback from the constitution loader; config: no line
    CliCase(
        "config-control-char", **_run_config("seed: 1\nengine: \x1f\n", "bad.yaml:2", "not allowed")
    ),
    # -- constitutions ----------------------------------------------------------------------
    CliCase(
        "constitution-missing-field",
        **_constitution(
            MINI.replace("    revision: Rewrite the reply without the harm.\n", ""),
            "c.yaml:5",
            "critique_principles[0].revision: missing required field",
        ),
    ),
    CliCase(
        "constitution-duplicate-id",
        **_constitution(
            MINI + "  - id: kind\n    question: Which is less rude?\n",
            "c.yaml:11",
            "duplicate id 'kind'",
        ),
    ),
    CliCase(
        "constitution-empty-principle",
        **_constitution(
            MINI.replace("Which response is kinder?", "'   '"), "c.yaml:10", "text is empty"
        ),
    ),
    CliCase(
        "constitution-wrong-type",
        **_constitution(
            MINI.replace("Which response is kinder?", "42"), "expected text, got int", "quote"
        ),
    ),
    CliCase(
        "constitution-unknown-principle-in-example",
        **_constitution(
            MINI + EXAMPLE, "unknown critique principle id 'harn'", "did you mean 'harm'"
        ),
    ),
    CliCase(
        "constitution-unknown-field",
        **_constitution(MINI.replace("    question:", "    questoin:"), "unknown field 'questoin'"),
    ),
    CliCase(
        "constitution-no-principles",
        **_constitution("name: a\nversion: '1'\ndescription: b\n", "no principles"),
    ),
    CliCase(
        "constitution-not-yaml", **_constitution("name: [unclosed\nversion: 1\n", "invalid YAML")
    ),
    CliCase("constitution-empty-file", **_constitution("", "the file is empty")),
    CliCase(
        "constitution-top-level-list", **_constitution("- a\n- b\n", "top level must be a mapping")
    ),
    CliCase(
        "constitution-binary", **_constitution(b"\x89PNG\r\n\x1a\n\x00\xff", "cannot read the file")
    ),
    CliCase(
        "constitution-duplicate-key",
        **_constitution(MINI + "name: again\n", "duplicate key 'name'"),
    ),
    CliCase(
        "constitution-missing-file",
        ("constitution", "validate", "{tmp}/none.yaml"),
        ("none.yaml", "constitution file not found"),
    ),
    # bug: each of these was a traceback (ValueError, RecursionError, TypeError, ReaderError)
    CliCase(
        "constitution-impossible-date",
        **_constitution(
            MINI.replace('version: "1"', "version: 2001-13-45"), "c.yaml:2", "2001-13-45"
        ),
    ),
    CliCase("constitution-deep-nesting", **_constitution(f"name: {DEEP}\n", "nested too deeply")),
    CliCase(
        "constitution-list-as-key", **_constitution("? [a, b]\n: c\n", "c.yaml:1", "unhashable key")
    ),
    CliCase(
        "constitution-recursive-alias",
        **_constitution(
            MINI.replace("description: a small constitution", "description: &d [*d]"),
            "description",
            "expected text",
        ),
    ),
    CliCase(
        "constitution-control-char",
        **_constitution(MINI + "source: \x07\n", "c.yaml:11", "not allowed"),
    ),
    CliCase(
        "constitution-import-huge-int",
        ("constitution", "import", "{tmp}/hf.json", "--format", "hf", "-o", "{tmp}/out.yaml"),
        ("hf.json", "invalid JSON", "4300 digits"),
        {"hf.json": f'{{"constitutions": [{HUGE_INT}]}}'},
    ),
    # -- prompt files (read before the model is loaded) -------------------------------------
    CliCase("prompts-empty-file", **_prompts("p.jsonl", "", "the source has no rows")),
    CliCase(
        "prompts-binary-garbage",
        **_prompts("p.jsonl", b"\x00\xff\xfe\n\x89PNG\n", "no valid rows", "invalid JSON"),
    ),
    CliCase(
        "prompts-all-rows-bad",
        **_prompts(
            "p.jsonl",
            '{"prompt": ""}\n{"prompt": 7}\n{"text": "hi"}\n',
            "no valid rows (3 rejected",
            "row 1: empty prompt",
            "row 2: not text",
            "row 3: no prompt column",
        ),
    ),
    CliCase(
        "prompts-parquet-without-column",
        **_prompts(
            "p.parquet", _parquet({"text": ["hi", "there"]}), "no usable column (found: text)"
        ),
    ),
    CliCase(
        "prompts-not-parquet",
        **_prompts("p.parquet", "not parquet at all", "not a readable Parquet"),
    ),
    CliCase(
        "prompts-broken-json-array", **_prompts("p.json", '[{"prompt": "hi"},', "not valid JSON")
    ),
    CliCase(
        "prompts-unsupported-suffix", **_prompts("p.txt", "hi\n", "unsupported file type '.txt'")
    ),
    CliCase(
        "prompts-missing-file",
        ("generate", "--model", "{model}", "--prompts", "{tmp}/none.jsonl"),
        ("none.jsonl", "no such file or folder"),
    ),
]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def _write(folder: Path, files: dict[str, Content]) -> None:
    for name, content in files.items():
        path = folder / name
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def _cai_ray(argv: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAI_RAY_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "cai_ray", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(case: CliCase, tmp_path, model_dir):
    _write(tmp_path, case.files)
    argv = [a.format(tmp=tmp_path, model=model_dir) for a in case.argv]
    out = _cai_ray(argv, tmp_path / "home")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("error: "), out.stderr[-2000:]
    for fragment in case.expect:
        assert fragment in out.stderr, f"{fragment!r} not in:\n{out.stderr}"


def test_cli_sets_bad_prompt_rows_aside_and_answers_the_rest(tmp_path, model_dir):
    rows = ['{"prompt": "Say hi."}', '{"prompt": 3}', "{oops", '{"prompt": "Say bye."}']
    _write(tmp_path, {"p.jsonl": "\n".join(rows) + "\n"})
    argv = ["generate", "--model", str(model_dir), "--prompts", str(tmp_path / "p.jsonl")]
    out = _cai_ray([*argv, "--max-new-tokens", "2", "-o", str(tmp_path / "out.jsonl")], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "set aside 2 prompts" in out.stderr
    assert "p.jsonl row 2: not text" in out.stderr
    assert "p.jsonl row 3: invalid JSON" in out.stderr
    answered = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in answered] == ["Say hi.", "Say bye."]


# -- single bad rows in otherwise good files: counted rejects, the rest proceeds -------------

GOOD_PROMPTS = ['{"prompt": "How do I bake bread?"}', '{"prompt": "What is a good book?"}']
PROMPT_ROWS = [
    # (id, the bad line, the reject reason it must get)
    ("invalid-json", '{"prompt": "x"', "invalid JSON"),
    ("not-utf8", b"\xff\xfe\x00", "invalid JSON"),
    ("line-is-a-list", "[1, 2]", "invalid JSON: line is a list"),
    ("empty-prompt", '{"prompt": "  "}', "empty prompt"),
    ("non-text-prompt", '{"prompt": {"text": "hi"}}', "not text: column 'prompt' is a dict"),
    ("missing-column", '{"question": "hi"}', "no prompt column"),
    ("bad-role", '{"messages": [{"role": "robot", "content": "hi"}]}', "bad messages"),
    ("no-user-turn", '{"messages": [{"role": "assistant", "content": "hi"}]}', "no user turn"),
    (
        "transcript-starts-with-assistant",
        json.dumps({"transcript": "Assistant: hi"}),
        "bad transcript",
    ),
    ("float-id", '{"prompt": "x", "id": 1.5}', "bad id"),
    ("duplicate", GOOD_PROMPTS[0], "duplicate prompt_id"),
    # bug: ValueError / RecursionError from json.loads were tracebacks
    ("huge-int", f'{{"prompt": "x", "id": {HUGE_INT}}}', "invalid JSON: Exceeds the limit"),
    ("deep-nesting", DEEP, "invalid JSON: nested too deeply"),
]


def _lines(*lines: str | bytes) -> bytes:
    return b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n"


@pytest.mark.parametrize(
    ("line", "reason"), [r[1:] for r in PROMPT_ROWS], ids=[r[0] for r in PROMPT_ROWS]
)
def test_bad_prompt_row_is_a_counted_reject(tmp_path, line, reason):
    path = tmp_path / "p.jsonl"
    path.write_bytes(_lines(GOOD_PROMPTS[0], line, GOOD_PROMPTS[1]))
    result = read_prompts(path)
    assert [r.conversation.last_user_message for r in result.records] == [
        "How do I bake bread?",
        "What is a good book?",
    ]
    (reject,) = result.rejects
    assert (reject.source, reject.row) == (str(path), 2)
    assert reject.reason.startswith(reason), reject.reason
    assert result.reject_counts == {reject.reason.split(":")[0]: 1}


GOOD_PAIR = {"chosen": HH + "Knead it.", "rejected": HH + "No."}
COMPARISON_ROWS = [
    (
        "no-shared-prefix",
        {**GOOD_PAIR, "rejected": "\n\nHuman: Hi\n\nAssistant: No."},
        "chosen/rejected mismatch",
    ),
    ("missing-rejected", {"chosen": GOOD_PAIR["chosen"]}, "no comparison columns"),
    ("missing-chosen", {"rejected": GOOD_PAIR["rejected"]}, "no comparison columns"),
    ("identical", {**GOOD_PAIR, "rejected": GOOD_PAIR["chosen"]}, "chosen/rejected identical"),
    (
        "no-final-reply",
        {**GOOD_PAIR, "chosen": "\n\nHuman: How do I bake bread?"},
        "bad transcript",
    ),
    ("non-text", {**GOOD_PAIR, "chosen": 42}, "not text"),
]


@pytest.mark.parametrize(
    ("row", "reason"), [r[1:] for r in COMPARISON_ROWS], ids=[r[0] for r in COMPARISON_ROWS]
)
def test_bad_comparison_row_is_a_counted_reject(tmp_path, row, reason):
    other = {"chosen": HH + "Use yeast.", "rejected": HH + "Buy some."}
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(_lines(json.dumps(GOOD_PAIR), json.dumps(row), json.dumps(other)))
    result = read_comparisons(path)
    assert [c.chosen for c in result.records] == ["Knead it.", "Use yeast."]
    (reject,) = result.rejects
    assert reject.row == 2 and reject.reason.startswith(reason), reject.reason


def test_comparison_file_with_no_good_row_is_an_error(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.table({"chosen": [HH + "a"], "rejected": ["\n\nHuman: x\n\nAssistant: b"]}), path
    )
    with pytest.raises(
        DataError, match=r"no valid rows \(1 rejected: row 1: chosen/rejected mismatch"
    ):
        read_comparisons(path)


# -- human judgement CSVs (elo.read_judgements_csv) --------------------------------------------

HEADER = "model_a,model_b,winner\n"
JUDGEMENT_ROWS = [
    ("winner-not-a-b-tie", "sl,rl,c\n", "winner must be a, b or tie, got 'c'"),
    ("empty-model", ",rl,a\n", "empty model name"),
    ("short-row", "sl\n", "empty model name"),
    ("self-comparison", "rl,rl,tie\n", "a model compared with itself: rl"),
]


@pytest.mark.parametrize(
    ("row", "reason"), [r[1:] for r in JUDGEMENT_ROWS], ids=[r[0] for r in JUDGEMENT_ROWS]
)
def test_bad_judgement_row_is_a_counted_reject(tmp_path, row, reason):
    path = tmp_path / "j.csv"
    path.write_text(HEADER + "sl,rl,a\n" + row + "rl,sl,tie\n", encoding="utf-8")
    comparisons, rejects = read_judgements_csv(path)
    assert comparisons == [("sl", "rl", 1.0), ("rl", "sl", 0.5)]
    assert rejects == [{"row": 3, "reason": reason}]


JUDGEMENT_FILES = [
    ("missing-column", "model_a,model_b\nsl,rl\n", "j.csv:1: missing columns: winner"),
    ("missing-file", None, "j.csv: judgements file not found"),
    # bug: UnicodeDecodeError and csv.Error were tracebacks
    ("not-utf8", HEADER.encode() + b"sl,\xff\xfe,a\n", "j.csv: unreadable CSV"),
    (
        "field-over-csv-limit",
        HEADER + 'sl,"' + "x" * 200_000 + '",a\n',
        "j.csv: unreadable CSV: field larger",
    ),
]


@pytest.mark.parametrize(
    ("content", "message"), [r[1:] for r in JUDGEMENT_FILES], ids=[r[0] for r in JUDGEMENT_FILES]
)
def test_unreadable_judgement_file_is_a_data_error(tmp_path, content, message):
    path = tmp_path / "j.csv"
    if content is not None:
        _write(tmp_path, {"j.csv": content})
    with pytest.raises(DataError) as info:
        read_judgements_csv(path)
    assert message in f"{info.value.where}: {info.value.message}"
    assert info.value.hint


def test_judgement_csv_with_a_byte_order_mark_is_read(tmp_path):
    # bug: spreadsheet exports start with a BOM, which hid the model_a column
    path = tmp_path / "j.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + "sl,rl,b\n").encode())
    assert read_judgements_csv(path) == ([("sl", "rl", 0.0)], [])
