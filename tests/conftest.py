"""Shared fixtures: tiny random-weight models built once per test session, over the project's
tokenizer and over the real Qwen 3 and Gemma 3 tokenizers (../shared/data/tokenizers)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZERS = ROOT.parent / "shared" / "data" / "tokenizers"
REAL_TOKENIZERS = ("qwen3", "gemma3")


def _unpack_tokenizer(src: Path, dest: Path) -> Path:
    """The shared folder keeps tokenizer files gzipped: decompress them into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".gz":
            with gzip.open(f, "rb") as fin, (dest / f.stem).open("wb") as fout:
                shutil.copyfileobj(fin, fout)
        elif f.name.endswith(".json"):
            shutil.copy(f, dest / f.name)
    return dest


@pytest.fixture(scope="session")
def real_tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """{name: tokenizer directory} for Qwen 3 and Gemma 3; skips where ../shared/data is absent."""
    if not all((SHARED_TOKENIZERS / n).is_dir() for n in REAL_TOKENIZERS):
        pytest.skip("../shared/data/tokenizers is absent")
    base = tmp_path_factory.mktemp("tokenizers")
    return {n: _unpack_tokenizer(SHARED_TOKENIZERS / n, base / n) for n in REAL_TOKENIZERS}


@pytest.fixture(scope="session")
def real_tiny_models(real_tokenizer_dirs, tmp_path_factory) -> dict[str, Path]:
    """{name: tiny-1m causal LM over that real tokenizer} (random weights, tied embeddings)."""
    from cai_ray.models import init_model

    base = tmp_path_factory.mktemp("real-tiny")
    return {
        n: init_model("tiny-1m", base / n, tokenizer=tok) for n, tok in real_tokenizer_dirs.items()
    }


@pytest.fixture(params=REAL_TOKENIZERS)
def real_tiny_model(request, real_tiny_models) -> Path:
    """Each real-tokenizer tiny model in turn (a test using it runs once per tokenizer)."""
    return real_tiny_models[request.param]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny-1m causal LM directory (random weights, seed 0), built once per session."""
    from cai_ray.models import init_model

    return init_model("tiny-1m", tmp_path_factory.mktemp("models") / "tiny-1m-causal")


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory):
    """A tiny-1m sequence-classification (num_labels=1) directory, built once per session."""
    from cai_ray.models import init_model

    return init_model(
        "tiny-1m",
        tmp_path_factory.mktemp("models") / "tiny-1m-classification",
        head="classification",
    )


@pytest.fixture(scope="session")
def tiny_gemma3_dir(real_tokenizer_dirs, tmp_path_factory) -> Path:
    """A tiny random `Gemma3ForCausalLM` (a real `Gemma3TextConfig`, 8M parameters, nearly all
    embeddings) with the Gemma 3 tokenizer: transformers has no *ForTokenClassification for it,
    which `real_tiny_models["gemma3"]` (a Llama body) cannot show (issue 14)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from cai_ray.models import load_tokenizer

    tok = load_tokenizer(real_tokenizer_dirs["gemma3"])
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gemma3-native") / "model"
    Gemma3ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
