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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.engines.base import (
    Engine,
    Generation,
    OptionScores,
    SamplingParams,
    ScoreRequest,
    prompt_seed,
)
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

        from cai_ray.models import check_model_dir, load_tokenizer
        from cai_ray.models import model_id as content_id
        from cai_ray.models.loading import load_causal_lm

        # Several engines and learners share a few cores: unbounded intra-op threads thrash.
        torch.set_num_threads(threads)
        path = check_model_dir(model_path, head="causal")
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        try:
            self.tokenizer = load_tokenizer(path, padding_side="left")
        except Exception as err:  # a broken tokenizer.json raises many types; the user's to fix
            raise ModelError(
                f"transformers could not load the model's tokenizer ({type(err).__name__}: {err})",
                where=str(path),
                hint="check the directory is a complete, uncorrupted HF model (re-save or re-copy it)",
            ) from None
        model = load_causal_lm(path, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.model_id = model_id or content_id(path)
        self.weight_version = 0
        self._stop_ids = _eos_ids(self.model, self.tokenizer)
        names = inspect.signature(self.model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; 4.4x spelled `num_logits_to_keep`.
        self._cache_kw = "cache" if "cache" in names else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in names else "num_logits_to_keep"

    # -- Engine interface -------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[Generation]]:
        """Sample `params.n` continuations per prompt.

        - `token_ids` are all sampled tokens, including an EOS or the tokens that completed a
          stop string (as vLLM reports them); `text` is decoded without special tokens and cut
          before the first stop string.
        - `logprobs` are the policy's: log-softmax of the raw logits (temperature 1, no top-p),
          which is what the RL ratio and KL terms need.
        - `seed` makes sampling reproducible per sample: sample j of a prompt draws from its own
          generator (`prompt_seed` + j), so it does not depend on the other prompts in the call,
          their order or the batch size (up to the float rounding of a differently shaped
          batch, which can flip a near-tie).
        """
        return self.generate_many([(prompts, params)])[0]

    @span("generate")
    def generate_many(
        self, requests: Sequence[tuple[Sequence[str], SamplingParams]]
    ) -> list[list[list[Generation]]]:
        """Several requests, each with its own sampling params, in shared forward passes
        (Serve's request batching). Prompts run longest first in chunks of about `batch_size`
        sequences; a prompt's n samples share one prefill."""
        rows: list[_Prompt] = []
        for r, (prompts, params) in enumerate(requests):
            budget = self.max_context - params.max_new_tokens
            for i, text in enumerate(prompts):
                ids = self._encode(text)
                if len(ids) > budget:
                    where = f"prompt {i}" if len(requests) == 1 else f"request {r}, prompt {i}"
                    raise CaiRayError(
                        f"prompt has {len(ids)} tokens; with max_new_tokens="
                        f"{params.max_new_tokens} the model's context of {self.max_context} "
                        f"leaves room for {budget}",
                        where=where,
                        hint="shorten the prompt or lower max_new_tokens",
                    )
                rows.append(_Prompt(r, i, ids, params))
        results: list[list[list[Generation]]] = [[[] for _ in p] for p, _ in requests]
        chunk: list[_Prompt] = []
        for row in sorted(rows, key=lambda x: -len(x.ids)):
            if chunk and sum(x.params.n for x in chunk) + row.params.n > self.batch_size:
                self._generate_chunk(chunk, results)
                chunk = []
            chunk.append(row)
        if chunk:
            self._generate_chunk(chunk, results)
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
        from cai_ray.data.tokens import encode_batch

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
        from cai_ray.data.tokens import encode

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

    def _generate_chunk(self, prompts: list[_Prompt], results) -> None:
        import torch

        pad, dev = self.tokenizer.pad_token_id, self.device
        ids, mask = _pad([p.ids for p in prompts], pad, dev, left=True)  # (B, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = _Rows(prompts, self)
        owner = torch.tensor(rows.owner, device=dev)  # (R,): the prompt of each sample row
        with torch.inference_mode():
            logits, cache = self._forward(ids, mask, positions)  # (B, 1, V)
            # Prefill once per prompt, then fan the cache out to its n samples.
            logits = logits[:, -1][owner]  # (R, V)
            cache.batch_select_indices(owner)
            mask, last_pos = mask[owner], positions[owner, -1]
            active = list(range(len(rows.owner)))  # row ids still sampling
            for _step in range(rows.longest):
                tokens, logprobs = rows.sample(active, logits)
                keep = rows.append(active, tokens.tolist(), logprobs)
                if not keep:
                    break
                if len(keep) < len(active):  # drop finished rows from every tensor and the cache
                    sel = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(sel)
                    tokens, mask, last_pos = tokens[sel], mask[sel], last_pos[sel]
                    active = [active[j] for j in keep]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                last_pos = last_pos + 1
                logits, cache = self._forward(tokens[:, None], mask, last_pos[:, None], cache)
                logits = logits[:, -1]
        for p, gens in zip(prompts, rows.generations(), strict=True):
            results[p.request][p.index] = gens

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


@dataclass
class _Prompt:
    """One prompt of a `generate_many` call: where its samples go, its tokens and params."""

    request: int
    index: int
    ids: list[int]
    params: SamplingParams


class _Rows:
    """Per-sample-row state of the sampling loop: each row's own params and random stream,
    its tokens, logprobs, finish reason and stop checks."""

    def __init__(self, prompts: list[_Prompt], engine: HFEngine):
        import torch

        self.prompts = prompts
        self.owner = [k for k, p in enumerate(prompts) for _ in range(p.params.n)]
        self.params = [prompts[k].params for k in self.owner]
        self.sample_index = [j for p in prompts for j in range(p.params.n)]
        count = len(self.owner)
        self.tokens: list[list[int]] = [[] for _ in range(count)]
        self.logprobs: list[list[float]] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.longest = max(p.max_new_tokens for p in self.params)
        self.tokenizer = engine.tokenizer
        self.stop_ids = engine._stop_ids
        self.temperature = torch.tensor([p.temperature for p in self.params])
        self.top_p = torch.tensor([p.top_p for p in self.params])
        self.generators = [
            None if p.seed is None else _row_generator(p.seed, prompts[k].ids, j)
            for p, k, j in zip(self.params, self.owner, self.sample_index, strict=True)
        ]
        self.want_logprobs = any(p.logprobs for p in self.params)

    def sample(self, active: list[int], logits):
        """Next token per active row from (A, V) float logits, with each row's temperature,
        top-p and random stream; plus its policy logprob when any row asks for them."""
        import torch

        sel = torch.tensor(active)
        temps, top_p = self.temperature[sel].to(logits.device), self.top_p[sel].to(logits.device)
        tokens = logits.argmax(-1)
        hot = (temps > 0).nonzero()[:, 0]
        if len(hot):
            draws = [self._uniform(active[k]) for k in hot.tolist()]
            uniform = torch.tensor(draws, dtype=logits.dtype, device=logits.device)
            tokens[hot] = _inverse_cdf(logits[hot] / temps[hot, None], top_p[hot], uniform)
        logprobs = None
        if self.want_logprobs:
            logprobs = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
        return tokens, logprobs

    def _uniform(self, row: int) -> float:
        import torch

        return torch.rand(1, generator=self.generators[row]).item()

    def append(self, active: list[int], tokens: list[int], logprobs) -> list[int]:
        """Record one sampled token per active row; return the positions still running."""
        lps = logprobs.tolist() if logprobs is not None else None
        check = []
        for j, (row, tok) in enumerate(zip(active, tokens, strict=True)):
            params = self.params[row]
            self.tokens[row].append(tok)
            if lps is not None and params.logprobs:
                self.logprobs[row].append(lps[j])
            if tok in self.stop_ids:
                self.finish[row] = "stop"
            elif len(self.tokens[row]) >= params.max_new_tokens:
                self.finish[row] = "length"
            if params.stop and self.finish[row] != "stop":
                check.append(row)
        if check:
            # Decode whole rows: a stop string may span several tokens (or end inside one).
            texts = self.tokenizer.batch_decode(
                [self.tokens[r] for r in check], skip_special_tokens=True
            )
            for row, text in zip(check, texts, strict=True):
                if any(s in text for s in self.params[row].stop if s):
                    self.finish[row] = "stop"
        return [j for j, row in enumerate(active) if self.finish[row] is None]

    def generations(self) -> list[list[Generation]]:
        """Per prompt of the chunk, its n samples."""
        texts = self.tokenizer.batch_decode(self.tokens, skip_special_tokens=True)
        out: list[list[Generation]] = [[] for _ in self.prompts]
        for row, k in enumerate(self.owner):
            params = self.params[row]
            out[k].append(
                Generation(
                    text=_cut_at_stop(texts[row], params.stop),
                    token_ids=self.tokens[row],
                    finish_reason=self.finish[row] or "length",
                    prompt_tokens=len(self.prompts[k].ids),
                    logprobs=self.logprobs[row] if params.logprobs else None,
                )
            )
        return out


def _row_generator(seed: int, prompt: list[int], sample: int):
    """A CPU generator for sample `sample` of `prompt` under `seed`: its own stream, whatever
    else is in the batch."""
    import torch

    return torch.Generator().manual_seed(prompt_seed(seed, prompt) + sample)


def _inverse_cdf(scaled, top_p, uniform):
    """Tokens drawn from softmax(scaled) (A, V) by inverse CDF in vocabulary order, one uniform
    per row; a row with top_p < 1 first keeps its smallest set of top tokens whose mass reaches
    top_p (nucleus). Each row's draw depends only on its own logits, top_p and uniform."""
    import torch

    probs = scaled.softmax(-1)
    cut = (top_p < 1).nonzero()[:, 0]
    if len(cut):
        part = probs[cut]
        ranked, order = part.sort(dim=-1, descending=True, stable=True)
        drop = (ranked.cumsum(-1) - ranked) >= top_p[cut, None]  # mass ahead of each token
        probs[cut] = part.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)
    cdf = probs.cumsum(-1)
    target = (uniform * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)[:, 0]


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
