"""`ensure_model`: the model directory a `ModelConfig` names, whichever way it names it.

A user's HF directory (`path`, checked), a GGUF file (`gguf`, converted once under the run
directory) or a preset (`preset`, built once under the run directory).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cai_ray.config import resolve_path
from cai_ray.models import store
from cai_ray.models.gguf import ensure_gguf_model
from cai_ray.models.presets import Head, check_head, get_preset
from cai_ray.profiling import span

if TYPE_CHECKING:
    from cai_ray.config import ModelConfig


def ensure_model(cfg: ModelConfig, *, run_dir: str | Path, head: Head = "causal") -> Path:
    """The model directory for `cfg`: a preset is built under run_dir/models/ on first use."""
    if cfg.path is not None:
        return store.check_model_dir(resolve_path(cfg.path), head=head)
    if cfg.gguf is not None:
        return ensure_gguf_model(resolve_path(cfg.gguf), run_dir=run_dir, head=head)
    check_head(head)
    get_preset(cfg.preset)  # fail on a typo before creating any directory
    parent = Path(run_dir) / "models"
    name = f"{cfg.preset}-{head}-s{cfg.seed}"
    tokenizer = None
    if cfg.tokenizer is not None:
        tokenizer = resolve_path(cfg.tokenizer)
        name += f"-{tokenizer.resolve().name}-{store.dir_digest(tokenizer)}"
    final = parent / name
    if final.is_dir():
        return store.check_model_dir(final, head=head)
    parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: a killed build leaves only a hidden temp dir behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=parent))
    try:
        with span("build_model"):
            store.init_model(
                cfg.preset, tmp, head=head, seed=cfg.seed, overwrite=True, tokenizer=tokenizer
            )
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return store.check_model_dir(final, head=head)
