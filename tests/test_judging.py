"""The judge prompt and the strict score parser: realistic verdicts, garbage, and
properties checked with hypothesis."""
import math
import re
import unicodedata
from pathlib import Path

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


# --- where a verdict's score is: the default rule on shapes real chat models write ---

V = "verdict"
DEFAULT_RULE = [
    # plain, case and separators
    ("Score: 4", 4.0), ("score: 4", 4.0), ("SCORE: 4", 4.0), ("Score:4", 4.0), ("Score : 4", 4.0),
    ("Score = 4", 4.0), ("SCORE=5", 5.0), ("Score is 4.", 4.0), ("Score - 4", 4.0), ("\tScore: 2", 2.0),
    ("Score: 0", 0.0), ("Score: 5", 5.0), ("Score: 4.5", 4.5), ("Score: 4.0", 4.0), ("Score: 0.5", 0.5),
    # labels before the word
    ("Total score: 4", 4.0), ("Final score: 3", 3.0), ("Overall Score: 2", 2.0), ("FINAL SCORE: 1", 1.0),
    # Markdown around it
    ("**Score:** 4", 4.0), ("**Score: 4**", 4.0), ("Score: **4**", 4.0), ("__Score:__ 1", 1.0),
    ("`Score: 2`", 2.0), ("*Score: 3*", 3.0), ("## Score: 5", 5.0), ("### Final Score: 4", 4.0),
    ("- Score: 3", 3.0), ("* Score: 3", 3.0), ("1. Relevance: yes\n2. Score: 4", 4.0),
    # the number's own wrappers and what may follow it
    ("Score: <4>", 4.0), ("Score: [4]", 4.0), ("Score: (4)", 4.0), ("Score: 4/5", 4.0), ("Score: 4 / 5", 4.0),
    ("Score: 4 out of 5", 4.0), ("Score: 3 points", 3.0), ("Score: 3 points.", 3.0), ("Score: 4.", 4.0),
    ("Score: 4!", 4.0), ("Score: 4, because it is complete.", 4.0), ("Score: 4 because it is complete", 4.0),
    ("Score: 4 (good)", 4.0), ("Score: 3 ✅", 3.0), ("score：４／５", 4.0),
    # full-width digits and colons (CJK output), invisible characters, line endings
    ("Ｓｃｏｒｅ：４", 4.0), ("Score：4", 4.0), ("Score: ４", 4.0), ("评分理由：回答完整。\nScore：３", 3.0),
    ("Score: ４．５", 4.5), ("Score: 3\u200b", 3.0), ("Explanation.\r\nScore: 2\r\n", 2.0),
    # where it is: the last statement that starts a line or a sentence
    ("The answer is relevant. Score: 4", 4.0), ("Good answer overall! Score: 5", 5.0),
    ("Explanation...\n\nScore: 3\n", 3.0), ("Score: 4\nScore: 3", 3.0),
    ("First I thought Score: 2 would be fair.\nScore: 4", 4.0),
    ("Score: 1\nA response would need citations to earn Score: 5.", 1.0),
    ("Score: 2. To earn Score: 5 it would need examples.", 2.0),
    ("Score: 3.\n\nNote: a 5 would need sources.", 3.0),
    ('The rubric says "Score: 5" needs expertise.\nScore: 2', 2.0),
    # reasoning blocks and quotes are not the verdict
    ("<think>Maybe Score: 5? No.</think>\nScore: 3", 3.0), ("<THINK>Score: 1</THINK>Score: 4", 4.0),
    ("<reasoning>Score: 1</reasoning>\nFinal score: 4", 4.0),
    ("Let me grade.\nScore: 2\n</think>\nScore: 4", 4.0),  # the block was opened in the prompt
    ("<thinking>draft: Score: 1</thinking>\n<thinking>Score: 2</thinking>\nScore: 5", 5.0),
    ("> Score: 5 is for expert answers.\nScore: 3", 3.0),
    # failures: counted, never a number
    ("<think>I think Score: 5</think>", NO_MATCH), ("<think>Score: 4, still drafting", NO_MATCH),
    ("> Score: 5", NO_MATCH), ("I would give it four points.", NO_MATCH), ("Score: four", NO_MATCH),
    ("Score: -1", NO_MATCH), ("Score: 3-4", NO_MATCH), ("Score: 3–4", NO_MATCH), ("Score: 4,5", NO_MATCH),
    ("Score: 4.5.6", NO_MATCH), ("Score: 4 3", NO_MATCH), ("Score: .5", NO_MATCH), ("Score: 1e1", NO_MATCH),
    ("My score: 4", NO_MATCH), ("The score is 4.", NO_MATCH), ("Scores: 4", NO_MATCH), ("Rating: 4", NO_MATCH),
    ("", NO_MATCH), ("Score:", NO_MATCH), ("Score: \n4", NO_MATCH), ("to earn Score: 5", NO_MATCH),
    ("Score: 7", OUT_OF_RANGE), ("Score: 5.5", OUT_OF_RANGE), ("Score: 10/10", OUT_OF_RANGE),
    ("Score: 45", OUT_OF_RANGE), ("Score: 2\nScore: 9", OUT_OF_RANGE),
]


