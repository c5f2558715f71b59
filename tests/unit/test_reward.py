"""RewardScorer: last-non-pad pooling matches the HF head, and batching changes nothing."""

from __future__ import annotations

import pytest

from cai_ray.errors import CaiRayError, ModelError

TEXTS = [
    "\n\nHuman: hi\n\nAssistant: hello there, how can I help?",
    "\n\nHuman: a much longer question about gardening and tomatoes\n\nAssistant: water them",
    "\n\nHuman: ok\n\nAssistant: ok",
]


@pytest.fixture(scope="module")
def scorer(tiny_reward_model_dir):
    from cai_ray.reward import RewardScorer

    return RewardScorer(tiny_reward_model_dir, device="cpu", threads=1, batch_size=2)


def test_scores_match_the_hf_head_on_unpadded_texts(scorer):
    import torch

    got = scorer.score(TEXTS)
    for text, value in zip(TEXTS, got, strict=True):
        ids = scorer.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            want = scorer.model(input_ids=ids).logits[0, 0].item()
        assert value == pytest.approx(want, abs=1e-4)


def test_batching_does_not_change_scores(scorer):
    batched = scorer.score(TEXTS)
    single = [scorer.score([t])[0] for t in TEXTS]
    assert batched == pytest.approx(single, abs=1e-4)
    assert len(set(round(s, 6) for s in batched)) == len(TEXTS)  # different texts, different scores


def test_over_long_text_is_a_user_error(scorer):
    with pytest.raises(CaiRayError, match="preference model accepts"):
        scorer.score(["word " * (scorer.max_context + 10)])


def test_causal_model_is_refused(tiny_model_dir):
    from cai_ray.reward import RewardScorer

    with pytest.raises(ModelError, match="sequence-classification"):
        RewardScorer(tiny_model_dir, device="cpu", threads=1)
