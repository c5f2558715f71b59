"""Option scores as disjoint events (issue 14): the direct-RLAIF 1-10 rating on real tokenizers,
where " 1" is a token prefix of " 10", by hand, with synthetic judges and on a real engine."""

from __future__ import annotations

import itertools
import math

import pytest

from cai_ray.feedback.prompts import (
    RATING_OPTIONS,
    build_rating_prompt,
    disjoint_logprobs,
    option_probabilities,
)

PROMPT_RESPONSE = "Hello! How can I help?"
PROMPT = build_rating_prompt(
    "\n\nHuman: Hi there\n\nAssistant:", PROMPT_RESPONSE, criterion="Rate it."
)


def test_disjoint_logprobs_by_hand():
    lp = [math.log(0.5), math.log(0.3), math.log(0.1), math.log(0.05)]
    # " 1" = [1], " 10" = [1, 0], " 100" = [1, 0, 0], " 2" = [2]: only minimal extensions count
    exact = disjoint_logprobs(lp, [[1], [1, 0], [1, 0, 0], [2]])
    assert [math.exp(x) for x in exact] == pytest.approx([0.2, 0.2, 0.1, 0.05])
    two = disjoint_logprobs([math.log(0.5), math.log(0.2), math.log(0.1)], [[1], [1, 0], [1, 1]])
    assert math.exp(two[0]) == pytest.approx(0.2)  # 0.5 - 0.2 - 0.1
    # rounding can make the remainder non-positive: an impossible event, never a NaN
    assert disjoint_logprobs([-1.0, -1.0], [[1], [1, 0]]) == [-math.inf, -1.0]


def test_disjoint_logprobs_is_a_no_op_without_prefixes():
    lp = [-0.3, -1.7, -4.0]
    assert disjoint_logprobs(lp, [[5], [6], [7]]) == lp
    assert disjoint_logprobs(lp, [[3, 5], [3, 6], [3, 7, 8]]) == lp  # split, no prefix
    with pytest.raises(ValueError):
        disjoint_logprobs(lp, [[1], [2]])


def _rating_token_ids(tokenizer) -> list[list[int]]:
    """The tokens the HF engine scores for each rating after the prompt (joint encoding)."""
    prefix = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    out = []
    for option in RATING_OPTIONS:
        joint = tokenizer(PROMPT + option, add_special_tokens=False)["input_ids"]
        assert joint[: len(prefix)] == prefix
        out.append(joint[len(prefix) :])
    return out


def _certain_of(k: int, option_ids: list[list[int]], stop: int, vocab: int, eps=1e-4):
    """Summed log-probs of the options under a judge that writes " k" then `stop`: each token on
    that path has probability 1 - eps, every other token eps / (vocab - 1)."""
    path = [*option_ids[k - 1], stop]
    hit, miss = math.log1p(-eps), math.log(eps / (vocab - 1))
    return [
        sum(hit if i < len(path) and t == path[i] else miss for i, t in enumerate(ids))
        for ids in option_ids
    ]


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def rating_tokens(request, real_tokenizer_dirs):
    from cai_ray.models import load_tokenizer

    tok = load_tokenizer(real_tokenizer_dirs[request.param])
    ids = _rating_token_ids(tok)
    stop = tok("\n", add_special_tokens=False)["input_ids"][-1]
    return ids, stop, len(tok)


def test_rating_options_overlap_on_real_tokenizers(rating_tokens):
    ids, _, _ = rating_tokens
    assert len(ids[0]) == 2 and ids[9] == [*ids[0], ids[9][2]]  # " 1" prefixes " 10"
    assert all(len(t) == 2 for t in ids[:9])


def test_certain_judge_rates_k_and_reward_is_monotone(rating_tokens):
    import torch

    from cai_ray.rl import algorithms

    ids, stop, vocab = rating_tokens
    expected = []
    for k in range(1, 11):
        exact = disjoint_logprobs(_certain_of(k, ids, stop, vocab), ids)
        score = algorithms.expected_score(torch.tensor([exact]), torch.arange(1.0, 11.0))
        expected.append(float(score[0]))
    assert expected == pytest.approx(list(range(1, 11)), abs=0.01)
    rewards = algorithms.rlaif_reward(torch.tensor(expected)).tolist()
    assert all(a < b for a, b in itertools.pairwise(rewards))
    assert rewards[0] == pytest.approx(-1, abs=0.01) and rewards[-1] == pytest.approx(1, abs=0.01)


def test_reward_worker_rates_a_certain_judge_k(rating_tokens, monkeypatch):
    """RewardWorker._rlaif itself, over an engine that returns the real option tokens."""
    from actors.rl_workers import RewardWorker
    from cai_ray.config.rl import RewardConfig
    from cai_ray.engines.base import OptionScores

    ids, stop, vocab = rating_tokens

    class Judge:
        k = 1

        def score_options(self, requests):
            return [OptionScores(_certain_of(self.k, ids, stop, vocab), ids) for _ in requests]

    worker = RewardWorker.__new__(RewardWorker)  # no model to load: the engine is the judge
    worker.cfg, worker.engine = RewardConfig(kind="rlaif"), Judge()
    item = {"messages": [{"role": "user", "content": "Hi"}], "response": "Hello!"}
    rewards = []
    for k in range(1, 11):
        worker.engine.k = k
        (reward,) = worker._rlaif([item])
        rewards.append(reward)
    assert rewards == pytest.approx([(k - 1) / 9 * 2 - 1 for k in range(1, 11)], abs=0.01)


def _fit_to_ten(model_dir, out_dir, *, steps: int = 40):
    """A copy of the tiny model trained (a few Adam steps) to answer " 10" after the prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from cai_ray.data.tokens import encode
    from cai_ray.models import load_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a shared 2-core machine
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ids = torch.tensor([encode(tok, PROMPT + " 10")])  # (1, T)
    n = len(encode(tok, PROMPT))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)  # (T-1, V)
        loss = -logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def test_real_engine_ratings_are_disjoint_and_sum_to_one(real_tiny_model, tmp_path):
    from actors.rl_workers import RewardWorker
    from cai_ray.config import EngineConfig
    from cai_ray.config.rl import RewardConfig
    from cai_ray.engines.base import ScoreRequest

    worker = RewardWorker(
        RewardConfig(kind="rlaif", criterion="Rate it."),  # renders PROMPT for the item below
        model_path=str(_fit_to_ten(real_tiny_model, tmp_path / "judge")),
        engine=EngineConfig(kind="hf", device="cpu", threads=1),
        batch_size=1,
        refusal_phrases=(),
    )
    (s,) = worker.engine.score_options([ScoreRequest(PROMPT, RATING_OPTIONS)])
    assert s.option_token_ids[9][:2] == s.option_token_ids[0]  # the overlap is real
    assert sum(math.exp(x) for x in s.logprobs) > 1.2  # P(" 1") counts P(" 10"): not disjoint
    exact = disjoint_logprobs(s.logprobs, s.option_token_ids)
    assert sum(math.exp(x) for x in exact) <= 1 + 1e-4
    probs = option_probabilities(exact)
    assert sum(probs) == pytest.approx(1, abs=1e-4)
    assert sum(k * p for k, p in enumerate(probs, start=1)) > 9
    item = {"messages": [{"role": "user", "content": "Hi there"}], "response": PROMPT_RESPONSE}
    (reward,) = worker.score([item])
    assert reward > 0.75  # the raw scores would give about 0 (an expected rating near 5.5)
