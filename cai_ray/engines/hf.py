"""`HFEngine`: the Engine interface on plain transformers, for CPU machines and single GPUs.

Generation is our own KV-cached loop rather than `model.generate()`: it needs per-token policy
logprobs, stop strings, n samples from one prefill, and rows that stop costing compute once they
finish; a loop of ~40 lines does all four (benchmarks/bench_generate.py compares the two).

Scoring computes each prefix once and reuses its KV cache for all options (the multiple-choice
labels of paper section 4.1: `p_A = exp(lA) / (exp(lA) + exp(lB))`).
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cai_ray.engines.base import Engine, Generation, OptionScores, SamplingParams, ScoreRequest
from cai_ray.errors import CaiRayError, ModelError
from cai_ray.profiling import span


class HFEngine(Engine):
    """A causal LM loaded with transformers. `batch_size` counts sequences per forward pass."""

    @span("load")
    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        threads: int = 2,
        batch_size: int = 8,
        model_id: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        from cai_ray.models import check_model_dir, load_tokenizer
        from cai_ray.models import model_id as content_id

        # Several engines and learners share a few cores: unbounded intra-op threads thrash.
        torch.set_num_threads(threads)
        path = check_model_dir(model_path, head="causal")
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        try:
            self.tokenizer = load_tokenizer(path, padding_side="left")
            model = AutoModelForCausalLM.from_pretrained(str(path), **_dtype_kwarg(self.dtype))
        except Exception as err:  # corrupt files raise many types; all are the user's to fix
            raise ModelError(
                f"transformers could not load the model ({type(err).__name__}: {err})",
                where=str(path),
                hint="check the directory is a complete, uncorrupted HF model (re-save or re-copy it)",
            ) from None
        self.model = model.to(self.device).eval()
        self.model_id = model_id or content_id(path)
        self.weight_version = 0
        self._stop_ids = _eos_ids(self.model, self.tokenizer)
        names = inspect.signature(self.model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; 4.4x spelled `num_logits_to_keep`.
        self._cache_kw = "cache" if "cache" in names else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in names else "num_logits_to_keep"

    # -- Engine interface -------------------------------------------------------------------

    @span("generate")
    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[Generation]]:
        """Sample `params.n` continuations per prompt.

        - `token_ids` are all sampled tokens, including an EOS or the tokens that completed a
          stop string (as vLLM reports them); `text` is decoded without special tokens and cut
          before the first stop string.
        - `logprobs` are the policy's: log-softmax of the raw logits (temperature 1, no top-p),
          which is what the RL ratio and KL terms need.
        - `seed` makes a call reproducible: the same prompts, params and batch size give the same
          samples. Prompts are processed longest first in chunks of `batch_size // n` prompts.
        """
        import torch

        encoded = [self._encode(p) for p in prompts]
        budget = self.max_context - params.max_new_tokens
        for i, ids in enumerate(encoded):
            if len(ids) > budget:
                raise CaiRayError(
                    f"prompt has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} "
                    f"the model's context of {self.max_context} leaves room for {budget}",
                    where=f"prompt {i}",
                    hint="shorten the prompt or lower max_new_tokens",
                )
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        per_chunk = max(1, self.batch_size // params.n)
        results: list[list[Generation]] = [[] for _ in encoded]
        for start in range(0, len(order), per_chunk):
            chunk = order[start : start + per_chunk]
            for i, gens in zip(
                chunk, self._generate_chunk([encoded[i] for i in chunk], params, gen), strict=True
            ):
                results[i] = gens
        return results

    @span("score")
    def score_options(self, requests: Sequence[ScoreRequest]) -> list[OptionScores]:
        """Summed logprob of each option's tokens after its prefix.

        Requests are batched (`batch_size` prefixes per forward, left-padded); each prefix's KV
        cache is then repeated once per option and all options run in one more forward.
        """
        plans = [self._plan_request(i, r) for i, r in enumerate(requests)]
        order = sorted(range(len(plans)), key=lambda i: -len(plans[i]["prefix"]))
        results: list[OptionScores | None] = [None] * len(plans)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            scores = self._score_chunk([plans[i] for i in chunk])
            for i, logprobs in zip(chunk, scores, strict=True):
                plan = plans[i]
                results[i] = OptionScores(
                    logprobs=logprobs,
                    option_token_ids=plan["options"],
                    prefix_tokens=len(plan["prefix"]),
                    meta={"engine": "hf", "weight_version": self.weight_version, **plan["meta"]},
                )
        return results  # type: ignore[return-value]

    def load_weights(self, state_dict: Mapping[str, Any], *, version: int) -> None:
        """Copy `state_dict` (HF parameter names) into the model; every name must match."""
        import torch

        own = self.model.state_dict()
        missing = set(own) - set(state_dict)
        if getattr(self.model.config, "tie_word_embeddings", False):
            missing.discard("lm_head.weight")  # tied to the input embeddings, often not sent
        unexpected = set(state_dict) - set(own)
        reshaped = [
            n
            for n in set(state_dict) & set(own)
            if tuple(state_dict[n].shape) != tuple(own[n].shape)
        ]
        if missing or unexpected or reshaped:
            raise ModelError(
                f"weights do not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}, wrong shape {sorted(reshaped)[:5]}",
                where=f"{self.model_id} load_weights(version={version})",
                hint="send the full state_dict of the same architecture (HF parameter names)",
            )
        with torch.no_grad():
            for name, tensor in state_dict.items():
                own[name].copy_(tensor)  # casts dtype and moves device as needed
        self.weight_version = version  # no prefix cache to reset: each call computes its own

    @property
    def max_context(self) -> int:
        """`max_position_embeddings` of the model config."""
        return int(self.model.config.max_position_embeddings)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids as the engine sends them (one BOS, where the tokenizer uses one)."""
        from cai_ray.tokens import encode_batch

        return encode_batch(self.tokenizer, texts)

    def close(self) -> None:
        """Drop the model and free its (GPU) memory."""
        import torch

        self.__dict__.pop("model", None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- generation -------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        from cai_ray.tokens import encode

        return encode(self.tokenizer, text)  # one BOS even when a chat template wrote it

    def _forward(self, ids, mask, positions, cache=None, *, keep: int = 1):
        """One forward; returns float32 logits of the last `keep` positions (0 = all) + cache."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kw: cache, self._keep_kw: keep},
        )
        return out.logits.float(), getattr(out, self._cache_kw)

    def _generate_chunk(
        self, prompts: list[list[int]], params: SamplingParams, gen
    ) -> list[list[Generation]]:
        import torch

        n, pad = params.n, self.tokenizer.pad_token_id
        ids, mask = _pad(prompts, pad, self.device, left=True)  # (B, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits, cache = self._forward(ids, mask, positions)  # (B, 1, V)
            # Prefill once per prompt, then fan the cache out to n samples.
            logits = logits[:, -1].repeat_interleave(n, dim=0)  # (B*n, V)
            cache.batch_repeat_interleave(n)
            mask = mask.repeat_interleave(n, dim=0)
            last_pos = positions[:, -1].repeat_interleave(n, dim=0)  # (B*n,)
            rows = _Rows(len(prompts) * n, self)
            active = list(range(len(prompts) * n))  # row ids still sampling
            for _step in range(params.max_new_tokens):
                tokens, logprobs = _sample(logits, params, gen)
                keep = rows.append(active, tokens.tolist(), logprobs, params)
                if not keep:
                    break
                if len(keep) < len(active):  # drop finished rows from every tensor and the cache
                    sel = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(sel)
                    tokens, mask, last_pos = tokens[sel], mask[sel], last_pos[sel]
                    active = [active[j] for j in keep]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                last_pos = last_pos + 1
                logits, cache = self._forward(tokens[:, None], mask, last_pos[:, None], cache)
                logits = logits[:, -1]
        return rows.generations(prompts, n, params)

    # -- scoring ----------------------------------------------------------------------------

    def _plan_request(self, index: int, request: ScoreRequest) -> dict[str, Any]:
        """Token ids of the prefix and of each option, and how the option tokens were found."""
        prefix = self._encode(request.prefix)
        options, separate = [], []
        for j, option in enumerate(request.options):
            joint = self._encode(request.prefix + option)
            if joint[: len(prefix)] == prefix:
                tokens = joint[len(prefix) :]
            else:
                # The tokenizer merged across the boundary: score the option's own tokens after
                # the prefix's exact tokens, so the prefix is never re-scored.
                tokens = list(self.tokenizer(option, add_special_tokens=False)["input_ids"])
                separate.append(j)
            if not tokens:
                raise CaiRayError(
                    "the option adds no tokens after the prefix",
                    where=f"score request {index}, option {j} ({option!r})",
                    hint="use a non-empty option",
                )
            options.append(tokens)
        total = len(prefix) + max(len(t) for t in options)
        if total > self.max_context:
            raise CaiRayError(
                f"prefix + option has {total} tokens; the model accepts {self.max_context}",
                where=f"score request {index}",
                hint="shorten the prefix (fewer few-shot examples)",
            )
        meta = {"separately_tokenized_options": separate} if separate else {}
        return {"prefix": prefix, "options": options, "meta": meta}

    def _score_chunk(self, plans: list[dict[str, Any]]) -> list[list[float]]:
        import torch

        dev, pad = self.device, self.tokenizer.pad_token_id
        ids, mask = _pad([p["prefix"] for p in plans], pad, dev, left=True)  # (R, P)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        counts = [len(p["options"]) for p in plans]
        options = [o for p in plans for o in p["options"]]  # K = sum(counts) rows
        owner = torch.repeat_interleave(
            torch.arange(len(plans), device=dev), torch.tensor(counts, device=dev)
        )
        with torch.inference_mode():
            logits, cache = self._forward(ids, mask, positions)  # (R, 1, V)
            first = logits[:, -1].log_softmax(-1)[owner]  # (K, V): each option's first-token dist
            first_ids = torch.tensor([o[0] for o in options], device=dev)
            totals = first.gather(1, first_ids[:, None])[:, 0]  # (K,)
            rest = [o[:-1] for o in options]  # inputs that predict option tokens 2..L
            if max(len(r) for r in rest) > 0:
                cache.batch_select_indices(owner)  # the prefix KV, once per option
                inp, opt_mask = _pad(rest, pad, dev, left=False)  # (K, L)
                full_mask = torch.cat([mask[owner], opt_mask], dim=1)
                pos = positions[owner, -1:] + 1 + torch.arange(inp.shape[1], device=dev)  # (K, L)
                out, _ = self._forward(inp, full_mask, pos, cache, keep=0)  # (K, L, V)
                targets, _ = _pad([o[1:] for o in options], 0, dev, left=False)
                token_lp = out.gather(2, targets[:, :, None])[:, :, 0] - out.logsumexp(-1)  # (K, L)
                totals = totals + (token_lp * opt_mask).sum(1)
        flat = totals.tolist()
        bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
        return [flat[bounds[i] : bounds[i + 1]] for i in range(len(plans))]


class _Rows:
    """Per-row bookkeeping of the sampling loop: tokens, logprobs, finish reasons, stop checks."""

    def __init__(self, count: int, engine: HFEngine):
        self.tokens: list[list[int]] = [[] for _ in range(count)]
        self.logprobs: list[list[float]] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.tokenizer = engine.tokenizer
        self.stop_ids = engine._stop_ids

    def append(
        self, active: list[int], tokens: list[int], logprobs, params: SamplingParams
    ) -> list[int]:
        """Record one sampled token per active row; return the positions still running."""
        lps = logprobs.tolist() if logprobs is not None else None
        for j, (row, tok) in enumerate(zip(active, tokens, strict=True)):
            self.tokens[row].append(tok)
            if lps is not None:
                self.logprobs[row].append(lps[j])
            if tok in self.stop_ids:
                self.finish[row] = "stop"
            elif len(self.tokens[row]) >= params.max_new_tokens:
                self.finish[row] = "length"
        if params.stop:
            # Decode whole rows: a stop string may span several tokens (or end inside one).
            check = [r for r in active if self.finish[r] != "stop"]
            texts = self.tokenizer.batch_decode(
                [self.tokens[r] for r in check], skip_special_tokens=True
            )
            for row, text in zip(check, texts, strict=True):
                if any(s in text for s in params.stop if s):
                    self.finish[row] = "stop"
        return [j for j, row in enumerate(active) if self.finish[row] is None]

    def generations(
        self, prompts: list[list[int]], n: int, params: SamplingParams
    ) -> list[list[Generation]]:
        texts = self.tokenizer.batch_decode(self.tokens, skip_special_tokens=True)
        out: list[list[Generation]] = []
        for i, prompt in enumerate(prompts):
            gens = []
            for row in range(i * n, (i + 1) * n):
                gens.append(
                    Generation(
                        text=_cut_at_stop(texts[row], params.stop),
                        token_ids=self.tokens[row],
                        finish_reason=self.finish[row] or "length",
                        prompt_tokens=len(prompt),
                        logprobs=self.logprobs[row] if params.logprobs else None,
                    )
                )
            out.append(gens)
        return out


def _sample(logits, params: SamplingParams, gen):
    """Next token per row from (A, V) float logits; plus its policy logprob when asked."""
    import torch

    if params.temperature == 0:
        tokens = logits.argmax(-1)
    else:
        scaled = logits / params.temperature
        if params.top_p < 1.0:
            # Nucleus: keep the smallest set of top tokens whose mass reaches top_p.
            sorted_logits, idx = scaled.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= params.top_p  # mass before this token
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(-1, idx, sorted_logits)
        tokens = torch.multinomial(scaled.softmax(-1), 1, generator=gen)[:, 0]
    logprobs = None
    if params.logprobs:
        logprobs = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def _pad(seqs: list[list[int]], pad: int, device, *, left: bool):
    """(ids, mask) as (N, max len) long tensors; left padding for prompts, right for options."""
    import torch

    width = max(1, *(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        if s:
            ids[i, span] = torch.tensor(s)
            mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a sample: the tokenizer's EOS plus the generation config's (e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if cfg_eos is not None:
        ids.update([cfg_eos] if isinstance(cfg_eos, int) else cfg_eos)
    return ids


def pick_device(device: str):
    """`auto` is CUDA when present; an explicit `cuda` without CUDA is a ModelError."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "device 'cuda' requested but CUDA is not available",
            where="engine.device",
            hint="use device: auto or cpu",
        )
    return torch.device(device)


def pick_dtype(dtype: str, device):
    """`auto` is bf16 on a CUDA device that supports it, else fp32 (CPU bf16 is slow and lossy)."""
    import torch

    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _dtype_kwarg(dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # `dtype=` replaced `torch_dtype=` in transformers 4.56.
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
