"""Building preference pairs from judged records (pure, no storage)."""
from hypothesis import given, settings, strategies as st

from selfreward.worker.pairs import MARGIN, TIE, TOO_FEW, build_pair, build_pairs


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
                 "droppedMargin": 1, "meanMargin": 2.5, "chosenMeanScore": 4.0, "rejectedMeanScore": 1.5}
    none, s0 = build_pairs([rec("c", 3.0, 3.0)])
    assert none == [] and s0["pairs"] == 0 and s0["meanMargin"] is None and s0["chosenMeanScore"] is None


scores = st.lists(st.one_of(st.none(), st.floats(0, 5, allow_nan=False)), max_size=8)


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
