"""Stage 7's embedded held-out sets (issue 14): well formed, spread over categories, and sharing
no prompt with any training sample; the training stages never read them."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

from cai_ray.config import RunConfig, load_config
from cai_ray.config.evaluate import HELD_OUT
from cai_ray.data.sources import EVAL_SAMPLES, TRAINING_SAMPLES, read_prompts, sample_path
from cai_ray.pipeline.evaluate import training_overlap

ROOT = Path(__file__).resolve().parents[2]
ID_PATTERN = {"eval_harmful": r"eval-harm-\d{3}", "eval_benign": r"eval-benign-\d{3}"}
NEAR_DUPLICATE = 0.8  # token Jaccard at or above this counts as the same prompt


def _rows(name: str) -> list[dict]:
    lines = sample_path(name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _tokens(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _training_prompts() -> list[str]:
    # every user turn of every training sample (hh pairs are multi-turn)
    return [
        turn.content
        for name in TRAINING_SAMPLES
        for record in read_prompts(f"sample:{name}", turns="every").records
        for turn in record.conversation.turns
        if turn.role == "user"
    ]


@pytest.mark.parametrize("name", EVAL_SAMPLES)
def test_held_out_rows_are_well_formed_and_spread(name):
    rows = _rows(name)
    assert len(rows) >= 100
    for row in rows:
        assert set(row) == {"id", "category", "prompt"}, row
        assert re.fullmatch(ID_PATTERN[name], row["id"]), row["id"]
        assert row["category"].strip() and row["prompt"].strip()
    assert len({r["id"] for r in rows}) == len(rows)
    counts = Counter(r["category"] for r in rows)
    assert len(counts) >= 8
    assert max(counts.values()) <= 0.2 * len(rows), counts.most_common(1)
    # round-robin order: a small `evaluate.limit` still samples several categories
    assert len({r["category"] for r in rows[:4]}) == 4
    result = read_prompts(f"sample:{name}")
    assert result.n_rejects == 0 and [r.prompt_id for r in result.records] == [
        r["id"] for r in rows
    ]


def test_held_out_prompts_share_nothing_with_training_samples():
    held = [(r["id"], r["prompt"]) for name in EVAL_SAMPLES for r in _rows(name)]
    train = _training_prompts()
    assert len(train) > 100  # the three training samples were all read
    train_norm = {_norm(t) for t in train}
    train_tokens = [(t, _tokens(t)) for t in train]
    for pid, prompt in held:
        assert _norm(prompt) not in train_norm, pid
        toks = _tokens(prompt)
        close = [t for t, other in train_tokens if _jaccard(toks, other) >= NEAR_DUPLICATE]
        assert not close, (pid, prompt, close)


def test_held_out_prompts_are_distinct_from_each_other():
    held = [(r["id"], _tokens(r["prompt"])) for name in EVAL_SAMPLES for r in _rows(name)]
    assert len({_norm(r["prompt"]) for name in EVAL_SAMPLES for r in _rows(name)}) == len(held)
    close = [(a, b) for (a, x), (b, y) in combinations(held, 2) if _jaccard(x, y) >= NEAR_DUPLICATE]
    assert not close


@pytest.mark.parametrize("config", [None, "configs/local-tiny.yaml", "configs/cluster-tiny.yaml"])
def test_training_never_reads_the_held_out_sets(config):
    cfg = load_config(ROOT / config if config else None)
    training = [cfg.data.red_team, cfg.data.helpful, cfg.pm_train.helpful_source]
    held = {f"sample:{name}" for name in EVAL_SAMPLES}
    held_files = {str(sample_path(name)) for name in EVAL_SAMPLES}
    assert held.isdisjoint(training) and held_files.isdisjoint(training)
    assert {cfg.evaluate.harmful, cfg.evaluate.helpful} == set(HELD_OUT.values()) == held
    assert training_overlap(cfg) == []


def test_an_eval_source_that_training_reads_is_a_warning(tmp_path):
    cfg = load_config(None, ["evaluate.harmful=sample:red_team"])
    (warning,) = training_overlap(cfg)
    assert warning.startswith("warning: evaluate.harmful (sample:red_team) is also data.red_team")
    # the same file under another spelling, and a file two training sources share
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    overrides = [f"data.helpful={prompts}", f"evaluate.helpful={tmp_path}/./prompts.jsonl"]
    overrides += [f"pm_train.helpful_source={prompts}", "pm_train.helpful_per_ai_pair=0.5"]
    (warning,) = training_overlap(load_config(None, overrides))
    assert "is also data.helpful, pm_train.helpful_source" in warning
    # skipping past the `data.limit` prompts training read holds them out; pm_train's source
    # counts only when stage 5 mixes it in
    skipped = ["evaluate.harmful=sample:red_team", "data.limit=16", "evaluate.skip=16"]
    assert training_overlap(load_config(None, skipped)) == []
    pairs = ["evaluate.helpful=sample:hh_helpful_pairs"]
    assert training_overlap(load_config(None, pairs)) == []
    assert training_overlap(load_config(None, [*pairs, "pm_train.helpful_per_ai_pair=0.5"]))


def test_defaults_in_code_are_the_held_out_sets():
    e = RunConfig().evaluate
    assert (e.harmful, e.helpful, e.skip) == ("sample:eval_harmful", "sample:eval_benign", 0)
