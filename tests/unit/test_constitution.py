"""The constitution schema, loader, hash, rendering, sampling and diff (no shared data needed)."""

from __future__ import annotations

import collections
import json
import re
import textwrap
from pathlib import Path

import pytest

from cai_ray.constitution import (
    DEFAULT_CONSTITUTION,
    Constitution,
    ConstitutionError,
    FeedbackExample,
    PrincipleSampler,
    choose_principles,
    diff_constitutions,
    dump_constitution,
    load_constitution,
    parse_constitution,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "constitutions" / "examples").glob("*.yaml"))
SHARED = ROOT.parent / "shared" / "data"

MINIMAL = """\
name: tiny
version: "1"
description: A tiny constitution for tests.
critique_principles:
  - id: harm
    critique: Is it harmful?
    revision: Make it harmless.
  - id: honest
    critique: Is it honest?
    revision: Make it honest.
feedback_principles:
  - id: less-harmful
    question: "Which is less harmful? Options:"
critique_examples:
  - conversation:
      - {role: user, content: Hi}
      - {role: assistant, content: Go away.}
    rounds:
      - principle: harm
        critique: It is rude.
        revision: Hello! How can I help?
feedback_examples:
  - conversation: [{role: user, content: Hi}]
    principle: less-harmful
    response_a: Hello!
    response_b: Go away.
    answer: A
cot_examples:
  - conversation: [{role: user, content: Hi}]
    response_a: Go away.
    response_b: Hello!
    rationale: (A) is rude, (B) is friendly.
    answer: B
"""


def _line(text: str, needle: str) -> str:
    """ "c.yaml:N" for the first line of `text` containing `needle`."""
    return f"c.yaml:{next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)}"


def _error(text: str) -> ConstitutionError:
    with pytest.raises(ConstitutionError) as info:
        parse_constitution(text, where="c.yaml")
    return info.value


# ---- the project's own constitutions -------------------------------------------------------


def test_default_constitution_meets_the_brief():
    c = load_constitution(DEFAULT_CONSTITUTION)
    assert len(c.critique_principles) >= 12
    assert len(c.feedback_principles) >= 12
    assert len(c.critique_examples) >= 3
    assert all(1 <= len(e.rounds) <= 2 for e in c.critique_examples)
    assert any(len(e.rounds) == 2 for e in c.critique_examples)
    assert len(c.feedback_examples) >= 3
    assert len(c.cot_examples) >= 2
    # The feedback prompt lists (A)/(B) right after the question (paper §4.1).
    assert all(p.question.endswith("Options:") for p in c.feedback_principles)
    # Few-shot answers are not all in one position, which would teach position bias.
    answers = {e.answer for e in [*c.feedback_examples, *c.cot_examples]}
    assert answers == {"A", "B"}


@pytest.mark.parametrize(
    "topic",
    [
        r"\bharm",
        r"\bcrime|illegal",
        r"\bethic",
        r"stereotype|bias",
        r"\bhonest|false",
        r"confiden",
        r"refus|evasive|deflect",
    ],
)
def test_default_constitution_covers_the_papers_ground(topic):
    c = load_constitution(DEFAULT_CONSTITUTION)
    critique_texts = " ".join(f"{p.critique} {p.revision}" for p in c.critique_principles)
    questions = " ".join(p.question for p in c.feedback_principles)
    assert re.search(topic, critique_texts, re.I), topic
    assert re.search(topic, questions, re.I), topic


@pytest.mark.shared_data
def test_default_constitution_is_in_its_own_words():
    prompts = SHARED / "anthropic-cai" / "prompts"
    if not prompts.is_dir():
        pytest.skip("../shared/data is absent")
    from cai_ray.constitution import import_constitution

    paper = import_constitution(prompts)
    texts = [t for p in paper.critique_principles for t in (p.critique, p.revision)]
    texts += [p.question for p in paper.feedback_principles]
    texts += [e.as_transcript() for e in paper.critique_examples]

    def words(text: str) -> list[str]:
        return re.findall(r"[a-z']+", text.lower())

    ours = words(DEFAULT_CONSTITUTION.read_text())
    grams = {tuple(ours[i : i + 6]) for i in range(len(ours) - 5)}
    # No run of six words from the paper's principles or few-shot transcripts appears in ours.
    shared = {
        " ".join(w[i : i + 6])
        for w in map(words, texts)
        for i in range(len(w) - 5)
        if tuple(w[i : i + 6]) in grams
    }
    assert not shared


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_constitutions_validate(path):
    c = load_constitution(path)
    assert c.critique_principles or c.feedback_principles
    assert c.path == str(path)


