"""The RL loop's long-lived roles besides the learners: rollout, reward and reference workers.

Plain classes: `actors.role_pool.RolePool` wraps them in `ray.remote` (or runs one in the
driver for size 0). Each loads its model once and answers batches for the whole run.
- `RLRolloutWorker` samples responses with the policy (HFEngine or VLLMEngine) and takes the
  learner's weights after every update (versioned: each sample records the version).
- `RewardWorker` scores (conversation, response) pairs: the PM, direct RLAIF, or a function.
- `ReferenceWorker` gives the frozen SL-CAI policy's log-probs of the response tokens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from cai_ray.config import EngineConfig
from cai_ray.config.rl import RewardConfig
from cai_ray.data.conversation import Conversation, PromptFormat
from cai_ray.data.tokens import strip_reasoning
from cai_ray.engines import resolve_threads, set_threads
from cai_ray.engines.base import SamplingParams
from cai_ray.profiling import span


class RLRolloutWorker:
    """Samples `params.n` responses per conversation with the current policy weights."""

    def __init__(
        self, model_path: str, engine: EngineConfig, *, fmt: str | PromptFormat, model_id: str
    ):
        from cai_ray.engines import make_engine

        self.engine = make_engine(model_path, engine, model_id=model_id)
        self.fmt = PromptFormat.of(fmt).load(model_path)

    def pid(self) -> int:
        return os.getpid()

    def engine_kind(self) -> str:
        """'vllm' or 'hf', as resolved on this worker's node (it may differ from the driver's)."""
        return "vllm" if type(self.engine).__name__ == "VLLMEngine" else "hf"

    def engine_info(self) -> tuple[str, str]:
        """(engine kind, 'cpu' or 'cuda'): what the weight sync can use (actors.learner.weight_sync)."""
        kind = self.engine_kind()
        if kind == "vllm":
            return kind, "cpu" if self.engine.on_cpu else "cuda"
        return kind, str(self.engine.device).split(":")[0]

    def generate(
        self, conversations: list[list[dict[str, str]]], params: SamplingParams
    ) -> list[list[dict[str, Any]]]:
        """Per conversation, its samples: prompt and response token ids, text, finish reason,
        the policy's per-token log-probs and the weight version they were sampled with."""
        texts = [self.fmt.render_messages(m) for m in conversations]
        prompt_ids = self.engine.tokenize(texts)
        out = self.engine.generate(texts, params)
        version = self.engine.weight_version
        return [
            [
                {
                    "prompt_ids": ids,
                    "response_ids": list(g.token_ids),
                    "response": strip_reasoning(g.text).strip(),  # what the user would read
                    "finish_reason": g.finish_reason,
                    "logprobs": g.logprobs,
                    "weight_version": version,
                }
                for g in gens
            ]
            for ids, gens in zip(prompt_ids, out, strict=True)
        ]

    def load_weights(self, state_dict: Mapping[str, Any], *, version: int) -> int:
        """Take the learner's weights (resets any prefix cache); returns the new version.
        Arrays (a Ray-actor rank ships numpy: `weight_sync.to_arrays`) become tensors."""
        from actors.learner.weight_sync import to_tensors

        self.engine.load_weights(to_tensors(state_dict), version=version)
        return version

    def join_weight_group(self, address: str, port: int, rank_offset: int, world_size: int) -> None:
        """Join learner rank 0's NCCL weight group (vLLM engines only; actors.learner.weight_sync)."""
        self.engine.init_weight_update_group(address, port, rank_offset, world_size)

    def receive_weights(self, metadata: list[Any], *, version: int) -> int:
        """Receive one NCCL broadcast of the weights; returns the new version."""
        names, dtypes, shapes = metadata
        self.engine.update_weights_from_group(names, dtypes, shapes, version=version)
        return version


