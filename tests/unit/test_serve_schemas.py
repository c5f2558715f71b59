"""Request validation, error shapes and bearer auth of the Serve API (no Ray)."""

from __future__ import annotations

import json
import pickle

import pytest

from cai_ray.errors import ConfigError
from cai_ray.serve.auth import check_bearer, load_token, token_digest
from cai_ray.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    CritiqueRequest,
    ScoreRequest,
    parse_body,
    sse,
    text_pieces,
)

USER = [{"role": "user", "content": "hi"}]


def _parse(schema, /, **body):
    return parse_body(json.dumps(body).encode(), schema)


def _fails(model, raw: bytes, code: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_body(raw, model)
    assert info.value.status == 400 and info.value.code == code
    return info.value


def test_valid_chat_request_and_defaults():
    req = _parse(ChatRequest, model="policy", messages=USER, stop="\n", user="ignored")
    assert req.temperature == 1.0 and req.n == 1 and not req.stream
    assert req.stops() == ("\n",)
    assert req.wanted_tokens(default=7) == 7
    both = _parse(ChatRequest, model="p", messages=USER, max_tokens=3, max_completion_tokens=5)
    assert both.wanted_tokens(default=7) == 5


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b"{bad", "invalid_json", None),
        (b'"text"', "invalid_json", None),
        (b'{"model": "p"}', "missing_field", "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "missing_field", "model"),
        (b'{"model": "p", "messages": []}', "invalid_value", "messages"),
        (b'{"model": "p", "messages": [{"role": "user"}]}', "missing_field", "messages.0.content"),
    ],
)
def test_malformed_bodies_name_the_field(raw, code, param):
    err = _fails(ChatRequest, raw, code)
    assert err.param == param


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"top_p": 0},
        {"max_tokens": 0},
        {"n": 0},
        {"seed": -1},
        {"max_tokens": 4, "min_tokens": 5},
        {"stop": ["a", "b", "c", "d", "e"]},
    ],
)
def test_impossible_numbers_are_400(extra):
    raw = json.dumps({"model": "p", "messages": USER, **extra}).encode()
    _fails(ChatRequest, raw, "invalid_value")


def test_completion_prompts_and_score_one_of():
    assert _parse(CompletionRequest, model="p", prompt="a").prompts() == ["a"]
    assert _parse(CompletionRequest, model="p", prompt=["a", "b"]).prompts() == ["a", "b"]
    _fails(CompletionRequest, b'{"model": "p", "prompt": []}', "invalid_value")
    _fails(CompletionRequest, b'{"model": "p", "prompt": [1, 2]}', "invalid_value")
    assert len(_parse(ScoreRequest, conversations=[USER, USER]).all_conversations()) == 2
    _fails(ScoreRequest, b"{}", "invalid_value")
    _fails(
        ScoreRequest,
        json.dumps({"messages": USER, "conversations": [USER]}).encode(),
        "invalid_value",
    )
    assert _parse(CritiqueRequest, messages=USER, response="x").rounds == 1


def test_error_body_shape_and_pickling():
    err = ApiError(404, "no such model", param="model", code="model_not_found")
    assert err.body() == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    back = pickle.loads(pickle.dumps(err))  # crosses from a replica to the ingress
    assert back.body() == err.body() and back.status == 404 and str(back) == "no such model"


def test_sse_and_pieces():
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"
    text = "x" * 40
    assert "".join(text_pieces(text)) == text and len(text_pieces(text)) == 3
    assert text_pieces("") == [""]


def test_bearer_auth(monkeypatch, tmp_path):
    check_bearer(None, None)  # auth off: anything goes
    digest = token_digest("s3cret")
    check_bearer("Bearer s3cret", digest)
    check_bearer("bearer  s3cret ", digest)
    for header, code in [
        (None, "missing_api_key"),
        ("Basic s3cret", "missing_api_key"),
        ("Bearer nope", "invalid_api_key"),
    ]:
        with pytest.raises(ApiError) as info:
            check_bearer(header, digest)
        assert info.value.status == 401 and info.value.code == code


def test_token_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("CAI_T", raising=False)
    assert load_token(env="CAI_T", file=None) is None
    monkeypatch.setenv("CAI_T", " abc \n")
    assert load_token(env="CAI_T", file=None) == "abc"
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert load_token(env="CAI_T", file=str(path)) == "from-file"  # the file wins
    with pytest.raises(ConfigError, match="token file"):
        load_token(env=None, file=str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_token(env=None, file=str(tmp_path / "empty"))


def test_serve_config_defaults_and_limits():
    from cai_ray.config import load_config

    cfg = load_config(None, ["serve.policy.autoscaling={min_replicas: 1, max_replicas: 3}"])
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.max_body_bytes == 1 << 20
    assert cfg.serve.policy.autoscaling.max_replicas == 3
    with pytest.raises(ConfigError, match="min_replicas"):
        load_config(None, ["serve.policy.autoscaling={min_replicas: 4, max_replicas: 3}"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(None, ["serve.max_tokns_limit=3"])