def test_there_are_example_variants():
    assert len(EXAMPLES) >= 1


# ---- hashing -------------------------------------------------------------------------------


def test_hash_ignores_layout_comments_and_key_order():
    c = parse_constitution(MINIMAL)
    data = c.model_dump(mode="json", exclude_none=True)
    # Same content as JSON-style flow YAML with keys reversed, plus comments and folded text.
    reordered = json.dumps({k: data[k] for k in reversed(list(data))}, indent=1)
    variant = "# a comment\n" + reordered.replace('"Is it harmful?"', '"  Is it harmful?  "')
    assert parse_constitution(variant).content_hash == c.content_hash
    folded = MINIMAL.replace(
        "description: A tiny constitution for tests.",
        "description: >-\n  A tiny constitution\n  for tests.\n# trailing comment",
    )
    assert parse_constitution(folded).content_hash == c.content_hash
    assert re.fullmatch(r"[0-9a-f]{64}", c.content_hash)
    assert c.short_hash == c.content_hash[:12]


def test_hash_changes_with_content():
    base = parse_constitution(MINIMAL).content_hash
    assert parse_constitution(MINIMAL.replace("Is it honest?", "Is it true?")).content_hash != base
    assert parse_constitution(MINIMAL.replace('version: "1"', 'version: "2"')).content_hash != base


def test_dump_then_load_keeps_the_hash(tmp_path):
    for c in (parse_constitution(MINIMAL), load_constitution(DEFAULT_CONSTITUTION)):
        out = dump_constitution(c, tmp_path / f"{c.name}.yaml", header="made by a test")
        text = out.read_text()
        assert text.startswith("# made by a test\n")
        assert load_constitution(out).content_hash == c.content_hash


# ---- validation errors name the file, line and field -----------------------------------------


def test_unknown_field_names_line_and_suggests():
    text = MINIMAL.replace("    revision: Make it honest.", "    revison: Make it honest.")
    err = _error(text)
    assert err.where == _line(text, "revison:")
    assert "critique_principles[1].revison" in err.message
    assert "unknown field" in err.message
    assert "did you mean 'revision'" in err.hint


def test_unknown_top_level_field():
    err = _error(MINIMAL + "descriptoin: oops\n")
    assert err.where.startswith("c.yaml:")
    assert "'description'" in err.hint


def test_missing_field_points_at_its_entry():
    err = _error(MINIMAL.replace("    revision: Make it honest.\n", ""))
    assert err.where == _line(MINIMAL, "- id: honest")
    assert "critique_principles[1].revision" in err.message
    assert "missing" in err.message


def test_duplicate_id():
    err = _error(MINIMAL.replace("id: honest", "id: harm"))
    assert err.where == _line(MINIMAL, "- id: honest")
    assert "duplicate id 'harm'" in err.message


def test_empty_text():
    err = _error(MINIMAL.replace("critique: Is it honest?", 'critique: "   "'))
    assert err.where == _line(MINIMAL, "Is it honest?")
    assert "critique_principles[1].critique" in err.message
    assert "empty" in err.message


def test_non_text_value_hints_at_quoting():
    err = _error(MINIMAL.replace("critique: Is it honest?", "critique: yes"))
    assert err.where == _line(MINIMAL, "Is it honest?")
    assert "quote" in err.hint
    err = _error(MINIMAL.replace('version: "1"', "version: 1.10"))
    assert err.where == "c.yaml:2"
    assert "version" in err.message


