"""LabelerWorker: AI-feedback labels for response pairs (paper section 4.1), in an actor pool.

A plain callable over pandas batches (Ray Data `map_batches`); tests call it in-process. All the
score requests of a batch (K principles x 2 orders x rationales x pairs) go to the engine in one
`score_options` call; with chain-of-thought, all rationales of a batch come from one `generate`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

from cai_ray.config import EngineConfig, RLLabelConfig
from cai_ray.data.conversation import PromptFormat
from cai_ray.engines.base import SamplingParams, ScoreRequest
from cai_ray.feedback.labeling import (
    RATIONALE_STOP,
    LabelQuery,
    PairLabel,
    apply_mode,
    best_and_worst,
    build_queries,
    clean_rationale,
    combine,
    cot_scoring_prefix,
    scored,
)
from cai_ray.feedback.prompts import OPTIONS

OUTPUT_COLUMNS = (
    "response_a",
    "response_b",
    "label",
    "label_raw",
    "principle_ids",
    "principles",
    "trace",
    "flips",
    "order_checks",
    "split_options",
    "tournament",
)


class LabelerWorker:
    """Adds a label and its trace to each live row (`pair_id`, `messages`, `responses`).

    `fmt` is the run's prompt format ("transcript" or "chat", or a `PromptFormat` with the
    feedback model's chat-template arguments); only chain-of-thought prompts depend on it.
    """

    def __init__(
        self,
        model_path: str,
        engine: EngineConfig,
        constitution_path: str,
        settings: RLLabelConfig,
        *,
        seed: int = 0,
        rationale_sampling: SamplingParams | None = None,
        model_id: str | None = None,
        fmt: str | PromptFormat = "transcript",
    ):

        from cai_ray.constitution import load_constitution
        from cai_ray.engines import make_engine

        self.engine = make_engine(model_path, engine, model_id=model_id)
        # The run's format shapes chain-of-thought prompts: "chat" renders them with the
        # feedback model's own chat template, so it needs that model's tokenizer (issue 14).
        fmt = PromptFormat.of(fmt)
        self.fmt = fmt.load(model_path) if settings.cot else fmt
        self.constitution = load_constitution(constitution_path)
        self.constitution.require_feedback()
        self.settings = settings
        self.seed = seed
        base = rationale_sampling or SamplingParams(max_new_tokens=64)
        self.sampling = dataclasses.replace(base, n=settings.cot_samples, stop=RATIONALE_STOP)

    def __call__(self, batch: Any) -> Any:
        batch = batch.copy()
        rejects = list(batch["reject"]) if "reject" in batch else [""] * len(batch)
        out: dict[str, list[Any]] = {c: [None] * len(batch) for c in OUTPUT_COLUMNS}
        jobs = []  # (row index, (i, j), responses i/j, queries)
        for r in range(len(batch)):
            if rejects[r]:
                continue
            responses = [str(x) for x in _as_list(batch["responses"].iloc[r])]
            reason = check_responses(responses)
            if reason:
                rejects[r] = reason
                continue
            messages = _as_list(batch["messages"].iloc[r])
            for i, j in itertools.combinations(range(len(responses)), 2):
                key = batch["pair_id"].iloc[r] + ("" if len(responses) == 2 else f"/{i}-{j}")
                queries = build_queries(
                    self.constitution,
                    pair_id=key,
                    messages=messages,
                    response_a=responses[i],
                    response_b=responses[j],
                    settings=self.settings,
                    seed=self.seed,
                    fmt=self.fmt,
                )
                jobs.append((r, (i, j), responses, queries))
        self._reject_too_long(jobs, rejects)
        jobs = [job for job in jobs if not rejects[job[0]]]
        labels = self._label([q for *_, qs in jobs for q in qs])
        pos = 0
        per_row: dict[int, dict[tuple[int, int], PairLabel]] = {}
        for r, ij, _responses, queries in jobs:
            results = [res for group in labels[pos : pos + len(queries)] for res in group]
            pos += len(queries)
            per_row.setdefault(r, {})[ij] = combine(results, self.settings)
        for r, pairs in per_row.items():
            responses = [str(x) for x in _as_list(batch["responses"].iloc[r])]
            self._fill(out, r, responses, pairs)
        for col, values in out.items():
            batch[col] = values
        batch["messages"] = [
            m if isinstance(m, str) else json.dumps(_as_list(m)) for m in batch["messages"]
        ]
        batch["reject"] = rejects
        return batch

    def _label(self, queries: list[LabelQuery]) -> list[list[Any]]:
        """Per query, its QueryResults (one per rationale): rationales first, then one scoring."""
        if not queries:
            return []
        rationales: list[list[str | None]] = [[None] for _ in queries]
        if self.settings.cot:
            gens = self.engine.generate([q.prefix for q in queries], self.sampling)
            rationales = [[clean_rationale(g.text) for g in samples] for samples in gens]
        requests, owners = [], []
        for q, rs in zip(queries, rationales, strict=True):
            for rationale in rs:
                prefix = q.prefix if rationale is None else cot_scoring_prefix(q.prefix, rationale)
                requests.append(ScoreRequest(prefix, OPTIONS))
                owners.append((q, rationale))
        scores = self.engine.score_options(requests)
        results = iter(
            scored(q, s.logprobs, s.option_token_ids, rationale)
            for (q, rationale), s in zip(owners, scores, strict=True)
        )
        return [[next(results) for _ in rs] for rs in rationales]

    def _reject_too_long(self, jobs: list, rejects: list[str]) -> None:
        """A prompt that cannot fit the feedback model's context is a reject, not a crash."""
        if not jobs:
            return
        extra = 8 + (self.sampling.max_new_tokens + 8 if self.settings.cot else 0)
        budget = self.engine.max_context - extra
        prefixes = [q.prefix for *_, qs in jobs for q in qs]
        counts = iter(self.engine.count_tokens(prefixes))
        for r, _ij, _responses, queries in jobs:
            longest = max(next(counts) for _ in queries)
            if longest > budget:
                rejects[r] = (
                    f"feedback prompt too long: {longest} tokens, the model takes {budget} "
                    "(lower rl_label.few_shot)"
                )

    def _fill(self, out: dict[str, list], r: int, responses: list[str], pairs: dict) -> None:
        """Row r's output: the pair itself (2 responses) or best vs worst of a round robin."""
        tournament = None
        if len(responses) == 2:
            a, b, label = 0, 1, pairs[(0, 1)]
        else:
            wins = {ij: lab.p_raw for ij, lab in pairs.items()}
            a, b = best_and_worst(len(responses), wins)
            label = pairs[(min(a, b), max(a, b))]
            if a > b:  # the stored label is P(lower index preferred): turn it round
                label = self._flipped(label)
            tournament = json.dumps(
                {"best": a, "worst": b, "wins": {f"{i}-{j}": p for (i, j), p in wins.items()}}
            )
        out["response_a"][r] = responses[a]
        out["response_b"][r] = responses[b]
        out["label"][r] = label.p
        out["label_raw"][r] = label.p_raw
        out["principle_ids"][r] = [x["principle_id"] for x in label.principles]
        out["principles"][r] = json.dumps(label.principles)
        out["trace"][r] = json.dumps(label.trace)
        out["flips"][r] = label.flips
        out["order_checks"][r] = label.order_checks
        out["split_options"][r] = label.split_options
        out["tournament"][r] = tournament

    def _flipped(self, label: PairLabel) -> PairLabel:
        def turn(p: float | None) -> float | None:
            return None if p is None else 1.0 - p

        principles = [
            {**x, "p": turn(x["p"]), "p_ab": turn(x["p_ab"]), "p_ba": turn(x["p_ba"])}
            for x in label.principles
        ]
        s = self.settings
        return PairLabel(
            apply_mode(1.0 - label.p_raw, s.mode, s.clamp),
            1.0 - label.p_raw,
            principles,
            label.trace,
            label.flips,
            label.order_checks,
            label.split_options,
        )


def check_responses(responses: list[str]) -> str:
    """'' when the responses can be compared, else the reject reason."""
    if len(responses) < 2:
        return f"too few responses: {len(responses)} (need 2)"
    if any(not r.strip() for r in responses):
        return "empty response"
    if len({r.strip() for r in responses}) < len(responses):
        return "identical responses"
    return ""


def _as_list(value: Any) -> list[Any]:
    """A list from a JSON string, a numpy array (Parquet via pandas) or a list."""
    if isinstance(value, str):
        return json.loads(value)
    return [dict(v) if isinstance(v, dict) else v for v in list(value)]
