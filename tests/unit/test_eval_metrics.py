"""Stage-7 numbers against hand-computed cases: Elo from judged rows, per-checkpoint metrics,
calibration against a reference, label quality, PM score by revision round, CSV imports."""

from __future__ import annotations

import math

import pytest

from cai_ray.errors import DataError
from cai_ray.eval.metrics import (
    calibration,
    checkpoint_metrics,
    comparisons_of,
    elo_table,
    human_comparisons,
    label_quality,
    read_reference_labels,
    refusal_summary,
    revision_curve,
)


def _row(*comparisons, answers=()):
    comps = [{"model_a": a, "model_b": b, "p": p} for a, b, p in comparisons]
    return {"comparisons": comps, "answers": list(answers)}


def test_elo_from_judged_rows_by_hand():
    # every prompt: the judge gives P(sl-cai better than helpful) = 0.75, so the ML fit has
    # sigmoid(d) = 3/4 -> d = ln 3 nats = 400 log10(3) = 190.85 Elo; helpful is the anchor at 0
    rows = [_row(("helpful", "sl-cai", 0.25)) for _ in range(40)]
    comps = comparisons_of(rows)
    assert len(comps) == 40 and comps[0] == ("helpful", "sl-cai", 0.25)
    table = elo_table({"harmlessness": comps}, order=["helpful", "sl-cai"], n=50, seed=1)
    harm = table["harmlessness"]
    assert list(harm) == ["helpful", "sl-cai"] and table["anchor"]["harmlessness"] == "helpful"
    assert harm["helpful"]["elo"] == 0.0
    assert harm["sl-cai"]["elo"] == pytest.approx(400 * math.log10(3), rel=2e-3)
    # identical comparisons: every resample gives the same fit, a zero-width interval
    assert harm["sl-cai"]["low"] == pytest.approx(harm["sl-cai"]["elo"], abs=1e-6)
    assert table["comparisons"] == {"harmlessness": 40}


def test_elo_order_and_spread():
    # rl-cai beats both others 9 times in 10, sl-cai and helpful tie: rl-cai on top, with an
    # interval that holds its point; the table lists checkpoints in the given order
    rows = []
    for i in range(10):
        win = 1.0 if i < 9 else 0.0
        rows.append(_row(("helpful", "sl-cai", 0.5), ("helpful", "rl-cai", 1 - win)))
        rows.append(_row(("sl-cai", "rl-cai", 1 - win)))
    order = ["helpful", "sl-cai", "rl-cai"]
    table = elo_table({"helpfulness": comparisons_of(rows)}, order=order, n=100, seed=0)
    h = table["helpfulness"]
    assert list(h) == order
    assert h["rl-cai"]["elo"] > 300 and abs(h["sl-cai"]["elo"]) < 1.0
    assert h["rl-cai"]["low"] <= h["rl-cai"]["elo"] <= h["rl-cai"]["high"]
    assert h["rl-cai"]["high"] > h["rl-cai"]["low"]
    empty = elo_table({"helpfulness": []}, order=order)
    assert empty["helpfulness"] == {} and empty["comparisons"] == {"helpfulness": 0}


def test_checkpoint_metrics_by_hand():
    def ans(ck, text, pm, ev):
        words = len(text.split())
        return {
            "checkpoint": ck,
            "text": text,
            "chars": len(text),
            "words": words,
            "pm_score": pm,
            "p_evasive": ev,
        }

    first = [ans("a", "I'm sorry, no.", 1.0, 0.9), ans("b", "Sure", 3.0, 0.2)]
    second = [ans("a", "Here is how", 2.0, 0.4), ans("b", "Ok then", 5.0, 0.1)]
    rows = [_row(("a", "b", 0.8), answers=first), _row(("a", "b", 0.4), answers=second)]
    m = checkpoint_metrics(rows, ["a", "b"], phrases=("i'm sorry",))
    a, b = m["a"], m["b"]
    assert a["answers"] == 2 and a["evasive_rate"] == 0.5
    assert a["p_evasive_mean"] == pytest.approx(0.65)
    assert a["refusal_rate"] == 0.5 and b["refusal_rate"] == 0.0 and b["evasive_rate"] == 0.0
    assert a["pm_mean"] == 1.5 and b["pm_mean"] == 4.0
    assert b["pm_sem"] == pytest.approx(math.sqrt(2) / math.sqrt(2))  # stdev 1.414.. / sqrt 2
    assert a["chars_mean"] == pytest.approx((14 + 11) / 2) and b["words_mean"] == 1.5
    assert a["win_rate"] == pytest.approx(0.6) and b["win_rate"] == pytest.approx(0.4)
    # no judge, no PM: those fields are None, the rest still counts
    bare = [_row(answers=[{"checkpoint": "a", "text": "x y", "chars": 3, "words": 2}])]
    only = checkpoint_metrics(bare, ["a"], phrases=())["a"]
    assert only["evasive_rate"] is None and only["pm_mean"] is None and only["words_mean"] == 2


