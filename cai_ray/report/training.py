"""The report's training sections: run config and hashes, manifests, curves, calibration,
per-principle bars, the Elo frontier (paper figure 2) and a browsable sample of traces."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Callable
from typing import Any

from cai_ray.layout import EVALUATE, PM_TRAIN, RL_LABEL, SL_GENERATE, STAGES, config_path, part_dir
from cai_ray.report.page import (  # noqa: F401
    CSS,
    IMG_SCRIPT,
    Page,
    absent,
    bars,
    esc,
    fmt,
    missing,
    read_json,
    read_jsonl,
    read_rows,
    table,
)


def run_section(page: Page, manifests: dict[str, dict]) -> str:
    cfg = config_path(page.run_dir)
    hashes = [
        [name, m.get("config_hash", ""), m.get("stage_hash", ""), m.get("constitution_hash", "")]
        for name, m in manifests.items()
    ]
    parts = [f"<p>Run directory: <code>{html.escape(str(page.run_dir))}</code></p>"]
    parts.append(
        table(["stage", "config hash", "stage hash", "constitution hash"], hashes, "hashes")
        if hashes
        else missing("no stage has written a manifest yet")
    )
    if cfg.is_file():
        parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(cfg.read_text())}")
        parts.append("</pre></details>")
    else:
        parts.append(missing("no config.yaml in the run directory"))
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


def manifests_section(page: Page, manifests: dict[str, dict]) -> str:
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
    return table(header, rows)


def _curve(metrics: list[dict], key: str, title: str) -> Callable[[Any], None]:
    def draw(ax):
        points = [(r.get("step", i), r[key]) for i, r in enumerate(metrics) if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set(title=title, xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)

    return draw


def curves_section(page: Page, manifests: dict[str, dict]) -> str:
    rl = ("reward_mean", "score_mean", "kl", "entropy", "response_len", "refusal_rate")
    wanted = {"sl-train": ("loss",), "pm-train": ("loss", "accuracy"), "rl-train": rl}
    parts = []
    for stage, keys in wanted.items():
        metrics = read_jsonl(page.run_dir / stage / "metrics.jsonl")
        found = [k for k in (*keys, "loss") if any(k in r for r in metrics)]
        if not found:
            parts.append(absent(manifests, stage, "metrics.jsonl"))
            continue
        for key in dict.fromkeys(found):
            name = f"{stage}-{key}"
            parts.append(page.figure(name, _curve(metrics, key, f"{stage} {key}")))
    return "".join(parts)


def calibration_section(page: Page, manifests: dict[str, dict]) -> str:
    parts = []
    evals = read_json(part_dir(page.run_dir, PM_TRAIN, "eval.json"))
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
        rows = [[fmt(e.get(k)) for k in keys] for e in evals]
        parts.append(table(keys, rows))
    else:
        parts.append(absent(manifests, "pm-train", "held-out evaluation (eval.json)"))
    stats = (manifests.get("rl-label") or {}).get("statistics") or {}
    counts = (stats.get("distribution") or {}).get("counts")
    if counts:

        def draw_hist(ax):
            width = 1.0 / len(counts)
            ax.bar([i * width for i in range(len(counts))], counts, width=width, align="edge")
            ax.set(title="rl-label: AI label distribution", xlabel="P(A better)", ylabel="pairs")

        parts.append(page.figure("rl-label-distribution", draw_hist))
        keys = ["labels", "mean_label", "prefers_a", "flip_rate", "mean_confidence"]
        parts.append(table(keys, [[fmt(stats.get(k)) for k in keys]]))
    else:
        parts.append(absent(manifests, "rl-label", "label statistics"))
    return "".join(parts)


def principles_section(page: Page, manifests: dict[str, dict]) -> str:
    parts = []
    gen = read_rows(part_dir(page.run_dir, SL_GENERATE, "red_team"), columns=["rounds"])
    sampled = Counter(r["principle_id"] for row in gen for r in row.get("rounds") or [])
    if sampled:
        title = "sl-generate: principle per critique round"
        parts.append(bars(page, "principles-sl-generate", sampled, title, "rounds"))
    else:
        parts.append(absent(manifests, "sl-generate", "critique rounds"))
    labels = read_rows(part_dir(page.run_dir, RL_LABEL, "labels"), columns=["label", "principles"])
    used, agree = Counter(), Counter()
    for row in labels:
        for p in row.get("principles") or []:
            used[p["principle_id"]] += 1
            # agreement: the principle picks the same winner as the ensemble label (paper 4.1)
            agree[p["principle_id"]] += (p["p"] > 0.5) == (row["label"] > 0.5)
    if used:
        parts.append(bars(page, "principles-rl-label", used, "rl-label: principle use", "labels"))
        if any(len(r.get("principles") or []) > 1 for r in labels):
            share = {k: agree[k] / used[k] for k in used}
            title = "rl-label: agreement with the ensemble label"
            parts.append(bars(page, "principles-agreement", share, title, "share"))
        else:
            parts.append(missing("one principle per label: agreement with the ensemble is 1"))
    else:
        parts.append(absent(manifests, "rl-label", "labels"))
    return "".join(parts)


def elo_section(page: Page, manifests: dict[str, dict]) -> str:
    elo = read_json(part_dir(page.run_dir, EVALUATE, "elo.json"))
    harm = (elo or {}).get("harmlessness") if isinstance(elo, dict) else None
    help_ = (elo or {}).get("helpfulness") if isinstance(elo, dict) else None
    if not harm or not help_:
        return absent(manifests, "evaluate", "Elo ratings (evaluate/elo.json)")
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
    elo_table = table(["model", "harmlessness Elo [CI]", "helpfulness Elo [CI]"], rows)
    return fig + elo_table + (note if counts else "")


def _generation_trace(row: dict[str, Any]) -> str:
    parts = [
        f"<details><summary>{esc(row.get('prompt_id'))}: {esc(row.get('prompt'))[:120]}</summary>"
    ]
    parts.append(f"<p><b>Prompt</b></p><pre>{esc(row.get('prompt'))}</pre>")
    parts.append(f"<p><b>Initial answer</b></p><pre>{esc(row.get('initial_answer'))}</pre>")
    for i, r in enumerate(row.get("rounds") or [], start=1):
        parts.append(f"<p><b>Round {i}</b> (principle <code>{esc(r.get('principle_id'))}</code>)")
        parts.append(f"</p><p>Critique request:</p><pre>{esc(r.get('critique_request'))}</pre>")
        parts.append(f"<p>Critique:</p><pre>{esc(r.get('critique'))}</pre>")
        parts.append(f"<p>Revision request:</p><pre>{esc(r.get('revision_request'))}</pre>")
        parts.append(f"<p>Revision:</p><pre>{esc(r.get('revision'))}</pre>")
    return "".join(parts) + "</details>"


def _label_trace(row: dict[str, Any]) -> str:
    summary = f"{esc(row.get('pair_id'))}: label {fmt(row.get('label'))}"
    parts = [f"<details><summary>{summary}</summary><pre>{esc(row.get('prompt'))}</pre>"]
    parts.append(f"<p>Response A</p><pre>{esc(row.get('response_a'))}</pre>")
    parts.append(f"<p>Response B</p><pre>{esc(row.get('response_b'))}</pre>")
    keys = ["principle_id", "p", "p_ab", "p_ba"]
    principles = [[fmt(p.get(k)) for k in keys] for p in row.get("principles") or []]
    parts.append(table(keys, principles))
    tkeys = ["principle_id", "order", "p_a", "rationale"]
    trace = [
        [fmt(t.get(k)) if t.get(k) is not None else "" for k in tkeys]
        for t in row.get("trace") or []
    ]
    parts.append(table(tkeys, trace))
    return "".join(parts) + "</details>"


def traces_section(page: Page, manifests: dict[str, dict], *, sample: int) -> str:
    parts = ["<h3>sl-generate: prompt, critiques, revisions</h3>"]
    gen = read_rows(part_dir(page.run_dir, SL_GENERATE, "red_team"), limit=sample)
    parts.extend(_generation_trace(r) for r in gen)
    if not gen:
        parts.append(absent(manifests, "sl-generate", "traces"))
    parts.append("<h3>rl-label: pairs and per-principle labels</h3>")
    labels = read_rows(part_dir(page.run_dir, RL_LABEL, "labels"), limit=sample)
    parts.extend(_label_trace(r) for r in labels)
    if not labels:
        parts.append(absent(manifests, "rl-label", "labels"))
    return "".join(parts)
