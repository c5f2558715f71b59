"""GGUF import (`cai_ray.models.gguf`): its errors, and a round trip through a tiny Llama GGUF
written here with the `gguf` package (Q8_0 weights, a byte-level vocabulary, a chat template)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai_ray.cli import main
from cai_ray.config import ModelConfig
from cai_ray.errors import ModelError
from cai_ray.models import ensure_model
from cai_ray.models.gguf import ensure_gguf_model, import_gguf

gguf = pytest.importorskip("gguf")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["T h", "Th e", "Ġ c", "Ġc a", "Ġca p"]


def write_tiny_gguf(path: Path, *, arch: str = "llama") -> Path:
    """A 2-layer Llama (hidden 64, GQA 4/2 heads) as llama.cpp lays it out: its tensor names,
    Q/K rows in GGUF order, 2-D weights quantised to Q8_0, embeddings tied (no output.weight)."""
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # `</s>` as ordinary text, as in Gemma's vocabulary: it must not become a stop token.
    merged = ["Th", "The", "Ġc", "Ġca", "Ġcap", "</s>"]
    tokens = SPECIALS + list(bytes_to_unicode().values()) + merged
    hidden, ff, heads, kv, hd = 64, 128, 4, 2, 16
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(2)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        if len(shape) == 1:  # norms stay float32, as llama.cpp keeps them
            w.add_tensor(name, np.ones(shape, np.float32))
            return
        q8 = gguf.quants.quantize(
            (rng.standard_normal(shape) * 0.1).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
        )
        w.add_tensor(name, q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    tensor("token_embd.weight", len(tokens), hidden)  # (V, C)
    for i in range(2):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", heads * hd, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv * hd, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv * hd, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, heads * hd)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ff)
    tensor("output_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def imported(tiny_gguf, tmp_path_factory) -> Path:
    return import_gguf(tiny_gguf, tmp_path_factory.mktemp("imported") / "tiny", log=None)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as err:
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    assert "nope.gguf" in str(err.value)


def test_not_a_gguf_file(tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("this is not a model\n")
    with pytest.raises(ModelError, match="not a GGUF file") as err:
        import_gguf(text, tmp_path / "out")
    assert err.value.where == str(text)
    assert not (tmp_path / "out").exists()


def test_output_dir_not_empty(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty") as err:
        import_gguf(tiny_gguf, out)
    assert "--force" in err.value.hint
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_gguf_package(tmp_path, monkeypatch):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(ModelError, match="`gguf`") as err:
        import_gguf(fake, tmp_path / "out")
    assert err.value.hint == "pip install gguf accelerate"


def test_unsupported_architecture_is_named(tmp_path):
    src = write_tiny_gguf(tmp_path / "rwkv.gguf", arch="rwkv7")
    with pytest.raises(ModelError, match="architecture 'rwkv7'") as err:
        import_gguf(src, tmp_path / "out", log=None)
    assert "llama" in err.value.hint and "gemma3" in err.value.hint  # the supported ones
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["rwkv.gguf"]  # no temp dir left behind


def test_round_trip_matches_the_gguf_model(tiny_gguf, imported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    config = json.loads((imported / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((imported / "generation_config.json").read_text())["eos_token_id"] == [1, 4]
    ref = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent),
        gguf_file=tiny_gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    ref_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(imported)
    tok = AutoTokenizer.from_pretrained(imported)
    assert not getattr(model, "is_quantized", False)
    text = "The cap of France<|im_end|>"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    chat = [{"role": "user", "content": "The cap?"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_force_replaces_and_a_failed_import_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    import cai_ray.models.gguf as gguf_module

    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    import_gguf(tiny_gguf, out, overwrite=True, log=None)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()

    def dies(src, tmp, **kwargs):
        (tmp / "config.json").write_text("{}")  # half-written, then killed
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_module, "_convert", dies)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(tiny_gguf, tmp_path / "never", log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_ensure_converts_once_and_reuses(tiny_gguf, tmp_path, capsys):
    cfg = ModelConfig(gguf=str(tiny_gguf))
    first = ensure_model(cfg, run_dir=tmp_path)
    assert "imported tiny-llama.gguf" in capsys.readouterr().err
    assert first.parent == tmp_path / "models" and first.name.startswith("tiny-llama-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_model(cfg, run_dir=tmp_path) == first
    assert capsys.readouterr().err == ""  # not imported again
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ModelError, match="preference model"):
        ensure_gguf_model(tiny_gguf, run_dir=tmp_path, head="classification")


def test_cli_from_gguf(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["init-model", "--from-gguf", str(tiny_gguf), str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "LlamaForCausalLM" in text and "vocab size 267" in text
    assert main(["init-model", "--from-gguf", str(tiny_gguf), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "exactly one of --preset NAME or --from-gguf FILE"),
        (["--preset", "tiny-1m", "--from-gguf", "x.gguf"], "exactly one of"),
        (["--from-gguf", "x.gguf", "--tokenizer", "tok"], "--tokenizer goes with --preset"),
        (["--from-gguf", "/no/such.gguf"], "GGUF file does not exist"),
    ],
)
def test_cli_source_errors(argv, message, tmp_path, capsys):
    assert main(["init-model", *argv, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_cli_preset_over_a_real_tokenizer(real_tokenizer_dirs, tmp_path, capsys):
    out = tmp_path / "m"
    tok = real_tokenizer_dirs["gemma3"]
    assert main(["init-model", "--preset", "tiny-1m", "--tokenizer", str(tok), str(out)]) == 0
    from cai_ray.models import load_tokenizer

    text = capsys.readouterr().out
    # Gemma 3's tokenizer.json holds 262,145 tokens (an image token past the 262,144 of the GGUF).
    assert f"tokenizer from {tok}" in text and f"vocab size {len(load_tokenizer(tok))}" in text


def test_a_bad_file_fails_before_heavy_imports(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("hi")
    code = (
        "import sys\nfrom cai_ray.cli import main\n"
        f"rc = main(['init-model', '--from-gguf', {str(text)!r}, {str(tmp_path / 'o')!r}])\n"
        "print(rc, [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "2 []"
    assert "not a GGUF file" in done.stderr
