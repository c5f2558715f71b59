"""HFEngine on the tiny-1m model: generation semantics, shared-prefix scoring, weight sync."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from cai_ray.config import EngineConfig
from cai_ray.engines import make_engine, resolve_engine_kind
from cai_ray.engines.base import SamplingParams, ScoreRequest
from cai_ray.engines.hf import HFEngine, pick_device, pick_dtype
from cai_ray.errors import CaiRayError, ModelError

PROMPTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant:",
    "\n\nHuman: hi\n\nAssistant:",
    "\n\nHuman: Write a long, careful answer about saving money each month.\n\nAssistant:",
]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = HFEngine(tiny_model_dir, threads=2, batch_size=4)
    yield eng
    eng.close()


def _naive_scores(
    engine: HFEngine, request: ScoreRequest, option_ids: list[list[int]]
) -> list[float]:
    """Reference: one full forward per option over prefix + option tokens, no cache."""
    prefix = engine._encode(request.prefix)
    out = []
    for ids in option_ids:
        full = torch.tensor([prefix + ids])
        with torch.no_grad():
            logp = engine.model(input_ids=full).logits[0].float().log_softmax(-1)  # (T, V)
        out.append(sum(logp[len(prefix) - 1 + j, t].item() for j, t in enumerate(ids)))
    return out


# -- generate ---------------------------------------------------------------------------------


def test_greedy_matches_transformers_generate(engine):
    ids = torch.tensor([engine._encode(PROMPTS[0])])
    ref = engine.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=12,
        eos_token_id=None,
    )[0, ids.shape[1] :].tolist()
    assert engine.generate([PROMPTS[0]], GREEDY)[0][0].token_ids == ref


def test_batched_left_padding_equals_one_by_one(engine):
    batched = engine.generate(PROMPTS, GREEDY)
    for prompt, gens in zip(PROMPTS, batched, strict=True):
        alone = engine.generate([prompt], GREEDY)[0][0]
        assert gens[0].token_ids == alone.token_ids
        assert gens[0].prompt_tokens == engine.count_tokens([prompt])[0]


def test_seed_reproduces_and_different_seeds_differ(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=7)
    first = engine.generate(PROMPTS, params)
    again = engine.generate(PROMPTS, params)
    other = engine.generate(
        PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=8)
    )

    def tokens(result):
        return [[g.token_ids for g in gens] for gens in result]

    assert tokens(first) == tokens(again)
    assert tokens(first) != tokens(other)
    assert all(len(gens) == 2 for gens in first)
    assert first[0][0].token_ids != first[0][1].token_ids  # n samples are distinct draws


def _tokens(result):
    return [[g.token_ids for g in gens] for gens in result]


def test_seeded_samples_do_not_depend_on_the_rest_of_the_call(engine, tiny_model_dir):
    """Serve batches unrelated requests together: a seeded sample must be the same alone, next
    to other prompts, in another order, and in another chunking of the batch."""
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=3)
    alone = engine.generate([PROMPTS[1]], params)[0]
    crowded = engine.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], params)[2]
    assert _tokens([alone]) == _tokens([crowded])
    wide = HFEngine(tiny_model_dir, threads=2, batch_size=64)
    try:
        assert _tokens(wide.generate([PROMPTS[2], PROMPTS[1]], params)[1:]) == _tokens([alone])
    finally:
        wide.close()


def test_generate_many_equals_each_request_alone(engine):
    """Requests with different temperatures, top-p, lengths, n, stops and logprobs share
    forward passes and each gets exactly what it would get alone."""
    requests = [
        (PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=6)),
        ([PROMPTS[2]], SamplingParams(temperature=0.7, max_new_tokens=12, n=3, seed=11)),
        ([PROMPTS[0]], SamplingParams(top_p=0.8, max_new_tokens=9, seed=5, logprobs=True)),
        ([PROMPTS[1]], SamplingParams(max_new_tokens=15, stop=("e",), seed=2)),
    ]
    together = engine.generate_many(requests)
    assert [len(r) for r in together] == [2, 1, 1, 1]
    for (prompts, params), got in zip(requests, together, strict=True):
        alone = engine.generate(prompts, params)
        assert _tokens(got) == _tokens(alone)
        assert [[g.text for g in gens] for gens in got] == [
            [g.text for g in gens] for gens in alone
        ]
        for gens in got:
            assert len(gens) == params.n
            assert all(len(g.token_ids) <= params.max_new_tokens for g in gens)
            assert all((g.logprobs is not None) == params.logprobs for g in gens)
    assert all("e" not in g.text for g in together[3][0])


def test_inverse_cdf_sampling_follows_the_distribution():
    """The sampler behind every sampled token: frequencies follow softmax(logits), and top-p
    keeps the smallest top set whose mass reaches p."""
    from cai_ray.engines.hf import _inverse_cdf

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(20_000, 1)
    uniform = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    drawn = _inverse_cdf(logits, torch.ones(20_000), uniform)
    freq = torch.bincount(drawn, minlength=4).float() / 20_000
    assert torch.allclose(freq, probs, atol=0.015)
    nucleus = _inverse_cdf(logits, torch.full((20_000,), 0.75), uniform)
    freq = torch.bincount(nucleus, minlength=4).float() / 20_000
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015)


def test_length_finish_and_counts(engine):
    (gen,) = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=5, seed=0))[0]
    assert gen.finish_reason == "length"
    assert len(gen.token_ids) == 5
    assert gen.text == engine.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    assert gen.logprobs is None


def test_stop_string_cuts_the_text(engine):
    full = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=20))[0][
        0
    ].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    gen = engine.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=20, stop=(stop, "never-seen"))
    )[0][0]
    assert gen.finish_reason == "stop"
    assert gen.text == full[: full.index(stop)]
    assert len(gen.token_ids) < 20
    # the tokens run up to the one that completed the stop string (as vLLM reports them)
    assert stop in engine.tokenizer.decode(gen.token_ids)
    assert stop not in engine.tokenizer.decode(gen.token_ids[:-1])


def test_rows_that_stop_early_leave_the_others_unchanged(engine):
    params = SamplingParams(temperature=0, max_new_tokens=16)
    full = [g[0] for g in engine.generate(PROMPTS, params)]
    texts = [g.text for g in full]
    # a stop string only row 0 produces, early: row 0 leaves the batch, rows 1-2 carry on
    stop = next(
        texts[0][i : i + 4]
        for i in range(len(texts[0]) - 4)
        if texts[0][i : i + 4].strip() and all(texts[0][i : i + 4] not in t for t in texts[1:])
    )
    stopped = [
        g[0]
        for g in engine.generate(
            PROMPTS, SamplingParams(temperature=0, max_new_tokens=16, stop=(stop,))
        )
    ]
    assert stopped[0].finish_reason == "stop" and len(stopped[0].token_ids) < 16
    assert [g.token_ids for g in stopped[1:]] == [g.token_ids for g in full[1:]]


def test_eos_finishes_with_stop(tiny_model_dir):
    eng = HFEngine(tiny_model_dir)
    first = eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=3))[0][
        0
    ].token_ids[0]
    eos = eng.tokenizer.eos_token_id
    weights = {k: v.clone() for k, v in eng.model.state_dict().items()}
    head = weights["lm_head.weight"]
    head[[first, eos]] = head[[eos, first]]  # EOS now gets the greedy token's logit
    eng.load_weights(weights, version=1)
    gen = eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=3))[0][0]
    assert (gen.token_ids, gen.finish_reason, gen.text) == ([eos], "stop", "")
    assert eng.weight_version == 1


def test_logprobs_are_the_policy_logprobs(engine):
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=6, seed=3, logprobs=True)
    gen = engine.generate([PROMPTS[2]], params)[0][0]
    prompt = engine._encode(PROMPTS[2])
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt + gen.token_ids])).logits[0]
    logp = logits.float().log_softmax(-1)  # temperature 1: the policy, not the sampler
    expected = [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(gen.token_ids)]
    assert gen.logprobs == pytest.approx(expected, abs=1e-4)


def test_tiny_top_p_is_greedy(engine):
    greedy = engine.generate(PROMPTS, GREEDY)
    nucleus = engine.generate(
        PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=12, seed=1)
    )
    assert [g[0].token_ids for g in nucleus] == [g[0].token_ids for g in greedy]


def test_too_long_prompt_names_its_index(engine):
    long = "word " * 600
    with pytest.raises(CaiRayError, match=r"prompt has \d+ tokens") as info:
        engine.generate([PROMPTS[0], long], SamplingParams(max_new_tokens=engine.max_context - 100))
    assert info.value.where == "prompt 1"
    assert engine.max_context == 2048


# -- score_options ----------------------------------------------------------------------------

REQUESTS = [
    ScoreRequest(
        "Which response is less harmful?\nOptions:\n (A) ok\n (B) bad\nThe answer is:",
        (" (A)", " (B)"),
    ),
    ScoreRequest(
        "\n\nHuman: hi\n\nAssistant:",
        (" Hello there, how can I help?", " No.", " (A) then more words"),
    ),
    ScoreRequest(
        "A short one", (" x", " a much longer option with many tokens in it", " (B)", "\n\nHuman:")
    ),
]


def test_score_options_equals_naive_per_option(engine):
    scores = engine.score_options(REQUESTS)
    assert len(scores) == len(REQUESTS)
    for request, sc in zip(REQUESTS, scores, strict=True):
        assert len(sc.logprobs) == len(request.options)
        assert sc.prefix_tokens == len(engine._encode(request.prefix))
        naive = _naive_scores(engine, request, sc.option_token_ids)
        assert sc.logprobs == pytest.approx(naive, abs=1e-4)
    assert [len(t) for t in scores[0].option_token_ids] == [1, 1]  # ` (A)` is one token
    assert len({len(t) for t in scores[2].option_token_ids}) > 1  # options of different lengths


def test_score_options_batching_does_not_change_numbers(tiny_model_dir, engine):
    one_at_a_time = HFEngine(tiny_model_dir, batch_size=1)
    batched = engine.score_options(REQUESTS)
    single = one_at_a_time.score_options(REQUESTS)
    for a, b in zip(batched, single, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_options_that_merge_across_the_boundary_are_tokenized_alone(engine):
    request = ScoreRequest("The cat sat on the mat wi", ("th a hat", " (A)"))
    (sc,) = engine.score_options([request])
    own = engine.tokenizer("th a hat", add_special_tokens=False)["input_ids"]
    assert sc.meta["separately_tokenized_options"] == [0]
    assert sc.option_token_ids[0] == own
    assert sc.logprobs == pytest.approx(
        _naive_scores(engine, request, sc.option_token_ids), abs=1e-4
    )


def test_empty_option_is_an_error(engine):
    with pytest.raises(CaiRayError, match="adds no tokens") as info:
        engine.score_options([ScoreRequest("prefix", (" (A)", ""))])
    assert "option 1" in info.value.where


# -- weights, dtype, device, selection --------------------------------------------------------


def test_load_weights_changes_outputs_and_rejects_mismatches(tiny_model_dir):
    eng = HFEngine(tiny_model_dir)
    before = eng.score_options(REQUESTS[:1])[0].logprobs
    torch.manual_seed(0)
    noisy = {k: v + 0.05 * torch.randn_like(v) for k, v in eng.model.state_dict().items()}
    eng.load_weights(noisy, version=5)
    assert eng.weight_version == 5
    assert eng.score_options(REQUESTS[:1])[0].logprobs != pytest.approx(before, abs=1e-3)
    with pytest.raises(ModelError, match="missing"):
        eng.load_weights({"lm_head.weight": noisy["lm_head.weight"]}, version=6)
    with pytest.raises(ModelError, match=r"wrong shape \['lm_head.weight'\]"):
        eng.load_weights({**noisy, "lm_head.weight": noisy["lm_head.weight"][:10]}, version=6)
    assert eng.weight_version == 5


def test_weights_shipped_as_arrays_load_exactly(tiny_model_dir):
    """A Ray-actor rank ships numpy arrays (zero-copy in the object store; bf16 stays a
    tensor); through Ray's own store and back as tensors, every weight lands bit for bit."""
    import numpy as np
    import ray

    from actors.learner.weight_sync import to_arrays, to_tensors

    eng = HFEngine(tiny_model_dir)
    torch.manual_seed(1)
    noisy = {k: v + 0.05 * torch.randn_like(v) for k, v in eng.model.state_dict().items()}
    shipped = to_arrays(noisy)
    assert all(isinstance(v, np.ndarray) for v in shipped.values())
    mixed = to_arrays({"a": torch.ones(2, dtype=torch.bfloat16), "b": torch.ones(2)})
    assert torch.is_tensor(mixed["a"]) and isinstance(mixed["b"], np.ndarray)
    started = not ray.is_initialized()  # the suite's cluster fixture may hold one already
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        arrived = ray.get(ray.put(shipped))  # read-only views of the store's memory
        eng.load_weights(to_tensors(arrived), version=3)
    finally:
        if started:
            ray.shutdown()
    for name, value in eng.model.state_dict().items():
        assert torch.equal(value, noisy[name]), name


