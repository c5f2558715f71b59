"""The Ray Serve application: a FastAPI ingress in front of the policy, PM and constitution.

Each model deployment is a thin shell over a backend (backends.py). The ingress authenticates,
bounds and validates every request before any model sees it, and answers every failure with an
OpenAI-style JSON error: 4xx for bad input, 503 for a model that is absent, not ready or too slow.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself on Serve methods.
import asyncio
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cai_ray.errors import CaiRayError
from cai_ray.serve import schemas as s
from cai_ray.serve.auth import check_bearer
from cai_ray.serve.backends import (
    ConstitutionBackend,
    PolicyBackend,
    RewardBackend,
    compare_scores,
    raise_if_error,
)
from cai_ray.serve.backends import assistant_turn as _turn
from cai_ray.serve.schemas import ApiError

api = FastAPI(title="cai-ray", docs_url=None, redoc_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown paths and wrong methods: FastAPI's own 404/405, in OpenAI's error shape.
    return _error(ApiError(exc.status_code, str(exc.detail), code="not_found"))


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(ApiError(400, f"invalid request: {exc.errors()[:1]}", code="invalid_value"))


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _as_api_error(exc: BaseException) -> ApiError:
    """The ApiError or CaiRayError inside a (Ray-wrapped) exception; else a 503 server error."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        inner = getattr(cur, "cause", None)  # a RayTaskError wraps the replica's exception
        if isinstance(inner, BaseException) and id(inner) not in seen:
            cur = inner
            continue
        if isinstance(cur, ApiError):
            return cur
        if isinstance(cur, CaiRayError):
            return ApiError(400, str(cur), code="invalid_value")
        if isinstance(cur, RayActorError):
            # The replica died mid-request (killed, OOM): Serve is replacing it and routes new
            # requests to the others, so this one is worth retrying (OpenAI clients retry 503s).
            return ApiError(
                503,
                "the model replica handling this request died; retry it",
                type="server_error",
                code="replica_died",
            )
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    return ApiError(503, f"model backend failed: {type(exc).__name__}", type="server_error")


# -- model deployments: a request waits up to `batch_wait_s` for others (at most
# `max_batch_size`), and the batch runs as one engine call. The call runs on the replica's
# user-code event loop, not in a worker thread: Ray Serve keeps receiving requests on its own
# thread and hands them over when the batch ends, and on a tiny model a worker thread fighting
# the loop for the GIL halved both the batch sizes and the throughput (bench_serve.py). A
# request that fails its own checks gets its error; the rest of its batch is unaffected.


def _batching(handler, deployment) -> None:
    handler.set_max_batch_size(deployment["max_batch_size"])
    handler.set_batch_wait_timeout_s(deployment["batch_wait_s"])


async def _one(handler, item):
    return raise_if_error(await handler(item))


@serve.deployment
class PolicyDeployment:
    """The policy engine (OpenAI endpoints)."""

    def __init__(self, path: str, engine, *, batching: dict[str, Any], **kwargs: Any):
        self.backend = PolicyBackend(path, engine, **kwargs)
        _batching(self._generate, batching)

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        prompt = self.backend.render_chat(messages)
        return (await self._run([prompt], params, True))[0]

    async def complete(self, prompts: list[str], params: dict[str, Any]) -> list[dict[str, Any]]:
        return await self._run(prompts, params, False)

    async def _run(self, prompts: list[str], params: dict[str, Any], chat: bool):
        if self.backend.async_engine is not None:  # vLLM batches continuously itself
            return await self.backend.generate_async(prompts, params, chat=chat)
        return await _one(self._generate, (prompts, params, chat))

    @serve.batch
    async def _generate(self, items: list[tuple]) -> list[Any]:
        return self.backend.generate_batch(items)

    async def ping(self) -> dict[str, Any]:
        if self.backend.async_engine is not None:
            return await self.backend.ping_async()
        return await asyncio.to_thread(self.backend.ping)


@serve.deployment
class RewardDeployment:
    """The preference model (`/v1/score`, `/v1/compare`)."""

    def __init__(self, path: str, engine, *, batching: dict[str, Any], **kwargs: Any):
        self.backend = RewardBackend(path, engine, **kwargs)
        _batching(self._score, batching)

    async def score(self, conversations: list[list[dict[str, str]]]) -> dict[str, Any]:
        return await _one(self._score, conversations)

    async def compare(self, messages: list[dict[str, str]], a: str, b: str) -> dict[str, Any]:
        out = await self.score([[*messages, _turn(a)], [*messages, _turn(b)]])
        return compare_scores(out)

    @serve.batch
    async def _score(self, items: list[list[list[dict[str, str]]]]) -> list[Any]:
        return self.backend.score_batch(items)

    async def ping(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.backend.ping)


