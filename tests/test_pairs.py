"""Building preference pairs from judged records (pure, no storage)."""
from hypothesis import given, settings, strategies as st

from selfreward.worker.pairs import IDENTICAL, MARGIN, TIE, TOO_FEW, TRUNCATED, build_pair, build_pairs


def rec(pid, *scores):
    return {"promptId": pid, "prompt": f"prompt {pid}",
            "responses": [{"text": f"{pid}-r{i}", "score": s} for i, s in enumerate(scores)]}


def test_highest_is_chosen_lowest_rejected():
    pair, why = build_pair(rec("a", 3.0, 4.5, None, 1.0, 2.0))
    assert why is None
    assert pair == {"promptId": "a", "prompt": "prompt a", "chosen": "a-r1", "rejected": "a-r3",
                    "chosenScore": 4.5, "rejectedScore": 1.0}


def test_ties_all_equal_and_too_few_scored():
    assert build_pair(rec("t", 4.0, 4.0, 4.0, 4.0)) == (None, TIE)
    assert build_pair(rec("u", 2.0, None, None, None)) == (None, TOO_FEW)
    assert build_pair(rec("v", None, None)) == (None, TOO_FEW)
    assert build_pair(rec("w")) == (None, TOO_FEW)
    # two responses share the top score: the first of them is chosen, still a pair
    pair, _ = build_pair(rec("x", 5.0, 2.0, 5.0))
    assert pair["chosen"] == "x-r0" and pair["rejected"] == "x-r1"
    # an unscored response never becomes the rejected one
    pair, _ = build_pair(rec("y", None, 3.0, 4.0))
    assert pair["rejected"] == "y-r1"


def test_margin():
    assert build_pair(rec("m", 3.0, 4.0), min_margin=1.0) == (None, MARGIN)  # equal to the margin: dropped
    assert build_pair(rec("m", 3.0, 4.5), min_margin=1.0)[0]["chosenScore"] == 4.5
    assert build_pair(rec("m", 3.0, 3.25), min_margin=0.0)[0] is not None  # no margin: any difference
    assert build_pair(rec("m", 3.0, 3.0), min_margin=0.0) == (None, TIE)


def test_summary_figures():
    records = [rec("a", 1.0, 5.0), rec("b", 2.0, 3.0), rec("c", 3.0, 3.0), rec("d", None, 4.0), rec("e", 4.0, 4.5)]
    pairs, s = build_pairs(records, min_margin=0.5)
    assert [p["promptId"] for p in pairs] == ["a", "b"]
    assert s == {"prompts": 5, "pairs": 2, "pairsDropped": 3, "droppedTies": 1, "droppedTooFewScored": 1,
                 "droppedMargin": 1, "droppedTruncated": 0, "droppedIdentical": 0, "droppedInverted": 0,
                 "meanMargin": 2.5, "chosenMeanScore": 4.0, "rejectedMeanScore": 1.5, "responsePairs": 2,
                 "lengthControl": 0.0, "chosenMeanLength": 4.0, "rejectedMeanLength": 4.0}
    none, s0 = build_pairs([rec("c", 3.0, 3.0)])
    assert none == [] and s0["pairs"] == 0 and s0["meanMargin"] is None and s0["chosenMeanScore"] is None


def judged(pid, *responses):
    """responses: (text, score, truncated)"""
    return {"promptId": pid, "prompt": f"prompt {pid}",
            "responses": [{"text": t, "score": s, "truncated": cut} for t, s, cut in responses]}


def test_a_truncated_response_is_never_chosen():
    # the best-scored response was cut at maxNewTokens: the best finished one is chosen
    pair, why = build_pair(judged("a", ("cut off mid-sent", 5.0, True), ("full answer.", 4.0, False),
                                  ("bad.", 1.0, False)))
    assert why is None and pair["chosen"] == "full answer." and pair["chosenScore"] == 4.0
    # a truncated response may still be the rejected one
    pair, _ = build_pair(judged("b", ("good.", 4.0, False), ("rambling and cut", 0.5, True)))
    assert pair["chosen"] == "good." and pair["rejected"] == "rambling and cut"
    # every scored response truncated: no pair, counted under its own reason
    assert build_pair(judged("c", ("x", 5.0, True), ("y", 1.0, True))) == (None, TRUNCATED)
    # the only finished response scores lowest: only truncated ones score above it, no pair
    assert build_pair(judged("d", ("x", 5.0, True), ("y", 1.0, False))) == (None, TRUNCATED)
    _, s = build_pairs([judged("c", ("x", 5.0, True), ("y", 1.0, True))])
    assert s["droppedTruncated"] == 1 and s["pairs"] == 0


def test_identical_texts_never_form_a_pair():
    # the same text judged twice with different scores (judge noise) is not a preference
    assert build_pair(judged("a", ("same", 5.0, False), (" same\n", 1.0, False))) == (None, IDENTICAL)
    # with a third, different text, that one is the rejected response
    pair, _ = build_pair(judged("b", ("same", 5.0, False), ("same", 1.0, False), ("other", 3.0, False)))
    assert pair["chosen"] == "same" and pair["rejected"] == "other" and pair["rejectedScore"] == 3.0
    _, s = build_pairs([judged("a", ("same", 5.0, False), ("same", 1.0, False))])
    assert s["droppedIdentical"] == 1 and s["pairsDropped"] == 1


scores = st.lists(st.one_of(st.none(), st.floats(0, 5, allow_nan=False)), max_size=8)
responses = st.lists(st.tuples(st.sampled_from(["a", "b", "a ", "c", ""]),
                               st.one_of(st.none(), st.floats(0, 5, allow_nan=False)), st.booleans()), max_size=6)


@settings(max_examples=300, deadline=None)
@given(all_responses=st.lists(responses, max_size=8), margin=st.sampled_from([0.0, 0.5]))
def test_pairs_properties_with_truncation_and_duplicates(all_responses, margin):
    records = [judged(str(i), *r) for i, r in enumerate(all_responses)]
    pairs, s = build_pairs(records, margin)
    assert s["pairs"] + s["pairsDropped"] == len(records)
    for p in pairs:
        rs = [r for r in all_responses[int(p["promptId"])] if r[1] is not None and r[0].strip()]
        assert p["chosen"].strip() != p["rejected"].strip()
        assert p["chosenScore"] > p["rejectedScore"]
        finished = [r for r in rs if not r[2]]
        assert p["chosenScore"] == max(r[1] for r in finished)
        assert any(r[0] == p["chosen"] and not r[2] and r[1] == p["chosenScore"] for r in rs)
        assert p["rejectedScore"] == min(r[1] for r in rs if r[0].strip() != p["chosen"].strip())


@settings(max_examples=300, deadline=None)
@given(all_scores=st.lists(scores, max_size=10), margin=st.sampled_from([0.0, 0.5, 1.0]))
def test_pairs_properties(all_scores, margin):
    records = [rec(str(i), *s) for i, s in enumerate(all_scores)]
    pairs, s = build_pairs(records, margin)
    assert s["pairs"] + s["pairsDropped"] == len(records)
    for p in pairs:
        assert p["chosenScore"] > p["rejectedScore"]
        if margin > 0:
            assert p["chosenScore"] - p["rejectedScore"] > margin
        valid = [x for x in all_scores[int(p["promptId"])] if x is not None]
        assert p["chosenScore"] == max(valid) and p["rejectedScore"] == min(valid)
