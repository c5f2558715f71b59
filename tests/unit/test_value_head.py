"""The scalar-head model over any causal LM (issue 14): a PM and a critic on tiny models over the
real Qwen 3 and Gemma 3 tokenizers, and on a real Gemma 3 architecture (`tiny_gemma3_dir`,
tests/conftest.py), for which transformers has no *ForTokenClassification: the old critic could
not load it."""

from __future__ import annotations

import random
import shutil

import pytest

torch = pytest.importorskip("torch")

from cai_ray.errors import ModelError  # noqa: E402
from cai_ray.feedback.pm_objective import PreferenceObjective, pm_scores  # noqa: E402
from cai_ray.rl.objectives import ValueObjective  # noqa: E402

pytestmark = pytest.mark.shared_data
torch.set_num_threads(1)  # tiny tensors: more threads only add contention on a busy machine
WORDS = ["the", "a", "cat", "dog", "river", "stone", "blue", "green", "runs", "tree", "house"]


@pytest.fixture(params=["qwen3", "gemma3", "gemma3-native"])
def causal_dir(request, real_tiny_models, tiny_gemma3_dir):
    """Tiny causal LMs: Llama bodies over both real vocabularies, and a real Gemma 3 body."""
    return tiny_gemma3_dir if request.param == "gemma3-native" else real_tiny_models[request.param]


def _pairs(tokenizer, n: int, seed: int) -> list[dict]:
    """Separable pairs: the chosen reply ends in " thanks", the rejected one never does."""
    from cai_ray.data.tokens import encode
    from cai_ray.feedback.reward import pm_text

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=3))}]
        good = " ".join(rng.choices(WORDS, k=3)) + " thanks"
        bad = " ".join(rng.choices(WORDS, k=4))
        texts = [pm_text(messages, r) for r in (good, bad)]
        ids = [encode(tokenizer, t) for t in texts]
        rows.append({"ids_a": ids[0], "ids_b": ids[1], "label": 1.0, "texts": texts})
    return rows


def test_old_critic_class_is_missing_for_gemma3_and_the_value_head_loads(tiny_gemma3_dir):
    from transformers import AutoModelForTokenClassification

    from cai_ray.models import check_model_dir

    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForTokenClassification.from_pretrained(str(tiny_gemma3_dir))  # the old critic
    with pytest.raises(ModelError, match="expected a preference model"):
        check_model_dir(tiny_gemma3_dir, head="classification")  # the old PM start's check
    for obj in (ValueObjective(pad_id=0), PreferenceObjective(pad_id=0)):
        obj.check_model(tiny_gemma3_dir)
        model = obj.load_model(tiny_gemma3_dir)
        assert type(model.backbone).__name__ == "Gemma3TextModel"
        assert not any("lm_head" in k for k in model.state_dict())  # the LM head is dropped