def test_refusal_summary_reads_refusal_on_harmful_and_over_refusal_on_benign():
    def ans(ck, text):
        return {"checkpoint": ck, "text": text, "chars": len(text), "words": len(text.split())}

    phrases = ("i can't help",)
    harmful = [_row(answers=[ans("a", "I can't help with that."), ans("b", "Sure, here.")])]
    harmful.append(_row(answers=[ans("a", "I can't help, sorry."), ans("b", "I can't help.")]))
    benign = [_row(answers=[ans("a", "I can't help with killing."), ans("b", "Run kill -9.")])]
    metrics = {
        "harmful": checkpoint_metrics(harmful, ["a", "b"], phrases=phrases),
        "helpful": checkpoint_metrics(benign, ["a", "b"], phrases=phrases),
    }
    summary = refusal_summary(metrics, ["a", "b"])
    a, b = summary["checkpoints"]["a"], summary["checkpoints"]["b"]
    assert (a["harmful_refusal_rate"], a["over_refusal_rate"]) == (1.0, 1.0)
    assert (b["harmful_refusal_rate"], b["over_refusal_rate"]) == (0.5, 0.0)
    assert a["harmful_evasive_rate"] is None and b["benign_evasive_rate"] is None  # no judge
    assert "higher is more harmless" in summary["about"]["harmful_refusal_rate"]
    assert "lower is better" in summary["about"]["over_refusal_rate"]
    # a split that did not run: its numbers are None, the other split's still count
    only = refusal_summary({"harmful": metrics["harmful"]}, ["a"])["checkpoints"]["a"]
    assert only["over_refusal_rate"] is None and only["harmful_refusal_rate"] == 1.0


def test_calibration_by_hand():
    pred = [0.05, 0.15, 0.55, 0.65, 0.95, 0.5]
    obs = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    c = calibration(pred, obs, bins=2)
    # bin 0 (< 0.5): predicted mean 0.1, observed 0.5; bin 1: (0.55+0.65+0.95+0.5)/4 = 0.6625
    # against 0.75. ECE = 2/6 * 0.4 + 4/6 * 0.0875
    lo, hi = c["calibration"]
    assert (lo["count"], hi["count"]) == (2, 4)
    assert lo["predicted"] == pytest.approx(0.1) and lo["observed"] == 0.5
    assert hi["predicted"] == pytest.approx(0.6625) and hi["observed"] == 0.75
    assert c["ece"] == pytest.approx(2 / 6 * 0.4 + 4 / 6 * 0.0875)
    # agreement leaves out the predicted tie: 0.05/0 yes, 0.15/1 no, 0.55 yes, 0.65 no, 0.95 yes
    assert c["agreement"] == pytest.approx(3 / 5)


def _label(pid, label, principles, flips=0, checks=1):
    return {
        "pair_id": pid,
        "label": label,
        "label_raw": label,
        "flips": flips,
        "order_checks": checks,
        "principles": principles,
    }


def _pr(pid, p, p_ab, p_ba):
    return {"principle_id": pid, "p": p, "p_ab": p_ab, "p_ba": p_ba}


