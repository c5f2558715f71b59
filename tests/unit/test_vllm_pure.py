"""VLLMEngine's pure parts and glue, tested without vLLM.

The fakes mirror vLLM 0.33's real shapes (vllm/outputs.py, vllm/logprobs.py): RequestOutput
(request_id, prompt, prompt_token_ids, prompt_logprobs, outputs, finished), CompletionOutput
(index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason) and
Logprob(logprob, rank, decoded_token); prompt_logprobs[0] is None.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from cai_ray.engines.base import SamplingParams, ScoreRequest
from cai_ray.engines.vllm import (
    VLLMEngine,
    _call_with_timeout,
    cut_at_stop,
    from_request_output,
    option_logprobs_from_prompt_logprobs,
    option_token_ids,
    plan_score_prompts,
    scoring_sampling_kwargs,
    to_vllm_sampling_kwargs,
)
from cai_ray.engines.vllm_worker_ext import (
    WeightSyncWorkerExtension,
    chunk_named_tensors,
    dtype_name,
    pack_tensors,
    unpack_tensors,
    weight_update_metadata,
)
from cai_ray.errors import CaiRayError, ConfigError, ModelError

# Fields of vllm.SamplingParams in 0.33 that we may set (read from the wheel's sampling_params.py).
VLLM_SAMPLING_FIELDS = {
    "n", "temperature", "top_p", "top_k", "seed", "stop", "max_tokens", "logprobs",
    "prompt_logprobs", "detokenize", "include_stop_str_in_output", "skip_special_tokens",
}  # fmt: skip


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True


BOS = 1


class CharTokenizer:
    """Char-level ids (ord) with a BOS, merging " (" into one token like BPE merges do."""

    MERGE = 999

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, i = ([BOS] if add_special_tokens else []), 0
        while i < len(text):
            if text[i : i + 2] == " (":
                ids.append(self.MERGE)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids


def toy_logprob(context: list[int], token: int) -> float:
    """A deterministic stand-in for a model: depends on the whole context and the token."""
    return -0.1 * (1 + (sum(context) * 7 + token) % 11)


def toy_prompt_logprobs(ids: list[int]) -> list[dict[int, Logprob] | None]:
    return [None] + [
        {ids[i]: Logprob(toy_logprob(ids[:i], ids[i]), rank=1)} for i in range(1, len(ids))
    ]


# -- sampling parameters ----------------------------------------------------------------------


def test_sampling_kwargs_translate_every_field():
    params = SamplingParams(
        temperature=0.7, top_p=0.9, max_new_tokens=33, stop=("\n\nHuman:",), n=3, seed=5
    )
    kwargs = to_vllm_sampling_kwargs(params)
    assert kwargs == {
        "n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 33, "stop": ["\n\nHuman:"],
        "include_stop_str_in_output": False, "seed": 5,
    }  # fmt: skip
    assert set(kwargs) <= VLLM_SAMPLING_FIELDS


def test_sampling_kwargs_greedy_and_logprobs():
    kwargs = to_vllm_sampling_kwargs(SamplingParams(temperature=0.0, top_p=0.5, logprobs=True))
    assert kwargs["temperature"] == 0.0 and kwargs["top_p"] == 1.0
    assert kwargs["logprobs"] == 0  # the sampled token only
    assert "logprobs" not in to_vllm_sampling_kwargs(SamplingParams())


def test_sampling_kwargs_reject_temperature_vllm_refuses():
    with pytest.raises(CaiRayError, match="temperature"):
        to_vllm_sampling_kwargs(SamplingParams(temperature=2.5))


def test_scoring_kwargs_ask_for_prompt_token_logprobs():
    kwargs = scoring_sampling_kwargs()
    assert kwargs["prompt_logprobs"] == 0 and kwargs["max_tokens"] == 1
    assert set(kwargs) <= VLLM_SAMPLING_FIELDS


# -- output conversion ------------------------------------------------------------------------


def _completion(index, text, ids, reason="stop", logprobs=None):
    return CompletionOutput(index, text, ids, None, logprobs, finish_reason=reason)


def test_from_request_output_orders_samples_and_maps_fields():
    lp = [{7: Logprob(-0.5), 3: Logprob(-2.0)}, {8: Logprob(-0.25)}]
    out = RequestOutput(
        "r0", None, [1, 2, 3], None,
        [_completion(1, "b", [9], "length", [{9: Logprob(-1.0)}]), _completion(0, "ab", [7, 8], "stop", lp)],
    )  # fmt: skip
    gens = from_request_output(out)
    assert [g.text for g in gens] == ["ab", "b"]
    assert [g.finish_reason for g in gens] == ["stop", "length"]
    assert gens[0].token_ids == [7, 8] and gens[0].prompt_tokens == 3
    assert gens[0].logprobs == [-0.5, -0.25] and gens[1].logprobs == [-1.0]


def test_from_request_output_cuts_stop_strings_and_keeps_no_logprobs():
    out = RequestOutput("r", None, [1], None, [_completion(0, "yes\n\nHuman: more", [5])])
    (gen,) = from_request_output(out, stop=("\n\nHuman:",))
    assert gen.text == "yes" and gen.logprobs is None
    assert cut_at_stop("a|b#c", ["#", "|"]) == "a"


@pytest.mark.parametrize("reason", ["abort", "error", None])
def test_from_request_output_rejects_unfinished_samples(reason):
    out = RequestOutput("r9", None, [1], None, [_completion(0, "x", [5], reason)])
    with pytest.raises(ModelError, match="r9"):
        from_request_output(out)


def test_from_request_output_requires_sampled_token_logprob():
    out = RequestOutput(
        "r", None, [1], None, [_completion(0, "x", [5], "stop", [{6: Logprob(-1)}])]
    )
    with pytest.raises(ValueError, match="sampled token 5"):
        from_request_output(out)


# -- option scoring ---------------------------------------------------------------------------


def test_option_logprobs_sum_only_the_option_positions():
    ids = [1, 10, 11, 12, 13]
    plp = toy_prompt_logprobs(ids)
    expected = toy_logprob(ids[:3], 12) + toy_logprob(ids[:4], 13)
    assert option_logprobs_from_prompt_logprobs(plp, ids, 3) == pytest.approx(expected)
    with pytest.raises(ValueError, match="start"):
        option_logprobs_from_prompt_logprobs(plp, ids, 0)
    plp[4] = {99: Logprob(-1.0)}
    with pytest.raises(ValueError, match="token 13"):
        option_logprobs_from_prompt_logprobs(plp, ids, 3)


def test_option_tokens_follow_the_prefix_tokens_exactly():
    tok = CharTokenizer()
    prefix = tok.encode("Q:")
    assert option_token_ids(prefix, tok.encode("Q: A"), [0]) == ([32, 65], False)
    # "Q: " ends in a space the tokenizer merges with the option's "(": the joint tokens no
    # longer start with the prefix's, so the option is tokenized on its own (as HFEngine does).
    prefix = tok.encode("Q: ")
    own = tok.encode("(A)", add_special_tokens=False)
    assert option_token_ids(prefix, tok.encode("Q: (A)"), own) == ([40, 65, 41], True)


def test_plan_score_prompts_flattens_request_by_request():
    tok = CharTokenizer()
    reqs = [ScoreRequest("ab ", ("(A)", "B")), ScoreRequest("xyz", ("1", "22", "3"))]
    prompts, starts, infos = plan_score_prompts(tok.encode, reqs)
    assert [i["prefix_tokens"] for i in infos] == [4, 4]
    assert infos[0]["meta"] == {"separately_tokenized_options": [0]} and infos[1]["meta"] == {}
    assert prompts[0] == [*tok.encode("ab "), 40, 65, 41] and prompts[1] == tok.encode("ab B")
    assert prompts[4] == tok.encode("xyz3") and starts == [4, 4, 4, 4, 4]
    with pytest.raises(CaiRayError, match="score request 1, option 0"):
        plan_score_prompts(tok.encode, [reqs[0], ScoreRequest("q", ("",))])
    with pytest.raises(CaiRayError, match="prefix has no tokens"):
        plan_score_prompts(
            lambda text, add_special_tokens: [ord(c) for c in text], [ScoreRequest("", ("a",))]
        )


# -- the engine's glue, on a fake vllm.LLM -----------------------------------------------------


class FakeWorker(WeightSyncWorkerExtension):
    def __init__(self, fail: bool = False):
        self.loaded: list[tuple[str, torch.Tensor]] = []
        self.fail = fail

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        assert is_checkpoint_format
        if self.fail:
            raise RuntimeError("layer shapes differ")
        self.loaded = list(weights_iterator)


@dataclass
class FakeLLM:
    worker: FakeWorker = field(default_factory=FakeWorker)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    model_config: Any = field(default_factory=lambda: SimpleNamespace(max_model_len=64))

    def generate(self, prompts, sampling, use_tqdm=True):
        self.calls.append(("generate", sampling.kwargs))
        outs = []
        for i, prompt in enumerate(prompts):
            ids = prompt["prompt_token_ids"]
            plp = toy_prompt_logprobs(ids) if "prompt_logprobs" in sampling.kwargs else None
            sample = _completion(0, f"out{i}", [42], "length", [{42: Logprob(-0.3)}])
            outs.append(RequestOutput(f"r{i}", None, ids, plp, [sample]))
        return outs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append((method, kwargs))
        if method.startswith("cai_"):
            return [getattr(self.worker, method)(*args, **(kwargs or {}))]
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", None))
        return True

    def update_weight_version(self, version):
        self.calls.append(("update_weight_version", version))


def _engine(llm: FakeLLM) -> VLLMEngine:
    engine = object.__new__(VLLMEngine)  # skip __init__: it needs vLLM
    engine._vllm = SimpleNamespace(SamplingParams=lambda **kw: SimpleNamespace(kwargs=kw))
    engine.llm, engine._tokenizer = llm, CharTokenizer()
    engine.model_id, engine.weight_version = "fake", 0
    return engine


def test_engine_scores_match_a_naive_per_option_computation():
    tok = CharTokenizer()
    reqs = [ScoreRequest("Which? ", ("(A)", "(B)")), ScoreRequest("Q", (" yes", " no"))]
    scores = _engine(FakeLLM()).score_options(reqs)
    for req, got in zip(reqs, scores, strict=True):
        prefix = tok.encode(req.prefix)
        for option, lp, ids in zip(req.options, got.logprobs, got.option_token_ids, strict=True):
            own = tok.encode(option, add_special_tokens=False)
            want, _ = option_token_ids(prefix, tok.encode(req.prefix + option), own)
            context, naive = list(prefix), 0.0
            for token in want:  # token by token after the prefix, as a model would score it
                naive += toy_logprob(context, token)
                context.append(token)
            assert lp == pytest.approx(naive) and ids == want
        assert got.prefix_tokens == len(prefix)
    assert scores[0].meta["separately_tokenized_options"] == [0, 1] and "separately" not in str(
        scores[1].meta
    )
    assert scores[0].logprobs[0] != scores[0].logprobs[1]


def test_engine_generate_sends_token_prompts_and_checks_length():
    llm = FakeLLM()
    gens = _engine(llm).generate(["hi", "yo"], SamplingParams(max_new_tokens=4, logprobs=True))
    assert [g[0].text for g in gens] == ["out0", "out1"] and gens[0][0].logprobs == [-0.3]
    assert gens[0][0].prompt_tokens == 3 and llm.calls[0][1]["max_tokens"] == 4
    with pytest.raises(CaiRayError, match="prompt 0"):
        _engine(llm).generate(["x" * 64], SamplingParams())
    assert _engine(llm).count_tokens(["ab", ""]) == [3, 1] and _engine(llm).max_context == 64


def test_engine_load_weights_stages_chunks_then_resets_the_prefix_cache():
    llm = FakeLLM()
    engine = _engine(llm)
    state = {
        "a.weight": torch.arange(6.0).reshape(2, 3),
        "b.bias": torch.ones(4, dtype=torch.bfloat16),
    }
    engine.load_weights(state, version=7, chunk_bytes=8)  # 8 bytes: one tensor per chunk
    methods = [c[0] for c in llm.calls]
    assert methods == [
        "cai_stage_weights", "cai_stage_weights", "cai_apply_staged_weights",
        "reset_prefix_cache", "update_weight_version",
    ]  # fmt: skip
    assert [n for n, _ in llm.worker.loaded] == ["a.weight", "b.bias"]
    assert all(torch.equal(t, state[n]) for n, t in llm.worker.loaded)
    assert llm.worker.loaded[1][1].dtype == torch.bfloat16
    assert engine.weight_version == 7 and llm.calls[-1][1] == "7"


def test_engine_load_weights_failure_clears_staging_and_keeps_the_version():
    llm = FakeLLM(worker=FakeWorker(fail=True))
    engine = _engine(llm)
    with pytest.raises(RuntimeError, match="shapes"):
        engine.load_weights({"w": torch.zeros(2)}, version=3)
    assert [c[0] for c in llm.calls][-1] == "cai_clear_staged_weights"
    assert engine.weight_version == 0 and llm.worker._cai_staged == []


def test_engine_nccl_group_calls_follow_vllm_weight_transfer_protocol():
    llm = FakeLLM()
    engine = _engine(llm)
    engine.init_weight_update_group("10.0.0.1", 29555, 1, 3)
    assert llm.calls[0] == (
        "init_weight_transfer_engine",
        {"init_info": {"master_address": "10.0.0.1", "master_port": 29555,
                       "rank_offset": 1, "world_size": 3, "packed": False}},
    )  # fmt: skip
    named = [("w", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b", torch.zeros(3))]
    names, dtypes, shapes = weight_update_metadata(named)
    engine.update_weights_from_group(names, [torch.bfloat16, "torch.float32"], shapes, version=2)
    assert [c[0] for c in llm.calls[1:]] == [
        "start_weight_update", "update_weights", "finish_weight_update",
        "reset_prefix_cache", "update_weight_version",
    ]  # fmt: skip
    assert llm.calls[2][1] == {
        "update_info": {"names": ["w", "b"], "dtype_names": ["bfloat16", "float32"],
                        "shapes": [[2, 3], [3]]}
    }  # fmt: skip
    assert dtypes == ["bfloat16", "float32"] and engine.weight_version == 2
    with pytest.raises(ConfigError, match="gloo"):
        engine.init_weight_update_group("h", 1, 1, 2, backend="gloo")


def test_missing_vllm_is_a_model_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ModelError, match="vllm") as info:
        VLLMEngine("/models/tiny")
    assert "cai-ray[vllm]" in str(info.value)


def test_rpc_deadline_raises_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="slow_call"):
        _call_with_timeout(lambda: time.sleep(1.0), timeout_s=0.05, what="slow_call")
    assert time.monotonic() - start < 0.9
    assert _call_with_timeout(lambda: 5, timeout_s=1.0, what="x") == 5


# -- weight transport helpers -----------------------------------------------------------------


def test_pack_roundtrip_keeps_values_dtypes_and_order_and_copies_views():
    big = torch.arange(100.0)
    named = [
        ("z", big[:3]),
        ("a", torch.tensor([1, 2], dtype=torch.int8)),
        ("t", big.view(10, 10).T),
    ]
    payload = pack_tensors(named)
    back = unpack_tensors(payload)
    assert [n for n, _ in back] == ["z", "a", "t"]
    assert all(
        torch.equal(b, t) and b.dtype == t.dtype for (_, b), (_, t) in zip(back, named, strict=True)
    )
    assert back[2][1].is_contiguous()
    # A view ships its own elements, not the whole storage it points into.
    assert len(pack_tensors([("z", big[:3])])) < len(pack_tensors([("z", big)])) - 300


def test_chunks_respect_the_byte_budget_in_order():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([2, 2, 5, 1, 1])]  # float32: 4 B each
    chunks = list(chunk_named_tensors(named, max_bytes=16))
    assert [[n for n, _ in c] for c in chunks] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert dtype_name(torch.float16) == "float16" and dtype_name("torch.int64") == "int64"


def test_importing_the_adapter_stays_light():
    code = "import sys, cai_ray.engines.vllm; print(sorted({'vllm', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
