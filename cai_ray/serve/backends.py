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

from cai_ray.config import DEFAULT_STOP, EngineConfig
from cai_ray.conversation import Conversation, PromptFormat
from cai_ray.critique import ChainPrompter, CritiqueSettings, run_chains
from cai_ray.engines.base import SamplingParams, ScoreRequest
from cai_ray.serve.schemas import ApiError


def _conversation(messages: Sequence[dict[str, str]], param: str = "messages") -> Conversation:
    from cai_ray.errors import DataError

    try:
        return Conversation.from_messages(list(messages))
    except DataError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_value") from None


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
        from cai_ray.engines import make_engine

        self.engine = make_engine(path, engine, model_id=None)
        self.fmt = PromptFormat.of(fmt).load(path)  # its own tokenizer: any engine kind
        self.max_prompt_tokens = max_prompt_tokens
        self.name = name
        self._lock = threading.Lock()  # the HF engine is not thread-safe

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
        with self._lock:
            results = self.engine.generate(prompts, sampling)
        return [
            {
                "choices": [(g.text, g.finish_reason) for g in gens],
                "prompt_tokens": count,
                "completion_tokens": sum(len(g.token_ids) for g in gens),
            }
            for gens, count in zip(results, counts, strict=True)
        ]

    def ping(self) -> dict[str, Any]:
        """A real one-token forward pass (health and readiness)."""
        out = self.generate(["Hello"], {"temperature": 0.0, "max_new_tokens": 1}, chat=False)
        # the pid of the replica that answered, for kill drills (tests/integration)
        return {"model": self.name, "ok": bool(out[0]["choices"]), "pid": os.getpid()}


class RewardBackend:
    """The preference model: scores conversations that end with an assistant turn."""

    def __init__(self, path: str, engine: EngineConfig, *, fmt: str, name: str):
        from cai_ray.reward import RewardScorer

        self.scorer = RewardScorer(
            path, device=engine.device, dtype=engine.dtype, threads=engine.torch_threads()
        )
        self.fmt = fmt
        self.name = name
        self._lock = threading.Lock()

    def render(self, convo: Conversation) -> str:
        """The PM's input exactly as pm-train and the RL reward workers write it (the transcript
        of the whole conversation, `cai_ray.reward.pm_text`), whatever the run's format: a PM
        scores what it was trained on."""
        return convo.render_transcript(add_generation_prompt=False)

    def score(self, conversations: list[list[dict[str, str]]]) -> dict[str, Any]:
        """`scores` (one per conversation) and `prompt_tokens`."""
        texts = [
            self.render(_conversation(c, f"conversations.{i}")) for i, c in enumerate(conversations)
        ]
        with self._lock:
            counts = self.scorer.count_tokens(texts)
            scores = self.scorer.score(texts)
        return {"scores": scores, "prompt_tokens": sum(counts)}

    def compare(self, messages: list[dict[str, str]], a: str, b: str) -> dict[str, Any]:
        """PM scores of both responses and P(a preferred) = sigmoid(r_a - r_b) (Bradley-Terry)."""
        import math

        out = self.score([[*messages, _assistant(a)], [*messages, _assistant(b)]])
        ra, rb = out["scores"]
        return {
            "score_a": ra,
            "score_b": rb,
            "prob_a_preferred": 1.0 / (1.0 + math.exp(rb - ra)),
            "prompt_tokens": out["prompt_tokens"],
        }

    def ping(self) -> dict[str, Any]:
        value = self.score([[{"role": "user", "content": "hi"}, _assistant("hello")]])
        return {"model": self.name, "ok": value["scores"][0] == value["scores"][0]}  # not NaN


def split_gpu_memory(engine: EngineConfig, ways: int) -> EngineConfig:
    """`engine` for one of `ways` vLLM engines on one GPU: vLLM's gpu_memory_utilization is the
    fraction of the whole device one engine takes (config/cache.py), so two engines that each
    ask for 0.85 cannot both start."""
    v = engine.vllm
    share = v.model_copy(update={"gpu_memory_utilization": v.gpu_memory_utilization / ways})
    return engine.model_copy(update={"vllm": share})


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


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
        convo, answer = _split_answer(request["messages"], request.get("response"))
        principles = self._critique_principles(request.get("principle_ids"))
        settings = CritiqueSettings(
            rounds=request["rounds"],
            fmt=self.fmt,
            few_shot=request.get("few_shot"),
            seed=request["seed"],
            sampling=SamplingParams(
                temperature=request["temperature"],
                max_new_tokens=request["max_tokens"],
                stop=DEFAULT_STOP,
            ),
        )
        prompter = _FixedPrompter(self.constitution, settings)
        prompter.fixed = tuple(principles)
        with self._lock:
            (result,) = run_chains(self.critic, prompter, [(convo.prompt_id, convo, answer)])
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

    def label(self, request: dict[str, Any]) -> dict[str, Any]:
        """P(response_a preferred) per feedback principle, both orders averaged, then the mean."""
        from cai_ray.feedback import OPTIONS, build_feedback_prompt, prob_first_preferred

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
        with self._lock:
            scores = self.judge.score_options(reqs)
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
        from cai_ray.labeling import LabelSettings, few_shots

        if not count:
            return ""
        settings = LabelSettings(few_shot=count, seed=self.seed)
        shots = few_shots(self.constitution, key=key, settings=settings)
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
