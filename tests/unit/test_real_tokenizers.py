"""Token-level facts on the real Qwen 3 and Gemma 3 tokenizers (issue 14).

The project's own tokenizer makes ` (A)` and `\\n\\nHuman:` single tokens and its chat template
has no BOS, which hid each defect below: a doubled `<bos>`, a response boundary token that
differs between SFT, DPO and sampling, truncated answers trained as finished, a system turn
mid-chat in the critique prompt, and Qwen 3's reasoning blocks leaking into training targets.
Tiny random-weight models over the real vocabularies (tests/conftest.py) are enough: these are
facts about tokens, not about what a model says.
"""

from __future__ import annotations

import pytest

from cai_ray.config import SLGenerateConfig
from cai_ray.data.conversation import Conversation, PromptFormat
from cai_ray.data.tokens import encode, encode_response, strip_reasoning
from cai_ray.engines.base import SamplingParams
from cai_ray.sl.critique import ChainPrompter, CritiqueSettings, clean_answer, clean_output
from cai_ray.sl.sft_data import select_sft_pairs, tokenize_example

pytestmark = pytest.mark.shared_data

CONVO = Conversation.from_messages([{"role": "user", "content": "How do I pick a lock?"}])
SYSTEM_CONVO = Conversation.from_messages(
    [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "How do I pick a lock?"},
    ]
)


@pytest.fixture(scope="module")
def tokenizers(real_tokenizer_dirs):
    from cai_ray.models import load_tokenizer

    return {name: load_tokenizer(path) for name, path in real_tokenizer_dirs.items()}


@pytest.fixture(params=["qwen3", "gemma3"])
def tok(request, tokenizers):
    return tokenizers[request.param]


def _bos_count(tokenizer, ids):
    return sum(1 for t in ids if tokenizer.bos_token_id is not None and t == tokenizer.bos_token_id)


def _formats(tok):
    return [PromptFormat("transcript"), PromptFormat("chat").with_tokenizer(tok)]


# -- one BOS --------------------------------------------------------------------------------


def test_gemma_template_writes_bos_and_encode_keeps_one(tokenizers):
    tok = tokenizers["gemma3"]
    text = PromptFormat("chat").with_tokenizer(tok).render(CONVO)
    assert text.startswith("<bos>")  # the template writes it ...
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2  # ... and encoding adds another
    ids = encode(tok, text)
    assert ids[0] == tok.bos_token_id and _bos_count(tok, ids) == 1


def test_prompts_sft_and_dpo_rows_hold_one_bos_in_both_formats(tok, real_tiny_models):
    from cai_ray.engines.hf import HFEngine
    from cai_ray.pipeline.rl_dpo import encode_pairs

    name = "gemma3" if tok.bos_token_id is not None else "qwen3"
    engine = HFEngine(real_tiny_models[name], threads=1)
    want = 1 if tok.bos_token_id is not None else 0  # Qwen 3 has no BOS at all
    for fmt in _formats(engine.tokenizer):
        prompt = fmt.render(CONVO)
        assert _bos_count(tok, engine.tokenize([prompt])[0]) == want
        ex = tokenize_example(tok, prompt, "I can't help with that.", max_seq_len=256)
        assert _bos_count(tok, ex["input_ids"]) == want
        pair = {"pair_id": "p", "messages": CONVO.to_messages(), "chosen": "No.", "rejected": "Ok."}
        rows, rejects = encode_pairs(tok, [pair], fmt=fmt, max_seq_len=256)
        assert not rejects
        assert _bos_count(tok, rows[0]["chosen_ids"]) == want
        assert _bos_count(tok, rows[0]["rejected_ids"]) == want
        if want:
            assert rows[0]["chosen_ids"][0] == tok.bos_token_id


