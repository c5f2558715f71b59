"""What each Serve deployment holds: plain classes over the core (engines, PM scorer, critique and
feedback), so the deployments in app.py stay thin shells.

Requests arrive already validated (schemas.py); what only the model can check (prompt length,
principle ids) raises an `ApiError` or a `CaiRayError`, which the ingress turns into a 400.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from typing import Any

from cai_ray.config import DEFAULT_STOP, EngineConfig, SLGenerateConfig
from cai_ray.data.conversation import Conversation, PromptFormat
from cai_ray.engines import resolve_threads
from cai_ray.engines.base import SamplingParams, ScoreRequest
from cai_ray.serve.schemas import ApiError
from cai_ray.sl.critique import ChainPrompter, CritiqueSettings, run_chains


def _conversation(messages: Sequence[dict[str, str]], param: str = "messages") -> Conversation:
    from cai_ray.errors import DataError

    try:
        return Conversation.from_messages(list(messages))
    except DataError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_value") from None


class BatchStats:
    """How requests were batched on this replica, for /ready and the tests: requests, engine
    batches, the largest batch."""

    def __init__(self) -> None:
        self.requests = self.batches = self.largest = 0

    def add(self, size: int) -> None:
        self.requests += size
        self.batches += 1
        self.largest = max(self.largest, size)

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest}


class PolicyBackend:
    """The policy engine: renders chat requests the run's way and enforces the prompt limits."""

    def __init__(
        self,
        path: str,
        engine: EngineConfig,
        *,
        fmt: str | PromptFormat,
        max_prompt_tokens: int,
        name: str,
    ):
        from cai_ray.engines import make_async_engine, make_engine

        # vLLM: its async engine, where each request joins the running batch (continuous
        # batching); HF: the deployment batches requests (`generate_batch`).
        self.async_engine = make_async_engine(path, engine)
        self.engine = self.async_engine or make_engine(path, engine, model_id=None)
        self.fmt = PromptFormat.of(fmt).load(path)  # its own tokenizer: any engine kind
        self.max_prompt_tokens = max_prompt_tokens
        self.name = name
        self._lock = threading.Lock()  # the HF engine is not thread-safe
        self.stats = BatchStats()

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt for a chat request: the chat template or the paper's transcript."""
        return self.fmt.render(_conversation(messages))

    def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        """One chat request: render the conversation, then `generate` it."""
        return self.generate([self.render_chat(messages)], params, chat=True)[0]

    def generate(
        self, prompts: list[str], params: dict[str, Any], *, chat: bool
    ) -> list[dict[str, Any]]:
        """Per prompt: `choices` [(text, finish_reason)], `prompt_tokens`, `completion_tokens`."""
        return raise_if_error(self.generate_batch([(prompts, params, chat)])[0])

    def generate_batch(
        self, items: Sequence[tuple[list[str], dict[str, Any], bool]]
    ) -> list[list[dict[str, Any]] | Exception]:
        """Several requests (prompts, params, chat) in shared forward passes, each with its own
        sampling params; a request that fails its checks gets its error, the rest still run."""

        def run(plans: list[tuple[list[str], SamplingParams, list[int]]]) -> list[list[dict]]:
            self.stats.add(len(plans))
            results = self.engine.generate_many([(p, sp) for p, sp, _ in plans])
            return [_choices(r, counts) for r, (_, _, counts) in zip(results, plans, strict=True)]

        return _batch_each(items, lambda item: self._plan(*item), run, self._lock)

    async def generate_async(
        self, prompts: list[str], params: dict[str, Any], *, chat: bool
    ) -> list[dict[str, Any]]:
        """`generate` on the async engine: the prompts run concurrently with every other
        request the replica holds."""
        import asyncio

        prompts, sampling, counts = self._plan(prompts, params, chat)
        self.stats.add(1)
        results = await asyncio.gather(
            *(self.async_engine.generate_async(p, sampling) for p in prompts)
        )
        return _choices(results, counts)

    async def ping_async(self) -> dict[str, Any]:
        out = await self.generate_async(
            ["Hello"], {"temperature": 0.0, "max_new_tokens": 1}, chat=False
        )
        ok = bool(out[0]["choices"])
        return {"model": self.name, "ok": ok, "pid": os.getpid(), "engine": "vllm-async"}

    def _plan(self, prompts: list[str], params: dict[str, Any], chat: bool):
        """(prompts, SamplingParams, token counts) of one request, its limits checked."""
        params = dict(params)
        stop = tuple(params.pop("stop", ()))
        if chat and self.fmt.kind == "transcript":
            stop = (*stop, *DEFAULT_STOP)  # a transcript model would go on to write the next turn
        sampling = SamplingParams(**params, stop=stop)
        counts = self.engine.count_tokens(prompts)
        for i, count in enumerate(counts):
            room = self.engine.max_context - sampling.max_new_tokens
            if count > min(self.max_prompt_tokens, room):
                raise ApiError(
                    400,
                    f"prompt {i} has {count} tokens; the limit is {self.max_prompt_tokens} and the "
                    f"model's context of {self.engine.max_context} leaves {room} after max_tokens",
                    param="messages" if chat else "prompt",
                    code="context_length_exceeded",
                )
        return prompts, sampling, counts

    def ping(self) -> dict[str, Any]:
        """A real one-token forward pass (health and readiness)."""
        out = self.generate(["Hello"], {"temperature": 0.0, "max_new_tokens": 1}, chat=False)
        # the pid of the replica that answered, for kill drills (tests/integration)
        ok = bool(out[0]["choices"])
        return {
            "model": self.name,
            "ok": ok,
            "pid": os.getpid(),
            "engine": "hf-batched",
            "batching": self.stats.as_dict(),
        }


