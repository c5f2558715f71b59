"""Tiny Llama-style model presets with random weights: the models tests and `make run` use.

Sizes count every parameter, embeddings included (untied input and output embeddings, as Llama).
Head dimensions are 32 or 64 so the same directories also load in vLLM's attention kernels.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cai_ray.errors import ModelError

if TYPE_CHECKING:
    from transformers import LlamaConfig

Head = Literal["causal", "classification"]
HEADS: tuple[str, ...] = ("causal", "classification")


@dataclass(frozen=True)
class ModelPreset:
    """A Llama config shape; the vocabulary comes from the project tokenizer."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048

    def llama_config(
        self,
        *,
        vocab_size: int,
        special_ids: dict[str, Any],
        head: Head,
        tie_embeddings: bool = False,
    ) -> LlamaConfig:
        """The transformers config for this shape; `head` picks the architecture."""
        from transformers import LlamaConfig

        extra: dict[str, Any] = {}
        if head == "classification":
            # One scalar per sequence (a reward / preference model), read at the last non-pad token.
            extra = {"num_labels": 1, "architectures": ["LlamaForSequenceClassification"]}
        else:
            extra = {"architectures": ["LlamaForCausalLM"]}
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=tie_embeddings,
            **special_ids,
            **extra,
        )


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # ~0.9M: 2 x 4096 x 64 embeddings + 4 layers; fast enough for every unit test.
        ModelPreset(
            "tiny-1m",
            hidden_size=64,
            num_layers=4,
            num_heads=2,
            num_kv_heads=2,
            intermediate_size=384,
        ),
        # ~21M: the benchmark size (few-shot prompts of ~600 tokens in milliseconds on a CPU).
        ModelPreset(
            "tiny-20m",
            hidden_size=384,
            num_layers=10,
            num_heads=6,
            num_kv_heads=6,
            intermediate_size=1024,
        ),
        # ~94M, grouped-query attention (12 query heads, 4 KV heads) as in current Llama models.
        ModelPreset(
            "tiny-100m",
            hidden_size=768,
            num_layers=14,
            num_heads=12,
            num_kv_heads=4,
            intermediate_size=2048,
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; an unknown name is a ModelError naming the closest preset."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.4)
    guess = f"did you mean '{close[0]}'? " if close else ""
    raise ModelError(
        f"unknown model preset '{name}'",
        where="preset",
        hint=f"{guess}presets: {', '.join(PRESETS)}",
    )


def check_head(head: str) -> Head:
    """Validate a head name ('causal' or 'classification')."""
    if head not in HEADS:
        raise ModelError(
            f"unknown model head '{head}'", where="head", hint=f"use one of: {', '.join(HEADS)}"
        )
    return head  # type: ignore[return-value]
