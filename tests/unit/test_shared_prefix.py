"""Shared-prefix packing gives the hidden states (and so losses and gradients) of separate rows:
on Llama, Qwen 3 and Gemma 3 (its sliding-window layers, a window shorter than the rows), with
sdpa and eager attention."""

from __future__ import annotations

import pytest
import torch

from cai_ray.models import shared_prefix


def _model(family: str, attn: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        attn_implementation=attn,
    )
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common))
    else:  # two sliding layers of window 3, one global: the window bites on these rows
        config = tf.Gemma3TextConfig(
            **common,
            sliding_window=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
        model = tf.Gemma3ForCausalLM(config)
    return model.eval()


def _seqs() -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, 64, (6,), generator=g).tolist()
    other = torch.randint(1, 64, (4,), generator=g).tolist()
    seqs = [
        [*prompt, 5, 9, 11],  # group 0: a shared prompt, three answers of different lengths
        [*prompt, 7],
        [*prompt, 5, 9, 12, 13, 14],  # "5 9" is not common to the whole group: not shared
        [*other, 1, 2, 3, 4, 5, 6, 7],  # group 1: a pair
        [*other, 8],
        other[:3],  # group 2 alone: no branch at all
    ]
    return seqs, [[0, 1, 2], [3, 4], [5]]


def _separate(model, seqs) -> list[torch.Tensor]:
    return [model.model(input_ids=torch.tensor([s]))[0][0] for s in seqs]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_shared_prefix_forward_equals_separate_rows(family, attn):
    model = _model(family, attn)
    seqs, groups = _seqs()
    packed = shared_prefix.pack(seqs, groups, pad_id=0)
    assert packed.input_ids.shape[0] == 3
    # each group's common prefix runs once: the prompt saves 2 x 6 tokens, `other` 4
    assert packed.tokens() == sum(map(len, seqs)) - 2 * 6 - 4
    assert shared_prefix.supported(model)
    mask = shared_prefix.attention_mask(packed, model, torch.float32)
    assert isinstance(mask, dict) == (family == "gemma3")
    hidden = model.model(
        input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids
    )[0]  # (N, T, H)
    want = _separate(model, seqs)
    width = max(map(len, seqs))
    every = packed.gather(hidden, torch.arange(width).expand(len(seqs), width))  # (S, L, H)
    for s, ref in enumerate(want):
        torch.testing.assert_close(every[s, : len(ref)], ref, rtol=1e-5, atol=1e-5)
    last = packed.last(hidden)
    torch.testing.assert_close(last, torch.stack([h[-1] for h in want]), rtol=1e-5, atol=1e-5)


def test_shared_prefix_gradients_equal_separate_rows():
    model = _model("llama", "sdpa")
    seqs, groups = _seqs()
    packed = shared_prefix.pack(seqs, groups, pad_id=0)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    mask = shared_prefix.attention_mask(packed, model, torch.float32)
    h = model.model(
        input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids
    )[0]
    shared = grads(packed.last(h).pow(2).sum())
    separate = grads(torch.stack([x[-1] for x in _separate(model, seqs)]).pow(2).sum())
    assert len(shared) == len(separate) > 0
    for a, b in zip(shared, separate, strict=True):
        # fp32 sums in another order (packed rows, AVX2 or AVX-512 kernels): an absolute slack
        # relative to the tensor's largest gradient, else near-zero entries fail on rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_pack_rejects_a_sequence_in_no_group_or_two():
    with pytest.raises(ValueError, match="in no group"):
        shared_prefix.pack([[1, 2], [1, 3]], [[0]], pad_id=0)
    with pytest.raises(ValueError, match="in two groups"):
        shared_prefix.pack([[1, 2], [1, 3]], [[0, 1], [1]], pad_id=0)


def test_flash_attention_is_not_supported():
    model = _model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    assert not shared_prefix.supported(model)


def test_pack_keeps_rows_whose_attention_would_cost_more_apart():
    """A packed row's attention grows with the square of its width: sequences with no common
    prefix get rows of their own, and many long answers to one short prompt split into rows."""
    a, b = list(range(1, 129)), list(range(200, 328))  # no common prefix
    packed = shared_prefix.pack([a, b], [[0, 1]], pad_id=0)
    assert packed.input_ids.shape[0] == 2 and packed.tokens() == 256
    prompt = [7] * 64
    pair = shared_prefix.pack([prompt + a[:64], prompt + b[:64]], [[0, 1]], pad_id=0)
    assert pair.input_ids.shape[0] == 1 and pair.tokens() == 192  # the PM's case: shared
    answers = [[7] * 1024 + [i] * 1024 for i in range(1, 5)]  # 4 x 1024 after 1024 shared
    split = shared_prefix.pack(answers, [[0, 1, 2, 3]], pad_id=0)
    assert split.input_ids.shape[0] == 2  # two answers per row, the prompt twice
    short = shared_prefix.pack([prompt + [i] * 1024 for i in range(1, 5)], [[0, 1, 2, 3]], pad_id=0)
    assert short.input_ids.shape[0] == 4  # a 64-token prompt is not worth 1024-token answers
    assert split.tokens() < sum(map(len, answers))  # the prompt still runs fewer times
    assert split.row.tolist() == sorted(split.row.tolist())  # members fill rows in order
    width = max(map(len, answers))
    every = split.gather(split.input_ids, torch.arange(width).expand(4, width))
    assert every.tolist() == answers  # every token where the index says


def test_run_groups_take_consecutive_sequences_that_start_alike():
    prompt = [9] * 8
    seqs = [[*prompt, 1], [*prompt, 2, 2], [5, 5, 5], [*prompt, 3], prompt[:2] + [4] * 8]
    # the third breaks the run; the fifth shares 2 of its 10 tokens: under half, a run of its own
    assert shared_prefix.run_groups(seqs) == [[0, 1], [2], [3], [4]]
