"""`cai-ray constitution ...`, run in-process through `cai_ray.cli.main` (plus one subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai_ray.cli import main
from cai_ray.constitution import DEFAULT_CONSTITUTION, load_constitution

ROOT = Path(__file__).resolve().parents[2]
TUTOR = ROOT / "constitutions" / "examples" / "childrens-tutor.yaml"
PAPER = ROOT.parent / "shared" / "data" / "anthropic-cai" / "prompts"
BROKEN = """\
name: broken
version: "1"
description: d
critique_principles:
  - id: harm
    critque: Is it harmful?
    revision: Make it harmless.
"""


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["constitution", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_ok(capsys):
    code, out, _ = _run(capsys, "validate", str(DEFAULT_CONSTITUTION))
    c = load_constitution(DEFAULT_CONSTITUTION)
    assert code == 0
    assert out.startswith("OK ")
    assert c.content_hash in out
    assert f"{len(c.critique_principles)} critique/revision principles" in out


def test_validate_error_names_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text(BROKEN)
    code, out, err = _run(capsys, "validate", str(bad))
    assert code == 2
    assert out == ""
    assert err.startswith(f"error: {bad}:6: critique_principles[0].critque: unknown field")
    assert "did you mean 'critique'" in err


def test_show_lists_principles(capsys):
    code, out, _ = _run(capsys, "show", str(TUTOR))
    assert code == 0
    assert "childrens-tutor v0.1" in out
    assert "[child-safe]" in out and "[teach-not-tell]" in out and "[better-tutor]" in out
    assert "Few-shot examples: 1 critique/revision (1 round), 1 feedback" in out
    code, out, _ = _run(capsys, "show", "--examples", str(TUTOR))
    assert "CritiqueRequest: Did the assistant's last reply simply give the answer" in out
    assert "The answer is: (B)" in out


def test_show_json(capsys):
    code, out, _ = _run(capsys, "show", "--json", str(TUTOR))
    data = json.loads(out)
    assert code == 0
    assert data["content_hash"] == load_constitution(TUTOR).content_hash
    assert data["counts"]["critique_principles"] == 2
    assert data["feedback_principles"][1]["id"] == "better-tutor"


def test_diff_exit_codes(tmp_path, capsys):
    code, out, _ = _run(capsys, "diff", str(TUTOR), str(TUTOR))
    assert code == 0 and "identical" in out
    changed = tmp_path / "tutor2.yaml"
    text = TUTOR.read_text().replace("better-tutor", "better-teacher")
    changed.write_text(text.replace('version: "0.1"', 'version: "0.2"'))
    code, out, _ = _run(capsys, "diff", str(TUTOR), str(changed))
    assert code == 1
    assert "version: '0.1' -> '0.2'" in out
    assert "+ better-teacher" in out and "- better-tutor" in out
    code, out, _ = _run(capsys, "diff", str(TUTOR), str(DEFAULT_CONSTITUTION))
    assert code == 1 and "critique principles:" in out


def _hf_file(tmp_path: Path) -> Path:
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Go away."},
        {"role": "user", "content": "Is it rude?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Fix it."},
        {"role": "assistant", "content": "Hello!"},
    ]
    path = tmp_path / "rules.json"
    data = {
        "constitutions": [{"critic": "Is it rude?", "revision": "Fix it."}],
        "system_chat": [chat],
    }
    path.write_text(json.dumps(data))
    return path


def test_import_writes_valid_yaml_and_refuses_to_overwrite(tmp_path, capsys):
    src, out_file = _hf_file(tmp_path), tmp_path / "out" / "rules.yaml"
    code, out, _ = _run(capsys, "import", str(src), "-o", str(out_file))
    assert code == 0
    imported = load_constitution(out_file)
    assert imported.critique_principles[0].critique == "Is it rude?"
    assert imported.content_hash in out
    assert "no feedback principles" in out
    assert out_file.read_text().startswith("# Imported by `cai-ray constitution import`")
    code, _, err = _run(capsys, "import", str(src), "-o", str(out_file))
    assert code == 2 and "exists" in err and "--force" in err
    code, _, _ = _run(capsys, "import", str(src), "-o", str(out_file), "--force", "--name", "mine")
    assert code == 0 and load_constitution(out_file).name == "mine"


def test_import_error_is_clean(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = _run(
        capsys, "import", str(bad), "-o", str(tmp_path / "x.yaml"), "--format", "hf"
    )
    assert code == 2 and err.startswith(f"error: {bad}:1: invalid JSON")
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.shared_data
@pytest.mark.skipif(not PAPER.is_dir(), reason="../shared/data is absent")
def test_import_the_papers_constitution(tmp_path, capsys):
    out_file = tmp_path / "paper.yaml"
    code, out, _ = _run(capsys, "import", str(PAPER), "-o", str(out_file))
    assert code == 0
    assert "16 critique/revision principles, 16 feedback principles" in out
    code, out, _ = _run(capsys, "validate", str(out_file))
    assert code == 0 and "5 critique/revision, 5 feedback, 6 chain-of-thought" in out


def test_subprocess_error_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text(BROKEN)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cai_ray", "constitution", "validate", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{bad}:6" in proc.stderr
