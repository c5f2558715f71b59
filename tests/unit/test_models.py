"""Tiny presets, the local tokenizer and model directories (cai_ray.models)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cai_ray.config import ModelConfig
from cai_ray.errors import ModelError
from cai_ray.models import (
    MARKER_TOKENS,
    PRESETS,
    build_tokenizer,
    check_model_dir,
    count_parameters,
    ensure_model,
    init_model,
    load_tokenizer,
    model_id,
)
from cai_ray.models import store as store_module
from cai_ray.models import tokenizer as tokenizer_module


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# -- presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("tiny-1m", 0.7e6, 1.3e6), ("tiny-20m", 15e6, 25e6), ("tiny-100m", 80e6, 120e6)],
)
def test_preset_parameter_counts(name, low, high):
    from transformers import AutoModelForCausalLM

    cfg = PRESETS[name].llama_config(vocab_size=4096, special_ids={}, head="causal")
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = AutoModelForCausalLM.from_config(cfg)
    assert low <= sum(p.numel() for p in model.parameters()) <= high
    assert cfg.max_position_embeddings >= 1024
    assert cfg.head_dim in (32, 64)


def test_unknown_preset_names_the_closest():
    with pytest.raises(ModelError, match="unknown model preset 'tiny-2m'") as info:
        init_model("tiny-2m", "/nonexistent/never-written")
    assert "tiny-20m" in info.value.hint


# -- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_build_is_deterministic(tokenizer):
    tokenizer_module._train.cache_clear()  # train again, not a cached copy
    again = build_tokenizer()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert len(tokenizer) == 4096


@pytest.mark.parametrize("marker", MARKER_TOKENS)
def test_markers_are_single_tokens(tokenizer, marker):
    ids = tokenizer("The answer is:" + marker + " ok", add_special_tokens=False)["input_ids"]
    alone = tokenizer(marker, add_special_tokens=False)["input_ids"]
    assert len(alone) == 1
    assert alone[0] in ids


def test_options_a_and_b_differ_and_follow_the_prefix(tokenizer):
    prefix = tokenizer("The answer is:")["input_ids"]
    a = tokenizer("The answer is: (A)")["input_ids"]
    b = tokenizer("The answer is: (B)")["input_ids"]
    assert a[: len(prefix)] == prefix and b[: len(prefix)] == prefix
    assert len(a) == len(b) == len(prefix) + 1 and a[-1] != b[-1]


@pytest.mark.parametrize(
    "text",
    [
        "Zoë, Łukasz and José paid 5 € — « bonjour »",
        "日本語のテキスト and русский текст and العربية",
        "emoji 🙂🚀 and tabs\tand\n\n\nnewlines   spaced  ",
        "\n\nHuman: hi (A)\n\nAssistant: (B) done<|not a token|>",
        "",
    ],
)
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_and_single_bos(tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_ids_to_tokens(ids[1]) == "<|im_start|>"
    no_cue = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_cue.endswith("assistant\n")


# -- model directories ------------------------------------------------------------------------


def test_saved_directory_loads_with_auto_classes(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "\n\nHuman: hello (A)\n\nAssistant:"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert model.config.vocab_size == len(tok)
    assert count_parameters(tiny_model_dir) == sum(p.numel() for p in model.parameters())
    gen_cfg = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen_cfg["eos_token_id"]
    assert load_tokenizer(tiny_model_dir).padding_side == "left"


def test_classification_head_scores_last_non_pad_token(tiny_reward_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    tok = load_tokenizer(tiny_reward_model_dir)
    texts = ["short", "a much longer response about baking bread at home"]
    with torch.no_grad():
        alone = [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
        for side in ("left", "right"):
            tok.padding_side = side
            batch = model(**tok(texts, return_tensors="pt", padding=True)).logits[:, 0]
            assert batch.tolist() == pytest.approx(alone, abs=1e-5)
    check_model_dir(tiny_reward_model_dir, head="classification")
    with pytest.raises(ModelError, match="expected a causal language model"):
        check_model_dir(tiny_reward_model_dir, head="causal")


def test_init_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty") as info:
        init_model("tiny-1m", tmp_path)
    assert "--force" in info.value.hint
    assert (tmp_path / "keep.txt").exists()


def test_seed_changes_weights_and_model_id(tmp_path, tiny_model_dir):
    same = init_model("tiny-1m", tmp_path / "a", seed=0)
    other = init_model("tiny-1m", tmp_path / "b", seed=1)
    digest = model_id(tiny_model_dir).split("@")[1]
    assert model_id(same) == f"a@{digest}"
    assert model_id(other).split("@")[1] != digest
    assert model_id(tiny_model_dir) == model_id(tiny_model_dir)  # stable


def _broken(tmp_path, tiny_model_dir, remove: str):
    copy = tmp_path / f"no-{remove}"
    shutil.copytree(tiny_model_dir, copy)
    (copy / remove).unlink()
    return copy


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp, good: tmp / "absent", "does not exist"),
        (lambda tmp, good: good / "config.json", "not a directory"),
        (lambda tmp, good: tmp, "no config.json"),
        (lambda tmp, good: _broken(tmp, good, "model.safetensors"), "no model weights"),
        (lambda tmp, good: _broken(tmp, good, "tokenizer.json"), "no tokenizer"),
    ],
)
def test_check_model_dir_names_the_problem(tmp_path, tiny_model_dir, make, message):
    path = make(tmp_path, tiny_model_dir)
    with pytest.raises(ModelError, match=message) as info:
        check_model_dir(path)
    assert info.value.where and info.value.hint


def test_check_model_dir_rejects_garbage_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"unreadable config\.json"):
        check_model_dir(tmp_path)


def test_ensure_model_builds_a_preset_once(tmp_path):
    cfg = ModelConfig(preset="tiny-1m", seed=3)
    path = ensure_model(cfg, run_dir=tmp_path)
    assert path == tmp_path / "models" / "tiny-1m-causal-s3"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_model(cfg, run_dir=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-1m-causal-s3"]


def test_ensure_model_leaves_no_half_model_when_the_build_dies(tmp_path, monkeypatch):
    def dies(preset, out_dir, **kwargs):
        (out_dir / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "init_model", dies)
    with pytest.raises(KeyboardInterrupt):
        ensure_model(ModelConfig(preset="tiny-1m"), run_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_ensure_model_checks_a_path(tmp_path, tiny_model_dir):
    assert ensure_model(ModelConfig(path=str(tiny_model_dir)), run_dir=tmp_path) == tiny_model_dir
    with pytest.raises(ModelError, match="does not exist"):
        ensure_model(ModelConfig(path=str(tmp_path / "nope")), run_dir=tmp_path)
    with pytest.raises(ModelError, match="unknown model preset"):
        ensure_model(ModelConfig(preset="huge-7b"), run_dir=tmp_path)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_disable_dropout_makes_training_forwards_deterministic(family):
    """Llama's attention dropout is a float its attention passes to SDPA, GPT-2's are
    nn.Dropout modules: both are zeroed, so two forwards in train mode agree."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from cai_ray.models.loading import disable_dropout

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, attention_dropout=0.5))  # fmt: skip
    else:
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.5, resid_pdrop=0.5,
            embd_pdrop=0.5))  # fmt: skip
    model.train()
    ids = torch.randint(0, 64, (2, 16))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is on
    assert disable_dropout(model) >= 2
    assert torch.equal(model(ids).logits, model(ids).logits)
    assert disable_dropout(model) == 0  # nothing left to zero
