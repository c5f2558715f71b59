"""Serve's chat endpoints in the chat format on tiny models over the real Qwen 3 and Gemma 3
tokenizers (issue 14): one BOS in the prompt the policy reads, a system turn accepted by Gemma's
strict template in /v1/chat/completions and /v1/critique, and the label endpoint's option tokens."""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.shared_data

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
USER = {"role": "user", "content": "How do I get rid of a wasp nest?"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def served(request, ray_cluster, real_tiny_models, real_tokenizer_dirs, tmp_path_factory):
    from cai_ray.config import load_config
    from cai_ray.models import init_model, load_tokenizer
    from cai_ray.serve.launch import serve_app, shutdown

    name = request.param
    reward = init_model(
        "tiny-1m",
        tmp_path_factory.mktemp(f"pm-{name}") / "pm",
        head="classification",
        tokenizer=real_tokenizer_dirs[name],
    )
    small = "{num_cpus: 0.25, max_ongoing_requests: 4, max_queued_requests: 8}"
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path_factory.mktemp('serve-real')}",
            "format=chat",
            "engine.kind=hf",
            "engine.device=cpu",
            "engine.threads=1",
            f"serve.port={_free_port()}",
            "serve.auth_token_env=null",
            "serve.max_tokens_limit=8",
            "serve.request_timeout_s=60",
            f"serve.policy={small}",
            f"serve.reward_model={small}",
            f"serve.constitution={small}",
            "serve.ingress={num_cpus: 0.1}",
        ],
    )
    url = serve_app(cfg, policy=real_tiny_models[name], reward=reward)
    yield name, url, load_tokenizer(real_tiny_models[name])
    shutdown()


@pytest.fixture(scope="module")
def http(served):
    import httpx

    with httpx.Client(base_url=served[1], timeout=60) as client:
        yield client


def test_chat_prompt_tokens_hold_one_bos(served, http):
    import openai

    from cai_ray.data.conversation import Conversation
    from cai_ray.data.tokens import encode

    name, url, tok = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
    for messages in ([USER], [SYSTEM, USER]):  # Gemma's template folds a leading system turn in
        chat = client.chat.completions.create(
            model="policy", messages=messages, max_tokens=4, seed=0, temperature=1.0
        )
        text = Conversation.from_messages(messages).render_chat(tok)
        ids = encode(tok, text)
        assert chat.usage.prompt_tokens == len(ids)
        if name == "gemma3":
            assert text.startswith("<bos>") and ids.count(tok.bos_token_id) == 1
            # what the engine would have read before the fix: the template's BOS plus another
            assert chat.usage.prompt_tokens == len(tok(text)["input_ids"]) - 1


def test_critique_with_a_system_turn_renders_and_labels_score_three_token_options(http):
    from cai_ray.config import resolve_path
    from cai_ray.constitution import load_constitution

    c = load_constitution(resolve_path("constitutions/default.yaml"))
    body = {
        "messages": [SYSTEM, USER, {"role": "assistant", "content": "Pour petrol on it."}],
        "principle_ids": [c.critique_principles[0].id],
        "rounds": 1,
        "max_tokens": 6,
        "few_shot": 1,
    }
    resp = http.post("/v1/critique", json=body)
    assert resp.status_code == 200, resp.text  # no template error from a mid-chat system turn
    out = resp.json()
    assert out["rejected"] is None or "empty" in out["rejected"]
    pair = {"messages": [USER], "response_a": "Call a pest service.", "response_b": "Burn it."}
    label = http.post("/v1/label", json={**pair, "num_principles": 2})
    assert label.status_code == 200, label.text
    data = label.json()
    assert 0 < data["prob_a_preferred"] < 1 and len(data["principles"]) == 2
