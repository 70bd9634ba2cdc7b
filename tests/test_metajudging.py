"""The meta-judge's pure rules (selfreward.metajudging): selection, what it reads,
outcomes in both orders, Bradley-Terry ratings, pairs and their caps; its spec section."""
import math
import re

import pytest
from hypothesis import given, settings, strategies as st

from selfreward import metajudging as M
from selfreward.judging import judge_response, parse_verdict
from selfreward.spec import DEFAULT_META_JUDGE_TEMPLATE, DEFAULT_SCORE_PATTERN, JudgeSpec, SpecError, parse_spec


def test_score_lines_are_removed_and_the_reasoning_kept():
    verdict = ("The answer is relevant and mostly complete.\n**Score:** 4\nIt misses an example.\n"
               "Final score = four\n> Score: 2 (quoted)\nScore: 4/5")
    shown = M.strip_score_lines(verdict, DEFAULT_SCORE_PATTERN)
    assert shown == "The answer is relevant and mostly complete.\nIt misses an example."
    assert parse_verdict(shown, JudgeSpec()).score is None  # nothing left to read a score from
    # a full-width score line is normalised as the parser reads it, so it goes too
    assert M.strip_score_lines("Good.\nＳｃｏｒｅ：３", DEFAULT_SCORE_PATTERN) == "Good."
    # the judge's own pattern decides too: a custom "Rating" line
    assert M.strip_score_lines("Fine.\nRating 3 of 5", r"Rating ([0-9])") == "Fine."


def _rec(pid, *responses):
    return {"promptId": pid, "prompt": f"q {pid}", "responses": responses}


def _resp(text, *verdicts):
    return judge_response(text, list(verdicts), JudgeSpec())


def test_selection_takes_the_most_disagreement_and_distinct_parsable_verdicts():
    recs = [
        _rec("p1", _resp("calm", "Score: 3", "Score: 3"),  # no disagreement: never selected
             _resp("split", "a. Score: 1", "b. Score: 5", "c. Score: 5", "no score here")),
        _rec("p2", _resp("mild", "x. Score: 2", "y. Score: 3"),
             _resp("dup", "same. Score: 1", "same. Score: 1", "other. Score: 4")),
    ]
    items = M.select_responses(recs, limit=10, min_variance=0.0, max_verdicts=4)
    assert [(i["promptId"], i["response"]) for i in items] == [("p1", "split"), ("p2", "dup"), ("p2", "mild")]
    split = items[0]
    assert [v["index"] for v in split["verdicts"]] == [0, 1, 2]  # the unparsable verdict is left out
    assert [v["score"] for v in split["verdicts"]] == [1.0, 5.0, 5.0]
    assert [v["text"] for v in items[1]["verdicts"]] == ["same. Score: 1", "other. Score: 4"]  # distinct texts
    assert split["variance"] == pytest.approx(((1 - 11 / 3) ** 2 + 2 * (5 - 11 / 3) ** 2) / 3)
    assert M.select_responses(recs, 1, 0.0, 4) == items[:1]
    assert len(M.select_responses(recs, 10, 0.0, 2)[0]["verdicts"]) == 2
    assert [i["response"] for i in M.select_responses(recs, 10, 1.0, 4)] == ["split", "dup"]  # above minVariance
    # records judged before verdictScores were kept: nothing to compare
    old = [{"promptId": "o", "prompt": "q", "responses": [{"text": "t", "verdicts": ["Score: 1", "Score: 5"],
                                                             "scores": [1.0, 5.0]}]}]
    assert M.select_responses(old, 10, 0.0, 4) == []


def test_both_orders_cancel_position_bias():
    assert M.comparisons(3) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    # i shown as A wins, then j shown as A loses (B = i wins): two wins for i, agreement
    assert M.outcome("a", "b") == ([1.0, 1.0], True)
    # a meta-judge that always says A: one win each, and the orders disagree
    assert M.outcome("a", "a") == ([1.0, 0.0], False)
    assert M.outcome("tie", "tie") == ([0.5, 0.5], True)
    assert M.outcome("b", None) == ([0.0], None)
    assert M.outcome(None, None) == ([], None)


