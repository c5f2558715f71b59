"""A real Serve app on local Ray with tiny models, called with the `openai` client and raw HTTP."""

from __future__ import annotations

import json
import socket

import pytest

TOKEN = "test-token-123"
ENV = "CAI_RAY_TEST_SERVE_TOKEN"
USER = [{"role": "user", "content": "How do I grow tomatoes?"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(
    ray_cluster, tiny_model_dir, tiny_reward_model_dir, tmp_path_factory, monkeypatch_module
):
    from cai_ray.config import load_config
    from cai_ray.serve.launch import serve_app, shutdown

    monkeypatch_module.setenv(ENV, TOKEN)
    small = "{num_cpus: 0.25, max_ongoing_requests: 8, max_queued_requests: 16}"
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path_factory.mktemp('serve-run')}",
            "engine.kind=hf",
            "engine.device=cpu",
            "engine.threads=1",
            f"serve.port={_free_port()}",
            f"serve.auth_token_env={ENV}",
            "serve.max_tokens_limit=16",
            "serve.max_prompt_tokens=200",
            "serve.max_n=3",
            "serve.max_body_bytes=20000",
            "serve.request_timeout_s=60",
            f"serve.policy={small}",
            f"serve.reward_model={small}",
            f"serve.constitution={small}",
            "serve.ingress={num_cpus: 0.1}",
        ],
    )
    url = serve_app(cfg, policy=tiny_model_dir, reward=tiny_reward_model_dir)
    yield url
    shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def http(server):
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, timeout=60, max_retries=0)


def _assert_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def test_models_and_health(http):
    resp = http.get("/v1/models")
    assert resp.status_code == 200, resp.text
    names = [m["id"] for m in resp.json()["data"]]
    assert names == ["policy", "reward"]
    assert http.get("/health").json()["policy"]["ok"] is True
    ready = http.get("/ready").json()
    assert ready["status"] == "ready"
    assert set(ready["models"]) == {"policy", "reward", "constitution"}


def test_chat_and_completions_with_the_openai_client(client):
    chat = client.chat.completions.create(
        model="policy", messages=USER, max_tokens=8, n=2, seed=1, temperature=0.8, top_p=0.9
    )
    assert len(chat.choices) == 2
    assert all(c.finish_reason in ("stop", "length") for c in chat.choices)
    assert chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    again = client.chat.completions.create(
        model="policy", messages=USER, max_tokens=8, n=2, seed=1, temperature=0.8, top_p=0.9
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in chat.choices]

    comp = client.completions.create(model="policy", prompt=["Hello", "Hi there"], max_tokens=4)
    assert len(comp.choices) == 2 and comp.usage.completion_tokens >= 2
    greedy = client.completions.create(
        model="policy", prompt="Hello", max_tokens=4, temperature=0, stop=["\n"]
    )
    assert greedy.choices[0].finish_reason in ("stop", "length")


def test_streaming_matches_the_full_response(client):
    kwargs = dict(model="policy", messages=USER, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)

    stream = client.completions.create(model="policy", prompt="Hello", max_tokens=6, stream=True)
    pieces = list(stream)
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens >= 1


