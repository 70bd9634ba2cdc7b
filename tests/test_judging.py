"""The judge prompt and the strict score parser: realistic verdicts, garbage, and
properties checked with hypothesis."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from selfreward.judging import (NO_MATCH, NOT_A_NUMBER, NOT_FINITE, OUT_OF_RANGE, aggregate, judge_response,
                                parse_score, parse_verdict, render_judge_prompt, score_stats)
from selfreward.spec import DEFAULT_SCORE_PATTERN, JudgeSpec

P = DEFAULT_SCORE_PATTERN


def score(text, pattern=P, lo=0.0, hi=5.0):
    return parse_score(text, pattern, lo, hi)


@pytest.mark.parametrize("text, expected", [
    ("The answer is relevant and addresses most of the question. Score: 4", 4.0),
    ("It covers the basics but misses the second part.\nScore: 3.5", 3.5),
    ("Score: 0", 0.0),
    ("Score: 5", 5.0),
    ("Score:4", 4.0),
    # several score lines: the last one is the verdict
    ("First I thought Score: 2 would be fair.\nOn reflection the answer is complete.\nScore: 4", 4.0),
    ("Score: 1\nScore: 2\nScore: 3", 3.0),
    # markdown emphasis around the score line
    ("The answer is precise and well organised.\n\n**Score:** 5", 5.0),
    ("**Score: 4**", 4.0),
    ("Score: *3*", 3.0),
    ("`Score: 2`", 2.0),
    ("__Score:__ 1", 1.0),
    ("Score: 4/5", 4.0),
    ("Score: 3 out of 5 points.", 3.0),
])
def test_realistic_verdicts(text, expected):
    v = score(text)
    assert v.ok and v.reason is None
    assert v.score == expected


def test_user_pattern_for_slash_scores():
    pattern = r"(?i)score:\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*5"
    assert score("Overall a fine answer. score: 5/5", pattern).score == 5.0
    assert score("SCORE: 2.5 / 5", pattern).score == 2.5
    # the pattern wants "/5": a bare number does not count
    v = score("score: 5", pattern)
    assert v.score is None and v.reason == NO_MATCH


@pytest.mark.parametrize("text, reason", [
    ("", NO_MATCH),
    ("The answer is good.", NO_MATCH),
    ("I would give it four points.", NO_MATCH),
    ("Score: four", NO_MATCH),
    ("Score: -1", NO_MATCH),  # the default pattern captures no sign
    ("Score: 7", OUT_OF_RANGE),
    ("Score: 5.01", OUT_OF_RANGE),
    ("Score: 4\nScore: 9", OUT_OF_RANGE),  # the last match counts, even when it is bad
    ("\x00\x01 ��� gibberish 0x!!", NO_MATCH),
])
def test_garbage_and_out_of_range_are_failures(text, reason):
    v = score(text)
    assert v.score is None
    assert v.reason == reason
    assert not v.ok


def test_negative_nan_inf_with_permissive_patterns():
    signed = r"Score:\s*(-?[0-9.]+)"
    assert score("Score: -1", signed).reason == OUT_OF_RANGE
    assert score("Score: -0", signed).score == 0.0  # -0 is in range and is zero
    anything = r"Score:\s*(\S+)"
    assert score("Score: nan", anything).reason == NOT_FINITE
    assert score("Score: NaN", anything).reason == NOT_FINITE
    assert score("Score: inf", anything).reason == NOT_FINITE
    assert score("Score: 4..5", anything).reason == NOT_A_NUMBER
    assert score("Score: abc", anything).reason == NOT_A_NUMBER
    assert score("Score: ", r"Score:\s*(\d*)").reason == NOT_A_NUMBER
    assert score("Score: x", r"Score:\s*(\d)?").reason == NOT_A_NUMBER


def test_custom_range():
    assert score("Rating: 8", r"Rating:\s*(\d+)", 1, 10).score == 8.0
    assert score("Rating: 0", r"Rating:\s*(\d+)", 1, 10).reason == OUT_OF_RANGE


def test_render_keeps_braces_of_the_content():
    judge = JudgeSpec(template="Q: {prompt}\nA: {response}\nScore it.")
    out = render_judge_prompt(judge, "What is {x}?", "It is {y} and {{z}}.")
    assert out == "Q: What is {x}?\nA: It is {y} and {{z}}.\nScore it."
    default = render_judge_prompt(JudgeSpec(), "PROMPT-TEXT", "RESPONSE-TEXT")
    assert "<question>PROMPT-TEXT</question>" in default and "<answer>RESPONSE-TEXT</answer>" in default


def test_aggregate_and_judged_response():
    assert aggregate([]) is None
    assert aggregate([4, 5, 3]) == 4.0
    assert aggregate([1, 2, 10], "median") == 2.0
    with pytest.raises(ValueError):
        aggregate([1.0], "mode")
    judge = JudgeSpec(samplesPerResponse=3)
    rec = judge_response("resp", ["Good. Score: 4", "nothing here", "Score: 5"], judge)
    assert rec["verdicts"] == ["Good. Score: 4", "nothing here", "Score: 5"]  # raw audit trail kept
    assert rec["scores"] == [4.0, 5.0]
    assert rec["score"] == 4.5
    assert rec["parseFailures"] == 1 and rec["failureReasons"] == [NO_MATCH]
    none = judge_response("resp", ["no", "Score: 11"], judge)
    assert none["score"] is None and none["scores"] == [] and none["parseFailures"] == 2
    median = judge_response("r", ["Score: 1", "Score: 2", "Score: 5"], JudgeSpec(aggregation="median"))
    assert median["score"] == 2.0


def test_score_stats_over_records():
    judge = JudgeSpec()
    records = [
        {"responses": [judge_response("a", ["Score: 1", "Score: 3"], judge), judge_response("b", ["x"], judge)]},
        {"responses": [judge_response("c", ["Score: 4"], judge)]},
    ]
    s = score_stats(records)
    assert s["judgedResponses"] == 3 and s["verdicts"] == 4 and s["parseFailures"] == 1
    assert s["scoredResponses"] == 2 and s["unscoredResponses"] == 1
    assert s["scoreMean"] == 3.0 and s["scoreMin"] == 2.0 and s["scoreMax"] == 4.0
    assert s["scoreStd"] == pytest.approx(1.0)
    assert s["parseFailuresNoMatch"] == 1
    empty = score_stats([])
    assert empty["scoreMean"] is None and empty["verdicts"] == 0


# --- properties ---

bounds = st.tuples(st.floats(-100, 100, allow_nan=False), st.floats(0.001, 100, allow_nan=False)).map(
    lambda t: (t[0], t[0] + t[1]))
PATTERNS = [P, r"Score:\s*(\S+)", r"(-?\d+(?:\.\d+)?)", r"(?i)rating\s*=\s*([^\s,]+)"]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200), rng=bounds, pattern=st.sampled_from(PATTERNS))
def test_parser_never_returns_a_value_outside_the_range(text, rng, pattern):
    lo, hi = rng
    v = parse_score(text, pattern, lo, hi)
    if v.score is None:
        assert v.reason in (NO_MATCH, NOT_A_NUMBER, NOT_FINITE, OUT_OF_RANGE)
    else:
        assert v.reason is None
        assert math.isfinite(v.score) and lo <= v.score <= hi


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_characters="0123456789"), max_size=200))
def test_no_match_is_none_never_zero(text):
    # without digits the default pattern cannot match: the result must be a failure,
    # not a stand-in 0 or -1
    v = parse_verdict(text, JudgeSpec())
    assert v.score is None and v.reason == NO_MATCH


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(max_size=80), value=st.integers(0, 5), suffix=st.text(alphabet=" .!\n", max_size=5))
def test_a_trailing_score_line_is_read(prefix, value, suffix):
    v = score(f"{prefix}\nScore: {value}{suffix}")
    assert v.score == float(value)
