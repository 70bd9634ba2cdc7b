"""Reconcile with spec.eval: the eval steps in the plan, their figures in the history,
and the gate's three actions (stop, rollback, warn) read from the eval summaries."""
from selfreward.reconcile import CreateJob, Event, reconcile
from selfreward.status import RunStatus
from test_reconcile import SETTINGS, Sim, created, make_run

EVAL = {"judgeSet": {"uri": "/d/judge.jsonl"}, "prompts": {"uri": "/d/heldout.jsonl"}, "verifier": "task:verify"}
SFT = {"instructionDataUri": "/d/ift.jsonl"}


def eval_summary(t, value, **gate):
    s = {"model": f"M{t + 1}", "checkpoint": f"iter-{t}/train/checkpoint" if t else "iter-0/sft/checkpoint",
         "verifierScore": value, "judgePairwiseAccuracy": 0.75, "winRateVsPrevious": 0.6,
         "gateMetric": "verifierScore", "gateValue": value, "gatePassed": True, "gateAction": "none",
         "bestModel": f"M{t + 1}", "bestValue": value, "bestCheckpoint": f"iter-{t}/train/checkpoint" if t else
         "iter-0/sft/checkpoint", "rollbacks": 0}
    s.update(gate)
    return s


def through(sim, names_and_summaries):
    res = None
    for name, summary in names_and_summaries:
        assert name in sim.jobs, (name, sorted(sim.jobs))
        sim.complete(name, summary)
        res = sim.step(1)
    return res


def iteration(t, value, **gate):
    return [(f"r-i{t}-generate", {"prompts": 4}), (f"r-i{t}-judge", {"judgedResponses": 16}),
            (f"r-i{t}-pairs", {"pairs": 3}), (f"r-i{t}-train", {"dpoLoss": 0.69}),
            (f"r-i{t}-eval", eval_summary(t, value, **gate))]


def test_eval_steps_history_progress_and_sft_loss():
    sim = Sim(make_run(iterations=1, sft=SFT, eval=EVAL))
    assert created(sim.step()) == ["r-i0-sft"]
    sim.complete("r-i0-sft", {"trainLoss": 1.25, "finalTrainLoss": 1.5})
    assert created(sim.step(1)) == ["r-i0-eval"]
    assert sim.status["currentPhase"] == "eval" and "iteration 0 (baseline)" in sim.status["message"]
    h0 = sim.status["history"][0]
    assert h0["sftLoss"] == 1.25 and "endTime" not in h0  # iteration 0 ends with its eval now
    sim.complete("r-i0-eval", eval_summary(0, 40.0))
    assert created(sim.step(1)) == ["r-i1-generate"]
    h0 = sim.status["history"][0]
    assert h0["verifierScore"] == 40.0 and h0["judgePairwiseAccuracy"] == 0.75 and h0["endTime"]
    assert sim.status["lastEval"] == 40.0 and sim.status["evalMetric"] == "verifierScore"
    assert sim.status["bestCheckpoint"] == "s3://bucket/r/iter-0/sft/checkpoint"
    through(sim, iteration(1, 50.0)[:4])
    # trained but not evaluated yet: the iteration is not finished
    assert sim.status["progress"] == "0/1" and created(sim.step()) == [] and "r-i1-eval" in sim.jobs
    assert "endTime" not in sim.status["history"][1]
    through(sim, iteration(1, 50.0)[4:])
    st = sim.status
    assert st["phase"] == "Succeeded" and st["progress"] == "1/1"
    assert st["finalCheckpoint"] == "s3://bucket/r/iter-1/train/checkpoint"
    assert st["history"][1]["verifierScore"] == 50.0 and st["history"][1]["winRateVsPrevious"] == 0.6
    assert st["bestCheckpoint"] == "s3://bucket/r/iter-1/train/checkpoint"
    RunStatus.model_validate(st)


