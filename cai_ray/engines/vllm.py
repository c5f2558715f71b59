"""`VLLMEngine`: the Engine interface on vLLM (GPU clusters), written against vLLM 0.33's API.

vLLM is imported only inside `VLLMEngine.__init__`. The translation between our types and
vLLM's (sampling parameters, `RequestOutput` -> `Generation`, prompt logprobs -> option scores,
the prefix/option token boundary) lives in module-level functions that take plain values or
vLLM-shaped objects, so they are unit-tested where vLLM cannot be installed.

Scoring note: vLLM 0.33 sets `skip_reading_prefix_cache` on every request that asks for prompt
logprobs (cached positions would have no logprobs), so `score_options` recomputes the shared
prefix for each option; the requests still run as one batch. Generation uses the prefix cache.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from cai_ray.engines.base import (
    Engine,
    Generation,
    OptionScores,
    SamplingParams,
    ScoreRequest,
)
from cai_ray.engines.vllm_worker_ext import (
    DEFAULT_CHUNK_BYTES,
    WORKER_EXTENSION,
    chunk_named_tensors,
    dtype_name,
    pack_tensors,
)
from cai_ray.errors import CaiRayError, ConfigError, ModelError
from cai_ray.profiling import span

_T = TypeVar("_T")
MAX_VLLM_TEMPERATURE = 2.0  # vLLM 0.33 SamplingParams rejects temperature > 2
_FINISH_REASONS = {"stop": "stop", "length": "length"}


def to_vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` that mean what `params` means."""
    if params.temperature > MAX_VLLM_TEMPERATURE:
        raise CaiRayError(
            f"vLLM accepts temperature <= {MAX_VLLM_TEMPERATURE}, got {params.temperature}",
            where="SamplingParams.temperature",
            hint="lower the temperature, or use engine: hf",
        )
    kwargs: dict[str, Any] = {
        "n": params.n,
        "temperature": params.temperature,  # 0 is greedy in vLLM as here
        "top_p": 1.0 if params.temperature == 0 else params.top_p,
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop),
        "include_stop_str_in_output": False,  # Generation.text excludes the stop string
        "seed": params.seed,  # vLLM gives sample i of a request the seed `seed + i`
    }
    if params.logprobs:
        # logprobs=k returns the top k plus the sampled token; k=0 is just the sampled one.
        kwargs["logprobs"] = 0
    return kwargs


