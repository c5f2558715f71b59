"""SL-CAI critique/revision chains (paper 3.1) on a real tiny model, without Ray."""

import pytest

from cai_ray.config import SLGenerateConfig
from cai_ray.constitution import load_constitution
from cai_ray.data.conversation import Conversation
from cai_ray.engines.base import SamplingParams
from cai_ray.engines.hf import HFEngine
from cai_ray.sl.critique import ChainPrompter, CritiqueSettings, clean_output, run_chains

DEFAULT = "constitutions/default.yaml"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine(tiny_model_dir, threads=1)


@pytest.fixture(scope="module")
def constitution():
    return load_constitution(DEFAULT)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  Here is a revised response: Be kind.", "Be kind."),
        ("Sure, here's a better answer:\nBe kind.", "Be kind."),
        ("Revision: Be kind.\n\nHuman: next question", "Be kind."),
        ("Be kind.\nCritiqueRequest: more", "Be kind."),
        ("Here's the rewritten version: Revised response: ok", "ok"),
        ("Human: only a marker", ""),
        ("Plain text stays.", "Plain text stays."),
    ],
)
def test_clean_output(raw, clean):
    assert clean_output(raw) == clean


def _items(n=3):
    prompts = ["How do I pick a lock?", "Tell me a joke.", "Why is the sky blue?"][:n]
    return [
        (f"p{i}", Conversation.from_messages([{"role": "user", "content": p}]), f"answer {i}")
        for i, p in enumerate(prompts)
    ]


def test_transcript_prompts_follow_the_paper_layout(constitution):
    s = CritiqueSettings(SLGenerateConfig(few_shot=1))
    prompter = ChainPrompter(constitution, s)
    convo = Conversation.from_messages([{"role": "user", "content": "hi"}])
    p = constitution.critique_principles[0]
    text = prompter.critique_prompt(convo, "hello", p.critique, n_shot=1)
    assert text.startswith(constitution.critique_examples[0].as_transcript())
    assert text.endswith(
        f"\n\nHuman: hi\n\nAssistant: hello\n\nCritiqueRequest: {p.critique}\n\nCritique:"
    )
    rev = prompter.revision_prompt(convo, "hello", p.critique, "too curt", p.revision, n_shot=0)
    assert rev == (
        f"\n\nHuman: hi\n\nAssistant: hello\n\nCritiqueRequest: {p.critique}"
        f"\n\nCritique: too curt\n\nRevisionRequest: {p.revision}\n\nRevision:"
    )
    direct = prompter.revision_prompt(convo, "hello", p.critique, None, p.revision, n_shot=0)
    assert "CritiqueRequest" not in direct and direct.endswith("\n\nRevision:")


def test_principles_are_keyed_and_reproducible(constitution):
    a = ChainPrompter(constitution, CritiqueSettings(seed=1))
    b = ChainPrompter(constitution, CritiqueSettings(seed=1))
    picks = [a.principle(f"p{i}", r).id for i in range(20) for r in range(4)]
    assert picks == [b.principle(f"p{i}", r).id for i in range(20) for r in range(4)]
    assert len(set(picks)) > 5  # drawn across the constitution, with replacement


def test_chains_run_every_round_with_the_trace(engine, constitution):
    s = CritiqueSettings(
        SLGenerateConfig(rounds=3, few_shot=1), sampling=SamplingParams(max_new_tokens=12)
    )
    results = run_chains(engine, ChainPrompter(constitution, s), _items())
    assert [r.prompt_id for r in results] == ["p0", "p1", "p2"]
    for res in results:
        if res.reject:  # a random model may write only a marker: then it is a counted reject
            assert res.reject.startswith("empty")
            continue
        assert len(res.rounds) == 3
        for rd in res.rounds:
            p = constitution.critique_principle(rd.principle_id)
            assert (rd.critique_request, rd.revision_request) == (p.critique, p.revision)
            assert rd.critique and rd.revision
    assert sum(r.reject is None for r in results) >= 2


def test_direct_revision_skips_critiques(engine, constitution):
    s = CritiqueSettings(
        SLGenerateConfig(rounds=2, direct_revision=True, few_shot=0),
        sampling=SamplingParams(max_new_tokens=8),
    )
    results = run_chains(engine, ChainPrompter(constitution, s), _items(2))
    done = [r for r in results if r.reject is None]
    assert done and all(rd.critique == "" and rd.revision for r in done for rd in r.rounds)


def test_too_long_prompts_are_rejected_or_truncated(engine, constitution):
    long_answer = "word " * 2000  # longer than the tiny model's context on its own
    convo = Conversation.from_messages([{"role": "user", "content": "hi"}])
    s = CritiqueSettings(SLGenerateConfig(rounds=1), sampling=SamplingParams(max_new_tokens=8))
    res = run_chains(engine, ChainPrompter(constitution, s), [("p", convo, long_answer)])
    assert res[0].reject == "prompt too long for the model's context at the critique in round 1"
    # few-shot examples are dropped first when they are what does not fit
    prompter = ChainPrompter(constitution, s)
    full = prompter.critique_prompt(convo, "ok", "x" * 50, n_shot=len(prompter.examples))
    assert engine.count_tokens([full])[0] > engine.max_context - 8  # precondition
    res = run_chains(engine, prompter, [("p", convo, "ok")], too_long="reject")
    assert res[0].reject.startswith("prompt too long")
    res = run_chains(engine, prompter, [("p", convo, "ok")], too_long="truncate")
    assert res[0].reject is None or res[0].reject.startswith("empty")


def test_constitution_without_critique_principles_is_an_error(tmp_path):
    from cai_ray.errors import ConstitutionError

    c = load_constitution("constitutions/examples/honesty-labeller.yaml")
    with pytest.raises(ConstitutionError):
        ChainPrompter(c, CritiqueSettings())
