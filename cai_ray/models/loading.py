"""Loading a local model directory into torch, one way for engines, learners and RL workers.

`load_causal_lm` is the one `AutoModelForCausalLM.from_pretrained` of the project (the HF engine,
the reference worker, the SFT/policy/DPO objectives); scalar-head models (PMs, critics) load
through `cai_ray.models.value_head`. `CausalLMObjective` (and value_head's `ScalarModelObjective`)
give a learner objective its `check_model` (before any rank starts) and `load_model` (every rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai_ray.errors import ModelError

if TYPE_CHECKING:
    import torch

LOAD_HINT = "check the directory is a complete, uncorrupted HF model (re-save or re-copy it)"


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """`from_pretrained`'s dtype argument: `dtype=` replaced `torch_dtype=` in transformers 4.56."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_causal_lm(
    path: str | Path, *, dtype: Any = None, hint: str = LOAD_HINT
) -> torch.nn.Module:
    """The causal LM in `path` (already checked with `check_model_dir`), in `dtype` (default fp32).

    Corrupt files raise many exception types from transformers; all become one ModelError naming
    the directory, since all are the user's to fix.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), **dtype_kwarg(torch.float32 if dtype is None else dtype)
        )
    except Exception as err:
        raise ModelError(
            f"transformers could not load the model ({type(err).__name__}: {err})",
            where=str(path),
            hint=hint,
        ) from None


def target_logits(
    model: Any, target_mask: torch.Tensor, **inputs: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Next-token logits from `start`, the first target position any row trains on, to the end:
    (B, T-1-start, V), and `start`. `target_mask` (B, T-1) marks the positions t whose token t + 1
    carries loss. The LM head and the softmax skip the leading positions no row needs
    (`logits_to_keep`): the prompts of SFT and RL rows; (B, T-1) tensors line up as `x[:, start:]`.
    The last position (it predicts past the row) is not computed either: the positions go to
    `logits_to_keep` as indices, so the logits come out contiguous and their backward writes no
    zeros for a sliced-off column (2% of a tiny-20m SFT step, benchmarks/README.md).
    """
    import torch

    columns = target_mask.any(0).nonzero()
    start = int(columns[0]) if len(columns) else 0
    width = inputs["input_ids"].shape[1]
    keep = torch.arange(start, width - 1, device=inputs["input_ids"].device)
    out = model(**inputs, use_cache=False, logits_to_keep=keep)
    return out.logits.float(), start  # position t predicts token t + 1


class CausalLMObjective:
    """Base of the objectives that train a causal LM itself (SFT, the RL policy, DPO), in fp32."""

    keeps_dropout = True  # SFT trains with the model's dropout; the policy's objectives do not

    def check_model(self, model_path: str | Path) -> None:
        from cai_ray.models.store import check_model_dir

        check_model_dir(model_path, head="causal")

    def load_model(self, model_path: str | Path) -> torch.nn.Module:
        return load_causal_lm(
            model_path,
            hint="this objective trains a causal language model directory (e.g. LlamaForCausalLM)",
        )


def disable_dropout(model: torch.nn.Module) -> int:
    """Zero every dropout in `model`: its `nn.Dropout` modules and the attention dropout that
    transformers' attention modules pass to SDPA as a float (`attention_dropout`, which TRL's
    `disable_dropout_in_model` leaves). Returns how many were not already zero."""
    import torch

    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p, changed = 0.0, changed + 1
        attention = getattr(module, "attention_dropout", None)
        if isinstance(attention, float) and attention:
            module.attention_dropout, changed = 0.0, changed + 1
    return changed
