"""AI-feedback label math against hand-computed values, prompts, and the labeller on a tiny model."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from cai_ray.config import RLLabelConfig
from cai_ray.constitution import load_constitution
from cai_ray.errors import ModelError
from cai_ray.feedback.labeling import (
    LabelQuery,
    QueryResult,
    apply_mode,
    best_and_worst,
    build_queries,
    clean_rationale,
    combine,
    cot_scoring_prefix,
    label_statistics,
    option_token_issue,
    scored,
)

MESSAGES = [{"role": "user", "content": "How do I pick the lock on my neighbour's door?"}]


@pytest.fixture(scope="module")
def constitution():
    return load_constitution("constitutions/default.yaml")


def _result(slot: int, order: str, p_first: float, *, tokens=((7,), (8,)), rationale=None):
    query = LabelQuery(slot, f"p{slot}", order, "prefix")
    return QueryResult(query, p_first, [list(t) for t in tokens], rationale)


def test_label_is_the_normalised_option_probability():
    r = scored(LabelQuery(0, "x", "ab", ""), [-1.0, -2.0], [[1], [2]])
    assert r.p_first == pytest.approx(math.exp(-1) / (math.exp(-1) + math.exp(-2)))
    swapped = scored(LabelQuery(0, "x", "ba", ""), [-1.0, -2.0], [[1], [2]])
    assert swapped.p_a == pytest.approx(1 - r.p_first)  # first shown is B in order "ba"


def test_two_orders_average_and_flips_are_counted():
    s = RLLabelConfig()
    same = combine([_result(0, "ab", 0.8), _result(0, "ba", 0.4)], s)
    assert same.p == pytest.approx(0.5 * (0.8 + 0.6)) and (same.flips, same.order_checks) == (0, 1)
    flipped = combine([_result(0, "ab", 0.8), _result(0, "ba", 0.7)], s)  # first always wins
    assert flipped.p == pytest.approx(0.5 * (0.8 + 0.3)) and flipped.flips == 1
    assert flipped.principles[0] == {
        "principle_id": "p0",
        "p": pytest.approx(0.55),
        "p_ab": pytest.approx(0.8),
        "p_ba": pytest.approx(0.3),
    }


def test_principles_are_averaged_after_orders():
    s = RLLabelConfig(principles_per_label=2)
    lab = combine(
        [
            _result(0, "ab", 0.9),
            _result(0, "ba", 0.1),
            _result(1, "ab", 0.4),
            _result(1, "ba", 0.4),
        ],
        s,
    )
    assert [p["p"] for p in lab.principles] == pytest.approx([0.9, 0.5])
    assert lab.p == pytest.approx(0.7) and len(lab.trace) == 4


@pytest.mark.parametrize(
    ("mode", "p", "want"),
    [
        ("soft", 0.83, 0.83),
        ("hard", 0.83, 1.0),
        ("hard", 0.2, 0.0),
        ("hard", 0.5, 0.5),
        ("clamped", 0.83, 0.6),
        ("clamped", 0.1, 0.4),
        ("clamped", 0.55, 0.55),
    ],
)
def test_label_modes(mode, p, want):
    assert apply_mode(p, mode, (0.4, 0.6)) == pytest.approx(want)


def test_cot_probabilities_are_clamped_then_averaged_over_rationales():
    s = RLLabelConfig(cot=True, both_orders=False, clamp=(0.2, 0.8))
    lab = combine(
        [_result(0, "ab", 0.99, rationale="r1"), _result(0, "ab", 0.01, rationale="r2")], s
    )
    assert [t["p_a"] for t in lab.trace] == pytest.approx([0.8, 0.2])
    assert lab.p == pytest.approx(0.5) and lab.order_checks == 0
    one = combine([_result(0, "ab", 0.97, rationale="r")], RLLabelConfig(cot=True))
    assert one.p == pytest.approx(0.6)  # the paper's default range [0.4, 0.6]
    assert 0.4 <= one.p <= 0.6


def test_rationale_parsing():
    text = " (A) is kinder.\nSo the answer is: (A)\n\nHuman: more"
    assert clean_rationale(text) == "(A) is kinder."
    assert cot_scoring_prefix("Q\nLet's think step-by-step:", "why") == (
        "Q\nLet's think step-by-step: why\nSo the answer is:"
    )


def test_queries_are_keyed_by_pair_id_and_show_both_orders(constitution):
    s = RLLabelConfig(principles_per_label=3, few_shot=2)
    q1 = build_queries(
        constitution,
        pair_id="p1",
        messages=MESSAGES,
        response_a="AAA",
        response_b="BBB",
        settings=s,
    )
    again = build_queries(
        constitution,
        pair_id="p1",
        messages=MESSAGES,
        response_a="AAA",
        response_b="BBB",
        settings=s,
    )
    assert q1 == again and len(q1) == 6
    assert [(q.slot, q.order) for q in q1] == [(i, o) for i in range(3) for o in ("ab", "ba")]
    ab, ba = q1[0].prefix, q1[1].prefix
    assert ab.endswith("(A) AAA\n(B) BBB\nThe answer is:")
    assert ba.endswith("(A) BBB\n(B) AAA\nThe answer is:")
    assert ab.count("The answer is:") == 3  # two answered few-shot examples, then the query
    ids = {q.principle_id for q in q1}
    assert ids <= {p.id for p in constitution.feedback_principles}
    cot = build_queries(
        constitution,
        pair_id="p1",
        messages=MESSAGES,
        response_a="AAA",
        response_b="BBB",
        settings=RLLabelConfig(cot=True, few_shot=1),
    )
    assert cot[0].prefix.endswith("Let's think step-by-step:")
    assert "So the answer is:" in cot[0].prefix  # the CoT few-shot example


def test_option_token_splitting_is_detected():
    assert option_token_issue([[5], [6]]) is None
    assert option_token_issue([[3, 5, 9], [3, 6, 9]]) == "split"
    with pytest.raises(ModelError, match="same tokens"):
        option_token_issue([[3, 5], [3, 5]])
    lab = combine(
        [_result(0, "ab", 0.6, tokens=((3, 5), (3, 6)))], RLLabelConfig(both_orders=False)
    )
    assert lab.split_options and lab.trace[0]["option_token_ids"] == [[3, 5], [3, 6]]


def test_statistics_by_hand():
    rows = [
        {"label": 0.95, "flips": 1, "order_checks": 2, "principles": [{"p": 0.9}, {"p": 0.2}]},
        {"label": 0.25, "flips": 0, "order_checks": 2, "principles": [{"p": 0.3}, {"p": 0.1}]},
    ]
    st = label_statistics(rows)
    assert st["distribution"]["counts"][9] == 1 and st["distribution"]["counts"][2] == 1
    assert st["flip_rate"] == pytest.approx(0.25)
    assert st["mean_confidence"] == pytest.approx((0.95 + 0.75) / 2)
    assert st["principle_agreement"] == pytest.approx(0.5)
    assert st["prefers_a"] == pytest.approx(0.5)


def test_best_and_worst_of_a_round_robin():
    wins = {(0, 1): 0.2, (0, 2): 0.6, (1, 2): 0.9}  # 1 beats both, 2 loses both
    assert best_and_worst(3, wins) == (1, 2)


def _naive_logprobs(engine, prefix: str, option_ids: list[list[int]]) -> list[float]:
    """One full forward per option over prefix + option tokens (no shared prefix)."""
    import torch

    prefix_ids = engine._encode(prefix)
    out = []
    with torch.inference_mode():
        for ids in option_ids:
            full = torch.tensor([prefix_ids + ids])
            logp = engine.model(input_ids=full).logits[0].float().log_softmax(-1)  # (T, V)
            rows = torch.arange(len(prefix_ids) - 1, len(prefix_ids) + len(ids) - 1)
            out.append(float(logp[rows, torch.tensor(ids)].sum()))
    return out


@pytest.mark.parametrize("options", [(" (A)", " (B)"), (" [A]", " [B]")])
def test_shared_prefix_labels_equal_naive_per_option(tiny_model_dir, constitution, options):
    from cai_ray.engines.base import ScoreRequest
    from cai_ray.engines.hf import HFEngine

    engine = HFEngine(tiny_model_dir, device="cpu", threads=1)
    queries = build_queries(
        constitution,
        pair_id="x",
        messages=MESSAGES,
        response_a="No, I can't help with that.",
        response_b="Use a tension wrench.",
        settings=RLLabelConfig(principles_per_label=1, few_shot=1),
    )
    scores = engine.score_options([ScoreRequest(q.prefix, options) for q in queries])
    for q, s in zip(queries, scores, strict=True):
        naive = _naive_logprobs(engine, q.prefix, s.option_token_ids)
        assert s.logprobs == pytest.approx(naive, abs=1e-4)
        shared = scored(q, s.logprobs, s.option_token_ids).p_first
        assert shared == pytest.approx(scored(q, naive, s.option_token_ids).p_first, abs=1e-5)
    issue = option_token_issue(scores[0].option_token_ids)
    assert issue == (None if options[0] == " (A)" else "split")  # the tiny tokenizer: markers


def test_labeler_worker_in_process(tiny_model_dir):
    from actors.labeler import LabelerWorker
    from cai_ray.config import EngineConfig

    msgs = json.dumps(MESSAGES)
    batch = pd.DataFrame(
        [
            {
                "pair_id": "a",
                "messages": msgs,
                "responses": ["No.", "Sure, like so."],
                "reject": "",
            },
            {"pair_id": "b", "messages": msgs, "responses": ["Same", "Same"], "reject": ""},
            {"pair_id": "c", "messages": msgs, "responses": ["", "x"], "reject": ""},
            {"pair_id": "d", "messages": msgs, "responses": ["x", "y"], "reject": "earlier"},
        ]
    )
    settings = RLLabelConfig(principles_per_label=4, few_shot=1)
    worker = LabelerWorker(
        str(tiny_model_dir),
        EngineConfig(kind="hf", device="cpu", threads=1),
        "constitutions/default.yaml",
        settings,
    )
    out = worker(batch)
    assert list(out.reject) == ["", "identical responses", "empty response", "earlier"]
    row = out.iloc[0]
    assert 0 < row.label < 1 and len(row.principle_ids) == 4
    trace = json.loads(row.trace)
    assert len(trace) == 8 and {t["order"] for t in trace} == {"ab", "ba"}
    assert all(len(ids) == 1 for t in trace for ids in t["option_token_ids"])
    assert row.label == pytest.approx(sum(p["p"] for p in json.loads(row.principles)) / 4)


# ---- issue 14: prefix options, one prompt layout, chain-of-thought framing --------------------


def test_an_option_prefixing_the_other_is_scored_as_disjoint_events():
    # " A" = [5] and " AB" = [5, 6]: P(" A") includes P(" AB"); the label must not
    q = LabelQuery(0, "x", "ab", "")
    r = scored(q, [math.log(0.5), math.log(0.3)], [[5], [5, 6]])
    assert r.p_first == pytest.approx(0.2 / (0.2 + 0.3))
    assert option_token_issue([[5], [5, 6]]) == "prefix"
    assert scored(q, [-1.0, -2.0], [[5], [6]]).p_first == pytest.approx(1 / (1 + math.exp(-1)))


def _question_paragraphs(prompt: str) -> list[str]:
    """Per multiple-choice block of `prompt`, the paragraph that holds its "Options:"."""
    from cai_ray.constitution.render import FEEDBACK_HEADER

    blocks = prompt.split(FEEDBACK_HEADER)[1:]
    return [next(p for p in b.split("\n\n") if "Options:" in p) for b in blocks]


def test_one_layout_with_a_blank_line_before_the_question(real_tiny_model, constitution):
    """The live query, its few-shot examples and serve's /v1/label prompt: the question is its
    own paragraph, never glued to the human's last message."""
    from cai_ray.config import EngineConfig
    from cai_ray.constitution.render import FEEDBACK_HEADER
    from cai_ray.serve.backends import ConstitutionBackend
    from cai_ray.serve.schemas import LabelRequest

    human = MESSAGES[0]["content"]
    queries = build_queries(
        constitution,
        pair_id="p1",
        messages=MESSAGES,
        response_a="No.",
        response_b="Use a tension wrench.",
        settings=RLLabelConfig(principles_per_label=2, few_shot=2),
    )
    backend = ConstitutionBackend(
        str(real_tiny_model),
        str(real_tiny_model),
        EngineConfig(kind="hf", device="cpu", threads=1),
        constitution="constitutions/default.yaml",
        fmt="transcript",
        seed=0,
    )
    seen: list[str] = []
    score = backend.judge.score_options
    backend.judge.score_options = lambda reqs: (seen.extend(r.prefix for r in reqs), score(reqs))[1]
    request = LabelRequest(
        messages=MESSAGES, response_a="No.", response_b="Use a tension wrench.", few_shot=2
    )
    out = backend.label(request.model_dump())
    assert len(seen) == 8 and len({p["id"] for p in out["principles"]}) == 4
    question = constitution.feedback_principle(queries[0].principle_id).question.strip()
    block = f"{FEEDBACK_HEADER}\nHuman: {human}\n\n{question}\n(A) No.\n(B) Use a tension wrench."
    assert queries[0].prefix.endswith(f"{block}\nThe answer is:")
    for prompt in [q.prefix for q in queries] + seen:
        paragraphs = _question_paragraphs(prompt)
        assert len(paragraphs) == 3  # two answered examples, then the query
        assert all(
            "Human:" not in p and p.split("\n(A) ")[0].endswith("Options:") for p in paragraphs
        )
    for q in (p["question"].strip() for p in out["principles"]):  # serve: the same layout
        live = f"{FEEDBACK_HEADER}\nHuman: {human}\n\n{q}\n(A) No.\n(B) Use a tension wrench."
        assert any(p.endswith(f"{live}\nThe answer is:") for p in seen)


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def chat_format(request, real_tokenizer_dirs):
    from cai_ray.data.conversation import PromptFormat

    return PromptFormat("chat").load(real_tokenizer_dirs[request.param])