class RewardWorker:
    """Scores `{messages, response}` items; `refusal_penalty` and `clip` apply to every kind."""

    def __init__(
        self,
        reward: RewardConfig,
        *,
        model_path: str | None,
        engine: EngineConfig,
        batch_size: int,
        refusal_phrases: Sequence[str],
    ):

        self.cfg = reward
        self.phrases = tuple(refusal_phrases)
        self._fn = None
        if reward.kind == "pm":
            from cai_ray.feedback.reward import RewardScorer

            self.scorer = RewardScorer(
                model_path,  # type: ignore[arg-type]
                device=engine.device,
                dtype=engine.dtype,
                threads=resolve_threads(engine.threads),
                batch_size=batch_size,
            )
        elif reward.kind == "rlaif":
            from cai_ray.engines import make_engine

            self.engine = make_engine(model_path, engine)  # type: ignore[arg-type]
        else:
            from cai_ray.feedback.rule_rewards import load_reward_function

            self._fn = load_reward_function(reward.function)  # type: ignore[arg-type]

    def pid(self) -> int:
        return os.getpid()

    def score(self, items: list[dict[str, Any]]) -> list[float]:
        """One reward per item; a NaN stays NaN (the driver counts and skips such batches)."""
        from cai_ray.feedback.rule_rewards import refusal_penalty

        responses = [it["response"] for it in items]
        if self.cfg.kind == "pm":
            from cai_ray.feedback.reward import pm_text

            texts = [pm_text(it["messages"], it["response"]) for it in items]
            scores = self.scorer.score(texts, truncate=True)
        elif self.cfg.kind == "rlaif":
            scores = self._rlaif(items)
        else:
            prompts = [Conversation.from_messages(it["messages"]).last_user_message for it in items]
            scores = [float(x) for x in self._fn(prompts, responses, **self.cfg.kwargs)]  # type: ignore[misc]
            if len(scores) != len(items):
                raise ValueError(f"reward function returned {len(scores)} scores for {len(items)}")
        if self.cfg.refusal_penalty:
            penalty = refusal_penalty([], responses, phrases=self.phrases)
            scores = [
                s + self.cfg.refusal_penalty * p for s, p in zip(scores, penalty, strict=True)
            ]
        if self.cfg.clip is not None:
            c = self.cfg.clip
            scores = [s if math.isnan(s) else min(c, max(-c, s)) for s in scores]
        return scores

    def _rlaif(self, items: list[dict[str, Any]]) -> list[float]:
        """Expected 1-10 rating under the feedback model, rescaled to [-1, 1]."""
        import torch

        from cai_ray.engines.base import ScoreRequest
        from cai_ray.feedback.prompts import RATING_OPTIONS, build_rating_prompt, disjoint_logprobs
        from cai_ray.rl import algorithms

        requests = [
            ScoreRequest(
                prefix=build_rating_prompt(
                    Conversation.from_messages(it["messages"]).render_transcript(),
                    it["response"],
                    criterion=self.cfg.criterion,
                ),
                options=RATING_OPTIONS,
            )
            for it in items
        ]
        scored = self.engine.score_options(requests)
        # " 1" is a token prefix of " 10" on Qwen/Gemma: score the ten ratings as disjoint
        # events, or a judge certain of 10 would rate 5.5 (issue 14).
        exact = [disjoint_logprobs(s.logprobs, s.option_token_ids) for s in scored]
        logprobs = torch.tensor(exact)  # (B, 10)
        expected = algorithms.expected_score(logprobs, torch.arange(1.0, 11.0))  # (B,)
        return algorithms.rlaif_reward(expected).tolist()


class ReferenceWorker:
    """The frozen reference policy (the SL-CAI model): log-probs of each response's tokens."""

    @span("load")
    def __init__(self, model_path: str, engine: EngineConfig, *, batch_size: int, pad_id: int):

        from cai_ray.engines.hf import pick_device, pick_dtype
        from cai_ray.models import check_model_dir
        from cai_ray.models.loading import load_causal_lm

        set_threads(engine)  # no engine here: torch runs the model directly
        path = check_model_dir(model_path, head="causal")
        self.device = pick_device(engine.device)
        dtype = pick_dtype(engine.dtype, self.device)
        model = load_causal_lm(path, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.pad_id = pad_id

    def pid(self) -> int:
        return os.getpid()

    @span("infer:reference")
    def logprobs(self, sequences: list[dict[str, Any]]) -> list[list[float]]:
        """Per sequence (`input_ids`, `prompt_len`), the response tokens' log-probs."""
        import torch

        from cai_ray.rl.objectives import PolicyObjective

        objective = PolicyObjective(pad_id=self.pad_id)
        out: list[list[float]] = []
        with torch.inference_mode():
            for start in range(0, len(sequences), self.batch_size):
                batch = objective.collate(sequences[start : start + self.batch_size])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out.extend(objective.infer(self.model, batch))
        return out

    def sequence_logprobs(self, sequences: list[dict[str, Any]]) -> list[float]:
        """Summed response log-prob per sequence (DPO's reference terms)."""
        return [sum(lp) for lp in self.logprobs(sequences)]
