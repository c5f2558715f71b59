"""One scalar-head model over any causal LM's decoder: the PM (paper section 4.1) and PPO's critic.

transformers has no `*ForTokenClassification` for many decoder-only families (Gemma 3: issue 14),
and not every family has `*ForSequenceClassification`. Both scalar models are therefore one
module: the causal LM's decoder (its LM head dropped) and a `Linear(hidden, 1)` giving a value
per token. The PM reads the value at the last non-pad token; the critic every response position.

On disk a value-head model is an ordinary HF causal-LM directory (config.json, model*.safetensors,
tokenizer) holding the decoder's weights but no LM head (a tied LM head lives in the embeddings;
an untied one loads as new weights: the directory is a scorer, not a generator), plus
`value_head.safetensors` and the marker `value_head.json`. `load_scalar_model` also reads
`*ForSequenceClassification` PMs (num_labels 1): their decoder and `score` head score as before.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch

from cai_ray.errors import ModelError
from cai_ray.models.loading import dtype_kwarg
from cai_ray.models.store import VALUE_HEAD_MARKER, check_model_dir

HEAD_FILE = "value_head.safetensors"
MARKER_FORMAT = "cai-ray/value-head"
Kind = Literal["value_head", "sequence_classifier", "causal_lm"]
# What a scalar model was built from, as manifests and logs say it.
KIND_LABELS: dict[str, str] = {
    "value_head": "value-head model",
    "sequence_classifier": "sequence classifier",
    "causal_lm": "causal LM + new scalar head",
}


def scalar_kind(path: str | Path) -> Kind | None:
    """What the directory holds, from its files alone (no weights read); None: none of them."""
    p = Path(path)
    if (p / VALUE_HEAD_MARKER).is_file():
        return "value_head"
    try:
        config = json.loads((p / "config.json").read_text())
        archs = [str(a) for a in config.get("architectures") or []]
    except (OSError, ValueError, AttributeError):
        return None
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence_classifier"
    if not archs or any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
        return "causal_lm"
    return None


def check_scalar_model(path: str | Path, *, new_head: bool) -> Kind:
    """The kind of a loadable scalar model at `path` (with `new_head`, a causal LM also counts:
    it gets a fresh head), else a ModelError. Cheap: for the driver, before any actor starts."""
    p = check_model_dir(path, head=None)
    kind = scalar_kind(p)
    if kind is None or (kind == "causal_lm" and not new_head):
        raise ModelError(
            "not a preference model: no value head (value_head.json) and not a "
            "*ForSequenceClassification directory",
            where=str(p),
            hint="train one with `cai-ray stage pm-train`, or start from a causal LM directory",
        )
    return kind


class ValueHeadModel(torch.nn.Module):
    """A causal LM's decoder plus a scalar head. `forward` gives one value per token (B, T),
    with `last_only` the value at each row's last real token (B,) (right padding), with `at`
    the values at the given (row, column) positions."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        head: torch.nn.Module,
        *,
        lm_config: Any,
        lm_class: str,
        prefix: str,
        kind: Kind,
    ):
        super().__init__()
        self.backbone, self.head = backbone, head
        # How the directory reloads as a causal LM: its config, class and the decoder's name
        # inside it ("model" for Llama, Qwen, Gemma).
        self.lm_config, self.lm_class, self.prefix = lm_config, lm_class, prefix
        self.kind = kind
        self.backbone.config.use_cache = False  # a KV cache only costs memory here

    @property
    def config(self) -> Any:
        return self.backbone.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Any,
        *,
        position_ids: torch.Tensor | None = None,
        last_only: bool = False,
        at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`at` (rows, cols): the values at those positions only, e.g. each sequence's last
        token in shared-prefix rows (`cai_ray.models.shared_prefix`), whose 4D `attention_mask`
        and `position_ids` pass through to the decoder."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )[0]  # (B, T, H)
        if at is not None:
            hidden = hidden[at[0], at[1]]  # (K, H)
        elif last_only:
            last = attention_mask.sum(1) - 1  # (B,) index of the last real token
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.head(hidden)[..., 0].float()  # (B, T) or (B,)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, path: str | Path, *, state_dict: dict | None = None) -> None:
        """Write the value-head directory (the learner's HF snapshot). `state_dict`: this
        module's full weights when they are sharded elsewhere (DeepSpeed ZeRO-3 gathers them)."""
        from huggingface_hub import save_torch_state_dict
        from safetensors.torch import save_file

        state = self.state_dict() if state_dict is None else state_dict
        backbone, head = {}, {}
        for key, value in state.items():
            part, _, name = key.partition(".")
            tensor = value.detach().to("cpu").contiguous()
            if part == "backbone":  # named as in the causal LM, so it reloads as one
                backbone[f"{self.prefix}.{name}"] = tensor
            elif part == "head":
                head[name] = tensor
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.lm_config)
        config.architectures = [self.lm_class]
        if backbone:
            config.dtype = next(iter(backbone.values())).dtype
        config.save_pretrained(out)
        save_torch_state_dict(backbone, out)
        save_file(head, str(out / HEAD_FILE), metadata={"format": "pt"})
        marker = {
            "format": MARKER_FORMAT,
            "version": 1,
            "head_file": HEAD_FILE,
            "backbone_prefix": self.prefix,
            "hidden_size": int(head["weight"].shape[-1]),
        }
        (out / VALUE_HEAD_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def load_scalar_model(
    path: str | Path, *, dtype: Any = torch.float32, new_head: bool = False
) -> ValueHeadModel:
    """The scalar model in `path`: a value-head directory, a `*ForSequenceClassification` PM,
    or with `new_head` a causal LM given a fresh head (the start of a PM or a critic).
    The one loader of the PM trainer, the critic and `cai_ray.feedback.reward.RewardScorer`."""
    p = Path(path)
    kind = check_scalar_model(p, new_head=new_head)
    if kind == "sequence_classifier":
        return _from_sequence_classifier(p, dtype)
    backbone, lm_config, lm_class, prefix = _decoder(p, dtype)
    hidden = int(lm_config.get_text_config().hidden_size)
    if kind == "value_head":
        head = _saved_head(p, hidden)
    else:
        head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(hidden))  # scores start near O(1)
        torch.nn.init.zeros_(head.bias)
    head = head.to(next(backbone.parameters()).dtype)
    return ValueHeadModel(
        backbone, head, lm_config=lm_config, lm_class=lm_class, prefix=prefix, kind=kind
    )


