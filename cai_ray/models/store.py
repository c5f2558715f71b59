"""Model directories: build presets, find them again, and check a user's path before loading it.

Every model is an ordinary Hugging Face directory (config.json, safetensors, tokenizer files), so
`AutoModelForCausalLM.from_pretrained(path)` and vLLM load it as they are (DESIGN.md, "Models
without a model hub").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cai_ray.errors import ModelError
from cai_ray.models.presets import Head, check_head, get_preset

if TYPE_CHECKING:
    pass

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
ARCH_SUFFIX = {"causal": "ForCausalLM", "classification": "ForSequenceClassification"}
# A scalar-head model over a causal LM's decoder (cai_ray/models/value_head.py): a PM or critic.
# Its config.json names the causal LM, so this marker is what makes it a "classification" model.
VALUE_HEAD_MARKER = "value_head.json"


def init_model(
    preset: str,
    out_dir: str | Path,
    *,
    head: Head = "causal",
    seed: int = 0,
    overwrite: bool = False,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write a random-weight preset model as an HF directory, over the project tokenizer or, with
    `tokenizer`, over a real one (a directory with tokenizer.json and its chat template), so a
    whole config can be dry-run against a target model's vocabulary in minutes."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        GenerationConfig,
    )

    spec = get_preset(preset)
    check_head(head)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelError("output path exists and is not a directory", where=str(out))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelError(
            "output directory is not empty", where=str(out), hint="pass --force to overwrite it"
        )
    tok, eos_ids = _preset_tokenizer(tokenizer)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": eos_ids,
        "pad_token_id": tok.pad_token_id,
    }
    # A real vocabulary (150k-260k tokens) dwarfs a tiny body: tie the embeddings to halve it.
    config = spec.llama_config(
        vocab_size=len(tok), special_ids=ids, head=head, tie_embeddings=tokenizer is not None
    )
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if head == "causal" else AutoModelForSequenceClassification
    model = cls.from_config(config, dtype=torch.float32)
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if head == "causal":
        # Stop at EOS or at the end of a chat turn; sampling defaults come from our configs.
        GenerationConfig(**ids, do_sample=True).save_pretrained(out)
    return out


def _preset_tokenizer(tokenizer: str | Path | None):
    """(tokenizer, ids that end a sample): the project's own, or the one in `tokenizer`."""
    from cai_ray.models.tokenizer import IM_END, build_tokenizer, load_tokenizer, stop_token_ids

    if tokenizer is None:
        tok = build_tokenizer()
        return tok, [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)]
    src = Path(tokenizer)
    if not src.is_dir() or not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            "not a tokenizer directory (no tokenizer.json, tokenizer.model or vocab.json)",
            where=str(src),
            hint="pass the folder of a downloaded model, or one holding its tokenizer files",
        )
    try:
        tok = load_tokenizer(src)
    except Exception as err:  # a broken tokenizer.json raises many types; the user's to fix
        raise ModelError(
            f"transformers could not load the tokenizer ({type(err).__name__}: {err})",
            where=str(src),
        ) from None
    return tok, stop_token_ids(tok)


def dir_digest(folder: Path) -> str:
    """8 hex digits over a tokenizer folder's file names and sizes (which tokenizer it is)."""
    h = hashlib.sha256()
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:8]


def check_model_dir(path: str | Path, *, head: Head | None = "causal") -> Path:
    """`path` if it is a loadable HF model directory with the wanted head (None: any head),
    else a ModelError."""
    p = Path(path)
    hint = "pass an HF model directory (config.json, *.safetensors, tokenizer files) or a preset, e.g. tiny-1m"
    if not p.exists():
        raise ModelError("model path does not exist", where=str(p), hint=hint)
    if not p.is_dir():
        raise ModelError("model path is not a directory", where=str(p), hint=hint)
    config = _read_config(p, hint)
    if not any((p / name).is_file() for name in WEIGHT_FILES) and not list(p.glob("*.safetensors")):
        raise ModelError(
            "no model weights (*.safetensors or pytorch_model.bin) in the directory",
            where=str(p),
            hint=hint,
        )
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            "no tokenizer (tokenizer.json) in the model directory", where=str(p), hint=hint
        )
    archs = config.get("architectures") or []
    value_head = (p / VALUE_HEAD_MARKER).is_file()
    if head == "causal" and value_head:
        raise ModelError(
            f"expected a causal language model, found a scalar-head model ({VALUE_HEAD_MARKER}: "
            "a preference model or critic, whose LM head was dropped)",
            where=str(p),
            hint="point at the policy's or base model's directory",
        )
    if head == "classification" and value_head:
        return p
    if head is not None and archs and not any(str(a).endswith(ARCH_SUFFIX[head]) for a in archs):
        want = (
            "a causal language model (*ForCausalLM)"
            if head == "causal"
            else "a preference model: a sequence classifier (*ForSequenceClassification) or a "
            f"value-head directory ({VALUE_HEAD_MARKER})"
        )
        fix = f"use `cai-ray init-model --head {head}` or a model with that head"
        if head == "classification":
            fix += ", or train one with `cai-ray stage pm-train`"
        raise ModelError(
            f"expected {want}, found {', '.join(map(str, archs))}",
            where=str(p / "config.json"),
            hint=fix,
        )
    return p


def _read_config(p: Path, hint: str) -> dict:
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise ModelError(
            "no config.json: not a Hugging Face model directory", where=str(p), hint=hint
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"unreadable config.json: {exc}", where=str(cfg_path), hint=hint) from None
    if not isinstance(config, dict):
        raise ModelError("config.json is not a JSON object", where=str(cfg_path), hint=hint)
    return config


def model_id(path: str | Path) -> str:
    """A readable, content-derived id recorded in outputs: `<dir name>@<12 hex>`.

    Hashes config.json plus each weight file's name, size and first/last 64 KiB, so it is cheap on
    large models yet differs between seeds and after every training save.
    """
    p = Path(path)
    h = hashlib.sha256()
    if (p / "config.json").is_file():
        h.update((p / "config.json").read_bytes())
    for f in (
        sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("*.index.json"))
    ):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(65536))
            if size > 65536:
                fh.seek(max(size - 65536, 65536))
                h.update(fh.read())
    return f"{p.resolve().name}@{h.hexdigest()[:12]}"


def count_parameters(path: str | Path) -> int:
    """Parameters stored in a directory's safetensors files (read from headers, no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                n = 1
                for dim in st.get_slice(name).get_shape():
                    n *= dim
                total += n
    return total


def default_cache_dir() -> Path:
    """Where CLI `--preset` models are built: $CAI_RAY_HOME, else ~/.cache/cai-ray."""
    home = os.environ.get("CAI_RAY_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "cai-ray"