def scoring_sampling_kwargs() -> dict[str, Any]:
    """`vllm.SamplingParams` for scoring: the prompt's own token logprobs, one throwaway token."""
    return {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "detokenize": False}


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (excluding) the earliest stop string; vLLM already cuts, this guards it."""
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def sampled_token_logprobs(token_ids: Sequence[int], logprobs: Sequence[Any]) -> list[float]:
    """The sampled token's logprob at each position, from vLLM's per-position
    `{token_id: Logprob}` dicts (a list or a `FlatLogprobs`, which indexes the same way)."""
    if len(logprobs) != len(token_ids):
        raise ValueError(f"{len(logprobs)} logprob positions for {len(token_ids)} tokens")
    out = []
    for position, (token_id, candidates) in enumerate(zip(token_ids, logprobs, strict=True)):
        if not candidates or token_id not in candidates:
            raise ValueError(f"no logprob for sampled token {token_id} at position {position}")
        out.append(float(candidates[token_id].logprob))
    return out


def from_request_output(output: Any, *, stop: Sequence[str] = ()) -> list[Generation]:
    """One `Generation` per `CompletionOutput` of a vLLM `RequestOutput`, in sample order."""
    prompt_tokens = len(output.prompt_token_ids or [])
    generations = []
    for completion in sorted(output.outputs, key=lambda c: c.index):
        reason = _FINISH_REASONS.get(str(completion.finish_reason))
        if reason is None:
            raise ModelError(
                f"vLLM finished a sample with reason {completion.finish_reason!r}",
                where=f"vLLM request {output.request_id}",
                hint="an 'abort' or 'error' sample is not usable; see the vLLM log above",
            )
        token_ids = [int(t) for t in completion.token_ids]
        logprobs = None
        if completion.logprobs is not None:
            logprobs = sampled_token_logprobs(token_ids, completion.logprobs)
        generations.append(
            Generation(
                text=cut_at_stop(completion.text, stop),
                token_ids=token_ids,
                finish_reason=reason,
                prompt_tokens=prompt_tokens,
                logprobs=logprobs,
            )
        )
    return generations


def option_token_ids(
    prefix_ids: Sequence[int], joint_ids: Sequence[int], own_ids: Sequence[int]
) -> tuple[list[int], bool]:
    """The option's tokens to score right after exactly `prefix_ids`, and whether they had to
    be tokenized on their own.

    `joint_ids` tokenizes prefix + option together; when the tokenizer merged across the
    boundary (a trailing space joining ` (A)`), the prefix tokens are not its head, and the
    option's own tokens (`own_ids`, no special tokens) are used so the prefix is never
    re-scored. HFEngine applies the same rule, so both backends score the same tokens.
    """
    n = len(prefix_ids)
    if list(joint_ids[:n]) == list(prefix_ids):
        return list(joint_ids[n:]), False
    return list(own_ids), True


def option_logprobs_from_prompt_logprobs(
    prompt_logprobs: Sequence[Any], token_ids: Sequence[int], start: int
) -> float:
    """Sum of the logprobs of `token_ids[start:]` from vLLM's `prompt_logprobs`.

    Entry i is `{token_id: Logprob}` for prompt token i given tokens < i (entry 0 is None).
    """
    if start < 1:
        raise ValueError(f"start must be >= 1 (prompt token 0 has no logprob), got {start}")
    if len(prompt_logprobs) != len(token_ids):
        raise ValueError(f"{len(prompt_logprobs)} prompt logprobs for {len(token_ids)} tokens")
    total = 0.0
    for i in range(start, len(token_ids)):
        entry = prompt_logprobs[i]
        if not entry or token_ids[i] not in entry:
            raise ValueError(f"no prompt logprob for token {token_ids[i]} at position {i}")
        total += float(entry[token_ids[i]].logprob)
    return total


def plan_score_prompts(
    encode: Callable[..., list[int]], requests: Sequence[ScoreRequest]
) -> tuple[list[list[int]], list[int], list[dict[str, Any]]]:
    """Token ids of every prefix + option prompt and the index its option starts at, flattened
    request by request, option by option; plus per request `prefix_tokens` and trace meta.

    `encode(text, add_special_tokens=...)` is the model's tokenizer.
    """
    prompts, starts, infos = [], [], []
    for i, request in enumerate(requests):
        prefix_ids = encode(request.prefix, add_special_tokens=True)
        if not prefix_ids:
            raise CaiRayError(
                "the prefix has no tokens, so the option's first token has no logprob",
                where=f"score request {i}",
                hint="use a non-empty prefix (or a tokenizer that adds a BOS token)",
            )
        separate = []
        for j, option in enumerate(request.options):
            joint = encode(request.prefix + option, add_special_tokens=True)
            own = encode(option, add_special_tokens=False)
            tokens, alone = option_token_ids(prefix_ids, joint, own)
            if not tokens:
                raise CaiRayError(
                    "the option adds no tokens after the prefix",
                    where=f"score request {i}, option {j} ({option!r})",
                    hint="use a non-empty option",
                )
            if alone:
                separate.append(j)
            prompts.append(list(prefix_ids) + tokens)
            starts.append(len(prefix_ids))
        meta = {"separately_tokenized_options": separate} if separate else {}
        infos.append({"prefix_tokens": len(prefix_ids), "meta": meta})
    return prompts, starts, infos


def _call_with_timeout(fn: Callable[[], _T], *, timeout_s: float, what: str) -> _T:
    """Run a blocking vLLM call with a deadline (vLLM's in-process executor ignores its own
    `timeout`). After a timeout the engine is in an unknown state: discard it."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-rpc")
    try:
        return pool.submit(fn).result(timeout=timeout_s)
    except FutureTimeout as err:
        raise TimeoutError(
            f"vLLM {what} did not finish within {timeout_s:.0f} s; the engine is unusable now "
            "(for a weight-group call: check the trainer joined/broadcast with the same "
            "address, port, world size, names and shapes)"
        ) from err
    finally:
        pool.shutdown(wait=False)  # a hung worker call must not hang the caller too