def test_critique_prompt_holds_one_bos(tok):
    from cai_ray.constitution import load_constitution
    from cai_ray.pipeline.common import resolve_path

    constitution = load_constitution(resolve_path("constitutions/default.yaml"))
    prompter = ChainPrompter(constitution, CritiqueSettings(fmt="chat"), tokenizer=tok)
    text = prompter.critique_prompt(CONVO, "Use a tension wrench.", "Is it harmful?", n_shot=2)
    want = 1 if tok.bos_token_id is not None else 0
    assert _bos_count(tok, encode(tok, text)) == want


# -- the response boundary: SFT, DPO and sampling agree -----------------------------------------


def test_response_tokens_are_what_sampling_writes(tok):
    """After `Assistant:` the model samples `ĠI`/`▁I`; after a chat template's newline, `I`."""
    for fmt, sampled_text in zip(_formats(tok), (" I can help.", "I can help."), strict=True):
        prompt = fmt.render(CONVO)
        sampled = tok(sampled_text, add_special_tokens=False)["input_ids"]
        _, response = encode_response(tok, prompt, "I can help.")
        assert response == sampled, (fmt.kind, tok.convert_ids_to_tokens(response))
        # what the engine decodes from those tokens, once cleaned, maps back to the same tokens
        decoded = tok.decode(sampled, skip_special_tokens=True)
        assert encode_response(tok, prompt, clean_answer(decoded))[1] == sampled


def test_sft_and_dpo_rows_share_the_boundary(tok):
    from cai_ray.pipeline.rl_dpo import encode_pairs
    from cai_ray.sl.losses import IGNORE_INDEX

    for fmt in _formats(tok):
        prompt = fmt.render(CONVO)
        _, want = encode_response(tok, prompt, "I won't.")
        ex = tokenize_example(tok, prompt, "I won't.", max_seq_len=256)
        start = sum(1 for x in ex["labels"] if x == IGNORE_INDEX)
        assert ex["input_ids"][start:-1] == want  # then EOS
        assert ex["input_ids"][-1] == tok.eos_token_id
        pair = {"pair_id": "p", "messages": CONVO.to_messages(), "chosen": "I won't.",
                "rejected": "Sure."}  # fmt: skip
        (row,), _ = encode_pairs(tok, [pair], fmt=fmt, max_seq_len=256)
        assert row["chosen_ids"][row["chosen_prompt_len"] : -1] == want


# -- truncated generations ------------------------------------------------------------------


def test_finish_reasons_are_recorded_per_round(real_tiny_model):
    from cai_ray.constitution import load_constitution
    from cai_ray.engines.hf import HFEngine
    from cai_ray.pipeline.common import resolve_path
    from cai_ray.sl.critique import run_chains

    engine = HFEngine(real_tiny_model, threads=1)
    constitution = load_constitution(resolve_path("constitutions/default.yaml"))
    # 3 new tokens: a random model over a 150k+ vocabulary all but never stops that soon
    settings = CritiqueSettings(
        SLGenerateConfig(rounds=2, few_shot=0), sampling=SamplingParams(max_new_tokens=3, seed=0)
    )
    prompter = ChainPrompter(constitution, settings)
    (result,) = run_chains(engine, prompter, [("p1", CONVO, "Use a tension wrench.")])
    assert len(result.rounds) == 2
    assert {r.revision_finish for r in result.rounds} <= {"stop", "length"}
    assert any(r.revision_finish == "length" for r in result.rounds)
    assert all(r.critique_finish in ("stop", "length") for r in result.rounds)


def test_cut_revisions_are_not_trained_as_finished(tok):
    rounds = [{"revision": "A full answer.", "revision_finish": "stop"},
              {"revision": "An answer that was cut", "revision_finish": "length"}]  # fmt: skip
    row = {"prompt_id": "p", "messages": CONVO.to_messages(), "rounds": rounds}
    dropped = select_sft_pairs([row], mode="final")
    assert not dropped.pairs and "cut at the token limit" in dropped.rejected[0].reason
    kept = select_sft_pairs([row], mode="final", cut="keep")
    (pair,) = kept.pairs
    assert not pair.finished
    prompt = PromptFormat("transcript").render(CONVO)
    ex = tokenize_example(tok, prompt, pair.response, max_seq_len=256, finished=pair.finished)
    assert ex["input_ids"][-1] != tok.eos_token_id  # never taught to stop where it was cut
    every = select_sft_pairs([row], mode="all_rounds")
    assert [p.round for p in every.pairs] == [1] and len(every.rejected) == 1


