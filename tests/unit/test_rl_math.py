"""RL math: hand-computed examples, looped references vs vectorised code, controllers, losses."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from cai_ray.errors import CaiRayError  # noqa: E402
from cai_ray.rl import algorithms as rm  # noqa: E402

torch.set_num_threads(1)


def close(actual, expected, tol: float = 1e-5) -> None:
    assert torch.allclose(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=tol,
        rtol=tol,
    ), f"{actual} != {expected}"


def ragged_mask(gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    return (torch.arange(length)[None, :] < lengths[:, None]).double()  # (B, T)


# ---------------------------------------------------------------- masked reductions


def test_masked_sum_mean_and_empty_mask():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(rm.masked_sum(values, mask), 1 + 2 + 4)
    close(rm.masked_mean(values, mask), (1 + 2 + 4) / 3)
    close(rm.masked_mean(values, mask, dim=-1), [(1 + 2) / 2, 4 / 1])
    close(rm.masked_mean(values, torch.zeros_like(mask)), 0.0)


def test_masked_whiten_by_hand():
    values = torch.tensor([[1.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # mean 2, unbiased var ((1-2)^2 + (3-2)^2) / 1 = 2
    out = rm.masked_whiten(values, mask, eps=0.0)
    close(out, [[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]])
    kept = rm.masked_whiten(values, mask, shift_mean=False, eps=0.0)
    close(kept, [[2 - 1 / math.sqrt(2), 2 + 1 / math.sqrt(2), 0.0]])


# ---------------------------------------------------------------- log-probs and entropy


def test_token_logprobs_and_entropy_by_hand():
    # Two-token vocabulary, logits (0, ln 3): p = (1/4, 3/4).
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # (1, 2, 2)
    labels = torch.tensor([[1, -100]])
    logps = rm.token_logprobs(logits, labels)
    close(logps[0, 0], math.log(0.75))
    ent = rm.token_entropy(logits)
    close(ent, [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2.0)]])
    close(rm.entropy_from_logits(logits, torch.tensor([[1.0, 0.0]])), ent[0, 0])
    close(rm.sequence_logprobs(logps, torch.tensor([[1.0, 0.0]])), [math.log(0.75)])


# ---------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    r = math.log(2.0)  # log(p / ref)
    close(rm.kl_k1(logp, ref), r)
    close(rm.kl_k2(logp, ref), 0.5 * r * r)
    close(rm.kl_k3(logp, ref), 0.5 - 1 + r)  # ref/p - 1 - log(ref/p)
    assert set(rm.KL_ESTIMATORS) == {"k1", "k2", "k3"}
    # k3 is never negative, unlike k1.
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    assert bool((rm.kl_k3(a, b) >= 0).all()) and bool((rm.kl_k1(a, b) < 0).any())


def test_kl_penalized_rewards_puts_score_on_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.7, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([2.0, -1.0])
    out = rm.kl_penalized_rewards(scores, kl, mask, beta=0.1)
    close(out, [[-0.01, -0.02, -0.03 + 2.0], [-0.05, -0.07 - 1.0, 0.0]])
    with pytest.raises(CaiRayError, match="no tokens"):
        rm.kl_penalized_rewards(scores, kl, torch.zeros_like(mask), beta=0.1)


def test_kl_loss_and_unknown_estimator():
    logp = torch.tensor([[0.0, 0.0]])
    ref = torch.tensor([[math.log(2.0), 5.0]])
    mask = torch.tensor([[1.0, 0.0]])
    close(rm.kl_loss(logp, ref, mask, estimator="k1"), -math.log(2.0))
    close(rm.kl_loss(logp, ref, mask), 2.0 - 1.0 - math.log(2.0))
    with pytest.raises(CaiRayError, match="did you mean 'k3'"):
        rm.kl_loss(logp, ref, mask, estimator="kk3")


# ---------------------------------------------------------------- controllers


def test_fixed_kl_controller_never_moves_and_round_trips():
    ctl = rm.KL_CONTROLLERS["fixed"](0.001)
    ctl.update(100.0, 64)
    assert ctl.beta == 0.001
    other = rm.FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.beta == 0.001


def test_adaptive_kl_controller_updates_by_hand():
    ctl = rm.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(9.0, 10)  # error = clip(9/6 - 1) = 0.2 (clipped from 0.5)
    close(ctl.beta, 0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(5.4, 50)  # error = 5.4/6 - 1 = -0.1
    close(ctl.beta, 0.1 * 1.02 * (1 - 0.1 * 50 / 100))
    resumed = rm.KL_CONTROLLERS["adaptive"](1.0, target=1.0, horizon=1)
    resumed.load_state_dict(ctl.state_dict())
    assert (resumed.beta, resumed.target, resumed.horizon) == (ctl.beta, 6.0, 100)
    with pytest.raises(CaiRayError, match="target > 0"):
        rm.AdaptiveKLController(0.1, target=0.0, horizon=100)


# ---------------------------------------------------------------- GAE


def gae_advantages_reference(rewards, values, mask, *, gamma, lam):
    """Plain per-sequence, per-token loop over the unmasked positions only."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.size(0)):
        idx = [t for t in range(rewards.size(1)) if mask[b, t] > 0]
        running, next_value = 0.0, 0.0
        for t in reversed(idx):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_value = float(values[b, t])
    return adv, (adv + values) * mask


