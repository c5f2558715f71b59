"""The paper's multiple-choice eval files: reading, PM and feedback-model scoring, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_ray.engines.base import Generation, OptionScores
from cai_ray.errors import DataError
from cai_ray.evals import EVAL_FILES, eval_with_feedback_model, eval_with_pm, read_eval_file

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "anthropic-cai" / "evals"


def _row(correct: str, incorrect: str, *, texts: bool = True) -> dict:
    prompt = "Which is better? Options:\n (A) [[[one]]]\n (B) [[[two]]]\n\nThe answer is:"
    row = {"prompt": prompt, "corrects": [correct], "incorrects": [incorrect]}
    if texts:
        row |= {"text_correct": "\n\nHuman: q\n\nAssistant: good answer", "text_incorrect": "bad"}
    return row


@pytest.fixture()
def small_file(tmp_path) -> Path:
    lines = [
        json.dumps(_row(" (A)", " (B)")),
        json.dumps(_row(" (B)", " (A)")),
        json.dumps(_row(" (B)", " (A)", texts=False)),
        "{not json",
        json.dumps({"prompt": "x", "corrects": [], "incorrects": [" (A)"]}),
        json.dumps({"prompt": "", "corrects": [" (A)"], "incorrects": [" (B)"]}),
        json.dumps({"corrects": [" (A)"], "incorrects": [" (B)"]}),
    ]
    path = tmp_path / "evals.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_sets_malformed_rows_aside_with_reasons(small_file):
    items, rejects = read_eval_file(small_file)
    assert [it.correct_label for it in items] == ["(A)", "(B)", "(B)"]
    assert [it.options for it in items] == [(" (A)", " (B)")] * 3
    assert [r["row"] for r in rejects] == [4, 5, 6, 7]
    assert "corrects" in rejects[1]["reason"] and "prompt" in rejects[3]["reason"]


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_eval_file(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="no valid rows"):
        read_eval_file(bad)


def test_pm_scoring_compares_the_two_transcripts(small_file):
    items, _ = read_eval_file(small_file)
    report = eval_with_pm("hhh", items, lambda texts: [float(len(t)) for t in texts])
    d = report.to_dict()
    assert (d["total"], d["correct"], d["accuracy"]) == (2, 2, 1.0)  # longer = correct here
    assert d["by_position"]["(A)"]["total"] == 1 and d["by_position"]["(B)"]["accuracy"] == 1.0
    assert d["rejects"] == [{"row": 3, "reason": "no text_correct/text_incorrect for a PM"}]
    worse = eval_with_pm("hhh", items, lambda texts: [-float(len(t)) for t in texts])
    assert worse.accuracy == 0.0
    assert "all" in report.table()


class _AlwaysA:
    """A stub feedback model that always prefers the first option; counts calls."""

    max_context = 10_000

    def __init__(self):
        self.generated: list[str] = []
        self.scored: list[str] = []

    def count_tokens(self, texts):
        return [len(t) // 4 for t in texts]

    def generate(self, prompts, params):
        self.generated += list(prompts)
        return [
            [Generation(" (A) looks better.\nSo the answer is: (A)", [], "stop", 0)]
            for _ in prompts
        ]

    def score_options(self, requests):
        self.scored += [r.prefix for r in requests]
        return [
            OptionScores([-0.1] + [-3.0] * (len(r.options) - 1), [[1]] * len(r.options))
            for r in requests
        ]


def test_feedback_model_accuracy_by_position_and_cot(small_file):
    items, _ = read_eval_file(small_file)
    engine = _AlwaysA()
    report = eval_with_feedback_model("hhh", items, engine)
    assert report.by_position == {
        "(A)": {"total": 1, "correct": 1},
        "(B)": {"total": 2, "correct": 0},
    }
    assert not engine.generated
    cot = eval_with_feedback_model("hhh", items, engine, cot=True)
    assert cot.method == "feedback-cot" and cot.correct == 1
    assert engine.generated[0].endswith("\n\nLet's think step-by-step:")
    assert engine.scored[-1].endswith("step-by-step: (A) looks better.\nSo the answer is:")


def test_too_long_prompts_are_rejects(small_file):
    items, _ = read_eval_file(small_file)
    engine = _AlwaysA()
    engine.max_context = 20
    report = eval_with_feedback_model("hhh", items, engine)
    assert report.total == 0 and len(report.rejects) == 3
    assert report.rejects[0]["reason"].startswith("prompt too long")


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "rows", "options"),
    [("hhh", 438, 2), ("harmful-vs-ethical", 254, 2), ("harm-classification", 287, 9)],
)
def test_the_papers_files(name, rows, options):
    path = SHARED / EVAL_FILES[name]
    if not path.is_file():
        pytest.skip("../shared/data is not present")
    items, rejects = read_eval_file(path)
    assert len(items) == rows and not rejects
    assert all(len(it.options) == options for it in items)
    if name == "hhh":
        positions = [it.correct_label for it in items]
        assert positions.count("(A)") == 228 and positions.count("(B)") == 210
        assert all(it.text_correct and it.text_incorrect for it in items)


def test_cli_eval_feedback_and_pm(
    small_file, tmp_path, tiny_model_dir, tiny_reward_model_dir, capsys
):
    from cai_ray.cli import main

    out = tmp_path / "report.json"
    args = ["eval", "hhh", "--file", str(small_file), "--model", str(tiny_model_dir)]
    assert main([*args, "--device", "cpu", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["total"] == 3 and report["method"] == "feedback" and len(report["rejects"]) == 4
    assert "(A)" in capsys.readouterr().out
    pm = ["eval", "hhh", "--file", str(small_file), "--model", str(tiny_reward_model_dir)]
    assert main([*pm, "--as", "pm", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["total"] == 2
    assert main([*pm, "--as", "pm", "--cot"]) == 2  # a PM has no chain of thought
