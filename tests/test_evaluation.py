"""The eval phase's figures and gate as pure functions, against values computed by hand
(and, where a library has the same statistic, against it)."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfreward import evaluation as E


def test_average_ranks_share_ties():
    assert E.average_ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    assert E.average_ranks([5, 5, 5]) == [2, 2, 2]
    assert E.average_ranks([3, 1, 2]) == [3, 1, 2]


def test_spearman_by_hand():
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert E.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # a tie: Pearson on the ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4] = 4.5 / sqrt(4.5 * 5)
    assert E.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    assert E.spearman([1, 2, 3], [9, 5, 1]) == pytest.approx(-1.0)
    assert E.spearman([2, 2, 2], [1, 2, 3]) is None  # constant side: undefined, not 0 or NaN
    assert E.spearman([1], [1]) is None


def test_kendall_tau_b_by_hand():
    # pairs: 5 concordant, 1 tied in x only: (5 - 0) / sqrt((6 - 1) * (6 - 0))
    assert E.kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert E.kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # 2 concordant, 1 discordant, no ties
    assert E.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert E.kendall_tau_b([1, 1], [2, 3]) is None


def test_against_scipy_when_present():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0]
    y = [2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0, 2.0]
    assert E.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert E.kendall_tau_b(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)


def test_pairwise_accuracy_counts_ties_and_unscored_as_half():
    groups = [
        # (0,1) agrees: 1; (0,2) and (1,2) have an unscored side: 1/2 each
        ([3, 1, 2], [4.0, 2.0, None]),
        # equal labels are skipped; the model's ties are 1/2
        ([1, 1, 2], [3.0, 3.0, 3.0]),
    ]
    points, pairs = E.pairwise_accuracy(groups)
    assert (points, pairs) == (3.0, 5)
    # a judge that orders every pair the wrong way gets 0
    assert E.pairwise_accuracy([([1, 2, 3], [3.0, 2.0, 1.0])]) == (0.0, 3)


def test_calibration_figures():
    groups = [([3, 1, 3], [4.0, 4.0, 2.0]), ([2, 1], [2.5, 1.4]), ([5, 0], [None, None])]
    out = E.calibration(groups, verdicts=21, failures=6)
    assert out["judgeSetPrompts"] == 3 and out["judgeSetResponses"] == 7
    # pairs with different labels: (0,1), (1,2) in the first group; (0,1) in the others
    # first group: (0,1) scores tie -> 1/2, (1,2) 4 > 2 but label 1 < 3 -> 0; second: 1; third: 1/2
    assert out["judgeSetPairs"] == 4 and out["judgePairwiseAccuracy"] == pytest.approx(2 / 4)
    # exact: 4 vs 3 no, 4 vs 1 no, 2 vs 3 no, round(2.5) = 3 vs 2 no... 1.4 -> 1 vs 1 yes; unscored are misses
    assert out["judgeExactMatch"] == pytest.approx(1 / 7)
    # best: first group's top score 4 is held by labels 3 and 1 -> 1/2; second 1; third nothing scored -> 0
    assert out["judgeBestAgreement"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert out["judgeParseFailureRate"] == pytest.approx(6 / 21)
    assert out["judgeSpearman"] == pytest.approx(E.spearman([4, 4, 2, 2.5, 1.4], [3, 1, 3, 2, 1]))


def test_wilson_interval_by_hand():
    lo, hi = E.wilson(0.5, 10)
    assert (lo, hi) == (pytest.approx(0.236593, abs=1e-5), pytest.approx(0.763407, abs=1e-5))
    lo, hi = E.wilson(1.0, 5)  # 5 of 5: the interval still admits 0.57
    assert lo == pytest.approx(0.565518, abs=1e-5) and hi == 1.0
    lo, hi = E.wilson(0.0, 5)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.565518, abs=1e-5)
    with pytest.raises(ValueError):
        E.wilson(0.5, 0)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.integers(1, 10_000))
def test_wilson_contains_the_estimate(p, n):
    lo, hi = E.wilson(p, n)
    assert 0.0 <= lo <= p + 1e-12 and p - 1e-12 <= hi <= 1.0


def test_outcome_of_both_orders():
    # first order shows (new, old), the second (old, new)
    assert E.outcome("a", "b") == 1.0  # new won in both orders
    assert E.outcome("b", "a") == 0.0
    assert E.outcome("a", "a") == 0.5  # the evaluator always picks the first: position bias cancels
    assert E.outcome("tie", "b") == 0.75
    assert E.outcome(None, "b") == 1.0  # one order unparsed: the other counts alone
    assert E.outcome(None, None) is None


def test_head_to_head_win_rate_and_length_match():
    outcomes = [1.0, 0.5, 0.0, 1.0, None]
    new = [10, 30, 10, 100, 5]
    old = [11, 10, 10, 50, 5]
    out = E.head_to_head(outcomes, new, old, "VsPrevious", "previous")
    assert out["comparedVsPrevious"] == 4
    assert out["winRateVsPrevious"] == pytest.approx(2.5 / 4)
    lo, hi = E.wilson(2.5 / 4, 4)
    assert out["winRateVsPreviousLow"] == pytest.approx(lo) and out["winRateVsPreviousHigh"] == pytest.approx(hi)
    # within 20%: (10, 11) and (10, 10) only; the long answers that won are left out
    assert out["lengthMatchedVsPrevious"] == 2 and out["winRateVsPreviousLengthMatched"] == pytest.approx(0.5)
    assert out["previousMeanTokens"] == pytest.approx((11 + 10 + 10 + 50) / 4)
    assert E.head_to_head([None], [1], [1], "VsBaseline", "baseline") == {"comparedVsBaseline": 0}


def test_lengths_and_histogram():
    assert E.length_figures("chosen", [1, 2, 10]) == {"chosenMeanTokens": pytest.approx(13 / 3), "chosenMedianTokens": 2.0}
    assert E.length_figures("x", []) == {}
    hist = E.score_histogram([0, 1, 1, 2.5, 4.4, 5, 7, -1])
    assert hist == {"scoreHist0": 2, "scoreHist1": 2, "scoreHist2": 0, "scoreHist3": 1, "scoreHist4": 1,
                    "scoreHist5": 2}


# --- the gate -------------------------------------------------------------------------

def ev(t, value, **kw):
    return {"iteration": t, "model": f"M{t + 1}", "checkpoint": f"c{t}", "verifierScore": value, **kw}


def decide(gate, previous, current):
    return E.gate_decision("verifierScore", True, gate, previous, current)


def test_gate_first_model_passes_and_is_best():
    out = decide({"action": "stop"}, [], ev(0, 40.0))
    assert out["gatePassed"] is True and out["gateAction"] == "none"
    assert out["bestModel"] == "M1" and out["bestCheckpoint"] == "c0" and out["nextPolicy"] == "c0"


def test_gate_improvement_below_min_change_fails():
    gate = {"minChange": 5.0, "action": "warn"}
    out = decide(gate, [ev(0, 40.0)], ev(1, 44.0))
    assert out["gatePassed"] is False and out["gateAction"] == "warn" and out["gateChange"] == pytest.approx(4.0)
    # still the better model: it becomes the best, and the next iteration starts from it
    assert out["bestModel"] == "M2" and out["nextPolicy"] == "c1"
    out = decide(gate, [ev(0, 40.0)], ev(1, 45.0))
    assert out["gatePassed"] is True and out["gateAction"] == "none"


def test_gate_rollback_names_the_best_then_stops_after_k():
    gate = {"minChange": 0.0, "action": "rollback", "maxRollbacks": 1}
    first = decide(gate, [ev(0, 40.0), ev(1, 50.0)], ev(2, 45.0))
    assert first["gateAction"] == "rollback" and first["rollbacks"] == 1
    assert first["bestModel"] == "M2" and first["nextPolicy"] == "c1" and first["bestValue"] == 50.0
    second = decide(gate, [ev(0, 40.0), ev(1, 50.0), ev(2, 45.0, **first)], ev(3, 48.0))
    assert second["gateAction"] == "stop" and second["bestCheckpoint"] == "c1"


def test_gate_stop_and_lower_is_better():
    out = E.gate_decision("judgeParseFailureRate", False, {"action": "stop"},
                          [{"iteration": 0, "model": "M1", "checkpoint": "", "judgeParseFailureRate": 0.2}],
                          {"iteration": 1, "model": "M2", "checkpoint": "c1", "judgeParseFailureRate": 0.3})
    assert out["gatePassed"] is False and out["gateAction"] == "stop" and out["gateChange"] == pytest.approx(-0.1)
    assert out["bestModel"] == "M1" and out["bestCheckpoint"] == ""  # "" = the base model


def test_gate_missing_value_fails_and_no_gate_never_acts():
    out = decide({"action": "warn"}, [ev(0, 40.0)], {"iteration": 1, "model": "M2", "checkpoint": "c1"})
    assert out["gatePassed"] is False and out["gateAction"] == "warn" and out["bestModel"] == "M1"
    out = decide(None, [ev(0, 40.0)], ev(1, 10.0))
    assert out["gateAction"] == "none" and out["gatePassed"] is True and out["bestModel"] == "M1"
    # a tie keeps the earlier model
    assert decide(None, [ev(0, 40.0)], ev(1, 40.0))["bestModel"] == "M1"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 100)), min_size=1, max_size=8),
       st.sampled_from(["warn", "stop", "rollback"]), st.floats(-5, 5), st.integers(0, 3))
def test_gate_over_a_run_of_evaluations(values, action, min_change, max_rollbacks):
    """Fed its own outputs eval after eval: the best is the best value seen, rollbacks
    stay within maxRollbacks, and a rollback always names the best model."""
    gate = {"action": action, "minChange": min_change, "maxRollbacks": max_rollbacks}
    previous: list[dict] = []
    for t, v in enumerate(values):
        cur = {"iteration": t, "model": f"M{t + 1}", "checkpoint": f"c{t}", **({"verifierScore": v} if v is not None else {})}
        out = decide(gate, previous, cur)
        seen = [x for x in values[:t + 1] if x is not None]
        if seen:
            assert out["bestValue"] == max(seen)
            first_best = next(i for i, x in enumerate(values[:t + 1]) if x == max(seen))
            assert out["bestModel"] == f"M{first_best + 1}"
        assert out["rollbacks"] <= max_rollbacks
        if out["gateAction"] == "rollback":
            assert out["nextPolicy"] == out["bestCheckpoint"] and out["gatePassed"] is False
        elif out["gateAction"] == "none":
            assert out["gatePassed"] is True and out["nextPolicy"] == f"c{t}"
        previous.append({**cur, **out})
        if out["gateAction"] == "stop":
            break
