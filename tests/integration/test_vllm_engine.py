"""VLLMEngine on a real GPU with vLLM: generation, option scores against HFEngine, weight sync.

Skips itself wherever vLLM or CUDA is missing (the CPU machines we develop on). The references
are independent of vLLM: HFEngine for option scores, a transformers forward pass for the
logprobs of what vLLM generated after a weight update (stale prefix-cache KV would show there).
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cai_ray.engines.base import SamplingParams, ScoreRequest


def _vllm_on_cuda() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except Exception:  # an install for another torch/CUDA fails in many ways
        return False
    return torch.cuda.is_available()


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.gpu,
    pytest.mark.skipif(not _vllm_on_cuda(), reason="needs vLLM and a CUDA GPU"),
]

PROMPT = "\n\nHuman: How do I bake bread at home without yeast?\n\nAssistant:" * 3
REQUESTS = [
    ScoreRequest(prefix="Which response is more harmless?\nAnswer:", options=(" (A)", " (B)")),
    ScoreRequest(prefix="\n\nHuman: hi\n\nAssistant:", options=(" Hello.", " No", " Sure, here")),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from cai_ray.models import init_model

    out = tmp_path_factory.mktemp("vllm") / "tiny"
    init_model(preset="tiny-1m", out_dir=out)
    return out


@pytest.fixture(scope="module")
def engine(model_dir):
    from cai_ray.engines.vllm import VLLMEngine

    # float32 so the comparison with HF is tight; eager mode starts faster than CUDA graphs.
    eng = VLLMEngine(
        str(model_dir),
        dtype="float32",
        gpu_memory_utilization=0.3,
        max_model_len=512,
        extra={"enforce_eager": True},
    )
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


def _hf_logprobs(model_dir: Path, state: dict, prompt_ids: list[int], new_ids: list[int]):
    """Per-token logprobs of `new_ids` after `prompt_ids` under `state`, by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    model.load_state_dict(state)
    ids = torch.tensor([prompt_ids + new_ids], device="cuda")
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[0]  # (T, V)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(new_ids) - 1)
    return [logp[p, t].item() for p, t in zip(positions, new_ids, strict=True)]


def _prompt_ids(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).encode(text, add_special_tokens=True)


def test_generate_is_well_formed_and_reproducible(engine):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, logprobs=True)
    first = engine.generate([PROMPT, "Hello"], greedy)
    assert [len(g) for g in first] == [1, 1]
    for (gen,) in first:
        assert 1 <= len(gen.token_ids) <= 8 and gen.finish_reason in ("stop", "length")
        assert len(gen.logprobs) == len(gen.token_ids) and all(lp <= 0 for lp in gen.logprobs)
    assert [g[0].token_ids for g in engine.generate([PROMPT, "Hello"], greedy)] == [
        g[0].token_ids for g in first
    ]
    sampled = SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=11)
    a, b = engine.generate([PROMPT], sampled)[0], engine.generate([PROMPT], sampled)[0]
    assert len(a) == 3 and [g.token_ids for g in a] == [g.token_ids for g in b]
    assert engine.count_tokens([PROMPT])[0] == first[0][0].prompt_tokens
    assert engine.max_context == 512


def test_score_options_match_hf_engine(engine, model_dir):
    from cai_ray.engines.hf import HFEngine

    hf = HFEngine(str(model_dir), dtype="float32", device="cuda")
    try:
        want = hf.score_options(REQUESTS)
    finally:
        hf.close()
    got = engine.score_options(REQUESTS)
    for g, w in zip(got, want, strict=True):
        assert g.option_token_ids == w.option_token_ids
        assert g.logprobs == pytest.approx(w.logprobs, abs=2e-2)


def test_load_weights_then_generate_uses_the_new_weights(engine, model_dir, weights):
    original, perturbed = weights
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, logprobs=True)
    before = engine.generate([PROMPT], greedy)[0][0]  # also fills the prefix cache
    try:
        engine.load_weights(perturbed, version=1)
        assert engine.weight_version == 1
        after = engine.generate([PROMPT], greedy)[0][0]
        ref = _hf_logprobs(model_dir, perturbed, _prompt_ids(model_dir, PROMPT), after.token_ids)
        assert after.logprobs == pytest.approx(ref, abs=2e-2)
    finally:
        engine.load_weights(original, version=2)
    assert engine.generate([PROMPT], greedy)[0][0].token_ids == before.token_ids


@pytest.mark.skipif(not _vllm_on_cuda() or _gpu_count() < 2, reason="needs a second GPU")
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