@serve.deployment
class ConstitutionDeployment:
    """The constitution's critique and labeller roles (`/v1/critique`, `/v1/label`)."""

    def __init__(
        self,
        critique_path: str,
        feedback_path: str,
        engine,
        *,
        batching: dict[str, Any],
        **kwargs: Any,
    ):
        self.backend = ConstitutionBackend(critique_path, feedback_path, engine, **kwargs)
        _batching(self._critique, batching)
        _batching(self._label, batching)

    async def critique(self, request: dict[str, Any]) -> dict[str, Any]:
        return await _one(self._critique, request)

    async def label(self, request: dict[str, Any]) -> dict[str, Any]:
        return await _one(self._label, request)

    @serve.batch
    async def _critique(self, items: list[dict[str, Any]]) -> list[Any]:
        return self.backend.critique_batch(items)

    @serve.batch
    async def _label(self, items: list[dict[str, Any]]) -> list[Any]:
        return self.backend.label_batch(items)

    async def ping(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.backend.ping)


class IngressRoutes:
    """HTTP routes; `settings` holds the names, limits and auth digest (see launch.build_app).

    Wrapped below rather than decorated: the class must stay importable by its own name, or
    Ray pickles it by value and the route closures lose this module's globals.
    """

    def __init__(self, policy, reward, constitution, settings: dict[str, Any]):
        self.policy, self.reward, self.constitution = policy, reward, constitution
        self.cfg = settings

    # -- plumbing --------------------------------------------------------------------------

    async def _run(self, request: Request, schema, handler, *, auth: bool = True):
        """Auth, bounded body, validation, the handler under a timeout; errors as JSON."""
        try:
            if auth:
                check_bearer(request.headers.get("authorization"), self.cfg["token_digest"])
            body = s.parse_body(await self._body(request), schema) if schema else None
            return await asyncio.wait_for(handler(body), self.cfg["timeout_s"])
        except TimeoutError:
            err = ApiError(503, "the request timed out", type="server_error", code="timeout")
            return _error(err)
        except Exception as exc:
            return _error(_as_api_error(exc))

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg["max_body_bytes"]
        too_big = ApiError(413, f"request body over {limit} bytes", code="body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():  # stop reading as soon as the limit is passed
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def _sampling(self, body: s._Sampling) -> dict[str, Any]:
        """Engine sampling params from an OpenAI request, within the configured limits."""
        cfg = self.cfg
        if body.model not in cfg["policy_names"]:
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; served: {', '.join(cfg['policy_names'])}",
                param="model",
                code="model_not_found",
            )
        max_tokens = body.wanted_tokens(default=cfg["default_max_tokens"])
        if max_tokens > cfg["max_tokens_limit"]:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} is over this server's limit of {cfg['max_tokens_limit']}",
                param="max_tokens",
                code="invalid_value",
            )
        if body.n > cfg["max_n"]:
            raise ApiError(400, f"n is limited to {cfg['max_n']}", param="n", code="invalid_value")
        if body.min_tokens:
            raise ApiError(
                400, "min_tokens > 0 is not supported by this server", param="min_tokens"
            )
        return {
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_new_tokens": max_tokens,
            "n": body.n,
            "seed": body.seed,
            "stop": body.stops(),
        }

    def _need_reward(self):
        if self.reward is None:
            raise ApiError(
                503,
                "no preference model is configured: set serve.reward_path, serve.reward, or run "
                "the pm-train stage",
                type="server_error",
                code="model_not_configured",
            )
        return self.reward

    # -- policy ----------------------------------------------------------------------------

    @api.get("/v1/models")
    async def models(self, request: Request):
        async def handler(_body):
            now = int(time.time())
            names = [
                *self.cfg["policy_names"][:1],
                *([self.cfg["reward_name"]] * bool(self.reward)),
            ]
            return {
                "object": "list",
                "data": [
                    {"id": n, "object": "model", "created": now, "owned_by": "cai-ray"}
                    for n in names
                ],
            }

        return await self._run(request, None, handler)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        async def handler(body: s.ChatRequest):
            params = self._sampling(body)
            messages = [m.model_dump() for m in body.messages]
            out = await self.policy.chat.remote(messages, params)
            return _completion(body, [out], chat=True)

        return await self._run(request, s.ChatRequest, handler)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        async def handler(body: s.CompletionRequest):
            params = self._sampling(body)
            outs = await self.policy.complete.remote(body.prompts(), params)
            return _completion(body, outs, chat=False)

        return await self._run(request, s.CompletionRequest, handler)

    # -- preference model ------------------------------------------------------------------

    @api.post("/v1/score")
    async def score(self, request: Request):
        async def handler(body: s.ScoreRequest):
            convos = body.all_conversations()
            if len(convos) > self.cfg["max_batch"]:
                raise ApiError(400, f"at most {self.cfg['max_batch']} conversations per request")
            dumped = [[m.model_dump() for m in c] for c in convos]
            out = await self._need_reward().score.remote(dumped)
            data = [{"index": i, "score": v} for i, v in enumerate(out["scores"])]
            return {
                "object": "list",
                "model": self.cfg["reward_name"],
                "data": data,
                "scores": out["scores"],
                "usage": s.usage(out["prompt_tokens"]),
            }

        return await self._run(request, s.ScoreRequest, handler)

    @api.post("/v1/compare")
    async def compare(self, request: Request):
        async def handler(body: s.PairRequest):
            messages = [m.model_dump() for m in body.messages]
            out = await self._need_reward().compare.remote(
                messages, body.response_a, body.response_b
            )
            tokens = out.pop("prompt_tokens")
            return {"model": self.cfg["reward_name"], **out, "usage": s.usage(tokens)}

        return await self._run(request, s.PairRequest, handler)

    # -- constitution ----------------------------------------------------------------------

    @api.post("/v1/critique")
    async def critique(self, request: Request):
        async def handler(body: s.CritiqueRequest):
            if body.rounds > self.cfg["max_rounds"]:
                raise ApiError(
                    400, f"rounds is limited to {self.cfg['max_rounds']}", param="rounds"
                )
            request = body.model_dump()
            request["max_tokens"] = body.max_tokens or min(64, self.cfg["max_tokens_limit"])
            if request["max_tokens"] > self.cfg["max_tokens_limit"]:
                raise ApiError(
                    400,
                    f"max_tokens is limited to {self.cfg['max_tokens_limit']}",
                    param="max_tokens",
                )
            out = await self.constitution.critique.remote(request)
            return {**out, "usage": s.usage(0)}

        return await self._run(request, s.CritiqueRequest, handler)

    @api.post("/v1/label")
    async def label(self, request: Request):
        async def handler(body: s.LabelRequest):
            out = await self.constitution.label.remote(body.model_dump())
            return {**out, "usage": s.usage(out.pop("prompt_tokens"))}

        return await self._run(request, s.LabelRequest, handler)

    # -- health ----------------------------------------------------------------------------

    @api.get("/health")
    async def health(self, request: Request):
        async def handler(_body):
            return {"status": "ok", "policy": await self.policy.ping.remote()}

        return await self._run(request, None, handler, auth=False)

    @api.get("/ready")
    async def ready(self, request: Request):
        async def handler(_body):
            parts = {
                "policy": self.policy,
                "reward": self.reward,
                "constitution": self.constitution,
            }
            checks = {k: h.ping.remote() for k, h in parts.items() if h is not None}
            report = {k: await ref for k, ref in checks.items()}
            return {
                "status": "ready",
                "models": report,
                "reward_configured": self.reward is not None,
            }

        return await self._run(request, None, handler, auth=False)