class VLLMEngine(Engine):
    """vLLM-backed generation and scoring; one `vllm.LLM` (tensor parallel inside vLLM).

    `extra` is passed to `vllm.LLM` as is, overriding the defaults set here (for example
    `{"enforce_eager": True}` or `{"logprobs_mode": "processed_logprobs"}`: vLLM's default
    sample logprobs are the raw model's, before temperature and top-p).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        model_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ):
        try:
            import vllm
        except ImportError as err:
            raise ModelError(
                f"engine 'vllm' needs the vllm package, which is not importable ({err})",
                where=model_path,
                hint="pip install 'cai-ray[vllm]' on a CUDA machine, or use engine: hf",
            ) from err
        self._vllm = vllm
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_prefix_caching": enable_prefix_caching,
            "seed": seed,
            "worker_extension_cls": WORKER_EXTENSION,
            # The worker builds vLLM's NCCL receiver up front; the group forms only on
            # init_weight_update_group, so engines that never sync pay nothing.
            "weight_transfer_config": {"backend": "nccl"},
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(extra or {})
        try:
            self.llm = vllm.LLM(model_path, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelError(
                f"vLLM could not start with this model: {err}",
                where=model_path,
                hint="check the model directory (config.json, weights) and the `extra` arguments",
            ) from err
        from cai_ray.models import model_id as content_id

        self._tokenizer = self.llm.get_tokenizer()
        self.model_id = model_id or content_id(model_path)  # the same id HFEngine records
        self.weight_version = 0

    # -- Engine interface -------------------------------------------------------------------

    def _encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        from cai_ray.tokens import encode

        if add_special_tokens:  # one BOS even when a chat template already wrote it
            return encode(self._tokenizer, text)
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _check_length(self, prompts: Sequence[list[int]]) -> None:
        limit = self.max_context
        for i, ids in enumerate(prompts):
            if not ids:
                raise CaiRayError("prompt is empty after tokenisation", where=f"prompt {i}")
            if len(ids) >= limit:
                raise CaiRayError(
                    f"prompt has {len(ids)} tokens; the model accepts {limit} in all",
                    where=f"prompt {i}",
                    hint="shorten the prompt or raise max_model_len",
                )

    @span("generate")
    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[Generation]]:
        """Sample `params.n` continuations per prompt (one vLLM batch, prefix cache on)."""
        token_prompts = [self._encode(p) for p in prompts]
        self._check_length(token_prompts)
        sampling = self._vllm.SamplingParams(**to_vllm_sampling_kwargs(params))
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in token_prompts], sampling, use_tqdm=False
        )
        return [from_request_output(out, stop=params.stop) for out in outputs]

    @span("score")
    def score_options(self, requests: Sequence[ScoreRequest]) -> list[OptionScores]:
        """Summed logprob of each option's tokens after its prefix (paper section 4.1 labels):
        one request per (prefix, option) asking for the prompt tokens' own logprobs."""
        prompts, starts, infos = plan_score_prompts(self._encode, requests)
        self._check_length(prompts)
        sampling = self._vllm.SamplingParams(**scoring_sampling_kwargs())
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts], sampling, use_tqdm=False
        )
        results, k = [], 0
        for request, info in zip(requests, infos, strict=True):
            logprobs, option_ids = [], []
            for _ in request.options:
                ids, start = prompts[k], starts[k]
                plp = outputs[k].prompt_logprobs
                logprobs.append(option_logprobs_from_prompt_logprobs(plp, ids, start))
                option_ids.append(ids[start:])
                k += 1
            meta = {"engine": "vllm", "weight_version": self.weight_version, **info["meta"]}
            results.append(
                OptionScores(
                    logprobs=logprobs,
                    option_token_ids=option_ids,
                    prefix_tokens=info["prefix_tokens"],
                    meta=meta,
                )
            )
        return results

    def load_weights(
        self,
        state_dict: Mapping[str, Any],
        *,
        version: int,
        timeout_s: float = 600.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        """Load HF-named tensors into every worker, then reset the prefix cache (its KV was
        computed with the old weights). For weights on other GPUs use the NCCL group instead."""
        try:
            for chunk in chunk_named_tensors(state_dict.items(), chunk_bytes):
                payload = pack_tensors(chunk)
                self._rpc("cai_stage_weights", args=(payload,), timeout_s=timeout_s)
            self._rpc("cai_apply_staged_weights", timeout_s=timeout_s)
        except TimeoutError:
            raise  # the workers are stuck: another RPC would hang too
        except Exception:
            self._rpc("cai_clear_staged_weights", timeout_s=timeout_s)
            raise
        self._after_weight_update(version)

    @property
    def max_context(self) -> int:
        """vLLM's `max_model_len` (the model's context, or the `max_model_len` given)."""
        return int(self.llm.model_config.max_model_len)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids as the engine sends them (BOS included)."""
        return [self._encode(t) for t in texts]

    def close(self) -> None:
        """Shut the engine core down and free GPU memory."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- NCCL weight sync (learner on other GPUs) ------------------------------------------

    def init_weight_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        *,
        backend: str = "nccl",
        timeout_s: float = 300.0,
    ) -> None:
        """Join the trainer's NCCL group through vLLM's weight-transfer engine. The trainer
        (rank 0, `vllm_worker_ext.open_trainer_group`) must join concurrently; the workers
        take ranks `rank_offset .. rank_offset + tensor_parallel_size - 1`."""
        if backend != "nccl":
            raise ConfigError(
                f"weight transfer backend {backend!r} is not supported",
                where="init_weight_update_group(backend=...)",
                hint="use backend='nccl' (the backend this engine configures in vLLM)",
            )
        init_info = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "packed": False,  # must match broadcast_named_tensors: one tensor per broadcast
        }
        self._rpc(
            "init_weight_transfer_engine", kwargs={"init_info": init_info}, timeout_s=timeout_s
        )

    def update_weights_from_group(
        self,
        names: Sequence[str],
        dtypes: Sequence[Any],
        shapes: Sequence[Sequence[int]],
        *,
        version: int,
        timeout_s: float = 600.0,
    ) -> None:
        """Receive the tensors the trainer broadcasts (same names, dtypes, shapes, order; see
        `vllm_worker_ext.weight_update_metadata`), load them, reset the prefix cache."""
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"{len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes")
        update_info = {
            "names": list(names),
            "dtype_names": [dtype_name(d) for d in dtypes],
            "shapes": [list(s) for s in shapes],
        }
        # The same three calls as LLM.start_weight_update/update_weights/finish_weight_update,
        # through collective_rpc so each gets a deadline.
        self._rpc("start_weight_update", timeout_s=timeout_s)
        self._rpc("update_weights", kwargs={"update_info": update_info}, timeout_s=timeout_s)
        self._rpc("finish_weight_update", timeout_s=timeout_s)
        self._after_weight_update(version)

    # -- internals ------------------------------------------------------------------------

    def _rpc(
        self,
        method: str,
        *,
        timeout_s: float,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        return _call_with_timeout(
            lambda: self.llm.collective_rpc(method, timeout=timeout_s, args=args, kwargs=kwargs),
            timeout_s=timeout_s,
            what=method,
        )

    def _after_weight_update(self, version: int) -> None:
        # Cached KV blocks were computed by the old weights; generation after a sync must not
        # reuse them (DESIGN.md, Engines). No request is running between our batch calls.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
        self.llm.update_weight_version(str(version))  # vLLM tags outputs with it
        self.weight_version = version
