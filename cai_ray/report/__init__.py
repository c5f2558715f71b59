"""`cai-ray report`: one self-contained HTML page (plus PNGs) over what a run directory holds.

Sections follow the issue 7 checklist: config and hashes, stage manifests, training curves,
calibration, per-principle bars, the harmlessness-vs-helpfulness Elo frontier (paper figure 2)
and a browsable sample of traces. A stage that has not run leaves its section saying so.
"""

from __future__ import annotations

import html
from pathlib import Path

from cai_ray.errors import CaiRayError
from cai_ray.layout import STAGES, manifest_path
from cai_ray.report import evaluation, training
from cai_ray.report.page import CSS, IMG_SCRIPT, Page, missing, read_json

SECTIONS = {
    "run": "Run config and hashes",
    "manifests": "Stage manifests",
    "curves": "Training curves",
    "calibration": "Calibration",
    "principles": "Principles",
    "elo": "Elo frontier",
    "evaluation": "Checkpoint evaluation",
    "label_quality": "Label quality",
    "revisions": "PM score by revision round",
    "traces": "Traces",
}


def build_report(run_dir: str | Path, *, out: str | Path | None = None, sample: int = 20) -> Path:
    """Write the report page (default `<run_dir>/report.html`) and its PNGs in `<run_dir>/report/`.

    `sample` is how many traces of each kind the page shows. Returns the page's path.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CaiRayError(
            "run directory not found",
            where=str(run_dir),
            hint="pass the run_dir of a `cai-ray run` (the folder holding config.yaml)",
        )
    page = Page(run_dir, run_dir / "report")
    manifests = {}
    for stage in STAGES:
        m = read_json(manifest_path(run_dir, stage))
        if isinstance(m, dict):
            manifests[stage] = m
    builders = {
        "run": training.run_section,
        "manifests": training.manifests_section,
        "curves": training.curves_section,
        "calibration": training.calibration_section,
        "principles": training.principles_section,
        "elo": training.elo_section,
        "evaluation": evaluation.evaluation_section,
        "label_quality": evaluation.label_quality_section,
        "revisions": evaluation.revisions_section,
        "traces": lambda p, m: training.traces_section(p, m, sample=sample),
    }
    body = []
    for key, title in SECTIONS.items():
        try:
            content = builders[key](page, manifests)
        except Exception as exc:  # one unreadable file must not cost the whole page
            content = missing(f"could not build this section: {type(exc).__name__}: {exc}")
        body.append(f'<section id="{key}"><h2>{html.escape(title)}</h2>{content}</section>')
    title = f"cai-ray report: {run_dir.name}"
    text = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        + "\n".join(body)
        + f"{IMG_SCRIPT}</body></html>\n"
    )
    path = Path(out) if out else run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