def _decoder(p: Path, dtype: Any) -> tuple[torch.nn.Module, Any, str, str]:
    """(the causal LM's decoder, the causal LM's config and class, the decoder's name in it)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a value-head dir has no LM head: it loads as new weights
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(p), output_loading_info=True, **dtype_kwarg(dtype)
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"transformers could not load it as a causal LM: {exc}".splitlines()[0],
            where=str(p),
            hint="a scalar model starts from a causal LM directory (*ForCausalLM)",
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    missing = [k for k in info.get("missing_keys", []) if k.startswith(f"{prefix}.")]
    if missing:
        raise ModelError(
            f"{len(missing)} decoder weights are missing from the checkpoint, e.g. {missing[0]}",
            where=str(p),
            hint="the directory is incomplete or of another architecture",
        )
    lm_config, lm_class = copy.deepcopy(model.config), type(model).__name__
    del model  # drops the LM head (unless tied to the embeddings, which the decoder keeps)
    return decoder, lm_config, lm_class, prefix


def _saved_head(p: Path, hidden: int) -> torch.nn.Linear:
    from safetensors.torch import load_file

    try:
        weights = load_file(str(p / HEAD_FILE))
    except (OSError, ValueError) as exc:
        raise ModelError(f"unreadable value head: {exc}", where=str(p / HEAD_FILE)) from None
    shape = tuple(weights.get("weight", torch.empty(0)).shape)
    if shape != (1, hidden):
        raise ModelError(
            f"the value head's weight has shape {shape}, the decoder's hidden size is {hidden}",
            where=str(p / HEAD_FILE),
            hint="the head belongs to another model: retrain the PM",
        )
    head = torch.nn.Linear(hidden, 1, bias="bias" in weights)
    head.load_state_dict(weights)
    return head


def _from_sequence_classifier(p: Path, dtype: Any) -> ValueHeadModel:
    """A `*ForSequenceClassification` PM as a value-head model: its decoder and its head."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(p), **dtype_kwarg(dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"transformers could not load the PM: {exc}".splitlines()[0], where=str(p)
        ) from None
    if model.config.num_labels != 1:
        raise ModelError(
            f"a preference model has one output, this one has {model.config.num_labels}",
            where=str(p / "config.json"),
            hint="train the PM with num_labels=1 (cai-ray stage pm-train)",
        )
    # Llama/Mistral/Qwen name the head `score`, BERT-likes `classifier`.
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise ModelError(
            f"unsupported PM architecture {type(model).__name__}: no score head",
            where=str(p),
            hint="use a Llama-style *ForSequenceClassification model",
        )
    return ValueHeadModel(
        model.base_model,
        head,
        lm_config=copy.deepcopy(model.config),
        lm_class=_causal_class_name(model),
        prefix=getattr(model, "base_model_prefix", "model"),
        kind="sequence_classifier",
    )


def _causal_class_name(model: Any) -> str:
    """The causal-LM class of a sequence classifier's family (LlamaForSequenceClassification ->
    LlamaForCausalLM), as transformers maps its config: how a re-saved PM reloads."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model.config.model_type)
    if isinstance(name, str):
        return name
    return type(model).__name__.replace("ForSequenceClassification", "ForCausalLM")


class ScalarModelObjective:
    """Base of the objectives that train a scalar head (the PM, PPO's critic): a scalar model to
    keep training, or a causal LM (the paper's start) with a fresh head."""

    keeps_dropout = False  # a pair's two sides (a PM) or a critic's targets: dropout is noise

    def check_model(self, model_path: str | Path) -> None:
        check_scalar_model(model_path, new_head=True)

    def load_model(self, model_path: str | Path) -> torch.nn.Module:
        return load_scalar_model(model_path, new_head=True)