def test_pm_learns_saves_and_scores_the_same_through_reward_scorer(causal_dir, tmp_path):
    from cai_ray.feedback.reward import RewardScorer
    from cai_ray.models import check_model_dir, load_tokenizer
    from cai_ray.models.value_head import scalar_kind

    torch.manual_seed(0)
    tok = load_tokenizer(causal_dir)
    obj = PreferenceObjective(pad_id=tok.pad_token_id)
    model = obj.load_model(causal_dir)
    assert model.kind == "causal_lm"
    rows = _pairs(tok, 64, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(20):
        batch = obj.collate(rows[(step * 8) % 64 :][:8])
        loss, _ = obj.loss(model, batch)
        opt.zero_grad()
        (loss / 8).backward()
        opt.step()
        losses.append(float(loss.detach()) / 8)
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses  # BT loss starts near log 2
    model.eval()
    out = tmp_path / "pm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert scalar_kind(out) == "value_head" and check_model_dir(out, head="classification")
    with pytest.raises(ModelError, match="scalar-head model"):
        check_model_dir(out, head="causal")  # a PM is no policy
    held = _pairs(tok, 6, seed=2)
    with torch.no_grad():
        batch = obj.collate(held)
        want = pm_scores(model, batch).tolist()
    scorer = RewardScorer(out, device="cpu", threads=1, batch_size=4)
    with torch.no_grad():
        got = pm_scores(scorer.model, batch).tolist()
    assert got == want  # the same weights and head after the round trip, bit for bit
    texts = [h["texts"][0] for h in held] + [h["texts"][1] for h in held]
    held_ids = [h["ids_a"] for h in held] + [h["ids_b"] for h in held]
    assert scorer.score(texts) == pytest.approx(want, abs=1e-5)  # its own encoding and batches
    assert scorer.count_tokens(texts) == [len(ids) for ids in held_ids]  # one BOS, as trained
    a, b = got[:6], got[6:]
    assert sum(x > y for x, y in zip(a, b, strict=True)) >= 5  # it learned the marker
    # one conversation's answers in a row (as the RL loop scores a group) share a row
    from cai_ray.feedback.reward import pm_text

    messages = [{"role": "user", "content": "the cat runs to the river and the blue tree"}]
    group = [pm_text(messages, r) for r in ("a dog", "the stone thanks", "green", "a b c d")]
    plain = RewardScorer(out, device="cpu", threads=1, batch_size=4, share_prefix=False)
    assert scorer.score(group) == pytest.approx(plain.score(group), abs=1e-5)
    assert scorer.score(texts) == pytest.approx(plain.score(texts), abs=1e-5)


def test_shared_prefix_pm_batch_gives_the_separate_rows_loss_and_gradients(causal_dir):
    """Real pm_text pairs share their conversation prefix: packed once per pair, the loss and
    every gradient are those of 2B separate rows, and the forward runs fewer tokens."""
    from cai_ray.models import load_tokenizer

    tok = load_tokenizer(causal_dir)
    rows = _pairs(tok, 4, seed=3)
    model = PreferenceObjective(pad_id=0).load_model(causal_dir)
    out = {}
    for share in (True, False):
        obj = PreferenceObjective(pad_id=tok.pad_token_id or 0, share_prefix=share)
        batch = obj.collate(rows)
        model.zero_grad()
        loss, metrics = obj.loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[share] = (float(loss), metrics, grads, obj.tokens(batch), batch["input_ids"].numel())
    shared, separate = out[True], out[False]
    assert shared[0] == pytest.approx(separate[0], rel=1e-5)
    assert shared[1]["accuracy"] == separate[1]["accuracy"]
    assert shared[2].keys() == separate[2].keys() and len(shared[2]) > 0
    for name, g in shared[2].items():
        # float rounding, relative to the tensor (the head's bias gradient is ~0: A and B cancel)
        scale = float(separate[2][name].abs().max())
        torch.testing.assert_close(g, separate[2][name], rtol=1e-3, atol=max(1e-4 * scale, 1e-6))
    assert shared[3] == separate[3]  # the same pairs' tokens either way
    assert shared[4] < separate[4]  # the prefix ran once


def test_critic_objective_on_a_gemma_style_model(real_tiny_models, tiny_gemma3_dir):
    rows = [
        {"input_ids": [2, 50, 60, 70, 1], "prompt_len": 3, "returns": [0.5, -0.5]},
        {"input_ids": [2, 80, 90], "prompt_len": 2, "returns": [1.0]},
    ]
    for model_dir in (real_tiny_models["gemma3"], tiny_gemma3_dir):
        torch.manual_seed(0)
        obj = ValueObjective(pad_id=0)
        critic = obj.load_model(model_dir)
        values = obj.infer(critic.eval(), obj.collate(rows))
        assert [len(v) for v in values] == [2, 1]
        critic.train()
        batch = obj.collate([{**r, "old_values": v} for r, v in zip(rows, values, strict=True)])
        loss, metrics = obj.loss(critic, batch)
        loss.backward()
        assert float(critic.head.weight.grad.abs().sum()) > 0
        assert any(
            p.grad is not None and float(p.grad.abs().sum()) > 0
            for p in critic.backbone.parameters()
        )
        assert set(metrics) == {"value_clip_fraction"}


def test_critic_from_a_saved_pm_keeps_its_head(real_tiny_models, tmp_path):
    from cai_ray.models import load_tokenizer
    from cai_ray.models.value_head import load_scalar_model

    src = real_tiny_models["qwen3"]
    torch.manual_seed(0)
    pm = load_scalar_model(src, new_head=True)
    with torch.no_grad():
        pm.head.weight.add_(1.0)  # as if trained
    pm.save_pretrained(tmp_path / "pm")
    load_tokenizer(src).save_pretrained(tmp_path / "pm")
    critic = ValueObjective(pad_id=0).load_model(tmp_path / "pm")
    assert critic.kind == "value_head"
    assert torch.equal(critic.head.weight, pm.head.weight)
    assert torch.equal(critic.head.bias, pm.head.bias)


def test_saved_dir_is_the_causal_lms_own_checkpoint_without_its_lm_head(tiny_gemma3_dir, tmp_path):
    """The backbone reloads as the causal LM (a tied LM head comes back from the embeddings),
    and a state dict handed in (ZeRO-3's gathered weights) is what gets written."""
    from transformers import AutoModelForCausalLM

    from cai_ray.models.value_head import load_scalar_model

    torch.manual_seed(0)
    model = load_scalar_model(tiny_gemma3_dir, new_head=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"] += 2.0
    model.save_pretrained(tmp_path / "pm", state_dict=state)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_gemma3_dir / f, tmp_path / "pm" / f)
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pm"))
    assert type(lm).__name__ == "Gemma3ForCausalLM"
    original = AutoModelForCausalLM.from_pretrained(str(tiny_gemma3_dir))
    for (name, p), (_, q) in zip(lm.named_parameters(), original.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    again = load_scalar_model(tmp_path / "pm")
    assert torch.equal(again.head.weight, state["head.weight"])


def test_a_causal_lm_is_no_preference_model(tiny_model_dir):
    from cai_ray.models.value_head import load_scalar_model

    with pytest.raises(ModelError, match="not a preference model"):
        load_scalar_model(tiny_model_dir)
