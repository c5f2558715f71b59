"""Bad input on the command line: one `error:` line naming the file/field, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cai_ray(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cai_ray", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _files(tmp: Path) -> dict[str, Path]:
    files = {
        "malformed.yaml": "engine:\n  threads: [1, 2\n",
        "unknown_key.yaml": "engine:\n  thredas: 2\n",
        "no_principles.yaml": "name: empty\nversion: '1'\ndescription: nothing\n",
        "empty.jsonl": "",
        "unreadable.parquet": "this is not parquet",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "not_a_model").mkdir()
    (tmp / "not_a_model" / "readme.txt").write_text("no config.json here")
    return {name: tmp / name for name in [*files, "not_a_model"]}


CASES = [
    # (argv built from the temp files, text the error must contain)
    (lambda f: ["run", str(f["malformed.yaml"])], "malformed YAML"),
    (lambda f: ["run", "configs/missing.yaml"], "config file not found"),
    (lambda f: ["run", str(f["unknown_key.yaml"])], "did you mean 'engine.threads'"),
    (lambda f: ["run", "--set", "engine.threads=-1"], "engine.threads"),
    (lambda f: ["constitution", "validate", str(f["no_principles.yaml"])], "no_principles.yaml"),
    (lambda f: ["generate", "--model", str(f["not_a_model"]), "--prompt", "hi"], "not_a_model"),
    (
        lambda f: ["generate", "--preset", "tiny-1m", "--prompts", str(f["empty.jsonl"])],
        "empty.jsonl",
    ),
    (
        lambda f: ["generate", "--preset", "tiny-1m", "--prompts", str(f["unreadable.parquet"])],
        "unreadable.parquet",
    ),
]


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[c[1][:24] for c in CASES])
def test_bad_input_is_a_clear_error(tmp_path, monkeypatch, argv, expected):
    files = _files(tmp_path)
    monkeypatch.setenv("CAI_RAY_HOME", str(tmp_path / "home"))
    out = _cai_ray(*argv(files))
    assert out.returncode == 2, out.stderr[-1500:]
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") or "\nerror: " in out.stderr
    assert expected in out.stderr