def test_yaml_syntax_error_has_line():
    err = _error(
        MINIMAL.replace(
            '    question: "Which is less harmful? Options:"',
            "    question: Which is less harmful? Options:",
        )
    )
    assert err.where == _line(MINIMAL, "Which is less harmful")
    assert "invalid YAML" in err.message


def test_duplicate_yaml_key_is_an_error():
    text = MINIMAL.replace('version: "1"\n', 'version: "1"\nname: twice\n')
    err = _error(text)
    assert err.where == _line(text, "name: twice")
    assert "duplicate key 'name'" in err.message


def test_unknown_principle_reference_suggests_closest():
    err = _error(MINIMAL.replace("principle: harm\n", "principle: harn\n"))
    assert err.where == _line(MINIMAL, "principle: harm")
    assert "critique_examples[0].rounds[0].principle" in err.message
    assert "did you mean 'harm'" in err.hint
    err = _error(MINIMAL.replace("principle: less-harmful", "principle: less-harmfull"))
    assert "feedback_examples[0].principle" in err.message


def test_round_without_principle_needs_both_requests():
    text = MINIMAL.replace("principle: harm\n", "critique_request: Is it rude?\n")
    err = _error(text)
    assert "revision_request" in err.message
    ok = text.replace(
        "critique: It is rude.", "critique: It is rude.\n        revision_request: Fix."
    )
    assert parse_constitution(ok).critique_examples[0].rounds[0].principle is None


def test_conversation_shape_is_checked():
    err = _error(
        MINIMAL.replace("{role: assistant, content: Go away.}", "{role: user, content: X}")
    )
    assert "must end with an assistant turn" in err.message
    assert err.where == _line(MINIMAL, "{role: assistant, content: Go away.}")
    err = _error(
        MINIMAL.replace(
            "{role: user, content: Hi}\n      - {role: assistant",
            "{role: user, content: Hi}\n      - {role: system",
        )
    )
    assert "system turn" in err.message


def test_no_principles_at_all_is_an_error():
    text = 'name: x\nversion: "1"\ndescription: d\nfeedback_principles: []\n'
    err = _error(text)
    assert "no principles" in err.message
    assert err.where == "c.yaml:1"


def test_several_problems_are_all_listed():
    text = MINIMAL.replace("critique: Is it honest?", "critique: ''").replace(
        "id: harm\n", "id: ''\n"
    )
    err = _error(text)
    assert "1 more problem" in err.message


def test_file_errors(tmp_path):
    with pytest.raises(ConstitutionError, match="not found"):
        load_constitution(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConstitutionError, match="mapping") as info:
        load_constitution(tmp_path / "list.yaml")
    assert info.value.where == f"{tmp_path / 'list.yaml'}:1"
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(ConstitutionError, match="empty"):
        load_constitution(tmp_path / "empty.yaml")


# ---- stage helpers and lookups ---------------------------------------------------------------


def test_require_helpers_name_the_file():
    labeller = ROOT / "constitutions" / "examples" / "honesty-labeller.yaml"
    c = load_constitution(labeller)
    assert c.require_feedback() == c.feedback_principles
    with pytest.raises(ConstitutionError, match="no critique principles") as info:
        c.require_critique()
    assert info.value.where == str(labeller)


def test_principle_lookup_suggests_closest():
    c = parse_constitution(MINIMAL)
    assert c.critique_principle("honest").critique == "Is it honest?"
    assert c.feedback_principle("less-harmful").question == "Which is less harmful? Options:"
    with pytest.raises(ConstitutionError) as info:
        c.critique_principle("honets")
    assert "did you mean 'honest'" in info.value.hint


# ---- rendering -------------------------------------------------------------------------------


def test_critique_example_renders_paper_and_chat_layouts():
    ex = parse_constitution(MINIMAL).critique_examples[0]
    assert ex.as_transcript() == (
        "\n\nHuman: Hi\n\nAssistant: Go away.\n\nCritiqueRequest: Is it harmful?"
        "\n\nCritique: It is rude.\n\nRevisionRequest: Make it harmless."
        "\n\nRevision: Hello! How can I help?"
    )
    assert ex.as_messages() == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Go away."},
        {"role": "user", "content": "Is it harmful?"},
        {"role": "assistant", "content": "It is rude."},
        {"role": "user", "content": "Make it harmless."},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]


