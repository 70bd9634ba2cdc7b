"""The saturation guard: the judge summary's top-score share and spread, the thresholds
(judge.saturation), the JudgeSaturated Event and condition in reconcile, and the eval
gate's onJudgeSaturated."""
import pytest

from selfreward import evaluation as E
from selfreward.judging import judge_response, saturation, score_stats
from selfreward.reconcile import CreateJob, Event
from selfreward.spec import JudgeSpec, SaturationSpec, SpecError, parse_spec
from selfreward.status import RunStatus
from test_reconcile import Sim, created, make_run
from test_reconcile_eval import EVAL, eval_summary, through


def judged(*scores_per_response):
    judge = JudgeSpec()
    return [{"responses": [judge_response(f"r{i}", [f"Score: {s}" for s in ss], judge)
                           for i, ss in enumerate(scores_per_response)]}]


def test_top_share_counts_scored_responses_at_the_top():
    s = score_stats(judged([5, 5], [5], [4, 5], [3], ["x"]), top=5.0)
    # four scored responses (the fifth has no score): two at 5 (5,5 and 5), 4.5 and 3 are not
    assert s["scoredResponses"] == 4 and s["topScoreShare"] == 0.5
    assert score_stats(judged(["x"]), top=5.0)["topScoreShare"] is None
    assert "topScoreShare" not in score_stats(judged([5]))  # no top given: no share


def test_thresholds_on_either_side():
    guard = SaturationSpec(maxTopShare=0.9, minStd=0.25)
    assert saturation({"topScoreShare": 0.9, "scoreStd": 0.25, "scoredResponses": 10}, guard) is None  # at: fine
    why = saturation({"topScoreShare": 0.95, "scoreStd": 1.0, "scoredResponses": 10}, guard)
    assert "95% of the scored responses got the top score" in why and "maxTopShare 0.9" in why
    why = saturation({"topScoreShare": 0.2, "scoreStd": 0.2, "scoredResponses": 10}, guard)
    assert "std 0.2" in why and "minStd 0.25" in why and "top score" not in why
    assert "; " in saturation({"topScoreShare": 1.0, "scoreStd": 0.0, "scoredResponses": 10}, guard)
    # switched off: maxTopShare 1, minStd 0
    off = SaturationSpec(maxTopShare=1.0, minStd=0.0)
    assert saturation({"topScoreShare": 1.0, "scoreStd": 0.0, "scoredResponses": 10}, off) is None
    # one scored response has no spread to judge; nothing scored, nothing to say
    assert saturation({"topScoreShare": 0.0, "scoreStd": 0.0, "scoredResponses": 1}, guard) is None
    assert saturation({"topScoreShare": None, "scoreStd": None, "scoredResponses": 0}, guard) is None


BASE = {"model": {"uri": "/m"}, "prompts": {"uri": "/p.jsonl"}, "storage": {"uri": "/tmp/s"}}


def test_spec_fields_and_refusals():
    spec = parse_spec(BASE)
    assert (spec.judge.saturation.maxTopShare, spec.judge.saturation.minStd) == (0.9, 0.25)
    for bad, where in (({"maxTopShare": 1.5}, "judge.saturation.maxTopShare"),
                       ({"minStd": -1}, "judge.saturation.minStd"), ({"typo": 1}, "judge.saturation.typo")):
        with pytest.raises(SpecError, match=where.replace(".", r"\.")):
            parse_spec({**BASE, "judge": {"saturation": bad}})
    with pytest.raises(SpecError, match=r"eval\.gate\.onJudgeSaturated"):
        parse_spec({**BASE, "eval": {"judgeSet": {"uri": "/j"}, "gate": {"metric": "judgePairwiseAccuracy",
                                                                         "onJudgeSaturated": "explode"}}})


def _gate(gate, saturated, value=0.8, previous_value=0.7):
    prev = [{"judgePairwiseAccuracy": previous_value, "model": "M1", "checkpoint": "iter-0/sft/checkpoint",
             "iteration": 0, "rollbacks": 0}]
    cur = {"judgePairwiseAccuracy": value, "model": "M2", "checkpoint": "iter-1/train/checkpoint", "iteration": 1}
    return E.gate_decision("judgePairwiseAccuracy", True, gate, prev, cur, judge_saturated=saturated)


def test_gate_acts_on_a_saturated_judge_only_when_asked():
    gate = {"minChange": 0.0, "action": "warn", "maxRollbacks": 1, "onJudgeSaturated": None}
    assert _gate(gate, True)["gatePassed"] is True  # not asked: the Warning Event is all
    asked = {**gate, "onJudgeSaturated": "stop"}
    out = _gate(asked, True)
    assert (out["gatePassed"], out["gateAction"], out["gateReason"]) == (False, "stop", "judgeSaturated")
    assert _gate(asked, False)["gatePassed"] is True and "gateReason" not in _gate(asked, False)
    # a failure on the metric keeps the gate's own action
    out = _gate(asked, True, value=0.6)
    assert (out["gateAction"], out["gateReason"]) == ("warn", "metric")
    # rollback goes back to the best model before the saturated judge's iteration, even
    # when this one scores better
    out = _gate({**gate, "onJudgeSaturated": "rollback"}, True)
    assert out["gateAction"] == "rollback" and out["nextPolicy"] == "iter-0/sft/checkpoint"
    assert out["bestModel"] == "M2" and out["rollbacks"] == 1
    # without a gate nothing acts
    assert _gate(None, True)["gatePassed"] is True