def test_ratings_follow_the_bradley_terry_fit():
    # equal records give equal ratings at the reference's 1000
    assert M.ratings(2, [(0, 1, 1.0), (0, 1, 0.0)]) == pytest.approx([1000.0, 1000.0])
    r = M.ratings(3, [(0, 1, 1.0), (0, 1, 1.0), (1, 2, 1.0), (1, 2, 1.0), (0, 2, 1.0), (0, 2, 1.0)])
    assert r[0] > r[1] > r[2] and all(math.isfinite(x) for x in r)  # finite although 0 never lost
    # the fit is the maximum-likelihood point: the gradient of the log-likelihood (with the
    # reference game) is zero there
    games = [(0, 1, 1.0), (0, 1, 0.5), (1, 2, 1.0), (2, 0, 1.0), (0, 2, 0.0)]
    rat = M.ratings(3, games)
    p = [10 ** ((x - 1000) / 400) for x in rat]
    for i in range(3):
        grad = 0.5 - p[i] / (p[i] + 1)
        for a, b, res in games:
            if i in (a, b):
                mine = res if i == a else 1 - res
                other = b if i == a else a
                grad += mine - p[i] / (p[i] + p[other])
        assert abs(grad) < 1e-6
    assert M.ratings(0, []) == []


def _item(*scores):
    return {"promptId": "p", "responseIndex": 2, "variance": 1.5, "prompt": "q", "response": "r",
            "verdicts": [{"index": k, "text": f"v{k}", "score": s} for k, s in enumerate(scores)]}


def test_the_best_rated_verdict_is_chosen_over_the_worst():
    pair = M.meta_pair(_item(5.0, 2.0, 4.0), [1100.0, 900.0, 1000.0], "judge prompt")
    assert (pair["chosen"], pair["rejected"]) == ("v0", "v1")
    assert (pair["chosenScore"], pair["rejectedScore"], pair["scoreClass"]) == (5.0, 2.0, 5)
    assert pair["prompt"] == "judge prompt" and pair["kind"] == "judge" and pair["ratingGap"] == 200.0
    # the better judgment may give the lower score: chosen follows the ratings, not the score
    low = M.meta_pair(_item(5.0, 2.5), [900.0, 1100.0], "jp")
    assert (low["chosen"], low["chosenScore"], low["scoreClass"]) == ("v1", 2.5, 3)
    assert M.meta_pair(_item(5.0, 1.0), [1000.0, 1000.0], "jp") is None  # no preference


def _cand(i, cls, gap=10.0):
    return {"promptId": f"p{i}", "scoreClass": cls, "ratingGap": gap, "variance": 1.0, "chosen": f"c{i}"}


def test_caps_share_of_the_data_and_of_a_score_class():
    cands = [_cand(i, 5, gap=100 - i) for i in range(10)] + [_cand(10 + i, 3) for i in range(4)] + [_cand(20, 1)]
    # 0.15 of the data: 34 response pairs allow floor(0.15/0.85*34) = 6 meta pairs
    kept, f = M.cap_meta_pairs(cands, 34, 0.15, 0.4)
    assert f["metaPairsLimit"] == 6 and len(kept) == f["metaPairs"]
    classes = f["metaPairScoreClasses"]
    assert all(n <= 0.4 * len(kept) for n in classes.values())
    # 6 pairs would need classes of at most 2: 2 + 2 + 1 = 5 < 6, so 5 pairs with quota 2
    assert len(kept) == 5 and classes == {"1": 1, "3": 2, "5": 2}
    assert [c["promptId"] for c in kept if c["scoreClass"] == 5] == ["p0", "p1"]  # the widest gaps
    assert f["metaPairsLargestClassShare"] == pytest.approx(0.4)
    # one score class only: any meta pair would be 100% of them
    assert M.cap_meta_pairs([_cand(i, 5) for i in range(5)], 100, 0.15, 0.4)[0] == []
    assert M.cap_meta_pairs(cands, 0, 0.15, 0.4)[0] == []  # no response pairs: no room
    assert len(M.cap_meta_pairs(cands, 1000, 0.15, 1.0)[0]) == len(cands)