def test_the_table_is_large():
    assert len(DEFAULT_RULE) >= 60
    assert len({t for t, _ in DEFAULT_RULE}) == len(DEFAULT_RULE)


@pytest.mark.parametrize("text, expected", DEFAULT_RULE, ids=[repr(t)[:50] for t, _ in DEFAULT_RULE])
def test_default_rule(text, expected):
    v = parse_verdict(text, JudgeSpec())
    if isinstance(expected, float):
        assert v.ok and v.score == expected, v
    else:
        assert v.score is None and v.reason == expected, v


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300), rng=bounds)
def test_text_without_a_score_statement_never_yields_a_number(text, rng):
    from hypothesis import assume
    assume("score" not in unicodedata.normalize("NFKC", text).casefold())
    v = parse_score(text, P, *rng)
    assert v.score is None and v.reason == NO_MATCH


@settings(max_examples=200, deadline=None)
@given(real=st.integers(0, 5), other=st.integers(0, 9), before=st.text(alphabet="abc .,\n", max_size=60),
       where=st.sampled_from(["<think>Score: {o}</think>", "> Score: {o}", "To earn Score: {o} it needs more.",
                              "A 'Score: {o}' would be unfair.", "<reasoning>\nScore: {o}\n"]))
def test_quotes_drafts_and_hypotheticals_after_the_score_do_not_count(real, other, before, where):
    v = parse_verdict(f"{before}\nScore: {real}\n{where.format(o=other)}", JudgeSpec())
    assert v.score == float(real)


@settings(max_examples=200, deadline=None)
@given(value=st.integers(0, 5), wrap=st.sampled_from(["{v}", "<{v}>", "**{v}**", "[{v}]", "{v}/5", "{v} out of 5"]),
       label=st.sampled_from(["Score", "score", "SCORE", "Total score", "Final Score", "**Score:**", "Ｓｃｏｒｅ"]),
       colon=st.sampled_from([":", "：", " :", " ="]))
def test_wrappers_are_tolerated(value, wrap, label, colon):
    sep = "" if label.endswith(":**") else colon
    v = parse_verdict(f"Some reasoning.\n{label}{sep} {wrap.format(v=value)}", JudgeSpec())
    assert v.score == float(value)


def test_a_long_verdict_is_read_from_its_end():
    text = ("blah " * 100_000) + "\nScore: 3"
    assert len(text) > 2 * __import__("selfreward.judging", fromlist=["x"]).MAX_VERDICT_CHARS
    assert parse_verdict(text, JudgeSpec()).score == 3.0
    assert parse_verdict("\ud800 Score: 2", JudgeSpec()).score == 2.0  # a lone surrogate from JSON


# --- score patterns: RE2, no pattern can stall a judge ---

