"""The project's own models: tiny Llama presets, a locally built tokenizer, model directories.

Importing this package is light (no torch); the functions import transformers when called.
"""

from cai_ray.models.ensure import ensure_model
from cai_ray.models.presets import HEADS, PRESETS, Head, ModelPreset, get_preset
from cai_ray.models.store import (
    check_model_dir,
    count_parameters,
    default_cache_dir,
    init_model,
    model_id,
)
from cai_ray.models.tokenizer import MARKER_TOKENS, build_tokenizer, load_tokenizer

__all__ = [
    "HEADS",
    "MARKER_TOKENS",
    "PRESETS",
    "Head",
    "ModelPreset",
    "build_tokenizer",
    "check_model_dir",
    "count_parameters",
    "default_cache_dir",
    "ensure_model",
    "get_preset",
    "init_model",
    "load_tokenizer",
    "model_id",
]
