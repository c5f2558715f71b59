"""Compute spans and the end-to-end time split (cai_ray/profiling.py), and `threads: auto`."""

from __future__ import annotations

import os

import pytest

from cai_ray import profiling
from cai_ray.config import EngineConfig
from cai_ray.engines import resolve_threads


def test_union_merges_overlaps_and_keeps_gaps():
    assert profiling.union_seconds([]) == 0.0
    assert profiling.union_seconds([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)
    assert profiling.union_seconds([(0, 10), (2, 3), (4, 5)]) == pytest.approx(10.0)


def test_split_of_a_stage_window():
    spans = [
        {"kind": "load", "t0": 1.0, "t1": 3.0},
        {"kind": "generate", "t0": 4.0, "t1": 6.0},  # two workers overlap: counted once
        {"kind": "score", "t0": 5.0, "t1": 7.0},
        {"kind": "train", "t0": 8.0, "t1": 9.0},
        {"kind": "generate", "t0": 20.0, "t1": 30.0},  # another stage's: outside the window
    ]
    part = profiling.split((0.0, 10.0), spans)
    assert part["wall_s"] == 10.0
    assert part["compute_s"] == pytest.approx(4.0)  # 4-7 and 8-9
    assert part["startup_s"] == pytest.approx(4.0)
    assert part["gaps_s"] == pytest.approx(1.0)  # 7-8
    assert part["tail_s"] == pytest.approx(1.0)
    assert part["setup_s"]["load"] == pytest.approx(2.0)
    assert part["compute_share"] == pytest.approx(0.4)
    assert part["compute_by_kind_s"] == {"generate": 2.0, "score": 2.0, "train": 1.0}
    # startup + compute + gaps + tail is the whole window
    total = part["startup_s"] + part["compute_s"] + part["gaps_s"] + part["tail_s"]
    assert total == pytest.approx(part["wall_s"])


def test_spans_are_written_only_when_enabled(tmp_path, monkeypatch):
    monkeypatch.delenv(profiling.ENV, raising=False)
    with profiling.span("generate"):
        pass
    assert profiling.read_spans(tmp_path) == []
    monkeypatch.setenv(profiling.ENV, str(tmp_path))

    @profiling.span("train")
    def step():
        return 7

    assert step() == 7 and step() == 7
    with pytest.raises(ValueError), profiling.span("score"):
        raise ValueError("recorded anyway")
    (tmp_path / "spans-1.jsonl").write_text('{"kind": "cut')  # a killed process's last line
    spans = profiling.read_spans(tmp_path)
    assert [s["kind"] for s in spans] == ["train", "train", "score"]
    assert all(s["t1"] >= s["t0"] and s["pid"] == os.getpid() for s in spans)


def test_threads_auto_outside_ray_is_every_usable_core():
    assert EngineConfig().threads == "auto"
    assert resolve_threads(EngineConfig().threads) == len(os.sched_getaffinity(0))
    assert resolve_threads(EngineConfig(threads=3).threads) == 3
    assert resolve_threads(1) == 1
