"""`cai-ray init-model`, `generate` and `score` end to end on the tiny-1m model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai_ray.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_RAY_HOME", str(tmp_path / "home"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_init_model_prints_path_and_size(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["init-model", "--preset", "tiny-1m", str(out), "--seed", "2"]) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "vocab size 4096" in text
    assert "parameters 885,312" in text
    assert (out / "model.safetensors").is_file()
    # a second write needs --force
    assert main(["init-model", "--preset", "tiny-1m", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (
        main(["init-model", "--preset", "tiny-1m", str(out), "--force", "--head", "classification"])
        == 0
    )
    assert "ForSequenceClassification" in (out / "config.json").read_text()


def test_generate_writes_jsonl(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    argv = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "hello",
        "--prompt",
        "bake bread?",
    ]
    argv += ["--n", "2", "--max-new-tokens", "5", "--seed", "1", "-o", str(out)]
    assert main(argv) == 0
    rows = _rows(out)
    assert [(r["prompt"], r["sample"]) for r in rows] == [
        ("hello", 0),
        ("hello", 1),
        ("bake bread?", 0),
        ("bake bread?", 1),
    ]
    assert all(r["finish_reason"] in ("stop", "length") and 1 <= r["tokens"] <= 5 for r in rows)
    assert rows[0]["model_id"].startswith(tiny_model_dir.name + "@")
    assert rows[0]["prompt_id"] == rows[1]["prompt_id"] != rows[2]["prompt_id"]
    assert "wrote 4 rows" in capsys.readouterr().out
    # same seed, same samples
    again = tmp_path / "again.jsonl"
    assert main([*argv[:-1], str(again)]) == 0
    assert [r["response"] for r in _rows(again)] == [r["response"] for r in rows]


def test_generate_table_from_sample_prompts_in_chat_format(tiny_model_dir, capsys):
    argv = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompts",
        "sample:red_team",
        "--limit",
        "2",
    ]
    assert main([*argv, "--max-new-tokens", "3", "--format", "chat"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["prompt_id", "prompt", "response"]
    assert len(lines) == 3 and all(line.rstrip().endswith(("length", "stop")) for line in lines[1:])


def test_generate_counts_bad_rows_and_too_long_prompts(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"prompt": "short question"}),
        "{broken json",
        json.dumps({"prompt": "word " * 2100}),
    ]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.jsonl"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "-o", str(out)]
    assert main([*argv, "--max-new-tokens", "4"]) == 0  # leaves 2044 of 2048 tokens for a prompt
    assert [r["prompt"] for r in _rows(out)] == ["short question"]
    err = capsys.readouterr().err
    assert "set aside 2 prompts" in err
    assert "row 2" in err and "tokens (> 2044)" in err


def test_generate_builds_a_preset_in_the_cache(tmp_path, capsys):
    argv = ["generate", "--preset", "tiny-1m", "--prompt", "hi", "--max-new-tokens", "2"]
    assert main(argv) == 0
    assert (tmp_path / "home" / "models" / "tiny-1m-causal-s0" / "config.json").is_file()


def test_score_prints_normalised_probabilities(tiny_model_dir, capsys):
    argv = ["score", "--model", str(tiny_model_dir), "--prefix", "The answer is:"]
    assert main([*argv, "--option", " (A)", "--option", " (B)"]) == 0
    lines = capsys.readouterr().out.splitlines()
    probs = [float(line.split()[-2]) for line in lines[2:4]]
    assert lines[2].split()[0] == "(A)" and sum(probs) == pytest.approx(1.0, abs=1e-3)


def test_score_file_sets_bad_rows_aside(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "score.jsonl"
    good = {"prefix": "The answer is:", "options": [" (A)", " (B)", " maybe"]}
    lines = [
        json.dumps(good),
        "[1, 2]",
        json.dumps({"prefix": "x", "options": []}),
        "nope",
        json.dumps({"options": ["a"]}),
    ]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(tiny_model_dir), "--file", str(src), "-o", str(out)]) == 0
    (row,) = _rows(out)
    assert row["row"] == 1 and len(row["logprobs"]) == 3
    assert sum(row["probs"]) == pytest.approx(1.0) and row["option_tokens"][:2] == [1, 1]
    err = capsys.readouterr().err
    assert "set aside 4 rows" in err
    for reason in ("not a JSON object", "non-empty list", "not JSON", "'prefix'"):
        assert reason in err


def test_score_file_with_no_valid_rows_is_an_error(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text("nope\n")
    assert main(["score", "--model", str(tiny_model_dir), "--file", str(src)]) == 2
    assert "no valid rows" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "plain-dir"])
def test_bad_model_path_exits_2_without_traceback(tmp_path, capsys, kind):
    path = tmp_path / "absent"
    if kind == "plain-dir":
        path = tmp_path / "plain"
        path.mkdir()
        (path / "weights.txt").write_text("not a model")
    assert main(["generate", "--model", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and "hint:" in err
    assert "Traceback" not in err


def test_bad_model_path_in_a_subprocess(tmp_path):
    env = {**os.environ, "CAI_RAY_HOME": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "cai_ray",
        "score",
        "--model",
        str(tmp_path),
        "--prefix",
        "x",
        "--option",
        "y",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_reads_config_overrides(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "-o", str(out)]
    sets = [
        "--set",
        "generation.max_new_tokens=3",
        "--set",
        "engine.kind=hf",
        "--set",
        "engine.threads=1",
    ]
    assert main([*argv, *sets]) == 0
    assert _rows(out)[0]["tokens"] == 3
    assert main([*argv, "--set", "engine.kind=gpu"]) == 2
    assert "engine.kind" in capsys.readouterr().err