class RewardBackend:
    """The preference model: scores conversations that end with an assistant turn."""

    def __init__(self, path: str, engine: EngineConfig, *, fmt: str, name: str):
        from cai_ray.feedback.reward import RewardScorer

        self.scorer = RewardScorer(
            path,
            device=engine.device,
            dtype=engine.dtype,
            threads=resolve_threads(engine.threads),
            batch_size=engine.batch_size,
        )
        self.fmt = fmt
        self.name = name
        self._lock = threading.Lock()

    def render(self, convo: Conversation) -> str:
        """The PM's input exactly as pm-train and the RL reward workers write it (the transcript
        of the whole conversation, `cai_ray.feedback.reward.pm_text`), whatever the run's format: a PM
        scores what it was trained on."""
        return convo.render_transcript(add_generation_prompt=False)

    def score(self, conversations: list[list[dict[str, str]]]) -> dict[str, Any]:
        """`scores` (one per conversation) and `prompt_tokens`."""
        return raise_if_error(self.score_batch([conversations])[0])

    def score_batch(
        self, items: Sequence[list[list[dict[str, str]]]]
    ) -> list[dict[str, Any] | Exception]:
        """Several requests' conversations scored in shared forward passes."""

        def run(batch: list[list[str]]) -> list[dict[str, Any]]:
            flat = [t for texts in batch for t in texts]
            counts, scores = self.scorer.count_tokens(flat), self.scorer.score(flat)
            out, k = [], 0
            for texts in batch:
                out.append(
                    {
                        "scores": scores[k : k + len(texts)],
                        "prompt_tokens": sum(counts[k : k + len(texts)]),
                    }
                )
                k += len(texts)
            return out

        return _batch_each(items, self._texts, run, self._lock)

    def _texts(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        return [
            self.render(_conversation(c, f"conversations.{i}")) for i, c in enumerate(conversations)
        ]

    def compare(self, messages: list[dict[str, str]], a: str, b: str) -> dict[str, Any]:
        """PM scores of both responses and P(a preferred) = sigmoid(r_a - r_b) (Bradley-Terry)."""
        return compare_scores(
            self.score([[*messages, assistant_turn(a)], [*messages, assistant_turn(b)]])
        )

    def ping(self) -> dict[str, Any]:
        value = self.score([[{"role": "user", "content": "hi"}, assistant_turn("hello")]])
        return {"model": self.name, "ok": value["scores"][0] == value["scores"][0]}  # not NaN


def split_gpu_memory(engine: EngineConfig, ways: int) -> EngineConfig:
    """`engine` for one of `ways` vLLM engines on one GPU: vLLM's gpu_memory_utilization is the
    fraction of the whole device one engine takes (config/cache.py), so two engines that each
    ask for 0.85 cannot both start."""
    v = engine.vllm
    share = v.model_copy(update={"gpu_memory_utilization": v.gpu_memory_utilization / ways})
    return engine.model_copy(update={"vllm": share})


def assistant_turn(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def compare_scores(out: dict[str, Any]) -> dict[str, Any]:
    """/v1/compare from the PM scores of (a, b): P(a preferred) = sigmoid(r_a - r_b)."""
    import math

    ra, rb = out["scores"]
    return {
        "score_a": ra,
        "score_b": rb,
        "prob_a_preferred": 1.0 / (1.0 + math.exp(rb - ra)),
        "prompt_tokens": out["prompt_tokens"],
    }


class ConstitutionBackend:
    """Critique/revision chains (paper 3.1) and multiple-choice AI feedback (paper 4.1)."""

    def __init__(
        self,
        critique_path: str,
        feedback_path: str,
        engine: EngineConfig,
        *,
        constitution: str,
        fmt: str,
        seed: int,
    ):
        from cai_ray.constitution import load_constitution
        from cai_ray.engines import make_engine

        self.constitution = load_constitution(constitution)
        same = str(feedback_path) == str(critique_path)
        if not same:  # two engines on the replica's GPU: vLLM's share is per engine
            engine = split_gpu_memory(engine, 2)
        self.critic = make_engine(critique_path, engine)
        self.judge = self.critic if same else make_engine(feedback_path, engine)
        self.fmt = PromptFormat.of(fmt).load(critique_path)
        self.seed = seed
        self._lock = threading.Lock()

    def critique(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run `rounds` critique -> revision steps on the response; the full trace comes back."""
        return raise_if_error(self.critique_batch([request])[0])

    def critique_batch(
        self, requests: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any] | Exception]:
        """Several critique requests; those with the same settings and principles run as one
        batch of chains (each round's critiques, then revisions, in shared forward passes)."""
        planned = [_attempt(self._plan_critique, r) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, plan in enumerate(planned):
            if not isinstance(plan, Exception):
                groups.setdefault(plan["key"], []).append(i)
        out: list[Any] = list(planned)
        for members in groups.values():
            first = planned[members[0]]
            prompter = _FixedPrompter(self.constitution, first["settings"])
            prompter.fixed = first["principles"]
            chains = [planned[i]["chain"] for i in members]
            results = _run_batch(
                lambda batch, p=prompter: run_chains(self.critic, p, batch), chains, self._lock
            )
            for i, result in zip(members, results, strict=True):
                out[i] = (
                    result
                    if isinstance(result, Exception)
                    else _attempt(_critique_response, planned[i]["chain"][2], result)
                )
        return out

    def _plan_critique(self, request: dict[str, Any]) -> dict[str, Any]:
        convo, answer = _split_answer(request["messages"], request.get("response"))
        principles = tuple(self._critique_principles(request.get("principle_ids")))
        settings = CritiqueSettings(
            section=SLGenerateConfig(rounds=request["rounds"], few_shot=request.get("few_shot")),
            fmt=self.fmt,
            seed=request["seed"],
            sampling=SamplingParams(
                temperature=request["temperature"],
                max_new_tokens=request["max_tokens"],
                stop=DEFAULT_STOP,
            ),
        )
        key = (
            request["rounds"],
            request.get("few_shot"),
            request["seed"],
            request["temperature"],
            request["max_tokens"],
            tuple(p.id for p in principles),
        )
        chain = (convo.prompt_id, convo, answer)
        return {"key": key, "settings": settings, "principles": principles, "chain": chain}

    def label(self, request: dict[str, Any]) -> dict[str, Any]:
        """P(response_a preferred) per feedback principle, both orders averaged, then the mean."""
        return raise_if_error(self.label_batch([request])[0])

    def label_batch(self, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        """Several label requests' multiple-choice prompts scored in one `score_options` call."""

        def run(plans: list[tuple[list, list[ScoreRequest]]]) -> list[dict[str, Any]]:
            scores = self.judge.score_options([r for _, reqs in plans for r in reqs])
            out, k = [], 0
            for principles, reqs in plans:
                out.append(_label_response(principles, scores[k : k + len(reqs)]))
                k += len(reqs)
            return out

        return _batch_each(requests, self._plan_label, run, self._lock)

    def _plan_label(self, request: dict[str, Any]) -> tuple[list, list[ScoreRequest]]:
        from cai_ray.feedback.prompts import OPTIONS, build_feedback_prompt

        convo = _conversation(request["messages"])
        a, b = request["response_a"], request["response_b"]
        key = _pair_key(convo, a, b)
        principles = self._feedback_principles(request, key)
        text = convo.render_transcript(add_generation_prompt=False)
        shots = self._feedback_shots(key, request.get("few_shot", 0))
        reqs = []
        for p in principles:
            for first, second in ((a, b), (b, a)):  # both orders cancel position bias
                prompt = build_feedback_prompt(text, p.question, first, second, few_shot=shots)
                reqs.append(ScoreRequest(prompt, OPTIONS))
        return principles, reqs

    def ping(self) -> dict[str, Any]:
        with self._lock:
            (out,) = self.judge.score_options([ScoreRequest("The answer is:", (" (A)", " (B)"))])
        return {"model": "constitution", "ok": len(out.logprobs) == 2}

    # -- principles ----------------------------------------------------------------------------

    def _critique_principles(self, ids: list[str] | None):
        return [self._lookup(self.constitution.critique_principle, i) for i in ids or []]

    def _feedback_principles(self, request: dict[str, Any], key: str):
        from cai_ray.constitution import choose_principles

        ids = request.get("principle_ids")
        if ids:
            return [self._lookup(self.constitution.feedback_principle, i) for i in ids]
        pool = self._lookup(lambda _: self.constitution.require_feedback(), None)
        return choose_principles(pool, seed=self.seed, key=key, k=request["num_principles"])

    def _feedback_shots(self, key: str, count: int) -> str:
        """Answered few-shot examples, each under its own principle as stage 4 shows them."""
        from cai_ray.config import RLLabelConfig
        from cai_ray.feedback.labeling import few_shots

        if not count:
            return ""
        settings = RLLabelConfig(few_shot=count)
        shots = few_shots(self.constitution, key=key, settings=settings, seed=self.seed)
        return "\n\n".join(ex.as_transcript(question=q) for ex, q in shots)

    @staticmethod
    def _lookup(find, principle_id):
        from cai_ray.errors import ConstitutionError

        try:
            return find(principle_id)
        except ConstitutionError as exc:
            raise ApiError(
                400, exc.message + (f" ({exc.hint})" if exc.hint else ""), param="principle_ids"
            ) from None


def _critique_response(answer: str, result) -> dict[str, Any]:
    """The /v1/critique body of one finished chain."""
    if result.reject and "too long" in result.reject:
        raise ApiError(400, result.reject, param="messages", code="context_length_exceeded")
    rounds = [r.to_row() for r in result.rounds]
    return {
        "response": answer,
        "revision": rounds[-1]["revision"] if rounds else None,
        "critiques": [r["critique"] for r in rounds],
        "revisions": [r["revision"] for r in rounds],
        "rounds": rounds,
        "rejected": result.reject,
    }


def _label_response(principles, scores) -> dict[str, Any]:
    """The /v1/label body: per principle both orders, averaged; then the mean over principles."""
    from cai_ray.feedback.prompts import prob_first_preferred

    detail = []
    for i, p in enumerate(principles):
        first = prob_first_preferred(*scores[2 * i].logprobs)
        second = 1.0 - prob_first_preferred(*scores[2 * i + 1].logprobs)
        detail.append(
            {
                "id": p.id,
                "question": p.question,
                "prob_a_shown_first": first,
                "prob_a_shown_second": second,
                "prob_a_preferred": 0.5 * (first + second),
            }
        )
    overall = sum(d["prob_a_preferred"] for d in detail) / len(detail)
    return {
        "prob_a_preferred": overall,
        "preferred": "a" if overall >= 0.5 else "b",
        "principles": detail,
        "prompt_tokens": sum(s.prefix_tokens for s in scores),
    }


def _pair_key(convo: Conversation, a: str, b: str) -> str:
    """Principles are drawn per comparison (paper 4.1), fixed by its content: a retry of the
    same request gets the same label."""
    return hashlib.sha256(f"{convo.prompt_id}\0{a}\0{b}".encode()).hexdigest()[:16]


def _split_answer(messages: list[dict[str, str]], response: str | None):
    """The conversation before the critiqued answer, and the answer."""
    if response is None:
        if not messages or messages[-1].get("role") != "assistant":
            raise ApiError(
                400,
                "give 'response', or end 'messages' with the assistant turn to critique",
                param="response",
                code="missing_field",
            )
        messages, response = messages[:-1], messages[-1]["content"]
    return _conversation(messages), response


class _FixedPrompter(ChainPrompter):
    """Uses the requested principles in turn; samples one per round when none were given."""

    fixed: tuple[Any, ...] = ()

    def principle(self, prompt_id: str, round_index: int):
        if self.fixed:
            return self.fixed[round_index % len(self.fixed)]
        return super().principle(prompt_id, round_index)


def _attempt(fn, *args):
    """fn(*args), or the user error it raised (one request of a batch failing its checks)."""
    from cai_ray.errors import CaiRayError

    try:
        return fn(*args)
    except (ApiError, CaiRayError) as exc:
        return exc


def _choices(results, counts: list[int]) -> list[dict[str, Any]]:
    """Per prompt: `choices` [(text, finish_reason)], `prompt_tokens`, `completion_tokens`."""
    return [
        {
            "choices": [(g.text, g.finish_reason) for g in gens],
            "prompt_tokens": count,
            "completion_tokens": sum(len(g.token_ids) for g in gens),
        }
        for gens, count in zip(results, counts, strict=True)
    ]


def _batch_each(items: Sequence[Any], plan, run, lock: threading.Lock) -> list:
    """One result per item: plan each (a user error is that item's result), then run the
    planned ones as one batch (`_run_batch`)."""
    planned = [_attempt(plan, item) for item in items]
    ok = [i for i, p in enumerate(planned) if not isinstance(p, Exception)]
    out: list[Any] = list(planned)
    for i, value in zip(ok, _run_batch(run, [planned[i] for i in ok], lock), strict=True):
        out[i] = value
    return out


def _run_batch(run, batch: list, lock: threading.Lock) -> list:
    """run(batch) under the engine lock, one result per item; when the whole batch fails with
    a user error, each item again on its own, so only the one at fault gets the error."""
    from cai_ray.errors import CaiRayError

    if not batch:
        return []
    try:
        with lock:
            return run(batch)
    except (ApiError, CaiRayError) as exc:
        if len(batch) == 1:
            return [exc]
    return [_run_batch(run, [item], lock)[0] for item in batch]


def raise_if_error(result):
    """A batched request's own result, or its error raised."""
    if isinstance(result, Exception):
        raise result
    return result