def test_label_quality_by_hand():
    labels = [
        _label("x", 0.7, [_pr("harm", 0.8, 0.9, 0.7), _pr("honest", 0.6, 0.4, 0.8)], 1, 2),
        _label("y", 0.3, [_pr("harm", 0.4, 0.3, 0.5), _pr("harm", 0.2, 0.1, 0.3)], 0, 2),
        _label("z", 0.45, [_pr("honest", 0.55, 0.6, 0.5), _pr("harm", 0.35, 0.3, 0.4)], 1, 2),
    ]
    q = label_quality(labels, reference={"x": 0.9, "y": 0.8, "z": 0.5}, source="ref", bins=2)
    assert q["pairs"] == 3 and q["flip_rate"] == pytest.approx(2 / 6)
    harm, honest = q["principles"]["harm"], q["principles"]["honest"]
    assert harm["sampled"] == 4 and honest["sampled"] == 2
    # honest picks A in z while the ensemble (0.45) picks B: 1 of 2 agree
    assert harm["agreement_with_ensemble"] == 1.0 and honest["agreement_with_ensemble"] == 0.5
    # flips: honest in x (0.4 vs 0.8) and in z (0.6 vs 0.5: a tie is no win for A) -> 2 of 2
    assert honest["flip_rate"] == 1.0 and harm["flip_rate"] == 0.0
    # reference picks A in x and y, ties in z (left out): harm agrees in x, not twice in y
    assert harm["agreement_with_reference"] == pytest.approx(1 / 3)
    ref = q["reference"]
    assert ref["source"] == "ref" and ref["pairs"] == 3
    assert ref["agreement"] == pytest.approx(1 / 2)  # x agrees, y does not, z is a tie
    assert label_quality(labels)["reference"] is None


def test_revision_curve():
    rows = [{"pm_scores": [0.0, 1.0, 2.0]}, {"pm_scores": [2.0, 3.0, 2.0]}]
    curve = revision_curve(rows)
    assert [c["round"] for c in curve] == [0, 1, 2]
    assert [c["mean"] for c in curve] == [1.0, 2.0, 2.0]
    assert curve[0]["sem"] == pytest.approx(math.sqrt(2) / math.sqrt(2)) and curve[2]["sem"] == 0


def test_human_csvs_reject_bad_rows(tmp_path):
    csv = tmp_path / "harm.csv"
    csv.write_text(
        "model_a,model_b,winner\n"
        "helpful,rl-cai,b\n"
        "helpful,rl_cai,a\n"  # a typo of a checkpoint name
        "sl-cai,sl-cai,a\n"
        "sl-cai,rl-cai,maybe\n"
        "rl-cai,sl-cai,tie\n"
    )
    comps, rejects = human_comparisons(
        {"harmlessness": str(csv)}, known=["helpful", "sl-cai", "rl-cai"]
    )
    assert comps["harmlessness"] == [("helpful", "rl-cai", 0.0), ("rl-cai", "sl-cai", 0.5)]
    rows = {r["row"]: r["reason"] for r in rejects["harmlessness"]}
    assert sorted(rows) == [3, 4, 5] and "unknown model 'rl_cai'" in rows[3]
    assert "itself" in rows[4] and "winner must be" in rows[5]
    assert all(r["file"] == str(csv) for r in rejects["harmlessness"])
    with pytest.raises(DataError, match="not found"):
        human_comparisons({"helpfulness": str(tmp_path / "nope.csv")}, known=["a"])


def test_reference_labels_csv(tmp_path):
    csv = tmp_path / "ref.csv"
    csv.write_text("pair_id,winner\np1,a\np2,B\np9,a\np1,b\np3,x\n")
    labels, rejects = read_reference_labels(csv, known={"p1", "p2", "p3"})
    assert labels == {"p1": 1.0, "p2": 0.0}
    reasons = {r["row"]: r["reason"] for r in rejects}
    assert "unknown pair_id" in reasons[4] and "twice" in reasons[5] and "winner" in reasons[6]
    (tmp_path / "bad.csv").write_text("id,winner\n")
    with pytest.raises(DataError, match="missing columns: pair_id"):
        read_reference_labels(tmp_path / "bad.csv", known=set())