def test_gate_stop_ends_the_run_early_with_the_best_model():
    sim = Sim(make_run(iterations=3, sft=SFT, eval={**EVAL, "gate": {"action": "stop"}}))
    sim.step()
    through(sim, [("r-i0-sft", {}), ("r-i0-eval", eval_summary(0, 40.0))])
    res = through(sim, iteration(1, 30.0, gatePassed=False, gateAction="stop", gateChange=-10.0, bestModel="M1",
                                 bestValue=40.0, bestCheckpoint="iter-0/sft/checkpoint"))
    st = sim.status
    assert created(res) == [] and not any(n.startswith("r-i2") for n in sim.jobs)
    assert st["phase"] == "Succeeded" and st["earlyStopped"] == "iter-1/eval"
    assert sim.cond("Ready")["reason"] == "EarlyStopped" and sim.cond("Succeeded")["status"] == "True"
    assert st["finalCheckpoint"] == st["bestCheckpoint"] == "s3://bucket/r/iter-0/sft/checkpoint"
    stop = [e for e in res.of(Event) if e.reason == "EarlyStopped"]
    assert len(stop) == 1 and "verifierScore 30 (-10)" in stop[0].message and "M1 at 40" in stop[0].message
    assert "Succeeded" in [e.reason for e in res.of(Event)]
    # it stays stopped: later passes create nothing and send no Event (the next pass lets
    # the recorded eval Job expire, as for any finished step)
    from selfreward.reconcile import SetJobTTL

    assert sim.step(60).actions == [SetJobTTL("r-i1-eval", 86400)]
    again = sim.step(60)
    assert again.actions == [] and again.status["phase"] == "Succeeded"
    assert sim.cond("Ready")["reason"] == "EarlyStopped"


def test_gate_stop_is_found_again_from_the_jobs_after_a_lost_status():
    sim = Sim(make_run(iterations=2, eval={**EVAL, "gate": {"action": "stop"}}))
    sim.step()
    through(sim, [("r-i0-eval", eval_summary(0, 40.0))])
    through(sim, iteration(1, 30.0, gatePassed=False, gateAction="stop", bestCheckpoint=""))
    res = reconcile(sim.run, {}, list(sim.jobs.values()), sim.now, SETTINGS)
    assert res.of(CreateJob) == [] and res.status["earlyStopped"] == "iter-1/eval"
    assert res.status["finalCheckpoint"] == "/models/base"  # "" = the base model (no SFT)


def test_gate_rollback_goes_on_with_an_event():
    sim = Sim(make_run(iterations=3, eval={**EVAL, "gate": {"action": "rollback"}}))
    sim.step()
    through(sim, [("r-i0-eval", eval_summary(0, 40.0))])
    res = through(sim, iteration(1, 30.0, gatePassed=False, gateAction="rollback", rollbacks=1, bestModel="M1",
                                 bestCheckpoint="", nextPolicy=""))
    assert created(res) == ["r-i2-generate"] and sim.status["rollbacks"] == 1
    (ev,) = [e for e in sim.events if e.reason == "RolledBack"]
    assert ev.type == "Warning" and "starts again from M1" in ev.message
    assert sim.status["phase"] == "Running"


def test_gate_warn_sends_a_warning_and_goes_on():
    sim = Sim(make_run(iterations=2, eval={**EVAL, "gate": {"action": "warn", "minChange": 5}}))
    sim.step()
    through(sim, [("r-i0-eval", eval_summary(0, 40.0))])
    res = through(sim, iteration(1, 42.0, gatePassed=False, gateAction="warn", gateChange=2.0))
    assert created(res) == ["r-i2-generate"]
    (ev,) = [e for e in sim.events if e.reason == "GateFailed"]
    assert ev.type == "Warning" and "verifierScore 42 (+2)" in ev.message
    assert not [e for e in sim.events if e.reason in ("RolledBack", "EarlyStopped")]
    # a passing gate sends nothing
    through(sim, iteration(2, 50.0))
    assert len([e for e in sim.events if e.reason == "GateFailed"]) == 1
    assert sim.status["phase"] == "Succeeded" and sim.cond("Ready")["reason"] == "Succeeded"


def test_without_eval_nothing_changes():
    sim = Sim(make_run(iterations=1))
    sim.step()
    through(sim, iteration(1, 0.0)[:4])
    st = sim.status
    assert st["phase"] == "Succeeded" and "r-i1-eval" not in sim.jobs and "r-i0-eval" not in sim.jobs
    assert not {"bestCheckpoint", "lastEval", "evalMetric", "earlyStopped"} & set(st)