def test_gae_three_tokens_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    # gamma = 1, lam = 0.95: delta_2 = 1 - 0.7 = 0.3, delta_1 = 0.7 - 0.6 = 0.1,
    # delta_0 = 0.6 - 0.5 = 0.1; A_2 = 0.3, A_1 = 0.1 + 0.95 * 0.3 = 0.385,
    # A_0 = 0.1 + 0.95 * 0.385 = 0.46575.
    adv, ret = rm.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.46575, 0.385, 0.3]])
    close(ret, [[0.46575 + 0.5, 0.385 + 0.6, 0.3 + 0.7]])


def test_gae_matches_looped_reference_on_ragged_and_holed_masks():
    gen = torch.Generator().manual_seed(1)
    batch, length = 6, 9
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    mask = ragged_mask(gen, batch, length)
    mask[0, :] = 1.0
    mask[1, 2] = 0.0  # a hole (e.g. a tool/user turn inside the response) is skipped
    for gamma, lam in [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)]:
        fast = rm.gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
        slow = gae_advantages_reference(rewards, values, mask, gamma=gamma, lam=lam)
        close(fast[0], slow[0], tol=1e-9)
        close(fast[1], slow[1], tol=1e-9)


# ---------------------------------------------------------------- group estimators


def test_grpo_and_rloo_by_hand():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    # group (1, 3): mean 2, unbiased std sqrt(2); group (0, 0): std 0 -> advantages 0.
    close(rm.group_normalized_scores(scores, group_size=2, eps=0.0)[:2], [-1 / 2**0.5, 1 / 2**0.5])
    close(rm.group_normalized_scores(scores, group_size=2)[2:], [0.0, 0.0])
    close(rm.group_normalized_scores(scores, group_size=2, scale_by_std=False), [-1, 1, 0, 0])
    # RLOO, one group of 3: r_i - mean of the other two.
    close(
        rm.leave_one_out_scores(torch.tensor([1.0, 2.0, 6.0]), group_size=3),
        [1 - 4.0, 2 - 3.5, 6 - 1.5],
    )


def test_group_estimators_match_looped_references():
    gen = torch.Generator().manual_seed(2)
    group, prompts = 4, 5
    scores = torch.randn(group * prompts, generator=gen, dtype=torch.float64)
    grpo, rloo = [], []
    for p in range(prompts):
        g = [float(s) for s in scores[p * group : (p + 1) * group]]
        mean = sum(g) / group
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / (group - 1))
        grpo += [(x - mean) / (std + 1e-6) for x in g]
        rloo += [x - (sum(g) - x) / (group - 1) for x in g]
    close(rm.group_normalized_scores(scores, group_size=group), grpo, tol=1e-9)
    close(rm.leave_one_out_scores(scores, group_size=group), rloo, tol=1e-9)


def test_group_size_errors():
    with pytest.raises(CaiRayError, match="groups of 3"):
        rm.group_normalized_scores(torch.zeros(4), group_size=3)
    with pytest.raises(CaiRayError, match="group_size >= 2"):
        rm.leave_one_out_scores(torch.zeros(4), group_size=1)
    close(rm.group_normalized_scores(torch.tensor([5.0, 7.0]), group_size=1), [0.0, 0.0])


