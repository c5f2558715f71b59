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


@pytest.mark.parametrize("share_prefix", [False, True])
def test_the_prompt_window_changes_no_loss_nor_gradient(policy, share_prefix):
    """Logits only from the first response position on (`logits_to_keep`), and with
    `share_prefix` a group's prompt run once: the same loss, metrics and gradient as the full
    (B, T-1, V) logits of separate rows."""
    from cai_ray.rl import algorithms

    obj = PolicyObjective(pad_id=0, entropy_coef=0.01, share_prefix=share_prefix)
    group = [1, 50, 60, 70]  # a GRPO group: one prompt, three samples (the third ends at once)
    rows = [{"input_ids": [*group, 80, 2], "prompt_len": 4}, {**ROWS[0]},
            {"input_ids": [*group, 81, 82, 83], "prompt_len": 4},
            {"input_ids": [*group, 2], "prompt_len": 4}]  # fmt: skip
    old = obj.infer(policy, obj.collate(rows))
    rows = [
        {**r, "advantages": [0.5 * (i + 1)] * len(o), "old_logprobs": [x - 0.1 for x in o],
         "ref_logprobs": [x + 0.2 for x in o], "kl_coef": 0.5}
        for i, (r, o) in enumerate(zip(rows, old, strict=True))
    ]  # fmt: skip
    batch = obj.collate(rows)
    if share_prefix:  # two rows: the group's prompt once, and ROWS[0]
        assert batch["input_ids"].shape[0] == 2 and obj.tokens(batch) == 6 + 5 + 7 + 5
    loss, metrics = obj.loss(policy, batch)
    loss.backward()
    grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    # the same loss on every position's logits of separate rows
    batch = PolicyObjective(pad_id=0, share_prefix=False).collate(rows)
    assert batch["response_mask"][:, :2].sum() == 0  # a window of 2 prompt positions to skip
    mask = batch["response_mask"]
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    logp = algorithms.token_logprobs(logits, batch["input_ids"][:, 1:])
    separate = [row[m > 0].tolist() for row, m in zip(logp.detach(), mask, strict=True)]
    for got, want in zip(old, separate, strict=True):  # infer: the same log-probs either way
        assert got == pytest.approx(want, abs=1e-5)
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


def test_dpo_with_a_shared_prompt_has_the_separate_rows_loss_and_gradient(policy):
    rows = [{"chosen_ids": [1, 50, 60, 70, 2], "rejected_ids": [1, 50, 60, 80, 81, 2],
             "chosen_prompt_len": 3, "rejected_prompt_len": 3, "ref_chosen": -9.0,
             "ref_rejected": -7.5},
            {"chosen_ids": [1, 90, 91], "rejected_ids": [1, 90, 92, 93],
             "chosen_prompt_len": 2, "rejected_prompt_len": 2, "ref_chosen": -4.0,
             "ref_rejected": -6.0}]  # fmt: skip
    out = {}
    for share in (True, False):
        obj = DPOObjective(pad_id=0, beta=0.1, share_prefix=share)
        batch = obj.collate(rows)
        policy.zero_grad()
        loss, metrics = obj.loss(policy, batch)
        loss.backward()
        grads = [p.grad.clone() for p in policy.parameters()]
        out[share] = float(loss), metrics["margin"], grads, obj.infer(policy, batch)
        policy.zero_grad()
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-4, abs=1e-6)
    assert out[True][3] == pytest.approx(out[False][3], abs=1e-5)  # summed log-probs
    for got, want in zip(out[True][2], out[False][2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
