"""pairs.lengthControl (Meta-Rewarding's length-controlled pair selection): pure
build_pairs, rho = 0 unchanged, the bands, the tie rules, per-iteration rho."""
import pytest
from hypothesis import given, settings, strategies as st

from selfreward.spec import SpecError, parse_spec
from selfreward.worker.pairs import (IDENTICAL, INVERTED, TIE, TOO_FEW, TRUNCATED, build_pair, build_pairs,
                                     response_length)


def judged(pid, *responses):
    """responses: (text, score, truncated, tokens, verdict scores)"""
    return {"promptId": pid, "prompt": f"prompt {pid}",
            "responses": [{"text": t, "score": s, "truncated": cut, "tokens": n, "scores": v}
                          for t, s, cut, n, v in responses]}


def R(text, score, tokens, truncated=False, scores=None):
    return (text, score, truncated, tokens, scores if scores is not None else ([] if score is None else [score]))


def today(record, min_margin):
    """The rule before length control, stated plainly: the best finished response (first
    of equals) against the lowest-scored other text (first of equals)."""
    scored = [r for r in record["responses"]
              if r["score"] is not None and isinstance(r["text"], str) and r["text"].strip()]
    if len(scored) < 2:
        return None, TOO_FEW
    finished = [r for r in scored if not r["truncated"]]
    if not finished:
        return None, TRUNCATED
    best = max(r["score"] for r in finished)
    chosen = next(r for r in finished if r["score"] == best)
    others = [r for r in scored if r["text"].strip() != chosen["text"].strip()]
    if not others:
        return None, IDENTICAL
    low = min(r["score"] for r in others)
    rejected = next(r for r in others if r["score"] == low)
    if best < low:
        return None, TRUNCATED
    if best == low:
        return None, TIE
    if min_margin > 0 and best - low <= min_margin:
        return None, "margin"
    return (chosen["text"], rejected["text"], best, low), None


texts = st.sampled_from(["a", "bb", "a ", "ccc", "", "dddd", "ee"])
response = st.tuples(texts, st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5, 3.0, 4.0, 5.0])), st.booleans(),
                     st.integers(1, 50), st.lists(st.sampled_from([1.0, 3.0, 5.0]), max_size=3))
records = st.lists(st.lists(response, max_size=6), max_size=6)


@settings(max_examples=400, deadline=None)
@given(all_responses=records, margin=st.sampled_from([0.0, 0.5]))
def test_rho_zero_is_the_rule_of_before(all_responses, margin):
    recs = [judged(str(i), *r) for i, r in enumerate(all_responses)]
    pairs, summary = build_pairs(recs, margin, 0.0)
    assert build_pairs(recs, margin) == (pairs, summary)  # the default is rho 0
    expected = [today(r, margin) for r in recs]
    kept = [e for e, _why in expected if e is not None]
    assert [(p["chosen"], p["rejected"], p["chosenScore"], p["rejectedScore"]) for p in pairs] == kept
    # the records are exactly those of before: no field was added
    assert all(set(p) == {"promptId", "prompt", "chosen", "rejected", "chosenScore", "rejectedScore"} for p in pairs)
    for why in (TOO_FEW, TRUNCATED, IDENTICAL, TIE):
        key = {"tooFewScored": "droppedTooFewScored", "truncated": "droppedTruncated", "identical": "droppedIdentical",
               "tie": "droppedTies"}[why]
        assert summary[key] == sum(w == why for _e, w in expected)
    assert summary["droppedInverted"] == 0 and summary["lengthControl"] == 0.0


def test_length_control_picks_the_shortest_good_and_the_longest_bad():
    rec = judged("p", R("long best", 5.0, 90), R("short good", 4.5, 10), R("mid", 3.0, 40),
                 R("short bad", 1.0, 5), R("long bad", 1.5, 80))
    # rho 0: the highest against the lowest, whatever their length
    pair, _ = build_pair(rec, rho=0.0)
    assert (pair["chosen"], pair["rejected"]) == ("long best", "short bad")
    # rho 0.2: chosen band [4.2, 5], rejected band [1, 1.8]
    pair, why = build_pair(rec, rho=0.2)
    assert why is None
    assert (pair["chosen"], pair["rejected"]) == ("short good", "long bad")
    assert (pair["chosenScore"], pair["rejectedScore"]) == (4.5, 1.5)
    assert (pair["chosenLength"], pair["rejectedLength"]) == (10, 80)
    # rho 0.05: chosen band [4.8, 5] holds only the best; rejected band [1, 1.2] only the lowest
    pair, _ = build_pair(rec, rho=0.05)
    assert (pair["chosen"], pair["rejected"]) == ("long best", "short bad")


def test_band_edges_are_inclusive_and_truncated_never_chosen():
    # rho 0.25 over [1, 5]: chosen band [4, 5], rejected band [1, 2]; 4.0 and 2.0 sit on the edges
    rec = judged("e", R("best", 5.0, 50), R("edge good", 4.0, 3), R("cut good", 4.5, 1, truncated=True),
                 R("edge bad", 2.0, 99), R("worst", 1.0, 20), R("outside", 2.01, 500))
    pair, _ = build_pair(rec, rho=0.25)
    assert (pair["chosen"], pair["rejected"]) == ("edge good", "edge bad")
    # a truncated response may still be rejected (the longest in the bottom band)
    rec = judged("t", R("ok", 4.0, 10), R("ok too", 4.0, 30), R("cut", 1.0, 200, truncated=True), R("bad", 1.5, 5))
    pair, _ = build_pair(rec, rho=0.3)
    assert (pair["chosen"], pair["rejected"]) == ("ok", "cut")


