"""RolloutWorker: answers prompts with a policy model, inside a Ray Data actor pool.

A plain class: Ray Data's `map_batches(RolloutWorker, concurrency=N, ...)` makes the pool, and
tests call it in-process. Rows arrive as pandas batches; rows already rejected pass through.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from cai_ray.config import EngineConfig
from cai_ray.conversation import Conversation
from cai_ray.engines.base import SamplingParams


class RolloutWorker:
    """Writes `answer_col` (n answers per row as a JSON list when n > 1) with one engine."""

    def __init__(
        self,
        model_path: str,
        engine: EngineConfig,
        sampling: SamplingParams,
        *,
        fmt: str = "transcript",
        too_long: str = "truncate",
        answer_col: str = "initial_answer",
        model_id: str | None = None,
    ):
        import torch

        from cai_ray.engines import make_engine
        from cai_ray.models import load_tokenizer

        torch.set_num_threads(engine.torch_threads())
        self.engine = make_engine(model_path, engine, model_id=model_id)
        self.tokenizer = load_tokenizer(model_path) if fmt == "chat" else None
        self.sampling = sampling
        self.fmt = fmt
        self.too_long = too_long
        self.answer_col = answer_col

    def __call__(self, batch: Any) -> Any:
        batch = batch.copy()
        answers = [""] * len(batch)
        rejects = list(batch["reject"])
        todo, prompts = [], []
        budget = self.engine.max_context - self.sampling.max_new_tokens
        for i, (msgs, reject) in enumerate(zip(batch["messages"], rejects, strict=True)):
            if reject:
                continue
            text = self._fit(Conversation.from_messages(json.loads(msgs)), budget)
            if text is None:
                rejects[i] = "prompt too long for the model's context"
                continue
            todo.append(i)
            prompts.append(text)
        texts = dict(zip(todo, self._answer(prompts), strict=True))
        for i in todo:
            if not all(texts[i]):
                rejects[i] = "empty answer after clean-up"
            answers[i] = texts[i][0] if len(texts[i]) == 1 else json.dumps(texts[i])
        batch[self.answer_col] = answers
        batch["reject"] = rejects
        return batch

    def _answer(self, prompts: list[str]) -> list[list[str]]:
        """Cleaned samples per prompt; a prompt with an empty sample is resampled once."""
        from cai_ray.critique import clean_output

        if not prompts:
            return []
        out = [
            [clean_output(s.text) for s in samples]
            for samples in self.engine.generate(prompts, self.sampling)
        ]
        retry = [i for i, texts in enumerate(out) if not all(texts)]
        if retry:
            seed = None if self.sampling.seed is None else self.sampling.seed + 1
            params = dataclasses.replace(self.sampling, seed=seed)
            again = self.engine.generate([prompts[i] for i in retry], params)
            for i, samples in zip(retry, again, strict=True):
                out[i] = [clean_output(s.text) for s in samples]
        return out

    def _fit(self, convo: Conversation, budget: int) -> str | None:
        """The rendered prompt; with too_long=truncate, earliest turns are dropped to fit."""
        while True:
            text = self.render(convo)
            if self.engine.count_tokens([text])[0] <= budget:
                return text
            users = [i for i, t in enumerate(convo.turns) if t.role == "user"]
            if self.too_long != "truncate" or len(users) < 2:
                return None
            convo = Conversation(convo.turns[users[1] :])

    def render(self, convo: Conversation) -> str:
        if self.fmt == "chat":
            return convo.render_chat(self.tokenizer)
        return convo.render_transcript()
