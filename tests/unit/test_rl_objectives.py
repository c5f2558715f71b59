"""RL objectives on a tiny model: token alignment, PPO/KL/value/DPO losses at known points."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from cai_ray.rl.objectives import (  # noqa: E402
    DPOObjective,
    PolicyObjective,
    ValueObjective,
    collate_responses,
)

torch.set_num_threads(1)
ROWS = [
    {"input_ids": [1, 50, 60, 70, 2], "prompt_len": 3},
    {"input_ids": [1, 80, 90], "prompt_len": 2},
]


def test_response_tokens_sit_at_their_target_positions():
    rows = [{**ROWS[0], "advantages": [0.5, -0.5]}, {**ROWS[1], "advantages": [2.0]}]
    batch = collate_responses(rows, pad_id=0, fields=["advantages"])
    assert batch["input_ids"].tolist() == [[1, 50, 60, 70, 2], [1, 80, 90, 0, 0]]
    # logits at t predict token t + 1: row 0's response (70, 2) is predicted at 2 and 3
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert batch["advantages"].tolist() == [[0, 0, 0.5, -0.5], [0, 2.0, 0, 0]]
    with pytest.raises(ValueError, match="advantages"):
        collate_responses([{**ROWS[1], "advantages": [1.0, 2.0]}], pad_id=0, fields=["advantages"])


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return PolicyObjective(pad_id=0).load_model(tiny_model_dir).eval()


def test_infer_gives_each_response_tokens_logprob(policy):
    obj = PolicyObjective(pad_id=0)
    got = obj.infer(policy, obj.collate(ROWS))
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([ROWS[0]["input_ids"]])).logits[0]
    lp = logits.log_softmax(-1)
    assert [len(g) for g in got] == [2, 1]
    assert got[0] == pytest.approx([float(lp[2, 70]), float(lp[3, 2])], abs=1e-5)


def test_ppo_loss_at_the_sampling_policy_is_minus_the_mean_advantage(policy):
    obj = PolicyObjective(pad_id=0)
    old = obj.infer(policy, obj.collate(ROWS))
    rows = [
        {**r, "advantages": [1.0] * len(o), "old_logprobs": o, "ref_logprobs": o, "kl_coef": 0.0}
        for r, o in zip(ROWS, old, strict=True)
    ]
    batch = obj.collate(rows)
    loss, metrics = obj.loss(policy, batch)
    units = obj.loss_units(batch)
    assert units == 3
    assert float(loss.detach()) == pytest.approx(-3.0, abs=1e-4)  # ratio 1: -A per token, summed
    assert metrics["clip_fraction"] == 0.0 and metrics["kl_loss_term"] == pytest.approx(0.0)
    # a KL term to a different reference adds beta * k3 > 0
    shifted = [{**r, "ref_logprobs": [x - 1.0 for x in r["old_logprobs"]], "kl_coef": 0.5}
               for r in rows]  # fmt: skip
    loss_kl, m2 = obj.loss(policy, obj.collate(shifted))
    k3 = math.exp(-1.0) - 1.0 + 1.0  # log(p / ref) = +1 per token: exp(-1) - 1 + 1
    assert m2["kl_loss_term"] == pytest.approx(3 * k3, rel=1e-4)
    assert float(loss_kl.detach()) == pytest.approx(-3.0 + 0.5 * 3 * k3, rel=1e-4)
    loss_kl.backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    policy.zero_grad()


def test_critic_starts_from_the_pm_head(tiny_reward_model_dir):
    from transformers import AutoModelForSequenceClassification

    critic = ValueObjective(pad_id=0).load_model(tiny_reward_model_dir).eval()
    pm = AutoModelForSequenceClassification.from_pretrained(str(tiny_reward_model_dir))
    assert torch.equal(critic.head.weight, pm.score.weight)
    obj = ValueObjective(pad_id=0)
    rows = [{**r, "returns": [0.0] * (len(r["input_ids"]) - r["prompt_len"])} for r in ROWS]
    values = obj.infer(critic, obj.collate(rows))
    assert [len(v) for v in values] == [2, 1]
    old = [{**r, "old_values": v} for r, v in zip(rows, values, strict=True)]
    loss, _ = obj.loss(critic, obj.collate(old))
    want = 0.5 * sum(x * x for v in values for x in v)  # 0.5 * (V - 0)^2 summed
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)


def test_dpo_loss_is_log2_per_pair_when_the_policy_is_the_reference(policy):
    obj = DPOObjective(pad_id=0, beta=0.1)
    seqs = obj.collate(
        [
            {
                "chosen_ids": ROWS[0]["input_ids"],
                "chosen_prompt_len": 3,
                "rejected_ids": ROWS[1]["input_ids"],
                "rejected_prompt_len": 2,
                "ref_chosen": 0.0,
                "ref_rejected": 0.0,
            }
        ]
    )
    chosen, rejected = obj.infer(policy, seqs)
    batch = obj.collate(
        [
            {
                "chosen_ids": ROWS[0]["input_ids"],
                "chosen_prompt_len": 3,
                "rejected_ids": ROWS[1]["input_ids"],
                "rejected_prompt_len": 2,
                "ref_chosen": chosen,
                "ref_rejected": rejected,
            }
        ]
    )
    loss, metrics = obj.loss(policy, batch)
    assert obj.loss_units(batch) == 1
    assert float(loss) == pytest.approx(math.log(2.0), abs=1e-5)
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-6)


def test_the_prompt_window_changes_no_loss_nor_gradient(policy):
    """Logits only from the first response position on (`logits_to_keep`): the same loss,
    metrics and gradient as the full (B, T-1, V) logits."""
    from cai_ray.rl import algorithms

    obj = PolicyObjective(pad_id=0, entropy_coef=0.01)
    rows = [{"input_ids": [1, 50, 60, 70, 80, 2], "prompt_len": 4}, {**ROWS[0]}]
    old = obj.infer(policy, obj.collate(rows))
    rows = [
        {**r, "advantages": [0.5 * (i + 1)] * len(o), "old_logprobs": [x - 0.1 for x in o],
         "ref_logprobs": [x + 0.2 for x in o], "kl_coef": 0.5}
        for i, (r, o) in enumerate(zip(rows, old, strict=True))
    ]  # fmt: skip
    batch = obj.collate(rows)
    assert batch["response_mask"][:, :2].sum() == 0  # a window of 2 prompt positions to skip
    loss, metrics = obj.loss(policy, batch)
    loss.backward()
    grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    # the same loss on every position's logits
    mask = batch["response_mask"]
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    logp = algorithms.token_logprobs(logits, batch["input_ids"][:, 1:])
    pl = algorithms.ppo_policy_loss(logp, batch["old_logprobs"], batch["advantages"], mask)
    kl = algorithms.kl_k3(logp, batch["ref_logprobs"]) * mask
    entropy = algorithms.masked_sum(algorithms.token_entropy(logits), mask)
    full = pl.loss * mask.sum() + (0.5 * kl).sum() - 0.01 * entropy
    full.backward()
    assert float(loss.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    assert metrics["entropy"] == pytest.approx(float(entropy), rel=1e-5)
    assert metrics["kl_loss_term"] == pytest.approx(float(kl.sum()), rel=1e-5)
    for got, want in zip(grads, (p.grad for p in policy.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    policy.zero_grad()