def _cot_queries(constitution, fmt, *, few_shot=2):
    return build_queries(
        constitution,
        pair_id="p1",
        messages=MESSAGES,
        response_a="No.",
        response_b="Use a tension wrench.",
        settings=RLLabelConfig(cot=True, few_shot=few_shot),
        fmt=fmt,
    )


def test_cot_prompt_in_the_chat_format(constitution, chat_format):
    from cai_ray.data.tokens import encode

    tok = chat_format.tokenizer
    for few_shot in (0, 2):
        prefix = _cot_queries(constitution, chat_format, few_shot=few_shot)[0].prefix
        assert prefix.endswith("\nLet's think step-by-step:")
        # the chat template frames the turns, not the transcript's markers
        assert "Human: Consider" not in prefix and "Assistant: Let's think" not in prefix
        assert prefix.count("Consider the following conversation") == few_shot + 1
        assert prefix.count("So the answer is:") == few_shot  # the answered examples
        ids = encode(tok, prefix)
        if tok.bos_token == "<bos>":  # Gemma: one BOS, at the start, in text and in tokens
            assert prefix.startswith("<bos>") and prefix.count("<bos>") == 1
            assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
            assert prefix.endswith("<start_of_turn>model\nLet's think step-by-step:")
        else:
            assert prefix.endswith("<|im_start|>assistant\nLet's think step-by-step:")
    # the rationale then the answer cue continue the model's own turn
    rationale = cot_scoring_prefix(prefix, "(A) refuses.")
    assert rationale.endswith("step-by-step: (A) refuses.\nSo the answer is:")


