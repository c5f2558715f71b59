"""SL-CAI data: pair selection, tokenisation (loss on response tokens only), truncation, packing."""

from __future__ import annotations

import pytest
import torch

from cai_ray.config.learner import LearnerConfig, SFTConfig
from cai_ray.errors import ConfigError
from cai_ray.sl.losses import IGNORE_INDEX, count_label_tokens, token_nll_mean
from cai_ray.sl.sft_data import (
    SFTPair,
    build_sft_examples,
    collate,
    mix_helpful,
    pack_examples,
    select_sft_pairs,
    tokenize_example,
)

torch.set_num_threads(2)


def chain(pid: str, revisions: list[str], *, prompt: str = "How do I pick a lock?") -> dict:
    rounds = [
        {
            "principle_id": f"harmful{i}",
            "critique_request": "Identify harm.",
            "critique": f"critique {i}",
            "revision_request": "Rewrite it.",
            "revision": text,
        }
        for i, text in enumerate(revisions)
    ]
    return {
        "prompt_id": pid,
        "prompt": prompt,
        "messages": [{"role": "user", "content": prompt}],
        "initial_answer": "Sure, here is how.",
        "rounds": rounds,
    }


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from cai_ray.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, load_tokenizer(tiny_model_dir)


# -- selection ---------------------------------------------------------------------------------


def test_final_mode_takes_the_last_revision_of_each_chain():
    sel = select_sft_pairs([chain("a", ["r1", "r2", "r3"]), chain("b", ["s1"])], mode="final")
    assert [(p.prompt_id, p.response, p.round) for p in sel.pairs] == [
        ("a", "r3", 3),
        ("b", "s1", 1),
    ]
    assert sel.pairs[0].messages == ({"role": "user", "content": "How do I pick a lock?"},)
    assert sel.rejected == []


def test_all_rounds_and_up_to_modes():
    rows = [chain("a", ["r1", "r2", "r3", "r4"]), chain("b", ["s1"])]
    every = select_sft_pairs(rows, mode="all_rounds")
    assert [p.response for p in every.pairs] == ["r1", "r2", "r3", "r4", "s1"]
    up_to_2 = select_sft_pairs(rows, mode="up_to", up_to=2)
    assert [(p.response, p.round) for p in up_to_2.pairs] == [("r1", 1), ("r2", 2), ("s1", 1)]


def test_bad_rows_and_empty_revisions_are_rejected_with_reasons():
    rows = [
        {"prompt": "x", "rounds": []},  # no id
        chain("no-rounds", []),
        {"prompt_id": "bad-msgs", "messages": [{"role": "user"}], "rounds": []},
        chain("empty", ["ok", "  "]),
        {"prompt_id": "only-prompt", "prompt": "Hi", "rounds": [{"revision": "Hello!"}]},
    ]
    sel = select_sft_pairs(rows, mode="all_rounds")
    reasons = {(r.prompt_id, r.round): r.reason for r in sel.rejected}
    assert reasons[(None, None)] == "missing prompt_id"
    assert reasons[("no-rounds", None)] == "no revision rounds"
    assert "messages" in reasons[("bad-msgs", None)]
    assert reasons[("empty", 2)] == "empty or missing revision"
    # A row without `messages` uses its prompt as one user turn.
    assert [(p.prompt_id, p.response) for p in sel.pairs] == [
        ("empty", "ok"),
        ("only-prompt", "Hello!"),
    ]
    assert sel.pairs[-1].messages == ({"role": "user", "content": "Hi"},)
    with pytest.raises(ConfigError):
        select_sft_pairs(rows, mode="up_to")


def test_mix_helpful_adds_the_ratio_of_helpful_samples():
    harmless = [SFTPair(f"h{i}", (), "r") for i in range(10)]
    helpful = [SFTPair(f"g{i}", (), "a", source="helpful") for i in range(30)]
    mixed = mix_helpful(harmless, helpful, ratio=0.5, seed=1)
    assert len(mixed) == 15 and sum(p.source == "helpful" for p in mixed) == 5
    assert mix_helpful(harmless, helpful, ratio=0.5, seed=1) == mixed  # seeded
    assert len(mix_helpful(harmless, helpful[:3], ratio=1.0)) == 13  # all there is
    assert mix_helpful(harmless, helpful, ratio=0.0) == harmless


