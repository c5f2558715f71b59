"""Conversation model: parsing, both renderings, stable ids."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cai_ray.data.conversation import Conversation, Turn, render, split_transcript
from cai_ray.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

TEMPLATE = (
    "{% if messages[0]['role'] == 'system' and not allow_system %}"
    "{{ raise_exception('system messages are not supported') }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tokenizer(chat_template: str | None):
    """A tiny in-memory WordLevel tokenizer wrapped for transformers (no model hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hi": 1, "there": 2}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    tok.chat_template = chat_template
    return tok


def _conv(*pairs: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Turn(role, content) for role, content in pairs))  # type: ignore[arg-type]


def test_turn_validates_role_and_content():
    with pytest.raises(DataError, match="role 'robot'"):
        Turn("robot", "hi")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="not text"):
        Turn("user", 3)  # type: ignore[arg-type]


def test_conversation_rejects_empty_and_late_system():
    with pytest.raises(DataError, match="no turns"):
        Conversation(())
    with pytest.raises(DataError, match="system turn at position 1"):
        _conv(("user", "a"), ("system", "b"))


def test_from_messages_roundtrip_and_aliases():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "Human", "content": "hi", "name": "ignored"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    conv = Conversation.from_messages(messages)
    assert [t.role for t in conv.turns] == ["system", "user", "assistant", "user"]
    assert conv.to_messages()[1] == {"role": "user", "content": "hi"}
    assert conv.last_user_message == "bye"
    assert Conversation.from_messages(conv.to_messages()) == conv


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hi", "not a list"),
        ([], "no turns"),
        ([{"role": "user"}], "'role' and 'content'"),
        (["hi"], "'role' and 'content'"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user", "content": ["a"]}], "not text"),
        ([{"role": "user", "content": "  "}], "empty"),
    ],
)
def test_from_messages_errors(messages, match):
    with pytest.raises(DataError, match=match):
        Conversation.from_messages(messages)


def test_from_messages_error_names_the_message():
    with pytest.raises(DataError) as info:
        Conversation.from_messages(
            [{"role": "user", "content": "a"}, {"role": "x", "content": "b"}]
        )
    assert info.value.where == "message 1"


def test_from_transcript_multi_turn_and_generation_cue():
    text = "\n\nHuman: hi  \n\nAssistant:  hello there\n\nHuman: how are you?\n\nAssistant:"
    conv = Conversation.from_transcript(text)
    assert conv.to_messages() == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "how are you?"},
    ]
    # without the leading blank line, as some files write it
    assert Conversation.from_transcript("Human: hi\n\nAssistant:") == Conversation.from_prompt("hi")


def test_from_transcript_preamble_becomes_system_and_round_trips():
    conv = _conv(("system", "You are kind."), ("user", "hi"), ("assistant", "yo"))
    text = conv.render_transcript(add_generation_prompt=False)
    assert text == "You are kind.\n\nHuman: hi\n\nAssistant: yo"
    assert Conversation.from_transcript(text) == conv


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("just some text", "no 'Human:' turn"),
        ("\n\nAssistant: hi\n\nHuman: there", "starts with an Assistant turn"),
        ("\n\nHuman:   \n\nAssistant: hi", "empty Human turn"),
        ("\n\nHuman: a\n\nAssistant:\n\nHuman: b", "empty Assistant turn"),
        (None, "not text"),
    ],
)
def test_from_transcript_malformed(text, match):
    with pytest.raises(DataError, match=match):
        Conversation.from_transcript(text)  # type: ignore[arg-type]


def test_split_transcript_keeps_empty_final_reply():
    assert split_transcript("\n\nHuman: q\n\nAssistant:") == [("user", "q"), ("assistant", "")]


def test_render_transcript_exact():
    conv = Conversation.from_prompt("hi")
    assert conv.render_transcript() == "\n\nHuman: hi\n\nAssistant:"
    assert conv.render_transcript(add_generation_prompt=False) == "\n\nHuman: hi"
    longer = conv.append("assistant", "hello").append("user", "bye")
    assert (
        longer.render_transcript()
        == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    )
    assert Conversation.from_transcript(longer.render_transcript()) == longer


def test_append_is_immutable_and_validates():
    conv = Conversation.from_prompt("hi")
    longer = conv.append("assistant", "yo")
    assert len(conv.turns) == 1 and len(longer.turns) == 2
    with pytest.raises(DataError):
        conv.append("narrator", "x")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="system turn"):
        conv.append("system", "late")


def test_last_user_message_without_user_turn():
    with pytest.raises(DataError, match="no user turn"):
        _ = _conv(("system", "s")).last_user_message


def test_prompt_id_is_content_hash():
    messages = [{"role": "user", "content": "héllo"}]
    canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    expected = "p" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert Conversation.from_messages(messages).prompt_id == expected
    assert Conversation.from_prompt("héllo").prompt_id == expected
    assert Conversation.from_prompt("hello").prompt_id != expected
    # the role matters, not only the text
    assert _conv(("system", "héllo"), ("user", "x")).prompt_id != _conv(("user", "x")).prompt_id


def test_render_chat_uses_template():
    tok = _tokenizer(TEMPLATE)
    conv = Conversation.from_prompt("hi").append("assistant", "there").append("user", "hi")
    assert conv.render_chat(tok) == "<|user|>hi\n<|assistant|>there\n<|user|>hi\n<|assistant|>"
    assert conv.render_chat(tok, add_generation_prompt=False).endswith("<|user|>hi\n")
    assert render(conv, fmt="chat", tokenizer=tok) == conv.render_chat(tok)


def test_render_chat_falls_back_to_transcript_without_template():
    tok = _tokenizer(None)
    conv = Conversation.from_prompt("hi")
    assert conv.render_chat(tok) == "\n\nHuman: hi\n\nAssistant:"


def test_render_chat_template_error_is_data_error():
    tok = _tokenizer(TEMPLATE)
    conv = _conv(("system", "s"), ("user", "hi"))
    with pytest.raises(DataError, match="system messages are not supported"):
        conv.render_chat(tok)


def test_render_dispatch_and_errors():
    conv = Conversation.from_prompt("hi")
    assert render(conv, fmt="transcript") == "\n\nHuman: hi\n\nAssistant:"
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        render(conv, fmt="chat")
    with pytest.raises(ConfigError, match="unknown prompt format"):
        render(conv, fmt="xml")  # type: ignore[arg-type]


@pytest.mark.shared_data
def test_hhh_eval_transcripts_parse():
    """The 438 HHH rows: `text_correct`/`text_incorrect` are hh-rlhf transcripts sharing a prefix.

    (Their `prompt` field is the multiple-choice feedback prompt, not a transcript; it embeds
    the same conversation, which the last assertion checks.)
    """
    path = SHARED_DATA / "anthropic-cai" / "evals" / "438HHHEvaluations.jsonl"
    if not path.exists():
        pytest.skip("../shared/data is absent")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    assert len(rows) == 438
    for row in rows:
        good = Conversation.from_transcript(row["text_correct"])
        bad = Conversation.from_transcript(row["text_incorrect"])
        assert good.turns[-1].role == bad.turns[-1].role == "assistant"
        prefix = Conversation(good.turns[:-1])
        assert prefix == Conversation(bad.turns[:-1])
        cue = prefix.render_transcript(add_generation_prompt=False)
        assert Conversation.from_transcript(cue + "\n\nAssistant:") == prefix
        assert f"Human: {prefix.turns[0].content}" in row["prompt"]