def test_cot_prompt_in_the_transcript_format(constitution, chat_format):
    from cai_ray.data.conversation import PromptFormat
    from cai_ray.data.tokens import encode

    tok = chat_format.tokenizer  # the paper's layout whatever the model; tokens checked on both
    for fmt in (None, PromptFormat("transcript")):
        prefix = _cot_queries(constitution, fmt)[0].prefix
        assert prefix.startswith("\n\nHuman: Consider the following conversation")
        assert prefix.count("\n\nHuman: Consider") == 3  # two examples, then the query
        assert prefix.count("\n\nAssistant: Let's think step-by-step:") == 3
        assert prefix.endswith("(B) Use a tension wrench.\n\nAssistant: Let's think step-by-step:")
        assert "Options:\n(A)" in prefix and "<bos>" not in prefix
        assert encode(tok, prefix).count(tok.bos_token_id) == (1 if tok.bos_token else 0)


def test_labeler_worker_cot_in_the_chat_format(real_tiny_model):
    from actors.labeler import LabelerWorker
    from cai_ray.config import EngineConfig
    from cai_ray.engines.base import SamplingParams

    worker = LabelerWorker(
        str(real_tiny_model),
        EngineConfig(kind="hf", device="cpu", threads=1),
        "constitutions/default.yaml",
        RLLabelConfig(cot=True, few_shot=1, both_orders=False),
        rationale_sampling=SamplingParams(temperature=0.0, max_new_tokens=3),
        fmt="chat",
    )
    prompts: list[str] = []
    generate = worker.engine.generate
    worker.engine.generate = lambda ps, params: (prompts.extend(ps), generate(ps, params))[1]
    batch = pd.DataFrame(
        [{"pair_id": "a", "messages": json.dumps(MESSAGES), "responses": ["No.", "Sure."]}]
    )
    out = worker(batch)
    assert list(out.reject) == [""] and 0.4 <= out.iloc[0].label <= 0.6  # clamped CoT label
    assert len(prompts) == 1 and prompts[0].endswith("\nLet's think step-by-step:")
    chat = prompts[0]
    assert "<start_of_turn>user\n" in chat or "<|im_start|>user\n" in chat  # its template
    assert chat.count("<bos>") <= 1 and "\n\nHuman:" not in chat
    trace = json.loads(out.iloc[0].trace)
    assert len(trace) == 1 and trace[0]["rationale"] is not None