def test_advantage_registry_broadcasts_outcome_to_tokens():
    assert set(rm.ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo"}
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    inputs = rm.AdvantageInputs(mask=mask, scores=torch.tensor([1.0, 3.0]), group_size=2)
    adv, ret = rm.ADVANTAGE_ESTIMATORS["rloo"](inputs)
    close(adv, [[-2.0, -2.0, 0.0], [2.0, 2.0, 2.0]])
    assert torch.equal(adv, ret)
    with pytest.raises(CaiRayError, match="needs values"):
        rm.ADVANTAGE_ESTIMATORS["gae"](rm.AdvantageInputs(mask=mask, token_rewards=mask))
    gae = rm.pick(rm.ADVANTAGE_ESTIMATORS, "gae", what="advantage estimator")
    adv, _ = gae(rm.AdvantageInputs(mask=mask, token_rewards=mask, values=0 * mask, lam=1.0))
    close(adv, [[2.0, 1.0, 0.0], [3.0, 2.0, 1.0]])


# ---------------------------------------------------------------- PPO


def test_ppo_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    out = rm.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # token 0: -min(1.5, 1.2) = -1.2 (clipped); token 1: -min(0.5, 0.8) = -0.5;
    # token 2: -min(-2.2, -2.2) = 2.2.
    close(out.loss, (-1.2 - 0.5 + 2.2) / 3)
    close(out.clip_fraction, 1 / 3)
    # approx KL(old || new) by k3 with r = new/old: r - 1 - log r.
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)]
    close(out.approx_kl, sum(k3) / 3)


def test_ppo_gradient_sign():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logp.detach().clone()
    out = rm.ppo_policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    out.loss.backward()
    # Raising a positive-advantage token's log-prob lowers the loss; the opposite for negative.
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]


def test_ppo_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    loss, frac = rm.ppo_value_loss(values, old, returns, torch.ones(1, 2), clip_eps=0.2)
    # token 0: max((1-1)^2, (0.2-1)^2) = 0.64; token 1: max(0.81, 0.81) = 0.81.
    close(loss, 0.5 * (0.64 + 0.81) / 2)
    close(frac, 0.5)


# ---------------------------------------------------------------- DPO


def test_dpo_loss_zero_margin_is_log2_and_by_hand():
    z = torch.zeros(3)
    out = rm.dpo_loss(z, z, z, z, beta=0.1)
    close(out.loss, math.log(2.0))
    close(out.margin, [0.0, 0.0, 0.0])
    c, r = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.0])
    out = rm.dpo_loss(c, r, rc, rr, beta=0.5, label_smoothing=0.1)
    h = 0.5 * ((-1 + 2) - (-3 + 2))  # = 1
    expected = -0.9 * math.log(1 / (1 + math.exp(-h))) - 0.1 * math.log(1 / (1 + math.exp(h)))
    close(out.loss, expected)
    close(out.chosen_rewards, [0.5])
    close(out.rejected_rewards, [-0.5])
    close(out.margin, [1.0])
    with pytest.raises(CaiRayError, match="label_smoothing"):
        rm.dpo_loss(c, r, rc, rr, label_smoothing=0.5)


# ---------------------------------------------------------------- direct RLAIF, monitoring


def test_rlaif_reward_and_expected_score():
    close(rm.rlaif_reward(torch.tensor([1.0, 10.0, 5.5, 4.0])), [-1, 1, 0, (4 - 1) / 9 * 2 - 1])
    with pytest.raises(CaiRayError, match=r"\[1.0, 10.0\]"):
        rm.rlaif_reward(torch.tensor([11.0]))
    # Log-probs of options "1" and "10" renormalised: p = (0.25, 0.75) -> 0.25 + 7.5 = 7.75.
    option_logprobs = torch.log(torch.tensor([[0.1, 0.3]]))
    close(rm.expected_score(option_logprobs, torch.tensor([1.0, 10.0])), [7.75])


def test_phrase_rate():
    responses = ["I\u2019m sorry, I can't help.", "Sure! Here it is.", "AS AN AI model...", ""]
    assert rm.phrase_rate(responses) == 0.5
    assert rm.phrase_rate(responses, ["here it is"]) == 0.25
    assert rm.phrase_rate([], ["x"]) == 0.0