def test_reconcile_records_a_saturated_judge_as_warning_and_condition():
    sim = Sim(make_run(iterations=2))
    sim.step()
    message = "iter-1/judge: the judge looks saturated: 95% of the scored responses got the top score"
    sim.complete("r-i1-generate", {"prompts": 4})
    sim.step(1)
    sim.complete("r-i1-judge", {"judgedResponses": 16, "topScoreShare": 0.95, "judgeSaturated": True,
                                "judgeSaturatedFlag": 1, "saturationMessage": message})
    res = sim.step(1)
    warn = [e for e in res.of(Event) if e.reason == "JudgeSaturated"]
    assert warn == [Event("Warning", "JudgeSaturated", message)]
    c = sim.cond("JudgeSaturated")
    assert (c["status"], c["reason"], c["message"]) == ("True", "JudgeSaturated", message)
    assert created(res) == ["r-i1-pairs"]  # a warning: the run goes on
    h = sim.status["history"][0]
    assert h["topScoreShare"] == 0.95 and h["judgeSaturated"] == 1
    # the condition stays while nothing new is judged, without a second Event
    again = sim.step(1)
    assert not [e for e in again.of(Event) if e.reason == "JudgeSaturated"]
    assert sim.cond("JudgeSaturated")["status"] == "True"
    through(sim, [("r-i1-pairs", {"pairs": 3}), ("r-i1-train", {"dpoLoss": 0.6}), ("r-i2-generate", {})])
    sim.complete("r-i2-judge", {"judgedResponses": 16, "topScoreShare": 0.4, "judgeSaturated": False,
                                "judgeSaturatedFlag": 0})
    res = sim.step(1)
    assert not [e for e in res.of(Event) if e.reason == "JudgeSaturated"]
    c = sim.cond("JudgeSaturated")
    assert (c["status"], c["reason"]) == ("False", "NotSaturated")
    assert sim.status["history"][1]["judgeSaturated"] == 0
    RunStatus.model_validate(sim.status)


def test_a_run_that_never_saturates_has_no_such_condition():
    sim = Sim(make_run(iterations=1))
    sim.step()
    through(sim, [("r-i1-generate", {}), ("r-i1-judge", {"judgeSaturated": False, "judgeSaturatedFlag": 0})])
    assert "JudgeSaturated" not in [c["type"] for c in sim.status["conditions"]]


def test_the_gate_event_names_the_saturated_judge():
    sim = Sim(make_run(iterations=2, eval={**EVAL, "gate": {"action": "warn", "onJudgeSaturated": "stop"}}))
    sim.step()
    through(sim, [("r-i0-eval", eval_summary(0, 40.0)), ("r-i1-generate", {}),
                  ("r-i1-judge", {"judgeSaturated": True, "saturationMessage": "saturated"}),
                  ("r-i1-pairs", {"pairs": 3}), ("r-i1-train", {})])
    sim.complete("r-i1-eval", eval_summary(1, 50.0, gatePassed=False, gateAction="stop", gateReason="judgeSaturated",
                                           bestModel="M2", bestValue=50.0))
    res = sim.step(1)
    stop = [e for e in res.of(Event) if e.reason == "EarlyStopped"]
    assert len(stop) == 1 and "the judge is saturated (eval.gate.onJudgeSaturated)" in stop[0].message
    assert sim.status["phase"] == "Succeeded" and not res.of(CreateJob)


def test_a_colocated_judge_that_saturates_warns_as_a_judge_job_would():
    """judge.colocate: the judge step completes from the generate Job's report; its
    saturation still becomes the Warning and the condition."""
    sim = Sim(make_run(iterations=1, judge={"colocate": True}))
    sim.step()
    message = "iter-1/judge: the judge looks saturated: 97% of the scored responses got the top score"
    sim.complete("r-i1-generate", {"phases": {"generate": {"prompts": 4},
                                              "judge": {"judgedResponses": 16, "topScoreShare": 0.97,
                                                        "judgeSaturated": True, "judgeSaturatedFlag": 1,
                                                        "saturationMessage": message}}})
    res = sim.step(1)
    assert [e for e in res.of(Event) if e.reason == "JudgeSaturated"] == [Event("Warning", "JudgeSaturated", message)]
    assert sim.cond("JudgeSaturated")["status"] == "True"
    assert created(res) == ["r-i1-pairs"]
