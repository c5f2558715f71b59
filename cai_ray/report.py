"""`cai-ray report`: one self-contained HTML page (plus PNGs) over what a run directory holds.

Sections follow the issue 7 checklist: config and hashes, stage manifests, training curves,
calibration, per-principle bars, the harmlessness-vs-helpfulness Elo frontier (paper figure 2)
and a browsable sample of traces. A stage that has not run leaves its section saying so.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai_ray.errors import CaiRayError

STAGES = ("sl-generate", "sl-train", "rl-pairs", "rl-label", "pm-train", "rl-train", "evaluate")
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
# each <img> records its decoded size, so a headless browser's DOM dump shows it was drawn
_IMG_SCRIPT = """<script>
for (const img of document.images) {
  const mark = () => { img.dataset.naturalWidth = img.naturalWidth; };
  img.complete ? mark() : img.addEventListener('load', mark);
}
</script>"""
_CSS = """body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}
table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px;
vertical-align:top;text-align:left}.hashes td+td{word-break:break-all}
pre{white-space:pre-wrap;background:#f6f6f6;padding:6px}
img{max-width:100%}.missing{color:#777;font-style:italic}details{margin:4px 0}"""


class _Page:
    """Collects sections and writes each figure as a PNG beside the page and inline in it."""

    def __init__(self, run_dir: Path, png_dir: Path):
        self.run_dir = run_dir
        self.png_dir = png_dir
        self.parts: list[str] = []

    def figure(self, name: str, draw: Callable[[Any], None], *, size=(6.0, 3.5)) -> str:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=size)
        try:
            draw(ax)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=90)
        finally:
            plt.close(fig)
        png = buf.getvalue()
        self.png_dir.mkdir(parents=True, exist_ok=True)
        (self.png_dir / f"{name}.png").write_bytes(png)
        data = base64.b64encode(png).decode("ascii")
        return f'<img alt="{name}" src="data:image/png;base64,{data}">'


def _missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def _absent(manifests: dict[str, dict], stage: str, what: str) -> str:
    """Why a section part is empty: the stage has not run, or ran without writing `what`."""
    return _missing(f"{stage}: {'no ' + what if stage in manifests else 'not run yet'}")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The readable lines of a metrics log (a torn last line from a killed run is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _rows(folder: Path, *, columns: list[str] | None = None, limit: int | None = None):
    """Rows of a stage's Parquet shards as plain dicts (nested lists, not numpy arrays)."""
    import pyarrow.parquet as pq

    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("shard-*.parquet")):
        schema = pq.read_schema(path).names
        cols = [c for c in columns if c in schema] if columns else None
        out.extend(pq.read_table(path, columns=cols).to_pylist())
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><tr>{head}</tr>{body}</table>"


def _run_section(page: _Page, manifests: dict[str, dict]) -> str:
    cfg = page.run_dir / "config.yaml"
    hashes = [
        [name, m.get("config_hash", ""), m.get("stage_hash", ""), m.get("constitution_hash", "")]
        for name, m in manifests.items()
    ]
    parts = [f"<p>Run directory: <code>{html.escape(str(page.run_dir))}</code></p>"]
    parts.append(
        _table(["stage", "config hash", "stage hash", "constitution hash"], hashes, "hashes")
        if hashes
        else _missing("no stage has written a manifest yet")
    )
    if cfg.is_file():
        parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(cfg.read_text())}")
        parts.append("</pre></details>")
    else:
        parts.append(_missing("no config.yaml in the run directory"))
    return "".join(parts)