@pytest.mark.parametrize("pattern, words", [
    (r"Score: (\d)\1", "RE2"),  # backreference
    (r"(?=Score)Score: (\d)", "RE2"),  # lookahead
    (r"(?<!x)Score: (\d)", "RE2"),
    (r"Score: ([a-z]+)", "never capture a number"),
    (r"(a+)+$", "never capture a number"),
    (r"Score: (?:\d)", "capturing group"),
    (r"Score: (\d{1001})", "RE2"),
    (r"Score: ([0-9]", "RE2"),
])
def test_bad_score_patterns_are_refused(pattern, words):
    from selfreward.spec import SpecError, parse_spec
    with pytest.raises(SpecError) as info:
        parse_spec({"model": {"uri": "m"}, "prompts": {"uri": "p"}, "storage": {"uri": "s3://bucket/r"},
                    "judge": {"scorePattern": pattern}})
    (loc, msg), = info.value.errors
    assert loc == "judge.scorePattern" and words in msg


CATASTROPHIC = [r"(\d+)+$", r"(\s*\w+\s*)*Score:\s*(\d+)", r"((\d|\d)*)*x", r"(.*a){12}(\d)", r"((\d|\d\d)+)+x",
                r"(\w+\s?)+\d+!", r"(\d+\d+)+y"]
ADVERSARIAL = ["1" * 30_000 + "!", "a" * 30_000, " a" * 15_000 + "Score:", "aa" * 15_000 + "\n", "x" * 30_000]


@pytest.mark.timeout(60)  # a backtracking engine takes hours on these; RE2 milliseconds
@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_nested_quantifiers_cannot_stall_the_parser(pattern):
    judge = JudgeSpec(scorePattern=pattern, maxScore=1e9)
    for text in ADVERSARIAL:
        assert parse_verdict(text, judge).reason in (None, NO_MATCH, NOT_A_NUMBER, NOT_FINITE, OUT_OF_RANGE)


_atoms = st.sampled_from(["a", r"\d", r"\s", r"\w", ".", "[0-9a]", "x"])
_patterns = st.recursive(_atoms, lambda inner: st.one_of(
    inner.map(lambda p: f"(?:{p})+"), inner.map(lambda p: f"(?:{p})*"), inner.map(lambda p: f"(?:{p}){{2,9}}"),
    st.tuples(inner, inner).map(lambda t: f"{t[0]}{t[1]}"), st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
), max_leaves=8)


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=None)
@given(body=_patterns, tail=st.sampled_from(["$", "!", r"\d", ""]))
def test_no_accepted_pattern_makes_parsing_slow(body, tail):
    """Every pattern validation accepts runs in linear time on long adversarial verdicts
    (a hang here is a backtracking engine; pytest-timeout fails the test)."""
    from pydantic import ValidationError
    try:
        judge = JudgeSpec(scorePattern=f"({body}){tail}", maxScore=1e9)
    except ValidationError:
        return
    for text in ADVERSARIAL:
        parse_verdict(text, judge)


# --- judge templates: two placeholders, doubled braces, nothing else ---

@pytest.mark.parametrize("template, words", [
    ("{prompt} {response:>99999999999}", "'{response:>99999999999}' at line 1, column 10"),
    ("{prompt.__class__} {response}", "{prompt.__class__}"),
    ("{prompt[0]} {response}", "{prompt[0]}"),
    ("{prompt!r} {response}", "{prompt!r}"),
    ("{prompt} {response} {rubric}", "{rubric}"),
    ("{prompt} {response} {}", "'{}'"),
    ("{prompt} {response} {0}", "{0}"),
    ("{prompt} {response} { prompt }", "{ prompt }"),
    ("{prompt} {response} {", "'{' at line 1"),
    ("{prompt}\n{response} }", "line 2, column 12"),
    ("{{prompt}} {response}", "{{prompt}} is the literal text {prompt}"),
    ("{prompt} {{response}}", "must contain the placeholder {response}"),
    ("{PROMPT} {response}", "{PROMPT}"),
])
def test_templates_with_anything_but_the_two_placeholders_are_refused(template, words):
    from pydantic import ValidationError
    with pytest.raises(ValidationError) as info:
        JudgeSpec(template=template)
    assert words in str(info.value)