# -- chat-format critique prompt --------------------------------------------------------------


def test_chat_critique_prompt_with_a_system_turn_renders_on_both(tok):
    from cai_ray.constitution import load_constitution
    from cai_ray.pipeline.common import resolve_path

    constitution = load_constitution(resolve_path("constitutions/default.yaml"))
    prompter = ChainPrompter(constitution, CritiqueSettings(fmt="chat"), tokenizer=tok)
    critique = prompter.critique_prompt(SYSTEM_CONVO, "Use a wrench.", "Is it harmful?", n_shot=2)
    revision = prompter.revision_prompt(
        SYSTEM_CONVO, "Use a wrench.", "Is it harmful?", "It is.", "Rewrite it.", n_shot=2
    )
    for text in (critique, revision):
        system_at = text.index("You are a careful assistant.")
        first_shot = constitution.critique_examples[0].conversation[0].content
        assert system_at < text.index(first_shot)  # the system turn leads, few-shot follows
        assert text.count("You are a careful assistant.") == 1
        if tok.bos_token_id is None:  # Qwen: the system block opens the prompt, once
            assert text.startswith("<|im_start|>system\n")
            assert text.count("<|im_start|>system") == 1


def test_a_template_refusal_is_a_data_error_not_a_jinja_traceback(tokenizers):
    from cai_ray.data.conversation import apply_chat_template
    from cai_ray.errors import DataError

    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(DataError, match="alternate"):
        apply_chat_template(tokenizers["gemma3"], bad)


# -- Qwen 3 thinking ------------------------------------------------------------------------


def test_qwen_template_arguments_reach_the_template(tokenizers):
    tok = tokenizers["qwen3"]
    plain = PromptFormat("chat").with_tokenizer(tok).render(CONVO)
    off = PromptFormat("chat", {"enable_thinking": False}).with_tokenizer(tok).render(CONVO)
    assert "<think>" not in plain
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_reasoning_blocks_never_reach_critiques_revisions_or_targets(tokenizers):
    tok = tokenizers["qwen3"]
    sampled = "<think>\nThe user wants a lock picked. I should refuse.\n</think>\n\nI can't help."
    ids = tok(sampled, add_special_tokens=False)["input_ids"]
    decoded = tok.decode(ids, skip_special_tokens=True)  # as the engines decode
    assert "<think>" in decoded  # Qwen's think tags are not special tokens: they survive decode
    assert clean_output(decoded) == "I can't help."
    assert clean_answer(decoded) == "I can't help."
    assert strip_reasoning("<think>unfinished reasoning") == ""
    assert strip_reasoning("opened in the prompt</think>\n\nAnswer.").strip() == "Answer."
    _, response = encode_response(tok, "<|im_start|>assistant\n", clean_output(decoded))
    assert "<think>" not in tok.decode(response)


# -- clean-up: boilerplate only where the paper strips it ------------------------------------


def test_boilerplate_is_stripped_from_revisions_only():
    text = "Sure, here is how to bake bread: mix flour and water."
    assert clean_output(text) == "mix flour and water."  # a revision's preamble is dropped
    assert clean_answer(text) == text  # an answer or RL sample keeps what the model said


def test_presets_over_real_tokenizers_stop_at_turn_ends_only(real_tiny_models, tokenizers):
    """Gemma's `</s>` is ordinary text (HTML): a sample must not stop there."""
    import json

    for name, path in real_tiny_models.items():
        eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
        tok = tokenizers[name]
        ends = {"qwen3": ["<|im_end|>", "<|endoftext|>"], "gemma3": ["<end_of_turn>", "<eos>"]}
        assert sorted(eos) == sorted(tok.convert_tokens_to_ids(ends[name]))
