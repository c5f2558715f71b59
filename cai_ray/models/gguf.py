"""Import a GGUF file (llama.cpp's format, the way many pretrained models ship) as an ordinary
Hugging Face directory, so every engine and trainer loads it like any other model.

transformers reads GGUF natively but marks the model as quantized, and `save_pretrained` refuses
such a model; loading it fully dequantised lets transformers drop that marker itself, and we check
that no trace of it reaches config.json (DESIGN.md, "Models without a model hub").
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from cai_ray.errors import ModelError
from cai_ray.models.presets import Head
from cai_ray.models.store import check_model_dir, count_parameters
from cai_ray.models.tokenizer import stop_token_ids
from cai_ray.profiling import span

GGUF_MAGIC = b"GGUF"
Dtype = Literal["float32", "bfloat16"]


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def import_gguf(
    file: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    dtype: Dtype = "float32",
    log: Callable[[str], None] | None = _log_stderr,
) -> Path:
    """Convert `file` into `out_dir` (config.json, model.safetensors, tokenizer files with the
    chat template, generation_config.json) and return `out_dir`; `log` gets a line before and
    after (the import of a 270M model takes about a minute on CPU).

    The directory is built beside `out_dir` and renamed into place, so a killed import never
    leaves a half-written model under the final name.
    """
    src = check_gguf_file(file)
    out = Path(out_dir)
    _check_out_dir(out, overwrite=overwrite)
    if dtype not in ("float32", "bfloat16"):
        raise ModelError(f"unknown dtype {dtype!r}", hint="use float32 or bfloat16")
    _require_gguf_packages()
    arch = gguf_architecture(src)
    say = log or (lambda _msg: None)
    say(f"importing {src} ({arch}, {src.stat().st_size / 2**20:.0f} MiB) as {dtype} into {out}")
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not mkdtemp's 0700) so the model gets the user's usual permissions.
    tmp = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        _convert(src, tmp, arch=arch, dtype=dtype)
        _publish(tmp, out, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    say(
        f"imported {src.name} in {time.monotonic() - t0:.0f} s: "
        f"{count_parameters(out):,} parameters, {size / 2**20:.0f} MiB in {out}"
    )
    return out


def ensure_gguf_model(file: Path, *, run_dir: str | Path, head: Head = "causal") -> Path:
    """The HF directory imported from `file` under run_dir/models/, converted on first use and
    reused after; the name carries a digest of the file's name, size and mtime, so a replaced
    file is imported again."""
    src = check_gguf_file(file)
    if head != "causal":
        raise ModelError(
            "a GGUF file cannot be the preference model (it holds a causal LM, not a classifier)",
            where=str(src),
            hint="import it as the helpful or feedback model; the PM is trained from a causal LM",
        )
    st = src.stat()
    digest = hashlib.sha256(f"{src.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    final = Path(run_dir) / "models" / f"{src.stem}-{digest[:8]}"
    if not final.is_dir():
        try:
            with span("build_model"):
                import_gguf(src, final)
        except ModelError:
            if not (final / "config.json").is_file():  # not a lost race with another process
                raise
    return check_model_dir(final, head=head)


def check_gguf_file(file: str | Path) -> Path:
    """`file` if it exists and starts with the GGUF magic bytes, else a ModelError."""
    src = Path(file)
    hint = "pass a .gguf model file (llama.cpp format), e.g. one assembled from a PyPI package"
    if not src.exists():
        raise ModelError("GGUF file does not exist", where=str(src), hint=hint)
    if not src.is_file():
        raise ModelError("GGUF path is not a file", where=str(src), hint=hint)
    with src.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})",
            where=str(src),
            hint=hint,
        )
    return src


def gguf_architecture(file: Path) -> str:
    """The file's `general.architecture`, read from its header without loading any tensor."""
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        metadata, _ = read_gguf_metadata(str(file))
    except (ValueError, OSError, KeyError, IndexError) as err:  # a truncated or corrupt header
        raise ModelError(f"unreadable GGUF header: {err}", where=str(file)) from None
    return str(metadata["general.architecture"])