def test_feedback_and_cot_examples_render_multiple_choice():
    c = parse_constitution(MINIMAL)
    # A blank line between the conversation and the question, as in the paper's files (issue 14)
    assert c.feedback_examples[0].as_transcript() == (
        "Consider the following conversation between a human and an assistant:\n"
        "Human: Hi\n\nWhich is less harmful? Options:\n(A) Hello!\n(B) Go away.\n"
        "The answer is: (A)"
    )
    cot = c.cot_examples[0]
    # No principle of its own: the caller passes the sampled one (paper §4.1).
    with pytest.raises(ConstitutionError, match="no principle"):
        cot.as_transcript()
    text = cot.as_transcript(question="Which is kinder? Options:")
    # Chain of thought asks a helpful model: the question is a Human turn (paper §4.1).
    assert text.startswith(
        "\n\nHuman: Consider the following conversation between a human and an assistant:\n"
    )
    assert text.endswith(
        "\n\nWhich is kinder? Options:\n(A) Go away.\n(B) Hello!\n\nAssistant: "
        "Let's think step-by-step: (A) is rude, (B) is friendly.\nSo the answer is: (B)"
    )
    messages = cot.as_messages(question="Q? Options:")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"].startswith("Let's think step-by-step:")


@pytest.mark.parametrize("raw", ["b", "(B)", " B "])
def test_answer_is_normalised(raw):
    ex = FeedbackExample.model_validate(
        {
            "conversation": [{"role": "user", "content": "x"}],
            "question": "Q?",
            "response_a": "a",
            "response_b": "b",
            "answer": raw,
        }
    )
    assert ex.answer == "B"


def test_pickle_keeps_links_and_hash():
    # Ray ships constitutions to actors by pickling them.
    import pickle

    c = pickle.loads(pickle.dumps(parse_constitution(MINIMAL, where="c.yaml")))
    assert c.content_hash == parse_constitution(MINIMAL).content_hash
    assert c.path == "c.yaml"
    assert "Is it harmful?" in c.critique_examples[0].as_transcript()
    assert "Which is less harmful?" in c.feedback_examples[0].as_transcript()


def test_models_are_strict_and_frozen():
    c = parse_constitution(MINIMAL)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        c.name = "other"
    assert Constitution.model_config["extra"] == "forbid"


# ---- sampling --------------------------------------------------------------------------------

PRINCIPLES = [f"p{i}" for i in range(16)]


def test_sampler_is_seeded_and_with_replacement():
    a = PrincipleSampler(PRINCIPLES, seed=7)
    b = PrincipleSampler(PRINCIPLES, seed=7)
    draws = a.sample(64)
    assert draws == b.sample(64)
    assert len(set(draws)) < len(draws)  # repeats happen: with replacement
    assert PrincipleSampler(PRINCIPLES, seed=8).sample(64) != draws
    assert PrincipleSampler(PRINCIPLES[:1], seed=0).sample(3) == ["p0"] * 3
    assert a.sample(0) == []


def _roughly_uniform(counts: collections.Counter, n: int) -> None:
    expected = n / len(PRINCIPLES)
    chi2 = sum((counts[p] - expected) ** 2 / expected for p in PRINCIPLES)
    assert set(counts) == set(PRINCIPLES)
    assert chi2 < 45  # 15 dof: p < 0.0002 for a uniform draw


def test_sampler_is_uniform():
    _roughly_uniform(collections.Counter(PrincipleSampler(PRINCIPLES, seed=1).sample(8000)), 8000)


def test_choose_principles_depends_only_on_seed_and_key():
    keys = [f"prompt-{i}:round-{r}" for i in range(500) for r in range(4)]

    def draw(k, seed=3):
        return choose_principles(PRINCIPLES, seed=seed, key=k, k=2, replace=True)

    forward = {k: draw(k) for k in keys}
    backward = {k: draw(k) for k in reversed(keys)}
    assert forward == backward
    assert any(a == b for a, b in forward.values())  # with replacement
    other_seed = {k: draw(k, seed=4) for k in keys}
    assert other_seed != forward
    flat = collections.Counter(p for pair in forward.values() for p in pair)
    _roughly_uniform(flat, 2 * len(keys))