Ingress = serve.deployment(serve.ingress(api)(IngressRoutes))


def _completion(body, outs: list[dict[str, Any]], *, chat: bool):
    """An OpenAI (chat) completion, or its SSE stream when `body.stream`."""
    created, model = int(time.time()), body.model
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    prompt_tokens = sum(o["prompt_tokens"] for o in outs)
    completion_tokens = sum(o["completion_tokens"] for o in outs)
    use = s.usage(prompt_tokens, completion_tokens)
    choices = [c for o in outs for c in o["choices"]]  # prompt-major, n per prompt (OpenAI order)
    if body.stream:
        stream = _stream(rid, created, model, choices, use, chat=chat)
        return StreamingResponse(stream, media_type="text/event-stream")
    kind = "chat.completion" if chat else "text_completion"
    items = []
    for i, (text, finish) in enumerate(choices):
        item = {"index": i, "finish_reason": finish, "logprobs": None}
        item.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        items.append(item)
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": model,
        "choices": items,
        "usage": use,
    }


def _stream(rid, created, model, choices, use, *, chat: bool):
    """Server-sent events. The HF engine has no token streaming: the finished text goes out in
    small pieces, so clients see the OpenAI stream protocol (deltas, finish, usage, [DONE])."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": rid, "object": kind, "created": created, "model": model}

    def chunk(index: int, piece: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if piece is not None:
                delta["content"] = piece
            part = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            part = {"index": index, "text": piece or "", "finish_reason": finish, "logprobs": None}
        return s.sse({**head, "choices": [part]})

    for i, (text, finish) in enumerate(choices):
        if chat:
            yield chunk(i, None, None, role=True)
        for piece in s.text_pieces(text):
            yield chunk(i, piece, None)
        yield chunk(i, None if chat else "", finish)
    yield s.sse({**head, "choices": [], "usage": use})
    yield s.sse("[DONE]")
