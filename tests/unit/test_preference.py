"""Bradley-Terry loss on soft labels, PM metrics, and a tiny PM that learns a marker task."""

from __future__ import annotations

import math
import random

import pytest
import torch

from cai_ray.feedback.pm_objective import PreferenceObjective, pm_scores
from cai_ray.feedback.preference import agreement_count, bt_loss_sum, pair_metrics


def _bt_by_hand(ra: float, rb: float, p: float) -> float:
    s = 1 / (1 + math.exp(-(ra - rb)))
    return -(p * math.log(s) + (1 - p) * math.log(1 - s))


@pytest.mark.parametrize(
    ("ra", "rb", "p"), [(0.0, 0.0, 1.0), (2.0, -1.0, 1.0), (2.0, -1.0, 0.0), (0.3, 0.8, 0.7)]
)
def test_bt_loss_matches_hand_computation(ra, rb, p):
    got = bt_loss_sum(torch.tensor([ra]), torch.tensor([rb]), torch.tensor([p]))
    assert float(got) == pytest.approx(_bt_by_hand(ra, rb, p), rel=1e-5)


def test_bt_loss_sums_and_is_smallest_at_the_soft_label():
    ra, rb, p = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5]), torch.tensor([0.9, 0.2])
    want = _bt_by_hand(1.0, 0.0, 0.9) + _bt_by_hand(0.0, 0.5, 0.2)
    assert float(bt_loss_sum(ra, rb, p)) == pytest.approx(want, rel=1e-5)
    # for p = 0.7 the loss over the margin d is minimal where sigmoid(d) = 0.7
    margins = torch.linspace(-3, 3, 601)
    losses = [float(bt_loss_sum(d[None], torch.zeros(1), torch.tensor([0.7]))) for d in margins]
    best = float(margins[min(range(len(losses)), key=losses.__getitem__)])
    assert best == pytest.approx(math.log(0.7 / 0.3), abs=0.02)


def test_agreement_ignores_tied_labels():
    ra, rb = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    p = torch.tensor([1.0, 0.0, 0.0, 0.5])
    assert int(agreement_count(ra, rb, p)) == 2


def test_pair_metrics_accuracy_and_calibration():
    m = pair_metrics([2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.5])
    assert m["pairs"] == 3 and m["accuracy"] == 1.0  # the tie is left out
    assert sum(b["count"] for b in m["calibration"]) == 3
    perfect = pair_metrics([0.0] * 4, [0.0] * 4, [0.5] * 4)  # predicts 0.5, labels 0.5
    assert perfect["ece"] == pytest.approx(0.0)
    assert pair_metrics([], [], [])["accuracy"] is None


def test_collate_right_pads_a_then_b():
    obj = PreferenceObjective(pad_id=2, share_prefix=False)
    batch = obj.collate(
        [
            {"ids_a": [5, 6, 7], "ids_b": [8], "label": 0.8},
            {"ids_a": [9], "ids_b": [4, 4], "label": 0},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 2, 2], [8, 2, 2], [4, 4, 2]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 1, 2]
    assert batch["labels"].tolist() == pytest.approx([0.8, 0.0])
    assert obj.loss_units(batch) == 2 and obj.tokens(batch) == 7


def test_collate_shares_each_pairs_prefix():
    obj = PreferenceObjective(pad_id=2)
    batch = obj.collate(
        [
            {"ids_a": [5, 6, 7], "ids_b": [5, 6, 9, 9], "label": 0.8},
            {"ids_a": [4], "ids_b": [3, 3], "label": 0},
        ]
    )
    # the first pair: one row, the common prefix [5, 6] once, then A's rest, then B's; the
    # second has no common prefix: a row per side (packed, attention would only cost more)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 9], [4, 2, 2, 2, 2], [3, 3, 2, 2, 2]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 2, 3]
    assert batch["branch"].tolist() == [[0, 0, 1, 2, 2], [1, -1, -1, -1, -1], [1, 1, -1, -1, -1]]
    assert batch["seq_row"].tolist() == [0, 1, 0, 2]  # A sides, then B sides
    assert batch["labels"].tolist() == pytest.approx([0.8, 0.0])
    assert obj.loss_units(batch) == 2 and obj.tokens(batch) == 10  # every side's tokens


WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "river",
    "stone",
    "blue",
    "green",
    "runs",
    "sleeps",
    "under",
    "over",
    "quickly",
    "softly",
    "tree",
    "house",
]


def _marker_pairs(tokenizer, n: int, seed: int, *, shuffled: bool) -> list[dict]:
    """The chosen reply ends with a marker word the rejected one lacks (labels p = 1).

    With `shuffled`, which reply carries the marker is a coin flip: the label is independent of
    the texts, so no PM can beat chance on held-out pairs made the same way.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=3))
        good = " ".join(rng.choices(WORDS, k=3)) + " thanks"
        bad = " ".join(rng.choices(WORDS, k=3)) + " " + rng.choice(WORDS)
        if shuffled and rng.random() < 0.5:
            good, bad = bad, good
        ids = [
            tokenizer(f"\n\nHuman: {prompt}\n\nAssistant: {r}")["input_ids"] for r in (good, bad)
        ]
        rows.append({"ids_a": ids[0], "ids_b": ids[1], "label": 1.0})
    return rows


def _train_and_eval(model_dir, *, shuffled: bool) -> float:
    from cai_ray.models import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_dir)
    obj = PreferenceObjective(pad_id=tokenizer.pad_token_id)
    model = obj.load_model(model_dir)
    train = _marker_pairs(tokenizer, 64, seed=1, shuffled=shuffled)
    held = _marker_pairs(tokenizer, 64, seed=2, shuffled=shuffled)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _epoch in range(2):
        for start in range(0, len(train), 16):
            batch = obj.collate(train[start : start + 16])
            loss, _ = obj.loss(model, batch)
            opt.zero_grad()
            (loss / 16).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        batch = obj.collate(held)
        a, b = pm_scores(model, batch).chunk(2)
    return pair_metrics(a.tolist(), b.tolist(), batch["labels"].tolist())["accuracy"]


def test_pm_learns_the_marker_and_shuffled_labels_stay_near_chance(tiny_reward_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention on a busy machine
    try:
        assert _train_and_eval(tiny_reward_model_dir, shuffled=False) >= 0.9
        assert 0.3 <= _train_and_eval(tiny_reward_model_dir, shuffled=True) <= 0.7
    finally:
        torch.set_num_threads(threads)