def supported_architectures() -> list[str]:
    """GGUF architectures this transformers reads: its legacy mapping plus the newer loader's."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names |= set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # not archs
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def _check_out_dir(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ModelError("output path exists and is not a directory", where=str(out))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelError(
            "output directory is not empty", where=str(out), hint="pass --force to overwrite it"
        )


def _require_gguf_packages() -> None:
    """transformers reads GGUF through the `gguf` package and places the weights with accelerate."""
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as err:
        raise ModelError(
            f"importing a GGUF file needs the `gguf` and `accelerate` packages ({err})",
            hint="pip install gguf accelerate",
        ) from None


def _convert(src: Path, out: Path, *, arch: str, dtype: Dtype) -> None:
    """Load `src` dequantised, write it to the empty directory `out` as a plain HF model."""
    from transformers import AutoTokenizer, GenerationConfig

    model = _load_model(src, arch=arch, dtype=dtype)
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as err:  # an unknown tokenizer type, a broken vocabulary: many types
        raise ModelError(
            f"transformers could not build the tokenizer ({type(err).__name__}: {err})",
            where=str(src),
        ) from None
    # The GGUF tokenizer has no length limit; the model's context is the real one.
    max_len = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_len, int):
        tok.model_max_length = max_len
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # safetensors writes weights 0600 (a temp file renamed); give them config.json's mode, the
    # user's umask, so other processes and users can load the model like any other file here.
    for weights in out.glob("*.safetensors"):
        os.chmod(weights, (out / "config.json").stat().st_mode & 0o777)
    # A chat model ends its turn with a token of its own (Gemma's <end_of_turn>), not the EOS.
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=stop_token_ids(tok, getattr(model.config, "vocab_size", None)),
        pad_token_id=tok.pad_token_id,
    ).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:  # would make every loader treat the model as GGUF again
        raise ModelError("the saved config.json still has a quantization_config", where=str(out))


def _load_model(src: Path, *, arch: str, dtype: Dtype):
    """The GGUF's model, every weight dequantised into `dtype`, with no quantizer attached."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    try:
        # dequantize=True: plain Linear layers (never packed GGUF blocks), and transformers then
        # removes its quantizer marker, which otherwise makes save_pretrained refuse the model.
        model = AutoModelForCausalLM.from_pretrained(
            str(src.parent),
            gguf_file=src.name,
            dtype=getattr(torch, dtype),
            quantization_config=GgufConfig(dequantize=True),
        )
    except ValueError as err:
        if "not supported" not in str(err):
            raise _load_error(src, err) from None
        import transformers

        raise ModelError(
            f"transformers {transformers.__version__} cannot read GGUF architecture {arch!r}",
            where=str(src),
            hint=f"supported: {', '.join(supported_architectures())}",
        ) from None
    except Exception as err:  # corrupt tensors, odd shapes, memory: the file is at fault
        raise _load_error(src, err) from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # a transformers that kept it: use its own cleanup
        quantizer.remove_quantization_config(model)
    return model


def _load_error(src: Path, err: Exception) -> ModelError:
    return ModelError(
        f"transformers could not load the GGUF model ({type(err).__name__}: {err})", where=str(src)
    )


def _publish(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Move the finished `tmp` to `out`; an old `out` is moved aside first and removed after,
    so the final name always holds a whole model (old or new) or nothing."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        _check_out_dir(out, overwrite=overwrite)  # another process may have finished first
        old = tmp.with_name(tmp.name + ".old")
        os.rename(out, old)
    elif out.is_dir():
        out.rmdir()
    try:
        os.rename(tmp, out)
    except OSError as err:
        raise ModelError(f"could not move the import into place: {err}", where=str(out)) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