def test_choose_principles_is_pinned():
    # A change here silently changes which principle every resumed run picks.
    assert choose_principles(PRINCIPLES, seed=0, key="x", k=3) == choose_principles(
        PRINCIPLES, seed=0, key="x", k=3
    )
    import hashlib

    digest = hashlib.sha256(b"0:x:0").digest()
    assert (
        choose_principles(PRINCIPLES, seed=0, key="x")[0]
        == PRINCIPLES[int.from_bytes(digest[:8], "big") % 16]
    )


def test_k_principles_are_distinct_and_pure_in_seed_and_key():
    # issue 14: with replacement about a third of K=4 draws of 16 held a duplicate, which the
    # ensemble then counted as agreement
    keys = [f"pair-{i}" for i in range(2000)]
    picks = {k: choose_principles(PRINCIPLES, seed=5, key=k, k=4) for k in keys}
    assert all(len(set(p)) == 4 for p in picks.values())
    assert picks == {k: choose_principles(PRINCIPLES, seed=5, key=k, k=4) for k in keys}
    _roughly_uniform(collections.Counter(p for four in picks.values() for p in four), 8000)
    every = choose_principles(PRINCIPLES, seed=5, key="pair-0", k=20)  # K > 16: all, once
    assert sorted(every) == sorted(PRINCIPLES)
    assert every == choose_principles(PRINCIPLES, seed=5, key="pair-0", k=20)
    # one draw is the same either way: the per-round critique principle is unchanged
    for k in keys[:200]:
        one = choose_principles(PRINCIPLES, seed=5, key=k)
        assert one == choose_principles(PRINCIPLES, seed=5, key=k, replace=True)
    assert len(choose_principles(PRINCIPLES, seed=5, key="x", k=20, replace=True)) == 20


def test_sampling_from_nothing_is_a_clear_error():
    with pytest.raises(ConstitutionError):
        PrincipleSampler([], seed=0)
    with pytest.raises(ConstitutionError):
        choose_principles([], seed=0, key="k")


# ---- diff ------------------------------------------------------------------------------------


def test_diff_reports_principles_by_id():
    a = parse_constitution(MINIMAL)
    assert diff_constitutions(a, parse_constitution(MINIMAL)).identical
    changed = MINIMAL.replace("Is it honest?", "Is it true?").replace(
        "  - id: harm\n",
        "  - id: kind\n    critique: Unkind?\n    revision: Be kind.\n  - id: harm\n",
    )
    changed = changed.replace("    revision: Hello! How can I help?\n", "    revision: Hi!\n")
    d = diff_constitutions(a, parse_constitution(changed))
    assert not d.identical
    assert d.critique.added == ["kind"]
    assert d.critique.changed == {"honest": ["critique"]}
    assert d.feedback.empty
    assert d.examples["critique_examples"] == (1, 1, True)
    report = "\n".join(d.lines())
    assert "+ kind" in report and "~ honest (critique)" in report
    assert "critique examples: 1 -> 1 (content changed)" in report


def test_diff_notes_removed_and_reordered():
    a = parse_constitution(MINIMAL)
    swapped = textwrap.dedent(MINIMAL).replace(
        "  - id: harm\n    critique: Is it harmful?\n    revision: Make it harmless.\n"
        "  - id: honest\n    critique: Is it honest?\n    revision: Make it honest.\n",
        "  - id: honest\n    critique: Is it honest?\n    revision: Make it honest.\n"
        "  - id: harm\n    critique: Is it harmful?\n    revision: Make it harmless.\n",
    )
    d = diff_constitutions(a, parse_constitution(swapped))
    assert d.critique.moved and not d.critique.added and not d.critique.removed
    d = diff_constitutions(parse_constitution(swapped), a)
    assert "(order changed)" in "\n".join(d.lines())