@settings(max_examples=300, deadline=None)
@given(classes=st.lists(st.integers(0, 5), max_size=40), response_pairs=st.integers(0, 200),
       share=st.sampled_from([0.05, 0.15, 0.5, 0.9]), class_share=st.sampled_from([0.2, 0.4, 0.5, 1.0]))
def test_cap_properties(classes, response_pairs, share, class_share):
    cands = [_cand(i, c, gap=float(i % 7)) for i, c in enumerate(classes)]
    kept, f = M.cap_meta_pairs(cands, response_pairs, share, class_share)
    n = len(kept)
    assert n <= share * (response_pairs + n) + 1e-9  # at most that share of all the DPO pairs
    counts = {}
    for c in kept:
        counts[c["scoreClass"]] = counts.get(c["scoreClass"], 0) + 1
    assert all(k <= class_share * n + 1e-9 for k in counts.values())
    assert len({c["promptId"] for c in kept}) == n
    # maximal: one pair more would break a cap whichever candidate it were
    rest = [c for c in cands if c not in kept]
    for extra in rest:
        m = n + 1
        over_share = m > share * (response_pairs + m) + 1e-9
        bigger = dict(counts)
        bigger[extra["scoreClass"]] = bigger.get(extra["scoreClass"], 0) + 1
        over_class = any(k > math.floor(class_share * m + 1e-9) for k in bigger.values())
        assert over_share or over_class


BASE = {"model": {"uri": "/m"}, "prompts": {"uri": "/p.jsonl"}, "storage": {"uri": "/tmp/s"}}


def test_meta_judge_spec_is_off_by_default_and_refuses_what_cannot_work():
    spec = parse_spec(BASE)
    assert spec.metaJudge is None and not spec.meta_judge_enabled
    on = parse_spec({**BASE, "metaJudge": {}})
    mj = on.metaJudge
    assert on.meta_judge_enabled and (mj.maxShare, mj.maxClassShare) == (0.15, 0.4)
    assert mj.prompt_template == DEFAULT_META_JUDGE_TEMPLATE
    assert not parse_spec({**BASE, "metaJudge": {"enabled": False}}).meta_judge_enabled
    cases = [
        ({"template": "{prompt} {response} {first}"}, r"metaJudge\.template.*\{second\}"),
        ({"template": "{prompt} {response} {first} {second} {rubric}"}, r"metaJudge\.template"),
        ({"winnerPattern": "no group"}, r"metaJudge\.winnerPattern.*capturing group"),
        ({"winnerPattern": "(a)\\1"}, r"metaJudge\.winnerPattern.*RE2"),
        ({"maxShare": 1.0}, r"metaJudge\.maxShare"),
        ({"maxClassShare": 0.0}, r"metaJudge\.maxClassShare"),
        ({"maxVerdicts": 1}, r"metaJudge\.maxVerdicts"),
        ({"backend": "vllm"}, r"metaJudge\.backend.*vllm needs a GPU"),
        ({"typo": 1}, r"metaJudge\.typo"),
    ]
    for section, where in cases:
        with pytest.raises(SpecError, match=where):
            parse_spec({**BASE, "metaJudge": section})
    gpu = parse_spec({**BASE, "metaJudge": {"backend": "vllm"}, "resources": {"metajudge": {"gpus": 1}}})
    assert gpu.metaJudge.backend == "vllm"


def test_default_meta_template_renders_its_four_placeholders():
    text = M.render_meta_prompt(DEFAULT_META_JUDGE_TEMPLATE, "Q{x}", "R", "first {judgment}", "second")
    assert "<question>Q{x}</question>" in text and "<judgment_a>first {judgment}</judgment_a>" in text
    assert "<judgment_b>second</judgment_b>" in text and re.search(r"Winner: A", text)
