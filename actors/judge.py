"""Stage 7's actor-pool roles: the AI judge (pairwise + evasiveness) and the PM scorer.

Plain callables over pandas batches (Ray Data `map_batches`), like actors/labeler.py: the judge
sends every query of a batch (pairs x principles x 2 orders, plus evasiveness) to the engine in
one `score_options` call; the PM scorer scores every text of a batch in one `score` call.
"""

from __future__ import annotations

import json
from typing import Any

from cai_ray.config import EngineConfig
from cai_ray.config.evaluate import EvaluateConfig
from cai_ray.engines import resolve_threads
from cai_ray.engines.base import ScoreRequest
from cai_ray.eval.judging import Axis, fold_prompt, plan_prompt
from cai_ray.feedback.labeling import scored
from cai_ray.feedback.prompts import OPTIONS


def _as_list(value: Any) -> list[Any]:
    """A list from a JSON string, a numpy array (Parquet via pandas) or a list."""
    if isinstance(value, str):
        return json.loads(value)
    return [dict(v) if isinstance(v, dict) else v for v in list(value)]


class JudgeWorker:
    """Adds `judged` (JSON: comparisons and evasiveness) to each live row (`prompt_id`, `axis`,
    `messages`, `answers`: one answer per checkpoint, in the order of `names`)."""

    def __init__(
        self,
        model_path: str,
        engine: EngineConfig,
        constitution_path: str,
        settings: EvaluateConfig,
        *,
        seed: int,
        names: list[str],
        model_id: str | None = None,
    ):

        from cai_ray.constitution import load_constitution
        from cai_ray.engines import make_engine

        self.engine = make_engine(model_path, engine, model_id=model_id)
        self.constitution = load_constitution(constitution_path)
        self.constitution.require_feedback()  # the harmlessness axis asks its principles
        self.settings = settings
        self.seed = seed
        self.names = list(names)

    def __call__(self, batch: Any) -> Any:
        batch = batch.copy()
        rejects = list(batch["reject"])
        axes: list[Axis] = list(batch["axis"])
        plans = {}
        for r in range(len(batch)):
            if rejects[r]:
                continue
            plans[r] = plan_prompt(
                self.constitution,
                axis=axes[r],
                key=f"{axes[r]}:{batch['prompt_id'].iloc[r]}",
                messages=_as_list(batch["messages"].iloc[r]),
                answers=[str(a) for a in _as_list(batch["answers"].iloc[r])],
                names=self.names,
                settings=self.settings,
                seed=self.seed,
            )
        self._reject_too_long(plans, rejects)
        plans = {r: jobs for r, jobs in plans.items() if not rejects[r]}
        queries = [q for jobs in plans.values() for job in jobs for q in job.queries]
        scores = self.engine.score_options([ScoreRequest(q.prefix, OPTIONS) for q in queries])
        results = iter(
            scored(q, s.logprobs, s.option_token_ids) for q, s in zip(queries, scores, strict=True)
        )
        judged = [""] * len(batch)
        for r, jobs in plans.items():
            per_job = [[next(results) for _ in job.queries] for job in jobs]
            folded = fold_prompt(
                jobs,
                per_job,
                names=self.names,
                axis=axes[r],
                settings=self.settings,
                seed=self.seed,
            )
            judged[r] = json.dumps(folded)
        batch["judged"] = judged
        batch["reject"] = rejects
        return batch

    def _reject_too_long(self, plans: dict[int, list], rejects: list[str]) -> None:
        """A judge prompt longer than the judge's context is a reject, not a crash."""
        budget = self.engine.max_context - 8  # room for the option tokens
        for r, jobs in plans.items():
            longest = max(self.engine.count_tokens([q.prefix for j in jobs for q in j.queries]))
            if longest > budget:
                rejects[r] = (
                    f"judge prompt too long: {longest} tokens, the judge takes {budget} "
                    "(lower evaluate.few_shot or evaluate.max_new_tokens)"
                )


class PMScoreWorker:
    """Adds `pm_scores` (JSON list) to each live row: the PM score of each text in `text_col`
    (a JSON list of responses) as the last turn of the row's `messages`."""

    def __init__(
        self,
        model_path: str,
        engine: EngineConfig,
        *,
        text_col: str,
        model_id: str | None = None,
    ):
        from cai_ray.feedback.reward import RewardScorer

        self.scorer = RewardScorer(
            model_path,
            device=engine.device,
            dtype=engine.dtype,
            threads=resolve_threads(engine.threads),
            batch_size=engine.batch_size,
        )
        self.text_col = text_col

    def __call__(self, batch: Any) -> Any:
        from cai_ray.feedback.reward import pm_text

        batch = batch.copy()
        rejects = list(batch["reject"])
        owners, texts = [], []
        for r in range(len(batch)):
            if rejects[r]:
                continue
            messages = _as_list(batch["messages"].iloc[r])
            for text in _as_list(batch[self.text_col].iloc[r]):
                owners.append(r)
                texts.append(pm_text(messages, str(text)))
        # truncate: a long conversation keeps its last tokens, the response the PM head reads
        scores = self.scorer.score(texts, truncate=True) if texts else []
        out: list[list[float]] = [[] for _ in range(len(batch))]
        for r, s in zip(owners, scores, strict=True):
            out[r].append(float(s))
        batch["pm_scores"] = [json.dumps(s) if not rejects[r] else "" for r, s in enumerate(out)]
        return batch
