"""The Bradley-Terry Elo fit against hand-computed cases, its bootstrap, and the CSV import."""

from __future__ import annotations

import math

import pytest

from cai_ray.errors import DataError
from cai_ray.eval.elo import ELO_SCALE, bootstrap_elo, fit_bradley_terry, read_judgements_csv


def test_two_models_three_wins_in_four():
    # ML: P(A wins) = 3/4 -> exp(d) = 3 -> d = ln 3 nats = 400 log10 3 Elo
    data = [("A", "B", 1.0)] * 3 + [("A", "B", 0.0)]
    elo = fit_bradley_terry(data, prior=1e-9)
    assert elo["A"] - elo["B"] == pytest.approx(400 * math.log10(3), abs=1e-3)
    assert elo["A"] + elo["B"] == pytest.approx(0.0, abs=1e-9)  # mean 0
    anchored = fit_bradley_terry(data, anchor="B", prior=1e-9)
    assert anchored["B"] == 0.0 and anchored["A"] == pytest.approx(190.849, abs=1e-3)


def test_soft_outcomes_match_hard_counts():
    # one comparison judged P(A wins) = 0.75 has the same ML fit as 3 wins in 4
    soft = fit_bradley_terry([("A", "B", 0.75)], prior=1e-9)
    assert soft["A"] - soft["B"] == pytest.approx(400 * math.log10(3), abs=1e-3)


def test_three_models_consistent_strengths():
    # strengths 1 : 2 : 4 (B twice A, C twice B); data set at the exact BT probabilities
    # P(B>A) = 2/3, P(C>B) = 2/3, P(C>A) = 4/5, so the ML fit recovers log-ratios ln 2 and ln 4
    data = [("B", "A", 2 / 3), ("C", "B", 2 / 3), ("C", "A", 4 / 5)]
    elo = fit_bradley_terry(data, anchor="A", prior=1e-9)
    assert elo["B"] == pytest.approx(ELO_SCALE * math.log(2), abs=1e-3)
    assert elo["C"] == pytest.approx(ELO_SCALE * math.log(4), abs=1e-3)


def test_symmetric_data_gives_equal_ratings():
    data = [("A", "B", 1.0), ("B", "A", 1.0), ("A", "C", 0.5), ("C", "B", 0.5)]
    elo = fit_bradley_terry(data)
    assert max(elo.values()) - min(elo.values()) == pytest.approx(0.0, abs=1e-6)


def test_clean_sweep_stays_finite_and_ordered():
    elo = fit_bradley_terry([("A", "B", 1.0)] * 5)
    assert math.isfinite(elo["A"]) and elo["A"] > elo["B"] + 400


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="no comparisons"):
        fit_bradley_terry([])
    with pytest.raises(ValueError, match="itself"):
        fit_bradley_terry([("A", "A", 1.0)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_bradley_terry([("A", "B", 1.5)])
    with pytest.raises(ValueError, match="anchor"):
        fit_bradley_terry([("A", "B", 1.0)], anchor="Z")


def _games(k: int) -> list[tuple[str, str, float]]:
    return ([("A", "B", 1.0)] * 3 + [("A", "B", 0.0)] + [("B", "C", 1.0), ("B", "C", 0.5)]) * k


def test_bootstrap_holds_the_point_and_narrows_with_data():
    small = bootstrap_elo(_games(3), n=100, seed=1)
    large = bootstrap_elo(_games(30), n=100, seed=1)
    point = fit_bradley_terry(_games(3))
    for model, rating in small.items():
        assert rating.elo == pytest.approx(point[model])
        assert rating.low <= rating.elo <= rating.high
        assert rating.high > rating.low
        assert large[model].high - large[model].low < rating.high - rating.low
    assert small["A"].to_dict().keys() == {"elo", "low", "high"}
    # same seed, same interval
    assert bootstrap_elo(_games(3), n=100, seed=1) == small


def test_csv_import_counts_rejects(tmp_path):
    path = tmp_path / "human.csv"
    path.write_text(
        "model_a,model_b,winner\n"
        "sl,rl,b\n"
        "sl,rl,tie\n"
        "rl,sl, A \n"
        "sl,sl,a\n"  # self-comparison
        "sl,,a\n"  # empty model
        "sl,rl,maybe\n"  # bad winner
        "sl,rl\n"  # short row
    )
    comparisons, rejects = read_judgements_csv(path)
    assert comparisons == [("sl", "rl", 0.0), ("sl", "rl", 0.5), ("rl", "sl", 1.0)]
    assert [r["row"] for r in rejects] == [5, 6, 7, 8]
    assert "itself" in rejects[0]["reason"] and "winner" in rejects[2]["reason"]
    elo = fit_bradley_terry(comparisons)
    assert elo["rl"] > elo["sl"]


def test_csv_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_judgements_csv(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,who\nx,y,a\n")
    with pytest.raises(DataError, match="missing columns") as info:
        read_judgements_csv(bad)
    assert info.value.where == f"{bad}:1"
