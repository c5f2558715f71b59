"""RolloutWorker: answers prompts with a policy model, inside a Ray Data actor pool.

A plain class: Ray Data's `map_batches(RolloutWorker, concurrency=N, ...)` makes the pool, and
tests call it in-process. Rows arrive as pandas batches; rows already rejected pass through.
Each answer's finish reason goes beside it (`<answer_col>_finish`): an answer cut at the token
limit must not later be trained on as if it were finished (issue 14).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from cai_ray.config import EngineConfig
from cai_ray.data.conversation import Conversation, PromptFormat
from cai_ray.engines.base import SamplingParams


class RolloutWorker:
    """Writes `answer_col` (n answers per row as a JSON list when n > 1) and `<answer_col>_finish`
    (their finish reasons, `stop` or `length`, likewise) with one engine."""

    def __init__(
        self,
        model_path: str,
        engine: EngineConfig,
        sampling: SamplingParams,
        *,
        fmt: str | PromptFormat = "transcript",
        too_long: str = "truncate",
        answer_col: str = "initial_answer",
        model_id: str | None = None,
    ):
        from cai_ray.engines import make_engine

        self.engine = make_engine(model_path, engine, model_id=model_id)
        self.fmt = PromptFormat.of(fmt).load(model_path)
        self.sampling = sampling
        self.too_long = too_long
        self.answer_col = answer_col

    def __call__(self, batch: Any) -> Any:
        batch = batch.copy()
        answers = [""] * len(batch)
        finishes = [""] * len(batch)
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
        results = dict(zip(todo, self._answer(prompts), strict=True))
        for i in todo:
            texts = [text for text, _ in results[i]]
            reasons = [reason for _, reason in results[i]]
            if not all(texts):
                rejects[i] = "empty answer after clean-up"
            answers[i] = texts[0] if len(texts) == 1 else json.dumps(texts)
            finishes[i] = reasons[0] if len(reasons) == 1 else json.dumps(reasons)
        batch[self.answer_col] = answers
        batch[f"{self.answer_col}_finish"] = finishes
        batch["reject"] = rejects
        return batch

    def _answer(self, prompts: list[str]) -> list[list[tuple[str, str]]]:
        """(cleaned text, finish reason) of each sample per prompt; a prompt with an empty
        sample is resampled once."""
        from cai_ray.sl.critique import clean_answer

        if not prompts:
            return []
        out = [
            [(clean_answer(s.text), s.finish_reason) for s in samples]
            for samples in self.engine.generate(prompts, self.sampling)
        ]
        retry = [i for i, samples in enumerate(out) if not all(text for text, _ in samples)]
        if retry:
            seed = None if self.sampling.seed is None else self.sampling.seed + 1
            params = dataclasses.replace(self.sampling, seed=seed)
            again = self.engine.generate([prompts[i] for i in retry], params)
            for i, samples in zip(retry, again, strict=True):
                out[i] = [(clean_answer(s.text), s.finish_reason) for s in samples]
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
        return self.fmt.render(convo)
