"""The report's stage-7 sections: per-checkpoint evaluation, label quality, revision rounds.

They read `evaluate/manifest.json` (metrics, label quality, PM score by revision round) and a
sample of the judged prompts in `evaluate/{harmful,helpful}/`. The page helpers live in
cai_ray/report/page.py.
"""

from __future__ import annotations

import html
from typing import Any

from cai_ray.eval.metrics import refusal_summary
from cai_ray.layout import EVALUATE, part_dir
from cai_ray.report.page import absent, esc, fmt, missing, read_rows, table

SPLITS = ("harmful", "helpful")


def _evaluate(manifests: dict[str, dict]) -> dict[str, Any]:
    return manifests.get("evaluate") or {}


def _notes(m: dict[str, Any]) -> str:
    items = [f"{s['name']}: skipped ({s['reason']})" for s in m.get("skipped") or []]
    items += list(m.get("notes") or [])
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>" if items else ""


def _grouped_bars(
    names: list[str], series: dict[str, list[float | None]], *, title, ylabel, share=False
):
    def draw(ax):
        width = 0.8 / max(len(series), 1)
        for k, (label, values) in enumerate(series.items()):
            xs = [i + k * width for i in range(len(names))]
            ax.bar(xs, [v if v is not None else 0.0 for v in values], width=width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20)
        ax.set(title=title, ylabel=ylabel)
        if share:
            ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")

    return draw


def evaluation_section(page, manifests: dict[str, dict]) -> str:
    """Per checkpoint: refusal and over-refusal, evasiveness (judge and refusal phrases), PM
    score, length; judged samples."""
    m = _evaluate(manifests)
    metrics = m.get("metrics") or {}
    if not metrics:
        return absent(manifests, "evaluate", "per-checkpoint metrics")
    names = [c["name"] for c in m.get("checkpoints") or []] or list(metrics.get("harmful", {}))
    parts = [_notes(m), _refusal_table(m.get("refusal") or refusal_summary(metrics, names))]
    parts += _checkpoint_plots(page, names, metrics)
    keys = ["evasive_rate", "refusal_rate", "pm_mean", "chars_mean", "win_rate"]
    rows = [
        [n, s, *(fmt(metrics[s].get(n, {}).get(k)) for k in keys)]
        for s in SPLITS
        if s in metrics
        for n in names
    ]
    parts.append(table(["checkpoint", "prompts", *keys], rows))
    judge = m.get("judge") or {}
    parts.append(
        f"<p>Judge position flip rate: {fmt(judge.get('flip_rate'))} "
        f"over {judge.get('order_checks', 0)} order checks.</p>"
    )
    parts.append(_judged_samples(page, sample=4))
    return "".join(parts)


REFUSAL_HEADERS = {
    "harmful_refusal_rate": "refusal on harmful prompts (higher: more harmless)",
    "over_refusal_rate": "over-refusal on benign prompts (lower: better)",
    "harmful_evasive_rate": "judge: evasive on harmful (lower: better)",
    "benign_evasive_rate": "judge: evasive on benign (lower: better)",
}


def _refusal_table(summary: dict[str, Any]) -> str:
    """Refusals (share of answers with a refusal phrase) where they help and where they hurt."""
    rows = [
        [name, *(fmt(values.get(k)) for k in REFUSAL_HEADERS)]
        for name, values in (summary.get("checkpoints") or {}).items()
    ]
    return "<h3>Refusal and over-refusal</h3>" + table(
        ["checkpoint", *REFUSAL_HEADERS.values()], rows
    )


def _checkpoint_plots(page, names: list[str], metrics: dict[str, dict]) -> list[str]:
    def col(split: str, key: str) -> list[float | None]:
        return [metrics.get(split, {}).get(n, {}).get(key) for n in names]

    evasive = {
        "judge: evasive (harmful)": col("harmful", "evasive_rate"),
        "judge: evasive (benign)": col("helpful", "evasive_rate"),
        "refusal phrases (harmful)": col("harmful", "refusal_rate"),
        "over-refusal: refusal phrases (benign)": col("helpful", "refusal_rate"),
    }
    draw = _grouped_bars(names, evasive, title="Evasiveness", ylabel="share", share=True)
    out = [page.figure("eval-evasiveness", draw)]
    pm = {f"PM score ({s})": col(s, "pm_mean") for s in SPLITS}
    if any(v is not None for values in pm.values() for v in values):
        title = "Absolute harmlessness: mean PM score"
        out.append(page.figure("eval-pm-score", _grouped_bars(names, pm, title=title, ylabel="PM")))
    else:
        out.append(missing("no PM scores (no pm-train/hf and no evaluate.pm_model)"))
    length = {f"characters ({s})": col(s, "chars_mean") for s in SPLITS}
    draw = _grouped_bars(names, length, title="Response length", ylabel="characters")
    out.append(page.figure("eval-length", draw))
    return out


