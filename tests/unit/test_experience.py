"""RL experience: rewards, KL and advantages from ragged per-sample lists, against cai_ray.rl.algorithms."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from cai_ray.config.rl import RLTrainConfig  # noqa: E402
from cai_ray.errors import CaiRayError  # noqa: E402
from cai_ray.rl import algorithms as rm  # noqa: E402
from cai_ray.rl import experience as xp  # noqa: E402


def settings(
    algorithm: str, *, beta: float = 0.0, kl_mode: str = "reward", whiten: bool = False, **kw
) -> dict:
    """compute_advantages' `s` (the rl_train section) and `beta`."""
    s = RLTrainConfig(
        algorithm=algorithm,
        group_size=2,
        kl={"mode": kl_mode, "estimator": "k1"},
        whiten_advantages=whiten,
        **kw,
    )
    return {"s": s, "beta": beta}


def test_pad_and_unpad_round_trip():
    values, mask = xp.pad([[1.0, 2.0, 3.0], [4.0]])
    assert values.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    assert xp.unpad(values, [3, 1]) == [[1.0, 2.0, 3.0], [4.0]]


def test_grpo_by_hand_with_kl_in_the_reward():
    # Two prompts x two samples; old - ref = 0.5 on each of 2 tokens of sample 0 -> KL sum 1.
    old = [[-1.0, -1.0], [-2.0], [-1.0, -1.0, -1.0], [-0.5]]
    ref = [[-1.5, -1.5], [-2.0], [-1.0, -1.0, -1.0], [-0.5]]
    exp = xp.compute_advantages(
        scores=[1.0, 0.0, 3.0, 3.0],
        old_logprobs=old,
        ref_logprobs=ref,
        values=None,
        **settings("grpo", beta=0.5),
    )
    assert exp.kl == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert exp.rewards == pytest.approx([0.5, 0.0, 3.0, 3.0])
    # group 1: rewards (0.5, 0); mean 0.25, unbiased std 0.3536 -> (+0.7071, -0.7071)
    a = 0.25 / math.sqrt(0.125)
    assert exp.advantages[0] == pytest.approx([a, a], abs=1e-4)
    assert exp.advantages[1] == pytest.approx([-a], abs=1e-4)
    # group 2: equal rewards -> advantage 0 for every token
    assert exp.advantages[2] == pytest.approx([0.0, 0.0, 0.0])
    assert [len(x) for x in exp.advantages] == [2, 1, 3, 1]
    assert exp.stats["kl"] == pytest.approx(0.25)


def test_rloo_and_kl_as_loss_leave_the_reward_alone():
    old = [[-1.0], [-1.0]]
    ref = [[-3.0], [-1.0]]
    exp = xp.compute_advantages(
        scores=[2.0, 0.0],
        old_logprobs=old,
        ref_logprobs=ref,
        values=None,
        **settings("rloo", kl_mode="loss", beta=1.0),
    )
    assert exp.rewards == [2.0, 0.0]
    assert exp.advantages == [[2.0], [-2.0]]


def test_ppo_matches_gae_on_kl_shaped_rewards():
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 1, 4]
    old = [torch.randn(n, generator=gen).tolist() for n in lengths]
    ref = [torch.randn(n, generator=gen).tolist() for n in lengths]
    values = [torch.randn(n, generator=gen).tolist() for n in lengths]
    scores = [0.5, -1.0, 2.0]
    s = settings("ppo", beta=0.1, gamma=1.0, lam=0.9)
    exp = xp.compute_advantages(
        scores=scores, old_logprobs=old, ref_logprobs=ref, values=values, **s
    )
    o, mask = xp.pad(old)
    r, _ = xp.pad(ref)
    v, _ = xp.pad(values)
    rewards = rm.kl_penalized_rewards(torch.tensor(scores), o - r, mask, beta=0.1)
    adv, ret = rm.gae_advantages(rewards, v, mask, gamma=1.0, lam=0.9)
    assert exp.advantages == [pytest.approx(a, abs=1e-6) for a in xp.unpad(adv, lengths)]
    assert exp.returns == [pytest.approx(a, abs=1e-6) for a in xp.unpad(ret, lengths)]
    # the sequence reward is the score minus beta * summed KL
    want = [sc - 0.1 * (sum(a) - sum(b)) for sc, a, b in zip(scores, old, ref, strict=True)]
    assert exp.rewards == pytest.approx(want, abs=1e-5)
    whitened = xp.compute_advantages(
        scores=scores,
        old_logprobs=old,
        ref_logprobs=ref,
        values=values,
        **settings("ppo", beta=0.1, lam=0.9, whiten=True),
    )
    flat = [x for row in whitened.advantages for x in row]
    assert sum(flat) / len(flat) == pytest.approx(0.0, abs=1e-5)


def test_ppo_without_values_and_mismatched_tokens_are_errors():
    with pytest.raises(CaiRayError, match="critic"):
        xp.compute_advantages(
            scores=[1.0], old_logprobs=[[0.0]], ref_logprobs=[[0.0]], values=None,
            **settings("ppo"),
        )  # fmt: skip
    with pytest.raises(CaiRayError, match="same response tokens"):
        xp.compute_advantages(
            scores=[1.0], old_logprobs=[[0.0, 0.0]], ref_logprobs=[[0.0]], values=None,
            **settings("grpo"),
        )  # fmt: skip


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_check_finite_names_the_sample(bad):
    with pytest.raises(CaiRayError, match="sample 1"):
        xp.check_finite([0.5, bad], what="the reward")


def test_rows_carry_what_the_learners_read():
    smp = xp.Sample(
        prompt_id="p", source="red_team", group=0, index=0, messages=[],
        prompt_ids=[1, 5, 6], response_ids=[7, 2], response="hi", finish_reason="stop",
        weight_version=3,
    )  # fmt: skip
    exp = xp.Experience(advantages=[[0.1, 0.2]], returns=[[1.0, 1.0]], rewards=[1.0], kl=[0.0],
                        stats={})  # fmt: skip
    (p,) = xp.policy_rows([smp], exp, [[-1.0, -2.0]], [[-1.5, -2.5]], kl_coef=0.1)
    assert p["input_ids"] == [1, 5, 6, 7, 2] and p["prompt_len"] == 3
    assert p["advantages"] == [0.1, 0.2] and p["kl_coef"] == 0.1
    (v,) = xp.value_rows([smp], exp, [[0.3, 0.4]])
    assert v["returns"] == [1.0, 1.0] and v["old_values"] == [0.3, 0.4]