def test_bf16_on_cpu_is_close_to_fp32(tiny_model_dir, engine):
    bf16 = HFEngine(tiny_model_dir, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.score_options(REQUESTS[:1])[0].logprobs == pytest.approx(
        engine.score_options(REQUESTS[:1])[0].logprobs, abs=0.1
    )
    gen = bf16.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, seed=0, logprobs=True))[0][0]
    assert len(gen.token_ids) == 4 and all(lp <= 0 for lp in gen.logprobs)


def test_device_and_dtype_selection():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    if torch.cuda.is_available():
        assert pick_device("auto").type == "cuda"
    else:
        assert pick_device("auto") == cpu
        with pytest.raises(ModelError, match="CUDA is not available"):
            pick_device("cuda")


def test_auto_engine_kind(monkeypatch):
    assert resolve_engine_kind(EngineConfig(kind="hf")) == "hf"
    assert resolve_engine_kind(EngineConfig(kind="vllm")) == "vllm"
    assert resolve_engine_kind(EngineConfig(device="cpu")) == "hf"
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "vllm" else None
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_engine_kind(EngineConfig()) == "vllm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_engine_kind(EngineConfig()) == "hf"


def test_make_engine_builds_hf_from_config(tiny_model_dir):
    eng = make_engine(
        tiny_model_dir, EngineConfig(kind="hf", batch_size=3, threads=1), model_id="policy@v0"
    )
    assert isinstance(eng, HFEngine)
    assert (eng.batch_size, eng.model_id, torch.get_num_threads()) == (3, "policy@v0", 1)
    eng.close()
    torch.set_num_threads(2)


def test_not_a_model_directory_is_a_model_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match=r"no config\.json"):
        HFEngine(tmp_path)


def test_corrupt_weights_are_a_model_error(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(ModelError, match="could not load the model") as info:
        HFEngine(broken)
    assert info.value.where == str(broken)