def _outputs_text(outputs: dict[str, Any]) -> tuple[str, Counter]:
    """'part: rows, rejects' and scalar counts; reject reasons summed over the parts."""
    parts, reasons = [], Counter()
    for key, value in outputs.items():
        if isinstance(value, dict) and "rows" in value:
            parts.append(f"{key}: {value.get('rows')} rows, {value.get('rejects')} rejects")
            reasons.update(value.get("reject_reasons") or {})
        elif key == "reject_reasons" and isinstance(value, dict):
            reasons.update(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return "; ".join(parts), reasons


def _manifests_section(page: _Page, manifests: dict[str, dict]) -> str:
    rows = []
    for stage in STAGES:
        m = manifests.get(stage)
        if m is None:
            rows.append([stage, "not run yet", "", "", "", ""])
            continue
        counts, reasons = _outputs_text(m.get("outputs") or {})
        timings = ", ".join(f"{k}={v}" for k, v in (m.get("timings") or {}).items())
        why = ", ".join(f"{k}: {v}" for k, v in reasons.items()) or "none"
        status = "complete" if m.get("complete") else "incomplete"
        rows.append([stage, status, counts, why, timings, m.get("written_at", "")])
    header = ["stage", "status", "outputs", "rejects by reason", "timings (s)", "written"]
    return _table(header, rows)


def _curve(metrics: list[dict], key: str, title: str) -> Callable[[Any], None]:
    def draw(ax):
        points = [(r.get("step", i), r[key]) for i, r in enumerate(metrics) if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set(title=title, xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)

    return draw


def _curves_section(page: _Page, manifests: dict[str, dict]) -> str:
    rl = ("reward_mean", "score_mean", "kl", "entropy", "response_len", "refusal_rate")
    wanted = {"sl-train": ("loss",), "pm-train": ("loss", "accuracy"), "rl-train": rl}
    parts = []
    for stage, keys in wanted.items():
        metrics = _jsonl(page.run_dir / stage / "metrics.jsonl")
        found = [k for k in (*keys, "loss") if any(k in r for r in metrics)]
        if not found:
            parts.append(_absent(manifests, stage, "metrics.jsonl"))
            continue
        for key in dict.fromkeys(found):
            name = f"{stage}-{key}"
            parts.append(page.figure(name, _curve(metrics, key, f"{stage} {key}")))
    return "".join(parts)


def _calibration_section(page: _Page, manifests: dict[str, dict]) -> str:
    parts = []
    evals = _json(page.run_dir / "pm-train" / "eval.json")
    if isinstance(evals, list) and evals:
        last = evals[-1]
        bins = last.get("calibration") or []

        def draw(ax):
            ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
            x = [b["predicted"] for b in bins]
            y = [b["observed"] for b in bins]
            ax.scatter(x, y, s=[20 + 10 * b.get("count", 1) for b in bins], label="held-out bins")
            ax.plot(x, y)
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="PM predicted P(chosen)", ylabel="observed")
            ax.set_title(
                f"PM calibration, epoch {last.get('epoch')} (ECE {last.get('ece', 0):.3f})"
            )
            ax.legend()

        parts.append(page.figure("pm-calibration", draw, size=(5.0, 4.5)))
        keys = ["epoch", "step", "pairs", "accuracy", "loss", "ece"]
        rows = [[_fmt(e.get(k)) for k in keys] for e in evals]
        parts.append(_table(keys, rows))
    else:
        parts.append(_absent(manifests, "pm-train", "held-out evaluation (eval.json)"))
    stats = (manifests.get("rl-label") or {}).get("statistics") or {}
    counts = (stats.get("distribution") or {}).get("counts")
    if counts:

        def draw_hist(ax):
            width = 1.0 / len(counts)
            ax.bar([i * width for i in range(len(counts))], counts, width=width, align="edge")
            ax.set(title="rl-label: AI label distribution", xlabel="P(A better)", ylabel="pairs")

        parts.append(page.figure("rl-label-distribution", draw_hist))
        keys = ["labels", "mean_label", "prefers_a", "flip_rate", "mean_confidence"]
        parts.append(_table(keys, [[_fmt(stats.get(k)) for k in keys]]))
    else:
        parts.append(_absent(manifests, "rl-label", "label statistics"))
    return "".join(parts)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _bars(page: _Page, name: str, counts: dict[str, float], title: str, xlabel: str) -> str:
    def draw(ax):
        names = sorted(counts)
        ax.barh(names, [counts[n] for n in names])
        ax.set(title=title, xlabel=xlabel)

    return page.figure(name, draw, size=(6.0, 1.2 + 0.3 * len(counts)))


def _principles_section(page: _Page, manifests: dict[str, dict]) -> str:
    parts = []
    gen = _rows(page.run_dir / "sl-generate" / "red_team", columns=["rounds"])
    sampled = Counter(r["principle_id"] for row in gen for r in row.get("rounds") or [])
    if sampled:
        title = "sl-generate: principle per critique round"
        parts.append(_bars(page, "principles-sl-generate", sampled, title, "rounds"))
    else:
        parts.append(_absent(manifests, "sl-generate", "critique rounds"))
    labels = _rows(page.run_dir / "rl-label" / "labels", columns=["label", "principles"])
    used, agree = Counter(), Counter()
    for row in labels:
        for p in row.get("principles") or []:
            used[p["principle_id"]] += 1
            # agreement: the principle picks the same winner as the ensemble label (paper 4.1)
            agree[p["principle_id"]] += (p["p"] > 0.5) == (row["label"] > 0.5)
    if used:
        parts.append(_bars(page, "principles-rl-label", used, "rl-label: principle use", "labels"))
        if any(len(r.get("principles") or []) > 1 for r in labels):
            share = {k: agree[k] / used[k] for k in used}
            title = "rl-label: agreement with the ensemble label"
            parts.append(_bars(page, "principles-agreement", share, title, "share"))
        else:
            parts.append(_missing("one principle per label: agreement with the ensemble is 1"))
    else:
        parts.append(_absent(manifests, "rl-label", "labels"))
    return "".join(parts)


def _elo_section(page: _Page, manifests: dict[str, dict]) -> str:
    elo = _json(page.run_dir / "evaluate" / "elo.json")
    harm = (elo or {}).get("harmlessness") if isinstance(elo, dict) else None
    help_ = (elo or {}).get("helpfulness") if isinstance(elo, dict) else None
    if not harm or not help_:
        return _absent(manifests, "evaluate", "Elo ratings (evaluate/elo.json)")
    models = [m for m in help_ if m in harm]

    def draw(ax):
        # the checkpoints in training order (helpful -> SL-CAI -> RL steps): paper Fig. 2's path
        ax.plot([help_[m]["elo"] for m in models], [harm[m]["elo"] for m in models], color="0.8")
        for m in models:
            h, s = help_[m], harm[m]
            xerr = [[h["elo"] - h.get("low", h["elo"])], [h.get("high", h["elo"]) - h["elo"]]]
            yerr = [[s["elo"] - s.get("low", s["elo"])], [s.get("high", s["elo"]) - s["elo"]]]
            ax.errorbar(h["elo"], s["elo"], xerr=xerr, yerr=yerr, fmt="o", capsize=3)
            ax.annotate(m, (h["elo"], s["elo"]), textcoords="offset points", xytext=(4, 4))
        ax.set(title="Harmlessness vs helpfulness Elo", xlabel="helpfulness Elo")
        ax.set_ylabel("harmlessness Elo")
        ax.grid(alpha=0.3)

    rows = [
        [
            m,
            *(
                f"{d[m]['elo']:.1f} [{d[m].get('low', 0):.1f}, {d[m].get('high', 0):.1f}]"
                for d in (harm, help_)
            ),
        ]
        for m in models
    ]
    fig = page.figure("elo-frontier", draw, size=(6.0, 5.0))
    counts = ", ".join(
        f"{axis}: {n} comparisons ({', '.join(f'{k} {v}' for k, v in src.items())})"
        for axis, n in (elo.get("comparisons") or {}).items()
        for src in [(elo.get("sources") or {}).get(axis, {})]
    )
    note = (
        f"<p>{html.escape(counts)}; intervals: {elo.get('bootstrap', '?')} bootstrap resamples.</p>"
    )
    table = _table(["model", "harmlessness Elo [CI]", "helpfulness Elo [CI]"], rows)
    return fig + table + (note if counts else "")


def _e(text: Any) -> str:
    return html.escape(str(text if text is not None else ""))


def _generation_trace(row: dict[str, Any]) -> str:
    parts = [
        f"<details><summary>{_e(row.get('prompt_id'))}: {_e(row.get('prompt'))[:120]}</summary>"
    ]
    parts.append(f"<p><b>Prompt</b></p><pre>{_e(row.get('prompt'))}</pre>")
    parts.append(f"<p><b>Initial answer</b></p><pre>{_e(row.get('initial_answer'))}</pre>")
    for i, r in enumerate(row.get("rounds") or [], start=1):
        parts.append(f"<p><b>Round {i}</b> (principle <code>{_e(r.get('principle_id'))}</code>)")
        parts.append(f"</p><p>Critique request:</p><pre>{_e(r.get('critique_request'))}</pre>")
        parts.append(f"<p>Critique:</p><pre>{_e(r.get('critique'))}</pre>")
        parts.append(f"<p>Revision request:</p><pre>{_e(r.get('revision_request'))}</pre>")
        parts.append(f"<p>Revision:</p><pre>{_e(r.get('revision'))}</pre>")
    return "".join(parts) + "</details>"


def _label_trace(row: dict[str, Any]) -> str:
    summary = f"{_e(row.get('pair_id'))}: label {_fmt(row.get('label'))}"
    parts = [f"<details><summary>{summary}</summary><pre>{_e(row.get('prompt'))}</pre>"]
    parts.append(f"<p>Response A</p><pre>{_e(row.get('response_a'))}</pre>")
    parts.append(f"<p>Response B</p><pre>{_e(row.get('response_b'))}</pre>")
    keys = ["principle_id", "p", "p_ab", "p_ba"]
    principles = [[_fmt(p.get(k)) for k in keys] for p in row.get("principles") or []]
    parts.append(_table(keys, principles))
    tkeys = ["principle_id", "order", "p_a", "rationale"]
    trace = [
        [_fmt(t.get(k)) if t.get(k) is not None else "" for k in tkeys]
        for t in row.get("trace") or []
    ]
    parts.append(_table(tkeys, trace))
    return "".join(parts) + "</details>"


def _traces_section(page: _Page, manifests: dict[str, dict], *, sample: int) -> str:
    parts = ["<h3>sl-generate: prompt, critiques, revisions</h3>"]
    gen = _rows(page.run_dir / "sl-generate" / "red_team", limit=sample)
    parts.extend(_generation_trace(r) for r in gen)
    if not gen:
        parts.append(_absent(manifests, "sl-generate", "traces"))
    parts.append("<h3>rl-label: pairs and per-principle labels</h3>")
    labels = _rows(page.run_dir / "rl-label" / "labels", limit=sample)
    parts.extend(_label_trace(r) for r in labels)
    if not labels:
        parts.append(_absent(manifests, "rl-label", "labels"))
    return "".join(parts)


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
    page = _Page(run_dir, run_dir / "report")
    manifests = {}
    for stage in STAGES:
        m = _json(run_dir / stage / "manifest.json")
        if isinstance(m, dict):
            manifests[stage] = m
    from cai_ray import report_eval  # its sections import this module's helpers

    builders = {
        "run": _run_section,
        "manifests": _manifests_section,
        "curves": _curves_section,
        "calibration": _calibration_section,
        "principles": _principles_section,
        "elo": _elo_section,
        "evaluation": report_eval.evaluation_section,
        "label_quality": report_eval.label_quality_section,
        "revisions": report_eval.revisions_section,
        "traces": lambda p, m: _traces_section(p, m, sample=sample),
    }
    body = []
    for key, title in SECTIONS.items():
        try:
            content = builders[key](page, manifests)
        except Exception as exc:  # one unreadable file must not cost the whole page
            content = _missing(f"could not build this section: {type(exc).__name__}: {exc}")
        body.append(f'<section id="{key}"><h2>{html.escape(title)}</h2>{content}</section>')
    title = f"cai-ray report: {run_dir.name}"
    text = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        + "\n".join(body)
        + f"{_IMG_SCRIPT}</body></html>\n"
    )
    path = Path(out) if out else run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
