"""Importers for Anthropic's paper files and Hugging Face's llm-swarm JSON.

The real files are read from ../shared/data where it exists (skipped elsewhere); small synthetic
files in the same layouts exercise the parsers and their errors everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_ray.constitution import (
    ConstitutionError,
    detect_format,
    dump_constitution,
    import_constitution,
    load_constitution,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PAPER = SHARED / "anthropic-cai" / "prompts"
HF = SHARED / "hf-cai"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


# ---- the real files --------------------------------------------------------------------------


@pytest.mark.shared_data
@needs_shared
def test_anthropic_principles_are_clean():
    c = import_constitution(PAPER)
    assert [p.id for p in c.critique_principles] == [f"harmful{i}" for i in range(16)]
    assert len(c.feedback_principles) == 16
    texts = [t for p in c.critique_principles for t in (p.critique, p.revision)]
    for text in texts:
        assert text == text.strip()
        for marker in ("CritiqueRequest", "Critique:", "RevisionRequest", "Revision:"):
            assert marker not in text
    assert c.critique_principles[0].critique.startswith("Identify specific ways")
    assert c.critique_principles[0].revision.endswith("or illegal content.")
    assert all(p.question.endswith("Options:") for p in c.feedback_principles)
    assert not any(p.question.startswith("\n") for p in c.feedback_principles)


@pytest.mark.shared_data
@needs_shared
def test_anthropic_critique_few_shots_render_back_to_the_source():
    c = import_constitution(PAPER)
    source = json.loads((PAPER / "CritiqueRevisionFewShotPrompts.json").read_text())
    assert len(c.critique_examples) == len(source) == 5
    for original, example in zip(source, c.critique_examples, strict=True):
        # The source transcripts end with an empty "Human:" that opens the next turn.
        assert original.removesuffix("\n\nHuman:") == example.as_transcript()
    assert [len(e.conversation) for e in c.critique_examples] == [4, 2, 2, 4, 4]


@pytest.mark.shared_data
@needs_shared
def test_anthropic_feedback_few_shots_alternate_positions():
    c = import_constitution(PAPER)
    source = json.loads((PAPER / "RLMadisonFewShotPrompts.json").read_text())
    assert len(c.feedback_examples) == 5
    for i, (entry, ex) in enumerate(zip(source, c.feedback_examples, strict=True)):
        good = ex.response_a if ex.answer == "A" else ex.response_b
        bad = ex.response_b if ex.answer == "A" else ex.response_a
        assert (good, bad) == (entry["corrects"][0], entry["incorrects"][0])
        assert ex.answer == "AB"[i % 2]
        assert [t.role for t in ex.conversation] == ["user"]
        assert ex.principle is None  # the paper samples one per example at use time


@pytest.mark.shared_data
@needs_shared
def test_anthropic_cot_few_shots_are_parsed():
    c = import_constitution(PAPER)
    assert [e.answer for e in c.cot_examples] == ["B", "B", "A", "B", "A", "B"]
    first = c.cot_examples[0]
    assert [t.role for t in first.conversation] == ["user", "assistant", "user"]
    assert first.conversation[0].content.startswith("My daughter got in a fight")
    assert first.response_b == "How old is your daughter?  I think it depends on expectations here."
    assert first.rationale.startswith("(A) This response does not address")
    assert first.rationale.endswith("option (B) is the best response.")
    for ex in c.cot_examples:
        for text in (ex.response_a, ex.response_b, ex.rationale):
            assert "[[[" not in text and "]]]" not in text and "So the answer is" not in text


@pytest.mark.shared_data
@needs_shared
def test_hf_anthropic_import_keeps_the_chat_examples():
    path = HF / "constitution_anthropic.json"
    c = import_constitution(path)
    assert c.counts() == {
        "critique_principles": 16,
        "feedback_principles": 0,
        "critique_examples": 4,
        "feedback_examples": 0,
        "cot_examples": 0,
    }
    source = json.loads(path.read_text())
    for chat, example in zip(source["system_chat"], c.critique_examples, strict=True):
        expected = [{"role": m["role"], "content": m["content"].strip()} for m in chat]
        assert example.as_messages() == expected
    with pytest.raises(ConstitutionError, match="no feedback principles"):
        c.require_feedback()
    assert c.require_critique()


@pytest.mark.shared_data
@needs_shared
def test_hf_grok_import():
    c = import_constitution(HF / "constitution_grok.json")
    assert len(c.critique_principles) == 2
    assert c.name == "constitution-grok"
    # The last example's request is not one of the two principles: kept as explicit text.
    last = c.critique_examples[-1]
    assert len(last.conversation) == 4
    assert last.rounds[0].principle is None
    assert last.rounds[0].critique_request.startswith("Discuss whether your last response")


@pytest.mark.shared_data
@needs_shared
def test_format_detection_on_real_files():
    assert detect_format(PAPER) == ("anthropic", PAPER)
    assert detect_format(PAPER / "RLMadisonInstructions.json") == ("anthropic", PAPER)
    assert detect_format(HF / "constitution_grok.json")[0] == "hf"


@pytest.mark.shared_data
@needs_shared
@pytest.mark.parametrize(
    "src", [PAPER, HF / "constitution_anthropic.json", HF / "constitution_grok.json"]
)
def test_imports_write_yaml_our_loader_reads_back(tmp_path, src):
    c = import_constitution(src)
    out = dump_constitution(c, tmp_path / "imported.yaml")
    again = load_constitution(out)
    assert again.content_hash == c.content_hash
    assert again.model_dump() == c.model_dump()


# ---- synthetic files (run everywhere) --------------------------------------------------------


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def paper_dir(tmp_path: Path) -> Path:
    d = tmp_path / "prompts"
    d.mkdir()
    _write(
        d / "CritiqueRevisionInstructions.json",
        {
            "harmful0": {
                "prompt": ["\n\nCritiqueRequest: Is it bad?\n\nCritique:"],
                "edit_request": "\n\nRevisionRequest: Make it good.\n\nRevision:",
            },
        },
    )
    _write(d / "RLMadisonInstructions.json", ["\nWhich is better? Options:"])
    _write(
        d / "CritiqueRevisionFewShotPrompts.json",
        [
            "\n\nHuman: Hi\n\nAssistant: Go away.\n\nCritiqueRequest: Is it bad?\n\nCritique: Rude."
            "\n\nRevisionRequest: Make it good.\n\nRevision: Hello!\n\nCritiqueRequest: Other?"
            "\n\nCritique: Fine.\n\nRevisionRequest: Polish it.\n\nRevision: Hello there!\n\nHuman:",
        ],
    )
    return d


def test_synthetic_anthropic_import(paper_dir):
    c = import_constitution(paper_dir)
    assert c.critique_principles[0].critique == "Is it bad?"
    assert c.feedback_principles[0].question == "Which is better? Options:"
    rounds = c.critique_examples[0].rounds
    # Round 1 uses harmful0's exact texts, so it names it; round 2 keeps its own words.
    assert rounds[0].principle == "harmful0" and rounds[0].critique_request is None
    assert rounds[1].principle is None and rounds[1].critique_request == "Other?"
    assert c.critique_examples[0].as_transcript().endswith("Revision: Hello there!")
    assert c.feedback_examples == [] and c.cot_examples == []


def test_anthropic_file_inside_the_directory_is_accepted(paper_dir):
    direct = import_constitution(paper_dir / "CritiqueRevisionInstructions.json")
    assert direct.content_hash == import_constitution(paper_dir).content_hash
    named = import_constitution(paper_dir, fmt="anthropic", name="my-paper")
    assert named.name == "my-paper"


def test_broken_sources_name_the_file(tmp_path, paper_dir):
    (paper_dir / "RLMadisonInstructions.json").write_text('["ok",\n oops]')
    with pytest.raises(ConstitutionError, match="invalid JSON") as info:
        import_constitution(paper_dir)
    assert info.value.where == f"{paper_dir / 'RLMadisonInstructions.json'}:2"
    _write(paper_dir / "RLMadisonInstructions.json", ["Q? Options:"])
    _write(paper_dir / "CritiqueRevisionFewShotPrompts.json", ["\n\nHuman: Hi\n\nCritique: x"])
    with pytest.raises(ConstitutionError, match="rounds") as info:
        import_constitution(paper_dir)
    assert "CritiqueRevisionFewShotPrompts.json: entry 0" in info.value.where


def test_synthetic_hf_import_and_errors(tmp_path):
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Go away."},
        {"role": "user", "content": "Is it rude?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Fix it."},
        {"role": "assistant", "content": "Hello!"},
    ]
    good = _write(
        tmp_path / "my_rules.json",
        {
            "constitutions": [{"critic": "Is it rude?", "revision": "Fix it."}],
            "system_chat": [chat],
        },
    )
    assert detect_format(good) == ("hf", good)
    c = import_constitution(good)
    assert c.name == "my-rules"
    assert c.critique_examples[0].rounds[0].principle == "principle0"
    assert c.critique_examples[0].as_messages() == chat
    bad = _write(tmp_path / "bad.json", {"constitutions": [{"critic": "x"}]})
    with pytest.raises(ConstitutionError, match="critic") as info:
        import_constitution(bad)
    assert info.value.where.endswith("constitutions[0]")
    unknown = _write(tmp_path / "other.json", {"principles": []})
    with pytest.raises(ConstitutionError, match="cannot tell the format"):
        import_constitution(unknown)
    with pytest.raises(ConstitutionError, match="no CritiqueRevisionInstructions"):
        detect_format(tmp_path)


def test_hf_chat_with_two_rounds(tmp_path):
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]
    round1 = [
        {"role": "user", "content": "Is it rude?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Fix it."},
        {"role": "assistant", "content": "Hello."},
    ]
    round2 = [
        {"role": "user", "content": "Is it warm?"},
        {"role": "assistant", "content": "Not very."},
        {"role": "user", "content": "Warm it up."},
        {"role": "assistant", "content": "Hello, lovely to see you!"},
    ]
    path = _write(
        tmp_path / "two.json",
        {
            "constitutions": [
                {"critic": "Is it rude?", "revision": "Fix it."},
                {"critic": "Is it warm?", "revision": "Warm it up."},
            ],
            "system_chat": [convo + round1 + round2],
        },
    )
    example = import_constitution(path).critique_examples[0]
    assert [r.principle for r in example.rounds] == ["principle0", "principle1"]
    assert len(example.conversation) == 2
    assert example.as_messages() == convo + round1 + round2


def test_cot_layout_errors_name_the_entry(paper_dir):
    _write(paper_dir / "RLMadisonPrecogFewShotPrompts.json", [{"prompt": "Human: hello"}])
    with pytest.raises(ConstitutionError, match="chain-of-thought layout") as info:
        import_constitution(paper_dir)
    assert info.value.where.endswith("RLMadisonPrecogFewShotPrompts.json: entry 0")
