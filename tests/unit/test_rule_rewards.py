"""Rule rewards and loading reward functions by name or file path."""

from __future__ import annotations

import pytest

from cai_ray.errors import ConfigError
from cai_ray.feedback import rule_rewards as rr


def test_refusal_penalty_and_rate_fold_curly_apostrophes():
    responses = ["I’m sorry, no.", "Sure: mix flour and water.", "As an AI I cannot."]
    assert rr.refusal_penalty([""] * 3, responses) == [-1.0, 0.0, -1.0]
    assert rr.phrase_rate(responses) == pytest.approx(2 / 3)
    assert rr.refusal_penalty([""], ["nope"], phrases=["nope"]) == [-1.0]


def test_length_target_is_zero_at_the_target():
    assert rr.length_target(["q"] * 3, ["abcd", "", "abcdefgh"], target_chars=4) == [0, -1, -1]
    with pytest.raises(ConfigError, match="target_chars"):
        rr.length_target(["q"], ["a"], target_chars=0)


def test_load_by_module_and_by_file(tmp_path):
    assert (
        rr.load_reward_function("cai_ray.feedback.rule_rewards:length_target") is rr.length_target
    )
    f = tmp_path / "my_reward.py"
    f.write_text("def exclaim(prompts, responses):\n    return [r.count('!') for r in responses]\n")
    fn = rr.load_reward_function(f"{f}:exclaim")
    assert fn(["q", "q"], ["a!!", "b"]) == [2, 0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "not 'module:fn'"),
        ("cai_ray.no_such_module:fn", "cannot load reward module"),
        ("/no/such/file.py:fn", "cannot load reward module"),
        ("cai_ray.feedback.rule_rewards:no_such_fn", "has no function"),
    ],
)
def test_bad_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        rr.load_reward_function(spec)


def test_rating_prompt_shows_the_response_and_ends_in_the_cue():
    from cai_ray.feedback.prompts import RATING_CUE, RATING_OPTIONS, build_rating_prompt

    text = build_rating_prompt("\n\nHuman: hi\n\nAssistant:", " hello ", criterion="Rate it.")
    assert text.endswith("Rate it.\n" + RATING_CUE)
    assert "Human: hi\n\nAssistant: hello\n\n" in text
    assert RATING_OPTIONS[0] == " 1" and RATING_OPTIONS[-1] == " 10" and len(RATING_OPTIONS) == 10
