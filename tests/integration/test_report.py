"""`cai-ray report` over a tiny real run (stages 1-4), and the page as a headless browser draws it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cai_ray.cli import main
from cai_ray.config import load_config
from cai_ray.report import SECTIONS, build_report

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "data.limit=4",
    "generation.max_new_tokens=8",
    "sl_generate.rounds=1",
    "sl_generate.helpful_samples=0",
    "sl_train.learner.num_ranks=0",
    "sl_train.learner.epochs=1",
    "sl_generate.few_shot=0",  # shorter prompts: the report needs traces, not good ones
    "rl_label.few_shot=0",
    "rl_label.principles_per_label=2",
]


@pytest.fixture(scope="module")
def run_dir(ray_cluster, tiny_model_dir, tmp_path_factory):
    """A run directory holding sl-generate, sl-train, rl-pairs and rl-label outputs."""
    from cai_ray.pipeline.runner import run_pipeline

    path = tmp_path_factory.mktemp("report-run")
    model = f"models.helpful={{path: {tiny_model_dir}}}"
    cfg = load_config(ROOT / "configs/local-tiny.yaml", [f"run_dir={path}", *TINY, model])
    run_pipeline(cfg, until="rl-label", progress=False)
    return path


def _section(text: str, key: str) -> str:
    return re.search(rf'<section id="{key}">(.*?)</section>', text, re.S).group(1)


def test_report_has_every_section_plots_and_traces(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    page = run_dir / "report.html"
    text = page.read_text()
    for key, title in SECTIONS.items():
        assert f"<h2>{title}</h2>" in _section(text, key)
    pngs = {p.stem for p in (run_dir / "report").glob("*.png")}
    assert {"sl-train-loss", "principles-sl-generate", "principles-rl-label"} <= pngs
    assert {"principles-agreement", "rl-label-distribution"} <= pngs
    assert text.count('src="data:image/png;base64,') == len(pngs)
    # the stages that ran are in the manifest table; later ones say they have not run
    manifests = _section(text, "manifests")
    assert "complete" in manifests and "4 rows" in manifests
    assert "not run yet" in _section(text, "elo") and "pm-train: not run yet" in text
    # traces: every prompt of stage 1 with its critique round, every labelled pair of stage 4
    traces = _section(text, "traces")
    assert traces.count("<details>") >= 5 and "Critique request" in traces
    assert "p_ab" in traces and "order" in traces
    assert "<script>alert" not in text  # model text is escaped (see the next test)


def test_model_text_is_escaped_and_elo_is_drawn(run_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    copy = tmp_path / "run"
    shutil.copytree(run_dir / "sl-generate", copy / "sl-generate")
    shard = next((copy / "sl-generate" / "red_team").glob("shard-*.parquet"))
    rows = pq.read_table(shard).to_pylist()
    rows[0]["prompt"] = "<script>alert(1)</script>"
    pq.write_table(pa.Table.from_pylist(rows), shard)
    elo = {
        axis: {m: {"elo": e, "low": e - 30, "high": e + 30} for m, e in (("sl", 0.0), ("rl", v))}
        for axis, v in (("harmlessness", 120.0), ("helpfulness", -20.0))
    }
    (copy / "evaluate").mkdir()
    (copy / "evaluate" / "elo.json").write_text(json.dumps(elo))
    (copy / "pm-train").mkdir()
    (copy / "pm-train" / "eval.json").write_text("{not json")  # a broken file is "not run"
    text = build_report(copy, out=tmp_path / "out" / "r.html").read_text()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)" in text
    assert (copy / "report" / "elo-frontier.png").is_file()
    assert "120.0 [90.0, 150.0]" in _section(text, "elo")
    assert "pm-train: not run yet" in text


def test_empty_and_missing_run_dirs(tmp_path, capsys):
    text = build_report(tmp_path).read_text()
    assert all(f"<h2>{title}</h2>" in text for title in SECTIONS.values())
    assert "<img" not in text and text.count("not run yet") >= 6
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_report_of_an_evaluated_run_has_every_section(evaluated_run):
    # the shared evaluated tiny run of tests/integration/conftest.py: stage 7 really ran there
    text = build_report(evaluated_run.run_dir).read_text()
    for key, title in SECTIONS.items():
        assert f"<h2>{title}</h2>" in _section(text, key)
        assert "could not build this section" not in _section(text, key)
    pngs = {p.stem for p in (evaluated_run.run_dir / "report").glob("*.png")}
    stage7 = {"elo-frontier", "eval-evasiveness", "eval-pm-score", "eval-length"}
    stage7 |= {"label-calibration-reference", "pm-by-revision-round"}
    assert stage7 | {"rl-train-reward_mean", "rl-train-kl", "rl-train-refusal_rate"} <= pngs
    assert text.count('src="data:image/png;base64,') == len(pngs)
    names = evaluated_run.names
    elo = _section(text, "elo")
    assert all(f"<td>{n}</td>" in elo for n in names) and "comparisons" in elo
    evaluation = _section(text, "evaluation")
    assert all(f"<td>{n}</td>" in evaluation for n in names)
    assert "rl-step-2: skipped (same weights as rl-cai)" in evaluation
    assert "Judged prompts" in evaluation and "P(A better)" in evaluation
    assert "Refusal and over-refusal" in evaluation and "over-refusal on benign" in evaluation
    assert "Reference: reference judge" in _section(text, "label_quality")
    assert "<td>0</td>" in _section(text, "revisions")  # round 0: the initial answers
    for key in ("elo", "evaluation", "label_quality", "revisions"):
        assert 'class="missing"' not in _section(text, key)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium installed")
def test_headless_chromium_renders_the_plots(evaluated_run, tmp_path):
    page = build_report(evaluated_run.run_dir, out=tmp_path / "report.html")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = page.resolve().as_uri()
    dom = subprocess.run(
        ["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=60
    ).stdout
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert widths and len(widths) == dom.count("<img") and min(widths) > 0
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,3000", url],
        capture_output=True,
        timeout=60,
    )
    from PIL import Image

    with Image.open(shot) as img:
        assert min(img.size) >= 1000  # the window, possibly scaled by the display's DPR
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 50  # not a blank page