def test_literal_braces_and_content_braces():
    judge = JudgeSpec(template='Reply as JSON {{"score": N}}.\n{prompt}|{response}|{prompt}')
    out = render_judge_prompt(judge, "P {response} {{x}}", "R {prompt}")
    assert out == 'Reply as JSON {"score": N}.\nP {response} {{x}}|R {prompt}|P {response} {{x}}'


@settings(max_examples=300, deadline=None)
@given(template=st.lists(st.sampled_from(list("ab{}\n :.!0[]") + ["{prompt}", "{response}"]), max_size=40)
       .map("".join))
def test_any_template_is_refused_or_renders_both_values(template):
    from selfreward.template import parse_template, template_problem
    problem = template_problem(template)
    if problem is not None:
        assert isinstance(problem, str) and problem
        return
    out = render_judge_prompt(JudgeSpec(template=template), "\x01P\x01", "\x02R\x02")
    assert "\x01P\x01" in out and "\x02R\x02" in out
    # what is left once the values are taken out is the template's literal text
    literal = "".join(p for p in parse_template(template) if isinstance(p, str))
    assert out.replace("\x01P\x01", "").replace("\x02R\x02", "") == literal
    parts = parse_template(template)
    assert out.count("\x01P\x01") == parts.count(("prompt",)) >= 1
    assert out.count("\x02R\x02") == parts.count(("response",)) >= 1


def test_every_renderer_is_the_one_template_renderer():
    """No code path formats a template with str.format (format specs, attribute access)."""
    root = Path(__file__).resolve().parent.parent
    sources = list((root / "operator" / "selfreward").rglob("*.py")) + list((root / "examples").rglob("*.py"))
    for path in sources:
        text = path.read_text()
        assert not re.search(r"\.format(_map)?\(\s*(prompt|response)\s*=", text), path
        assert "prompt_template.format" not in text, path
    assert "render_judge_prompt" in (root / "operator" / "selfreward" / "worker" / "judge.py").read_text()
    # the quickstart's EFT prompts are rendered by the same renderer the judge phase uses
    assert "render_template(" in (root / "operator" / "selfreward" / "tasks" / "cipher.py").read_text()


# --- the eval phase's evaluator: the same template renderer, an RE2 winner pattern ---------

@pytest.mark.parametrize("template, words", [
    ("{prompt} {first:>99999999999} {second}", "{first:>99999999999}"),
    ("{prompt.__class__} {first} {second}", "{prompt.__class__}"),
    ("{prompt} {first} {second} {response}", "{response}"),
    ("{prompt} {first} {{second}}", "must contain the placeholder {second}"),
    ("{prompt} {first}", "must contain the placeholder {second}"),
])
def test_evaluator_templates_know_only_their_three_placeholders(template, words):
    from pydantic import ValidationError

    from selfreward.spec import EvaluatorSpec
    with pytest.raises(ValidationError) as info:
        EvaluatorSpec(modelUri="/m/evaluator", template=template)
    assert words in str(info.value)


def test_evaluator_prompts_render_in_one_pass_with_literal_braces():
    from selfreward.worker.eval import render_pairwise
    out = render_pairwise('{{"winner": X}} Q: {prompt}\nA: {first}\nB: {second}', "p {second}", "a {{", "b }")
    assert out == '{"winner": X} Q: p {second}\nA: a {{\nB: b }'


@pytest.mark.timeout(20)
def test_a_catastrophic_winner_pattern_cannot_hang_the_evaluator():
    from selfreward.spec import EvaluatorSpec
    from selfreward.worker.eval import parse_winner
    pattern = EvaluatorSpec(modelUri="/m/evaluator", pattern=r"(\s*\w+\s*)*Winner:\s*(A|B|tie)").pattern
    verdict = "word " * 20000 + "!"  # Python's re backtracks exponentially on this
    assert parse_winner(verdict, pattern) is None
    assert parse_winner("I pick... winner: b", r"Winner:\s*(A|B|tie)") == "b"
