"""Rule rewards and refusal detection: plain functions of (prompts, responses), no torch.

A rule reward is `fn(prompts, responses, **kwargs) -> list[float]`, one float per response; the
RL loop loads one by name (`reward.kind: function`, `reward.function: cai_ray.feedback.rule_rewards:NAME`
or any `module:fn` / `path/to/file.py:fn` of your own). They shape a reward (penalise refusals,
keep answers to a length) or replace the PM where a task has a checkable answer.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cai_ray.config.sections import DEFAULT_BOILERPLATE_PHRASES
from cai_ray.errors import ConfigError

RewardFn = Callable[..., list[float]]


def _fold(text: str) -> str:
    # Curly apostrophes fold to straight ones so "I’m sorry" matches "i'm sorry".
    return text.lower().replace("\u2019", "'")


def has_phrase(response: str, phrases: Sequence[str] = DEFAULT_BOILERPLATE_PHRASES) -> bool:
    """Whether `response` contains any of `phrases` (case-insensitive).

    >>> has_phrase("I’m sorry, I can't help.")
    True
    """
    text = _fold(response)
    return any(_fold(p) in text for p in phrases if p)


def phrase_rate(
    responses: Sequence[str], phrases: Sequence[str] = DEFAULT_BOILERPLATE_PHRASES
) -> float:
    """Fraction of responses containing any phrase: the refusal/boilerplate rate.

    CAI §4.3 warns that over-optimised policies drift into boilerplate; log this during training.
    """
    if not responses:
        return 0.0
    return sum(has_phrase(r, phrases) for r in responses) / len(responses)


def refusal_penalty(
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    phrases: Sequence[str] = DEFAULT_BOILERPLATE_PHRASES,
) -> list[float]:
    """-1 for a response with a refusal phrase, else 0: the paper's goal is non-evasive answers.

    >>> refusal_penalty(["q", "q"], ["I cannot do that.", "Here is how."])
    [-1.0, 0.0]
    """
    return [-1.0 if has_phrase(r, phrases) else 0.0 for r in responses]


def length_target(
    prompts: Sequence[str], responses: Sequence[str], *, target_chars: int = 200
) -> list[float]:
    """-|len - target| / target per response (0 at the target, -1 at empty or double length).

    >>> length_target(["q", "q"], ["abcd", "ab"], target_chars=4)
    [0.0, -0.5]
    """
    if target_chars < 1:
        raise ConfigError("target_chars must be >= 1", where="reward.kwargs.target_chars")
    return [-abs(len(r) - target_chars) / target_chars for r in responses]


def load_reward_function(spec: str) -> RewardFn:
    """`package.module:fn` or `path/to/file.py:fn` -> the function; clear errors otherwise."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise ConfigError(
            f"reward function {spec!r} is not 'module:fn' or 'file.py:fn'",
            where="reward.function",
            hint="e.g. cai_ray.feedback.rule_rewards:refusal_penalty",
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            key = f"cai_ray_reward_{abs(hash(str(path.resolve())))}"
            loader = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(loader)  # type: ignore[arg-type]
            sys.modules[key] = module
            loader.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError, SyntaxError) as exc:
        raise ConfigError(
            f"cannot load reward module {module_name!r}: {exc}",
            where="reward.function",
            hint="name an importable module or an existing .py file (relative to the job's "
            "working directory on a cluster)",
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(
            f"{module_name!r} has no function {name!r}",
            where="reward.function",
            hint="define fn(prompts, responses, **kwargs) -> list[float] there",
        )
    return fn
