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
    from cai_ray.feedback.reward import RewardScorer

    return RewardScorer(tiny_reward_model_dir, device="cpu", threads=1, batch_size=2)


def test_a_sequence_classifier_scores_as_transformers_head_does(scorer, tiny_reward_model_dir):
    """The classification preset (and users' *ForSequenceClassification PMs) load through the
    value-head loader (issue 14) and score as `AutoModelForSequenceClassification` does."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from cai_ray.data.tokens import encode

    assert scorer.model.kind == "sequence_classifier"
    ref = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_reward_model_dir), dtype=torch.float32
    ).eval()
    got = scorer.score(TEXTS)
    for text, value in zip(TEXTS, got, strict=True):
        ids = torch.tensor([encode(scorer.tokenizer, text)])
        with torch.inference_mode():
            want = ref(input_ids=ids).logits[0, 0].item()
        assert value == pytest.approx(want, abs=1e-5)
        with torch.inference_mode():  # the pooling RewardScorer had: bit for bit the same
            out = ref.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))
            before = ref.score(out.last_hidden_state[:, -1])[:, 0].float().item()
        assert scorer.score([text])[0] == before


def test_batching_does_not_change_scores(scorer):
    batched = scorer.score(TEXTS)
    single = [scorer.score([t])[0] for t in TEXTS]
    assert batched == pytest.approx(single, abs=1e-4)
    assert len(set(round(s, 6) for s in batched)) == len(TEXTS)  # different texts, different scores


def test_over_long_text_is_a_user_error(scorer):
    with pytest.raises(CaiRayError, match="preference model accepts"):
        scorer.score(["word " * (scorer.max_context + 10)])


def test_causal_model_is_refused(tiny_model_dir):
    from cai_ray.feedback.reward import RewardScorer

    with pytest.raises(ModelError, match="expected a preference model"):
        RewardScorer(tiny_model_dir, device="cpu", threads=1)
