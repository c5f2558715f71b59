"""SL-CAI critique -> revision chains (paper section 3.1), Ray-free.

For each prompt and initial answer, N rounds: sample a critique under a critique request, then a
revision under the paired revision request; the revision replaces the answer for the next round.
A principle is drawn per (prompt, round) with replacement, keyed so that workers and resumed runs
draw the same one. Few-shot examples are prepended: without them the model loses its point of
view (CAI_METHOD.md, stage 1). Every intermediate critique and revision is kept as the trace.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cai_ray.config import SLGenerateConfig
from cai_ray.data.conversation import Conversation, PromptFormat, apply_chat_template
from cai_ray.data.tokens import strip_reasoning
from cai_ray.engines.base import Engine, SamplingParams

MARKERS = ("Human:", "Assistant:", "CritiqueRequest:", "RevisionRequest:", "Critique:", "Revision:")
# Boilerplate a model puts before the revised text; stripped from the start of a revision.
DEFAULT_BOILERPLATE = (
    r"here(?: is|'s) (?:a |my |the )?(?:revised|rewritten|updated|improved)[^:\n]{0,40}:",
    r"(?:revised|rewritten|updated) (?:response|answer|version)[^:\n]{0,20}:",
    r"sure[,!.]? here(?: is|'s)[^:\n]{0,60}:",
    r"revision:",
    r"critique:",
)


@dataclass(frozen=True)
class CritiqueSettings:
    """How one call's chains run: the `sl_generate` section (rounds, direct_revision, few_shot)
    and what is resolved per call beside it: the critic's prompt format, the seed and sampling.
    Stage 1 passes the run's section; Serve's `/v1/critique` builds one per request. The defaults
    are the paper's (4 rounds, T=1)."""

    section: SLGenerateConfig = field(default_factory=SLGenerateConfig)
    fmt: str | PromptFormat = "transcript"
    seed: int = 0
    sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=64)
    )
    boilerplate: tuple[str, ...] = DEFAULT_BOILERPLATE
    empty_retries: int = 1


@dataclass
class Round:
    principle_id: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    critique_finish: str = ""  # "stop", "length" (cut at max_new_tokens), "" without a critique
    revision_finish: str = "stop"

    def to_row(self) -> dict[str, str]:
        return dict(self.__dict__)


@dataclass
class ChainResult:
    """The trace of one prompt, or `reject` (a reason) when the chain could not complete."""

    prompt_id: str
    rounds: list[Round] = field(default_factory=list)
    reject: str | None = None


def clean_output(text: str, boilerplate: Sequence[str] = DEFAULT_BOILERPLATE) -> str:
    """The paper's clean-up of a critique or revision: drop reasoning blocks, strip boilerplate
    prefixes ("Here is a revised response:"), cut at the first transcript/constitution marker."""
    text = _strip_prefixes(strip_reasoning(text), boilerplate)
    return _strip_prefixes(_cut_at_marker(text), boilerplate)


def clean_answer(text: str) -> str:
    """An answer or RL sample as content: reasoning blocks dropped and cut at the first marker,
    but no boilerplate stripped ("Sure, here is how to X:" is what the model said; issue 14)."""
    return _cut_at_marker(strip_reasoning(text)).strip()


def _cut_at_marker(text: str) -> str:
    cut = len(text)
    for marker in MARKERS:
        m = re.search(r"(?:^|\n)\s*" + re.escape(marker), text)
        if m:
            cut = min(cut, m.start())
    return text[:cut]


def _strip_prefixes(text: str, boilerplate: Sequence[str]) -> str:
    text = text.strip()
    while text:
        for pattern in boilerplate:
            m = re.match(pattern + r"\s*", text, flags=re.IGNORECASE)
            if m and m.end() > 0:
                text = text[m.end() :].strip()
                break
        else:
            return text
    return text


class ChainPrompter:
    """Renders critique and revision prompts for one constitution, model and format."""

    def __init__(self, constitution: Any, settings: CritiqueSettings, *, tokenizer: Any = None):
        constitution.require_critique()
        fmt = PromptFormat.of(settings.fmt)
        if tokenizer is not None:
            fmt = fmt.with_tokenizer(tokenizer)
        if fmt.kind == "chat" and fmt.tokenizer is None:
            raise ValueError("chat format needs the model's tokenizer")
        self.c = constitution
        self.s = settings
        self.fmt = fmt
        examples = list(constitution.critique_examples)
        few = settings.section.few_shot
        self.examples = examples if few is None else examples[:few]

    def principle(self, prompt_id: str, round_index: int):
        from cai_ray.constitution import choose_principles

        key = f"{prompt_id}:{round_index}"
        return choose_principles(self.c.critique_principles, seed=self.s.seed, key=key, k=1)[0]

    def critique_prompt(
        self, convo: Conversation, answer: str, request: str, *, n_shot: int
    ) -> str:
        if self.fmt.kind == "chat":
            msgs = [*self._chat_head(convo, n_shot), _msg("assistant", answer)]
            return self._chat([*msgs, _msg("user", request)])
        return (
            self._shot_text(n_shot)
            + convo.render_transcript(add_generation_prompt=False)
            + f"\n\nAssistant: {answer.strip()}\n\nCritiqueRequest: {request.strip()}\n\nCritique:"
        )

    def revision_prompt(
        self,
        convo: Conversation,
        answer: str,
        critique_req: str,
        critique: str | None,
        request: str,
        *,
        n_shot: int,
    ) -> str:
        if self.fmt.kind == "chat":
            msgs = [*self._chat_head(convo, n_shot), _msg("assistant", answer)]
            if critique is not None:
                msgs += [_msg("user", critique_req), _msg("assistant", critique)]
            return self._chat([*msgs, _msg("user", request)])
        text = self._shot_text(n_shot) + convo.render_transcript(add_generation_prompt=False)
        text += f"\n\nAssistant: {answer.strip()}"
        if critique is not None:
            text += f"\n\nCritiqueRequest: {critique_req.strip()}\n\nCritique: {critique.strip()}"
        return text + f"\n\nRevisionRequest: {request.strip()}\n\nRevision:"

    def _shot_text(self, n: int) -> str:
        return "".join(ex.as_transcript() for ex in self.examples[:n])

    def _chat_head(self, convo: Conversation, n_shot: int) -> list[dict[str, str]]:
        """The conversation's system turn first (templates allow it nowhere else), then the
        few-shot chains, then the rest of the conversation."""
        msgs = convo.to_messages()
        system = [m for m in msgs[:1] if m["role"] == "system"]
        shots = [m for ex in self.examples[:n_shot] for m in ex.as_messages()]
        return [*system, *shots, *msgs[len(system) :]]

    def _chat(self, messages: list[dict[str, str]]) -> str:
        return apply_chat_template(self.fmt.tokenizer, messages, **self.fmt.template_kwargs)


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content.strip()}


