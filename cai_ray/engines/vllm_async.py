"""`AsyncVLLMEngine`: vLLM's async engine behind Serve's policy (continuous batching).

The offline adapter (`vllm.py`) serves the pipeline's batch stages and weight sync; this one
only generates, one request at a time as requests arrive, and shares the offline adapter's
engine arguments, start-up checks and sampling conversion.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from cai_ray.engines.base import Generation, SamplingParams, prompt_seed
from cai_ray.engines.vllm import (
    _client_errors,
    _engine_kwargs,
    _import_vllm,
    _starting,
    copies_of,
    from_request_output,
    is_greedy,
    to_vllm_sampling_kwargs,
)
from cai_ray.errors import CaiRayError


class AsyncVLLMEngine:
    """vLLM's `AsyncLLM` for serving: every request joins the engine's running batch as it
    arrives (continuous batching), instead of waiting for a batch to form and finish. The same
    model, arguments and sampling semantics as `VLLMEngine` (greedy n copies, a seed per
    prompt, stop strings cut); no weight sync or scoring (Serve's policy only generates).
    """

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        threads: int | None = None,
        model_id: str | None = None,
        **options: Any,
    ):
        """`options`: `_engine_kwargs`' (dtype, max_model_len, ...), as `make_async_engine`
        passes them from the EngineConfig."""
        vllm, self.on_cpu = _import_vllm(model_path, device)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._vllm = vllm
        self._client_errors = _client_errors()
        kwargs = _engine_kwargs(self.on_cpu, **options)
        with _starting(model_path, threads, on_cpu=self.on_cpu):
            self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_path, **kwargs))
        from cai_ray.models import model_id as content_id

        self.tokenizer = self.llm.get_tokenizer()
        self.model_id = model_id or content_id(model_path)
        self.max_context = int(self.llm.model_config.max_model_len)
        self._watched = False

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        from cai_ray.data.tokens import encode

        return [encode(self.tokenizer, t) for t in texts]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenize(texts)]

    async def generate_async(self, prompt: str, params: SamplingParams) -> list[Generation]:
        """`params.n` samples of one prompt, as `VLLMEngine.generate` gives them."""
        import uuid

        if not self._watched:  # the engine core follows this process if it is killed
            await self.llm.collective_rpc("cai_exit_with", args=(os.getpid(),))
            self._watched = True
        (ids,) = self.tokenize([prompt])
        if len(ids) >= self.max_context:
            raise CaiRayError(
                f"prompt has {len(ids)} tokens; the model accepts {self.max_context} in all",
                where=self.model_id,
                hint="shorten the prompt or raise max_model_len",
            )
        kwargs = to_vllm_sampling_kwargs(params)
        if params.seed is not None:
            kwargs["seed"] = prompt_seed(params.seed, ids)
        try:
            sampling = self._vllm.SamplingParams(**kwargs)
            final = None
            stream = self.llm.generate(
                {"prompt_token_ids": ids}, sampling, request_id=uuid.uuid4().hex
            )
            async for out in stream:
                final = out
        except self._client_errors as err:
            raise CaiRayError(
                f"vLLM refused the request: {err}",
                where=self.model_id,
                hint="check the sampling parameters and prompt length against the model",
            ) from err
        copies = params.n if is_greedy(params) else 1
        return copies_of(from_request_output(final, stop=params.stop), copies)

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.shutdown()