def test_ties_in_length_go_to_the_lowest_judge_variance_then_the_first():
    rec = judged("v", R("noisy good", 5.0, 10, scores=[5.0, 5.0, 5.0, 5.0]),
                 R("sure good", 5.0, 10, scores=[5.0, 5.0]),
                 R("noisy bad", 1.0, 30, scores=[0.0, 2.0]), R("sure bad", 1.0, 30, scores=[1.0, 1.0]))
    rec["responses"][0]["scores"] = [4.0, 6.0]  # mean 5, variance 1
    pair, _ = build_pair(rec, rho=0.1)
    assert (pair["chosen"], pair["rejected"]) == ("sure good", "sure bad")
    same = judged("s", R("first", 5.0, 10), R("second", 5.0, 10), R("x", 1.0, 7), R("y", 1.0, 7))
    pair, _ = build_pair(same, rho=0.1)
    assert (pair["chosen"], pair["rejected"]) == ("first", "x")


def test_length_is_tokens_else_characters():
    assert response_length({"text": "abc", "tokens": 17}) == 17
    assert response_length({"text": "abcd"}) == 4
    assert response_length({"text": "abcd", "tokens": True}) == 4  # a bool is not a count
    rec = {"promptId": "c", "prompt": "q", "responses": [
        {"text": "short", "score": 5.0}, {"text": "a much longer answer", "score": 4.8},
        {"text": "bad", "score": 1.0}]}
    assert build_pair(rec, rho=0.1)[0]["chosen"] == "short"


def test_overlapping_bands_never_teach_the_worse_response():
    # rho 1: both bands are every score; the shortest finished one scored 1, the longest 5
    rec = judged("o", R("short", 1.0, 1), R("long", 5.0, 100))
    assert build_pair(rec, rho=1.0) == (None, INVERTED)
    rec = judged("q", R("short", 3.0, 1), R("long", 3.0, 100))
    assert build_pair(rec, rho=0.5) == (None, TIE)
    _, s = build_pairs([judged("o", R("short", 1.0, 1), R("long", 5.0, 100))], rho=1.0)
    assert s["droppedInverted"] == 1 and s["pairs"] == 0 and s["lengthControl"] == 1.0


@settings(max_examples=400, deadline=None)
@given(all_responses=records, margin=st.sampled_from([0.0, 0.5]), rho=st.sampled_from([0.1, 0.25, 0.4, 0.6, 1.0]))
def test_length_control_properties(all_responses, margin, rho):
    recs = [judged(str(i), *r) for i, r in enumerate(all_responses)]
    pairs, s = build_pairs(recs, margin, rho)
    assert s["pairs"] + s["pairsDropped"] == len(recs)
    for p in pairs:
        rs = [r for r in recs[int(p["promptId"])]["responses"] if r["score"] is not None and r["text"].strip()]
        assert p["chosenScore"] > p["rejectedScore"]
        if margin:
            assert p["chosenScore"] - p["rejectedScore"] > margin
        assert p["chosen"].strip() != p["rejected"].strip()
        finished = [r for r in rs if not r["truncated"]]
        s_max, s_min = max(r["score"] for r in finished), min(r["score"] for r in rs)
        top = [r for r in finished if r["score"] >= (1 - rho) * s_max + rho * s_min]
        chosen = [r for r in top if r["text"] == p["chosen"] and r["score"] == p["chosenScore"]]
        assert chosen, "the chosen response is a finished one in the top band"
        assert p["chosenLength"] == min(response_length(r) for r in top)  # the shortest there
        others = [r for r in rs if r["text"].strip() != p["chosen"].strip()]
        low = min(r["score"] for r in others)
        bottom = [r for r in others if r["score"] <= (1 - rho) * low + rho * s_max]
        assert any(r["text"] == p["rejected"] and r["score"] == p["rejectedScore"] for r in bottom)
        assert p["rejectedLength"] == max(response_length(r) for r in bottom)  # the longest there
    assert s["chosenMeanLength"] is None or s["chosenMeanLength"] == pytest.approx(
        sum(p["chosenLength"] for p in pairs) / len(pairs))


BASE = {"model": {"uri": "/m"}, "prompts": {"uri": "/p.jsonl"}, "storage": {"uri": "/tmp/s"}}


def test_rho_per_iteration_and_its_refusals():
    spec = parse_spec({**BASE, "iterations": 3, "pairs": {"lengthControl": [0.0, 0.2, 0.5]}})
    assert [spec.pairs.rho(t) for t in (1, 2, 3)] == [0.0, 0.2, 0.5]
    one = parse_spec({**BASE, "iterations": 2, "pairs": {"lengthControl": 0.3}})
    assert [one.pairs.rho(t) for t in (1, 2)] == [0.3, 0.3]
    assert parse_spec(BASE).pairs.rho(1) == 0.0
    for value, iterations in (([0.1, 0.2], 3), ([0.1, 0.2, 0.3, 0.4], 3), ([], 1)):
        with pytest.raises(SpecError, match=r"pairs\.lengthControl.*for 3 iterations|pairs\.lengthControl.*for 1 iter"):
            parse_spec({**BASE, "iterations": iterations, "pairs": {"lengthControl": value}})
    for bad in (1.5, -0.1, [0.2, 1.01, 0.0], "0.2", True):
        with pytest.raises(SpecError, match=r"pairs\.lengthControl"):
            parse_spec({**BASE, "iterations": 3, "pairs": {"lengthControl": bad}})