def run_chains(
    engine: Engine,
    prompter: ChainPrompter,
    items: Sequence[tuple[str, Conversation, str]],
    *,
    too_long: Literal["reject", "truncate"] = "truncate",
) -> list[ChainResult]:
    """Critique and revise a batch of (prompt_id, conversation, initial answer), round by round.

    Each round is two batched `generate` calls (critiques, then revisions) over the live chains.
    A chain whose output is empty after clean-up, or whose prompt cannot fit the model's context
    (after dropping few-shot examples, when `too_long="truncate"`), is rejected with a reason.
    """
    s = prompter.s
    results = [ChainResult(pid) for pid, _, _ in items]
    answers = [answer for _, _, answer in items]
    fit = _Fitter(
        engine, engine.max_context - s.sampling.max_new_tokens, too_long, len(prompter.examples)
    )
    for r in range(s.section.rounds):
        live = [i for i, res in enumerate(results) if res.reject is None]
        picks = {i: prompter.principle(items[i][0], r) for i in live}
        sampled: dict[int, tuple[str | None, str]] = dict.fromkeys(live, (None, ""))
        if not s.section.direct_revision:
            prompts = {
                i: fit(prompter.critique_prompt, items[i][1], answers[i], picks[i].critique)
                for i in live
            }
            sampled = _generate_step(engine, s, prompts, results, f"critique in round {r + 1}")
        critiques = {i: text for i, (text, _) in sampled.items()}
        critique_finish = {i: reason for i, (_, reason) in sampled.items()}
        prompts = {
            i: fit(
                prompter.revision_prompt,
                items[i][1],
                answers[i],
                picks[i].critique,
                critiques[i],
                picks[i].revision,
            )
            for i in live
            if results[i].reject is None
        }
        revisions = _generate_step(engine, s, prompts, results, f"revision in round {r + 1}")
        for i, (revision, finish) in revisions.items():
            if results[i].reject is None and revision is not None:
                p = picks[i]
                round_ = Round(
                    p.id,
                    p.critique,
                    critiques[i] or "",
                    p.revision,
                    revision,
                    critique_finish=critique_finish.get(i, ""),
                    revision_finish=finish,
                )
                results[i].rounds.append(round_)
                answers[i] = revision
    return results


@dataclass(frozen=True)
class _Fitter:
    """Renders a prompt with as many few-shot examples as fit the context, or None."""

    engine: Engine
    budget: int
    too_long: str
    n_shot: int

    def __call__(self, render, *args) -> str | None:
        counts = range(self.n_shot, -1, -1) if self.too_long == "truncate" else [self.n_shot]
        for n in counts:
            text = render(*args, n_shot=n)
            if self.engine.count_tokens([text])[0] <= self.budget:
                return text
        return None


def _generate_step(engine, s: CritiqueSettings, prompts, results, what: str):
    """One batched generate over the live chains: {chain: (cleaned text or None, finish reason)}.

    Rejects over-long prompts, and empty outputs after `s.empty_retries` resamples (a random stop
    at the first token is not a reason to lose a row).
    """
    out: dict[int, tuple[str | None, str]] = {}
    todo = []
    for i, text in prompts.items():
        if text is None:
            results[i].reject = f"prompt too long for the model's context at the {what}"
        else:
            todo.append(i)
    for attempt in range(s.empty_retries + 1):
        if not todo:
            break
        seed = _step_seed(s.seed, f"{what}#{attempt}")
        params = SamplingParams(**{**s.sampling.__dict__, "n": 1, "seed": seed})
        gens = engine.generate([prompts[i] for i in todo], params)
        for i, samples in zip(todo, gens, strict=True):
            out[i] = (
                clean_output(samples[0].text, s.boilerplate) or None,
                samples[0].finish_reason,
            )
        todo = [i for i in todo if out[i][0] is None]
    for i in todo:
        results[i].reject = f"empty {what} after clean-up"
    return out


def _step_seed(seed: int, step: str) -> int:
    """A distinct seed per step: critique and revision must not share a stream. (The engines
    seed each prompt from it and the prompt's tokens, so a chain's samples do not depend on
    which other chains share its batch.)"""
    key = f"{seed}:{step}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")