# -- tokenisation and the loss mask -------------------------------------------------------------


def test_prompt_tokens_are_unlabelled_and_response_ends_with_eos(tiny):
    _, tok = tiny
    ex = tokenize_example(tok, "\n\nHuman: hi\n\nAssistant:", " hello there", max_seq_len=64)
    prompt_ids = tok("\n\nHuman: hi\n\nAssistant:")["input_ids"]
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_loss_gradient_is_exactly_zero_at_prompt_positions(tiny):
    model, tok = tiny
    ex = tokenize_example(
        tok, "\n\nHuman: tell me a story\n\nAssistant:", " once upon", max_seq_len=64
    )
    batch = collate([ex], pad_id=tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.detach().requires_grad_(True)  # (1, T, V)
    loss = token_nll_mean(logits, batch["labels"])
    loss.backward()
    labels = batch["labels"][0]
    # Position t predicts token t+1: it carries loss only if token t+1 is a response token.
    predicts_response = torch.zeros_like(labels, dtype=torch.bool)
    predicts_response[:-1] = labels[1:] != IGNORE_INDEX
    grad_norm = logits.grad[0].abs().sum(-1)  # (T,)
    assert torch.all(grad_norm[~predicts_response] == 0)
    assert torch.all(grad_norm[predicts_response] > 0)
    # Changing what the prompt says after position 0 cannot change the loss's targets.
    assert count_label_tokens(batch["labels"]) == int(predicts_response.sum())


def test_truncation_keeps_the_response_and_the_prompt_end(tiny):
    _, tok = tiny
    prompt = "\n\nHuman: " + "word " * 60 + "question?\n\nAssistant:"
    ex = tokenize_example(tok, prompt, " short answer", max_seq_len=32)
    assert len(ex["input_ids"]) == 32
    assert ex["input_ids"][0] == tok.bos_token_id  # BOS survives the cut
    full = tok(prompt)["input_ids"]
    n_resp = sum(label != IGNORE_INDEX for label in ex["labels"])
    kept_prompt = ex["input_ids"][1 : 32 - n_resp]
    assert kept_prompt == full[len(full) - len(kept_prompt) :]  # the end of the prompt
    assert ex["input_ids"][-1] == tok.eos_token_id  # the response is whole

    long_response = " and" * 80
    ex = tokenize_example(tok, prompt, long_response, max_seq_len=32)
    n_prompt = sum(label == IGNORE_INDEX for label in ex["labels"])
    assert len(ex["input_ids"]) == 32 and n_prompt == 16  # the prompt keeps half the budget

    reason = tokenize_example(tok, prompt, " short answer", max_seq_len=32, truncation="drop")
    assert isinstance(reason, str) and "max_seq_len 32" in reason


def test_build_examples_numbers_rows_and_reports_rejects(tiny):
    _, tok = tiny
    items = [("a", "\n\nHuman: hi\n\nAssistant:", " yes"), ("b", "\n\nHuman: hi\n\nAssistant:", "")]
    items += [("c", "\n\nHuman: " + "long " * 50, " ok")]
    examples, rejected = build_sft_examples(tok, items, max_seq_len=16, truncation="drop")
    assert [e["idx"] for e in examples] == [0]
    assert {r.prompt_id: r.reason for r in rejected}["b"] == "empty response"
    assert "max_seq_len" in {r.prompt_id: r.reason for r in rejected}["c"]


def test_collate_pads_right_with_masked_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
    batch = collate(rows, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert int(batch["num_tokens"]) == 4


# -- packing -----------------------------------------------------------------------------------


def _examples(tok, n: int) -> list[dict]:
    items = [
        (str(i), f"\n\nHuman: question number {i} about cats\n\nAssistant:", " answer" * (i + 1))
        for i in range(n)
    ]
    return build_sft_examples(tok, items, max_seq_len=64)[0]


def test_packing_fills_rows_and_restarts_positions(tiny):
    _, tok = tiny
    examples = _examples(tok, 6)
    packs = pack_examples(examples, max_seq_len=48)
    assert sum(p["n_seqs"] for p in packs) == 6
    assert all(len(p["input_ids"]) <= 48 for p in packs)
    assert len(packs) < 6
    first = packs[0]
    starts = [i for i, pos in enumerate(first["position_ids"]) if pos == 0]
    assert len(starts) == first["n_seqs"]
    assert all(first["labels"][s] == IGNORE_INDEX for s in starts)
    assert sum(count_label_tokens(collate([p])["labels"]) for p in packs) == sum(
        count_label_tokens(collate([e])["labels"]) for e in examples
    )


def test_packed_loss_equals_unpacked_loss(tiny):
    from cai_ray.sl.objective import SFTObjective

    model, tok = tiny
    objective = SFTObjective(pad_id=tok.pad_token_id)  # the learner's code path
    examples = _examples(tok, 5)
    unpacked = objective.collate(examples)
    packed = objective.collate(pack_examples(examples, max_seq_len=80))
    assert packed["input_ids"].shape[0] < len(examples)
    assert "attention_mask" not in packed
    with torch.no_grad():
        loss_unpacked, _ = objective.loss(model, unpacked)
        loss_packed, _ = objective.loss(model, packed)
    assert objective.loss_units(packed) == objective.loss_units(unpacked)
    assert objective.tokens(packed) == objective.tokens(unpacked)
    assert loss_packed.item() == pytest.approx(loss_unpacked.item(), rel=1e-5)


def test_the_prompt_window_changes_no_loss_nor_gradient(tiny_model_dir):
    """SFT logits only from the first labelled position on (`target_logits`): the same loss and
    gradient as the full (B, T, V) logits, with prompts of different lengths in one batch."""
    from transformers import AutoModelForCausalLM

    from cai_ray.models import load_tokenizer
    from cai_ray.sl.losses import token_nll_sum
    from cai_ray.sl.objective import SFTObjective

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = load_tokenizer(tiny_model_dir)
    objective = SFTObjective(pad_id=tok.pad_token_id)
    examples = [
        tokenize_example(tok, "\n\nHuman: a much longer question here\n\nAssistant:", " yes",
                         max_seq_len=64),
        tokenize_example(tok, "\n\nHuman: a long question\n\nAssistant:", " no, not that",
                         max_seq_len=64),
    ]  # fmt: skip
    batch = objective.collate(examples)
    first = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero()[0])
    assert first >= 4  # a window of prompt positions to skip
    loss, _ = objective.loss(model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    full, _ = token_nll_sum(model(**inputs).logits, batch["labels"])
    full.backward()
    assert float(loss.detach()) == pytest.approx(float(full.detach()), rel=1e-6)
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# -- config ------------------------------------------------------------------------------------


def test_sft_config_validates_up_to():
    assert SFTConfig(pairs="up_to", up_to=2).up_to == 2
    with pytest.raises(ValueError, match="needs up_to"):
        SFTConfig(pairs="up_to")
    with pytest.raises(ValueError, match="only read with pairs=up_to"):
        SFTConfig(up_to=2)
    with pytest.raises(ValueError, match="extra"):
        SFTConfig(learner={"zero_stag": 2})


def test_paper_defaults_and_lr_schedules():
    sft = SFTConfig()
    assert (sft.pairs, sft.learner.lr_schedule, sft.learner.epochs) == ("final", "constant", 1)
    assert sft.learner.lr_factor(500, 1000) == 1.0
    warm = LearnerConfig(lr_schedule="warmup_constant", warmup_steps=4)
    assert [warm.lr_factor(s, 10) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
    cos = LearnerConfig(lr_schedule="cosine", warmup_steps=2)
    assert cos.lr_factor(2, 12) == 1.0 and cos.lr_factor(7, 12) == pytest.approx(0.5)
    lin = LearnerConfig(lr_schedule="linear")
    assert lin.lr_factor(5, 10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        LearnerConfig(lr_schedule="warmup_constant")
    assert LearnerConfig(num_ranks=0, zero_stage=3).world_size == 1
    assert LearnerConfig(num_ranks=2, micro_batch_size=4, grad_accum=3).global_batch == 24