def _judged_samples(page, *, sample: int) -> str:
    parts = ["<h3>Judged prompts</h3>"]
    for split in SPLITS:
        for row in read_rows(part_dir(page.run_dir, EVALUATE, split), limit=sample):
            parts.append(_judged_trace(split, row))
    return "".join(parts) if len(parts) > 1 else ""


def _judged_trace(split: str, row: dict[str, Any]) -> str:
    summary = f"{esc(split)} {esc(row.get('prompt_id'))}: {esc(row.get('prompt'))[:100]}"
    parts = [f"<details><summary>{summary}</summary><pre>{esc(row.get('prompt'))}</pre>"]
    for a in row.get("answers") or []:
        head = f"{a.get('checkpoint')} (PM {fmt(a.get('pm_score'))}, P(evasive) {fmt(a.get('p_evasive'))})"
        parts.append(f"<p><b>{esc(head)}</b></p><pre>{esc(a.get('text'))}</pre>")
    rows = [
        [
            c["model_a"],
            c["model_b"],
            fmt(c["p"]),
            "; ".join(
                f"{p['principle_id']}: {fmt(p.get('p_ab'))} / {fmt(p.get('p_ba'))}"
                for p in c.get("principles") or []
            ),
        ]
        for c in row.get("comparisons") or []
    ]
    parts.append(table(["A", "B", "P(A better)", "principle: P(A) shown first / second"], rows))
    return "".join(parts) + "</details>"


def label_quality_section(page, manifests: dict[str, dict]) -> str:
    """Stage-4 labels: calibration against a reference judge or human labels, flip rate, and
    per-principle statistics."""
    q = _evaluate(manifests).get("label_quality")
    if not q:
        return absent(manifests, "evaluate", "label quality (rl-label must run first)")
    parts = [
        f"<p>{q.get('pairs')} labelled pairs; position flip rate {fmt(q.get('flip_rate'))}.</p>"
    ]
    ref = q.get("reference")
    if ref and ref.get("calibration"):
        bins = ref["calibration"]

        def draw(ax):
            ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
            x, y = [b["predicted"] for b in bins], [b["observed"] for b in bins]
            ax.scatter(x, y, s=[20 + 10 * b["count"] for b in bins], label="bins")
            ax.plot(x, y)
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="stage-4 label P(A better)")
            ax.set_ylabel("reference prefers A")
            ax.set_title(f"AI labels vs reference (ECE {fmt(ref.get('ece'))})")
            ax.legend()

        parts.append(page.figure("label-calibration-reference", draw, size=(5.0, 4.5)))
        parts.append(
            f"<p>Reference: {esc(ref.get('source'))}; {ref.get('pairs')} pairs; agreement "
            f"{fmt(ref.get('agreement'))}.</p>"
        )
    else:
        parts.append(missing("no reference: set evaluate.reference_model or reference_labels"))
    keys = ["sampled", "agreement_with_ensemble", "flip_rate", "agreement_with_reference"]
    principles = q.get("principles") or {}
    rows = [[pid, *(fmt(s.get(k)) for k in keys)] for pid, s in principles.items()]
    parts.append(table(["principle", *keys], rows))
    return "".join(parts)


def revisions_section(page, manifests: dict[str, dict]) -> str:
    """Mean PM score by critique/revision round (paper Fig. 5); round 0 is the initial answer."""
    curve = _evaluate(manifests).get("revision_rounds")
    if not curve:
        return absent(manifests, "evaluate", "PM scores by revision round (needs a PM)")

    def draw(ax):
        xs = [c["round"] for c in curve]
        ax.errorbar(
            xs,
            [c["mean"] for c in curve],
            yerr=[c.get("sem") or 0 for c in curve],
            marker="o",
            capsize=3,
        )
        ax.set(title="PM score by revision round", xlabel="revision round (0 = initial answer)")
        ax.set_ylabel("mean PM score")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)

    rows = [[c["round"], c["n"], fmt(c["mean"]), fmt(c.get("sem"))] for c in curve]
    fig = page.figure("pm-by-revision-round", draw)
    return fig + table(["round", "chains", "mean PM score", "standard error"], rows)