def test_raw_sse_ends_with_done(http):
    body = {"model": "policy", "prompt": "Hello", "max_tokens": 3, "stream": True}
    resp = http.post("/v1/completions", json=body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in resp.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" in json.loads(events[-2][len("data: ") :])


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(http):
    """Requests that share an engine batch (different temperatures, lengths, n and seeds) get
    exactly what each gets alone; one that fails its own checks fails alone."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [
        {
            "model": "policy",
            "messages": [{"role": "user", "content": f"Tell me about item {i}."}],
            "max_tokens": 4 + i % 5,
            "temperature": (0.0, 0.8, 1.0)[i % 3],
            "seed": i,
            "n": 1 + i % 2,
        }
        for i in range(8)
    ]
    bodies[5]["messages"] = [{"role": "user", "content": "word " * 400}]  # over 200 tokens

    def post(body):
        return http.post("/v1/chat/completions", json=body)

    def texts(resp):
        return [c["message"]["content"] for c in resp.json()["choices"]]

    alone = [post(b) for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(post, bodies))
    for i, (a, t) in enumerate(zip(alone, together, strict=True)):
        if i == 5:
            _assert_error(t, 400, "context_length_exceeded")
            continue
        assert t.status_code == 200, t.text
        assert texts(t) == texts(a)
        assert len(texts(t)) == bodies[i]["n"]
        assert t.json()["usage"] == a.json()["usage"]
    policy = http.get("/ready").json()["models"]["policy"]
    assert policy["engine"] == "hf-batched"
    batching = policy["batching"]
    assert batching["largest_batch"] > 1
    assert batching["batches"] < batching["requests"]


def test_reward_score_and_compare(http):
    convo = [*USER, {"role": "assistant", "content": "Water them."}]
    one = http.post("/v1/score", json={"messages": convo}).json()
    many = http.post("/v1/score", json={"conversations": [convo, USER]}).json()
    assert len(one["scores"]) == 1 and len(many["scores"]) == 2
    assert many["scores"][0] == pytest.approx(one["scores"][0], abs=1e-4)
    assert many["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"]
    pair = {"messages": USER, "response_a": "Water them.", "response_b": "No."}
    cmp = http.post("/v1/compare", json=pair).json()
    assert 0 < cmp["prob_a_preferred"] < 1
    swapped = http.post(
        "/v1/compare", json={**pair, "response_a": "No.", "response_b": "Water them."}
    ).json()
    assert cmp["prob_a_preferred"] + swapped["prob_a_preferred"] == pytest.approx(1, abs=1e-4)


def test_constitution_critique_and_label(http):
    body = {
        "messages": [*USER, {"role": "assistant", "content": "Use lots of poison."}],
        "principle_ids": ["harmful"],
        "rounds": 2,
        "max_tokens": 8,
        "few_shot": 0,
    }
    bad = http.post("/v1/critique", json=body)
    err = _assert_error(bad, 400)
    assert "harmful" in err["message"] and err["param"] == "principle_ids"
    from cai_ray.config import resolve_path
    from cai_ray.constitution import load_constitution

    c = load_constitution(resolve_path("constitutions/default.yaml"))
    pid = c.critique_principles[0].id
    out = http.post("/v1/critique", json={**body, "principle_ids": [pid]}).json()
    assert out["response"] == "Use lots of poison."
    if out["rejected"] is None:
        assert [r["principle_id"] for r in out["rounds"]] == [pid, pid]
        assert out["revision"] == out["revisions"][-1] and len(out["critiques"]) == 2
    else:
        assert "empty" in out["rejected"]

    fids = [p.id for p in c.feedback_principles[:2]]
    pair = {
        "messages": USER,
        "response_a": "Water them.",
        "response_b": "No.",
        "principle_ids": fids,
    }
    label = http.post("/v1/label", json=pair).json()
    assert [d["id"] for d in label["principles"]] == fids
    mean = sum(d["prob_a_preferred"] for d in label["principles"]) / 2
    assert label["prob_a_preferred"] == pytest.approx(mean)
    assert label["usage"]["prompt_tokens"] > 0
    sampled = http.post("/v1/label", json={**pair, "principle_ids": None, "num_principles": 3})
    assert len(sampled.json()["principles"]) == 3


def test_auth_failures(server):
    import httpx
    import openai

    with httpx.Client(base_url=server, timeout=30) as anon:
        _assert_error(anon.get("/v1/models"), 401, "missing_api_key")
        wrong = anon.post("/v1/score", json={}, headers={"Authorization": "Bearer nope"})
        _assert_error(wrong, 401, "invalid_api_key")
        basic = anon.get("/v1/models", headers={"Authorization": "Basic dXNlcjpwdw=="})
        _assert_error(basic, 401, "missing_api_key")
        assert anon.get("/health").status_code == 200  # probes need no token
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
        ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
        ("/v1/chat/completions", {"model": "policy"}, 400, "missing_field"),
        ("/v1/chat/completions", {"messages": USER}, 400, "missing_field"),
        ("/v1/chat/completions", {"model": "policy", "messages": []}, 400, "invalid_value"),
        ("/v1/chat/completions", {"model": "nope", "messages": USER}, 404, "model_not_found"),
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": USER, "max_tokens": -1},
            400,
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": USER, "max_tokens": 999},
            400,
            None,
        ),
        ("/v1/chat/completions", {"model": "policy", "messages": USER, "n": 0}, 400, None),
        ("/v1/chat/completions", {"model": "policy", "messages": USER, "n": 50}, 400, None),
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": USER, "temperature": -1},
            400,
            None,
        ),
        ("/v1/chat/completions", {"model": "policy", "messages": USER, "top_p": 0}, 400, None),
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": USER, "max_tokens": 4, "min_tokens": 8},
            400,
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": [{"role": "robot", "content": "hi"}]},
            400,
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": [{"role": "user", "content": "word " * 400}]},
            400,
            "context_length_exceeded",
        ),
        ("/v1/completions", {"model": "policy", "prompt": []}, 400, None),
        ("/v1/completions", {"model": "policy", "prompt": "x", "seed": -3}, 400, None),
        ("/v1/score", {"messages": USER, "conversations": [USER]}, 400, None),
        ("/v1/compare", {"messages": USER, "response_a": "x"}, 400, "missing_field"),
        ("/v1/critique", {"messages": USER}, 400, "missing_field"),
        ("/v1/critique", {"messages": USER, "response": "x", "rounds": 99}, 400, None),
        (
            "/v1/label",
            {"messages": USER, "response_a": "a", "response_b": "b", "principle_ids": ["zz"]},
            400,
            None,
        ),
        ("/v1/nothing", {}, 404, None),
        # the bad-input corpus (issue 8); the first two were 503s before parse_body caught
        # RecursionError and Python's 4300-digit int limit
        ("/v1/chat/completions", b"[" * 5000, 400, "invalid_json"),
        (
            "/v1/completions",
            b'{"model": "policy", "prompt": "x", "n": ' + b"9" * 5000 + b"}",
            400,
            "invalid_json",
        ),
        ("/v1/chat/completions", b"\xff\xfe{}", 400, "invalid_json"),
        ("/v1/chat/completions", b"", 400, "invalid_json"),
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": [{"role": "user", "content": "   "}]},
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": USER, "stop": list("abcde")},
            400,
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": USER, "temperature": "hot"},
            400,
            None,
        ),
        ("/v1/score", {"conversations": [USER] * 40}, 400, None),
    ],
)
def test_invalid_requests_are_4xx_json(http, path, body, status, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = http.post(path, content=raw, headers={"content-type": "application/json"})
    _assert_error(resp, status, code)


def test_body_limit_and_survival(http, client):
    big = {"model": "policy", "prompt": "x" * 30000}
    _assert_error(http.post("/v1/completions", json=big), 413, "body_too_large")
    # chunked, so no content-length: the limit holds while the body streams in
    chunks = (b"x" * 4096 for _ in range(8))
    chunked = http.post(
        "/v1/completions", content=chunks, headers={"content-type": "application/json"}
    )
    assert "content-length" not in chunked.request.headers
    _assert_error(chunked, 413, "body_too_large")
    # After every invalid request above, the replicas still answer.
    out = client.chat.completions.create(model="policy", messages=USER, max_tokens=2)
    assert out.choices and out.usage.total_tokens > 0
    assert http.get("/ready").status_code == 200
