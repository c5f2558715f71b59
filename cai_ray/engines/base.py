"""The Engine interface every generation backend implements (see ../shared/DESIGN.md, Engines).

Two operations carry the whole method:
- `generate`: sampling for responses, critiques, revisions and rollouts;
- `score_options`: log-probabilities of several continuations after one shared prefix, the
  multiple-choice scorer behind AI feedback labels (paper section 4.1): the prefix is computed once.
Plus `load_weights` for RL weight sync, versioned so every rollout records what it was sampled with.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cai_ray.errors import CaiRayError

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `seed` makes sampling reproducible.

    A seeded sample depends only on (seed, its prompt's tokens, its index j): not on the
    other prompts of the call or the batch size (`prompt_seed`).

    temperature 0 is greedy decoding, which has one answer: `n > 1` then gives `n` copies of
    it on every engine (vLLM refuses greedy n > 1, so VLLMEngine asks once and copies). A
    stage that needs different samples (preference pairs, RL groups) must sample at T > 0.
    Empty stop strings are ignored.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise CaiRayError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CaiRayError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise CaiRayError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise CaiRayError(f"n must be >= 1, got {self.n}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @classmethod
    def of(cls, generation: Any, *, n: int = 1, seed: int | None = None, **overrides: Any):
        """The sampling a `generation` config section asks for (temperature, top_p,
        max_new_tokens, stop), with `overrides` on top: the engines own this type, the config
        only its defaults."""
        fields = dict(
            temperature=generation.temperature,
            top_p=generation.top_p,
            max_new_tokens=generation.max_new_tokens,
            stop=generation.stop,
        )
        return cls(**{**fields, **overrides}, n=n, seed=seed)


def prompt_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """The seed of one prompt's samples under a request's `seed` (sample j uses this + j, as
    vLLM numbers a request's samples): every prompt gets its own random stream, whatever else
    shares its batch, so a seeded sample depends only on (seed, prompt, j)."""
    import hashlib

    key = hashlib.blake2b(f"{seed}|{list(prompt_ids)}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") >> 32  # 32 bits: vLLM adds j, torch takes 64


@dataclass
class Generation:
    """One sampled continuation. `text` is cut before the first stop string (which is excluded)."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[float] | None = None  # one per generated token, when requested


@dataclass(frozen=True)
class ScoreRequest:
    """Score each option as a continuation of `prefix`."""

    prefix: str
    options: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.options:
            raise CaiRayError("score_options needs at least one option")
        object.__setattr__(self, "options", tuple(self.options))


@dataclass
class OptionScores:
    """Summed log-probability of each option's tokens given the prefix.

    `option_token_ids` records exactly which tokens were scored for each option, so a tokenizer
    that splits ` (A)` unexpectedly is visible in the trace.
    """

    logprobs: list[float]
    option_token_ids: list[list[int]]
    prefix_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


class Engine(abc.ABC):
    """A loaded causal LM that generates and scores. Implementations: HFEngine, VLLMEngine."""

    model_id: str
    weight_version: int = 0

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[Generation]]:
        """Sample `params.n` continuations for each prompt; result[i] holds prompt i's samples."""

    def generate_many(
        self, requests: Sequence[tuple[Sequence[str], SamplingParams]]
    ) -> list[list[list[Generation]]]:
        """Several `generate` requests, each with its own params; result[r] is request r's.
        Engines that batch across params (HF, vLLM) run them together; a request's samples do
        not depend on the others."""
        return [self.generate(prompts, params) for prompts, params in requests]

    @abc.abstractmethod
    def score_options(self, requests: Sequence[ScoreRequest]) -> list[OptionScores]:
        """Log-probabilities of each request's options after its shared prefix."""

    @abc.abstractmethod
    def load_weights(self, state_dict: Mapping[str, Any], *, version: int) -> None:
        """Replace the model weights (RL weight sync); resets any prefix cache."""

    @property
    @abc.abstractmethod
    def max_context(self) -> int:
        """The longest prompt + generation the model accepts, in tokens."""

    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids exactly as `generate` sends each prompt (special tokens included)."""

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts, for length checks before a request is sent."""
        return [len(ids) for ids in self.tokenize(texts)]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory."""
