"""GPU-seconds and spec.budget in the pure reconcile function: pods with start and finish
times and GPU requests, summed per phase, iteration and run; the step a budget refuses;
pods gone before they were read."""
import copy
import json
from datetime import timedelta

import pytest

from selfreward import budget as B
from selfreward import jobs as J
from selfreward.reconcile import CreateJob, Event, reconcile
from selfreward.status import RunStatus
from test_reconcile import SETTINGS, T0, Sim, make_run

# GPUs per pod of each phase, and how long each phase's pods run (seconds): all different,
# so a figure charged to the wrong phase, or time not multiplied by the GPUs, shows
GPUS = {"generate": 1, "judge": 2, "pairs": 0, "train": 1}
SECONDS = {"generate": 100, "judge": 300, "pairs": 7, "train": 400}
RESOURCES = {"default": {"gpus": 1}, "judge": {"gpus": 2}, "pairs": {"gpus": 0}}
ITERATION_GPU_SECONDS = sum(GPUS[p] * SECONDS[p] * (2 if p == "judge" else 1) for p in GPUS)  # judge: 2 shards


def budget_run(gen=1, **budget):
    return make_run(gen=gen, resources=RESOURCES, judge={"shards": 2},
                    **({"budget": budget} if budget else {}))


def pod_of(job, index, start, seconds, exit_code=0, message="{}"):
    """A finished pod of the Job as the API server shows it: the template's containers
    (their GPU requests) and a terminated state with its start and finish."""
    end = start + timedelta(seconds=seconds)
    containers = copy.deepcopy(job["spec"]["template"]["spec"]["containers"])
    term = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message,
            "startedAt": J.format_time(start), "finishedAt": J.format_time(end)}
    return {"metadata": {"name": f"{job['metadata']['name']}-{index}"},
            "spec": {"containers": containers},
            "status": {"phase": "Succeeded" if exit_code == 0 else "Failed", "startTime": J.format_time(start),
                       "containerStatuses": [{"name": "worker", "imageID": "img@sha256:1",
                                              "state": {"terminated": term}}]}}


def play(sim, name, seconds, ok=True, summary=None, pods=True):
    """Finish a running Job after ``seconds``: every completion's pod ran that long."""
    job = copy.deepcopy(sim.jobs[name])
    start = sim.now
    sim.now = start + timedelta(seconds=seconds)
    n = int(job["spec"].get("completions") or 1)
    ts = J.format_time(sim.now)
    job["status"] = {"startTime": J.format_time(start),
                     "conditions": [{"type": "Complete" if ok else "Failed", "status": "True",
                                     "lastTransitionTime": ts}]}
    job["status"].update({"succeeded": n, "completionTime": ts} if ok else {"failed": 1})
    msg = json.dumps(summary or {"durationSeconds": seconds})
    job["pods"] = ([pod_of(job, i, start, seconds, 0 if ok else 1, msg if ok else json.dumps({"error": "boom"}))
                    for i in range(n if ok else 1)] if pods else [])
    sim.jobs[name] = job


def one_iteration(sim, t):
    for phase in ("generate", "judge", "pairs", "train"):
        res = sim.step()
        assert f"r-i{t}-{phase}" in sim.jobs, (phase, res.status.get("message"))
        play(sim, f"r-i{t}-{phase}", SECONDS[phase])


def test_gpu_seconds_per_phase_iteration_and_run_with_their_cost():
    sim = Sim(budget_run(pricePerGpuHour=3.6))
    one_iteration(sim, 1)
    one_iteration(sim, 2)
    res = sim.step()
    st = RunStatus.model_validate(res.status)
    assert st.phase == "Succeeded"
    for rec in st.history:
        assert rec.gpuSecondsByPhase == {"generate": 100.0, "judge": 1200.0, "pairs": 0.0, "train": 400.0}
        assert rec.gpuSeconds == ITERATION_GPU_SECONDS == 1700
        assert rec.cost == pytest.approx(1.7)  # 1700 GPU-seconds at 3.6 per GPU-hour
        assert rec.gpuSecondsEstimated is None
    assert st.gpuSeconds == 3400 and st.cost == pytest.approx(3.4)
    assert st.gpuSecondsByPhase == {"generate": 200.0, "judge": 2400.0, "pairs": 0.0, "train": 800.0}
    assert st.costByPhase["judge"] == pytest.approx(2.4)
    done = [e.message for e in sim.events if e.reason == "StepCompleted"]
    assert any(m.startswith("iter-1/judge completed") and "gpuSeconds=1200" in m for m in done)


def test_a_failed_attempt_is_charged_to_its_step():
    sim = Sim(budget_run())
    sim.step()
    play(sim, "r-i1-generate", 50, ok=False)
    sim.step()
    res = sim.step(10)
    assert "r-i1-generate-r2" in [a.name for a in res.of(CreateJob)]
    play(sim, "r-i1-generate-r2", 100)
    st = sim.step().status
    assert st["history"][0]["gpuSecondsByPhase"] == {"generate": 150.0}
    assert st["gpuSeconds"] == 150.0
    again = sim.step().status  # a later pass charges nothing twice
    assert again["gpuSeconds"] == 150.0


def test_a_step_that_would_cross_the_budget_is_not_started_and_the_run_keeps_its_best_model():
    # iteration 1 uses 1700 GPU-seconds; the budget is 3300: iteration 2's generate (est.
    # 100), judge (est. 1200, to 3000) and pairs (est. 0) run; train (est. 400, to 3400) does not
    limit_hours = 3300 / 3600
    sim = Sim(budget_run(maxGpuHours=limit_hours, pricePerGpuHour=2.0))
    one_iteration(sim, 1)
    for phase in ("generate", "judge", "pairs"):
        sim.step()
        play(sim, f"r-i2-{phase}", SECONDS[phase])
    res = sim.step()
    assert "r-i2-train" not in sim.jobs and not res.of(CreateJob)
    st = res.status
    assert st["phase"] == "Succeeded" and sim.cond("Succeeded")["reason"] == "BudgetExhausted"
    assert sim.cond("Ready")["status"] == "True"
    assert st["finalCheckpoint"] == "s3://bucket/r/iter-1/train/checkpoint"
    assert st["message"].startswith("budget exhausted before iter-2/train: 0.8333 of 0.9167 GPU-hours used and "
                                    "the step is estimated at 0.1111 more (what iter-1/train used)")
    assert "cost so far 1.66667" in st["message"] and st["completionTime"] and "activeJob" not in st
    assert [e.reason for e in res.of(Event) if e.reason != "StepCompleted"] == ["BudgetExhausted", "Succeeded"]
    # the next pass finds the same and says nothing new
    again = sim.step(30)
    assert not again.of(CreateJob) and not again.of(Event) and again.status["completionTime"] == st["completionTime"]


def test_a_step_that_lands_exactly_on_the_budget_still_starts():
    sim = Sim(budget_run(maxGpuHours=(1700 + 1300) / 3600))  # iteration 1, then 2's generate and judge
    one_iteration(sim, 1)
    sim.step()
    play(sim, "r-i2-generate", 100)
    sim.step()
    assert "r-i2-judge" in sim.jobs
    play(sim, "r-i2-judge", 300)
    sim.step()
    assert "r-i2-pairs" in sim.jobs  # at the budget, a step estimated at 0 more still runs
    play(sim, "r-i2-pairs", SECONDS["pairs"])
    st = sim.step().status
    assert "r-i2-train" not in sim.jobs and sim.cond("Succeeded")["reason"] == "BudgetExhausted"
    assert st["gpuSeconds"] == 3000.0


def test_without_an_estimate_a_step_starts_until_the_budget_is_used_up_then_nothing_trained_fails():
    sim = Sim(budget_run(maxGpuHours=0.05))  # 180 GPU-seconds
    sim.step()
    play(sim, "r-i1-generate", 100)
    sim.step()  # no iteration before: judge has no estimate, 100 < 180 used: it starts
    assert "r-i1-judge" in sim.jobs
    play(sim, "r-i1-judge", 300)
    res = sim.step()
    assert "r-i1-pairs" not in sim.jobs
    assert res.status["phase"] == "Failed" and sim.cond("Failed")["reason"] == "BudgetExhausted"
    assert "nothing was trained yet" in res.status["message"] and "finalCheckpoint" not in res.status
    assert [(e.type, e.reason) for e in res.of(Event) if e.reason != "StepCompleted"] == [
        ("Warning", "BudgetExhausted")]
    assert not sim.step(60).of(CreateJob)  # a failed run stays failed...

    # ...until the budget is raised: the run goes on with the step it stopped before
    sim.run = budget_run(gen=2, maxGpuHours=1.0)
    res = sim.step()
    assert [a.name for a in res.of(CreateJob)] == ["r-i1-pairs"]
    assert res.status["phase"] == "Running" and "completionTime" not in res.status


def test_a_run_stopped_by_the_budget_goes_on_when_it_is_raised():
    sim = Sim(budget_run(maxGpuHours=1800 / 3600))
    one_iteration(sim, 1)
    res = sim.step()  # generate: 1700 + 100 <= 1800 runs
    play(sim, "r-i2-generate", 100)
    res = sim.step()  # judge: 1800 + 1200 > 1800
    assert res.status["phase"] == "Succeeded" and "r-i2-judge" not in sim.jobs
    sim.run = budget_run(gen=2, maxGpuHours=2.0)
    res = sim.step()
    assert [a.name for a in res.of(CreateJob)] == ["r-i2-judge"]
    assert res.status["phase"] == "Running" and "completionTime" not in res.status
    assert "finalCheckpoint" not in res.status


def test_the_eval_gates_best_model_is_the_result_of_a_budget_stop():
    sim = Sim(budget_run(maxGpuHours=1800 / 3600))
    one_iteration(sim, 1)
    sim.step()
    play(sim, "r-i2-generate", 100)
    sim.status = dict(sim.status, bestCheckpoint="s3://bucket/r/iter-0/sft/checkpoint")
    st = sim.step().status
    assert st["finalCheckpoint"] == "s3://bucket/r/iter-0/sft/checkpoint"


def test_pods_gone_before_they_were_read_are_estimated_from_their_job():
    sim = Sim(budget_run())
    sim.step()
    play(sim, "r-i1-generate", 100)
    sim.step()
    play(sim, "r-i1-judge", 300, pods=False)  # both shards' pods deleted (a TTL, a person)
    res = sim.step()
    rec = res.status["history"][0]
    assert rec["gpuSecondsByPhase"]["judge"] == 2 * 300 * 2  # 2 pods x the Job's 300 s x 2 GPUs
    assert rec["gpuSecondsEstimated"] is True
    msg = next(e.message for e in res.of(Event) if e.reason == "StepCompleted" and "judge" in e.message)
    assert "estimated" in msg


# --- selfreward.budget on its own ----------------------------------------------------

def _pod(states, gpus=None, start=None):
    pod = {"status": {"containerStatuses": [{"name": "worker", **states}]}}
    if start:
        pod["status"]["startTime"] = start
    if gpus is not None:
        pod["spec"] = {"containers": [{"name": "worker", "resources": {"limits": {"example.com/gpu": str(gpus)}}},
                                      {"name": "sidecar", "resources": {"limits": {"example.com/gpu": "8"}}}]}
    return pod


def _term(start, end):
    return {"terminated": {"exitCode": 0, "startedAt": start, "finishedAt": end}}


def test_job_usage_reads_each_pods_request_and_its_restarts():
    restarted = _pod({"state": _term("2026-03-01T12:00:30Z", "2026-03-01T12:01:00Z"),
                      "lastState": _term("2026-03-01T12:00:00Z", "2026-03-01T12:00:20Z")}, gpus=3)
    no_spec = _pod({"state": _term("2026-03-01T12:00:00Z", "2026-03-01T12:00:10Z")})
    running = _pod({"state": {"running": {"startedAt": "2026-03-01T12:00:00Z"}}}, gpus=1)
    job = {"status": {"succeeded": 2}, "pods": [restarted, no_spec, running]}
    use = B.job_usage(job, gpus=5, resource="example.com/gpu")
    # 60 s x the pod's own 3 GPUs (the sidecar is not the worker), 10 s x the step's 5
    assert use == B.Usage(60 * 3 + 10 * 5, False)
    assert B.job_usage({"pods": [running]}, gpus=1) == B.Usage(0.0, False)  # not finished: not yet


def test_refusal_sides():
    assert B.refusal(100.0, 3500.0, 1.0) is None  # lands on the budget
    assert B.refusal(100.0, 3501.0, 1.0) is not None
    assert B.refusal(3599.0, None, 1.0) is None  # no estimate: starts while budget is left
    assert B.refusal(3600.0, None, 1.0) is not None
    assert B.refusal(3600.0, 0.0, 1.0) is None and B.refusal(3601.0, 0.0, 1.0) is not None
    assert B.refusal(1e9, 1e9, None) is None


def test_a_run_without_gpus_counts_zero_and_no_budget_refuses():
    sim = Sim(make_run(budget={"maxGpuHours": 0.001}))
    for phase in ("generate", "judge", "pairs", "train"):
        sim.step()
        play(sim, f"r-i1-{phase}", 50)
    st = sim.step().status
    assert st["gpuSeconds"] == 0.0 and "r-i2-generate" in sim.jobs
    assert reconcile(make_run(), {}, [], T0, SETTINGS).status.get("gpuSeconds") is None


def test_the_operators_pod_cache_keeps_what_the_count_reads():
    from selfreward.controller import slim_pod

    pod = _pod({"state": _term("2026-03-01T12:00:00Z", "2026-03-01T12:00:10Z")}, gpus=3)
    pod["spec"]["containers"][0].update(image="worker:1", command=["selfreward"], env=[{"name": "A", "value": "1"}])
    slim = slim_pod(pod)
    assert slim["spec"] == {"containers": [{"name": "worker", "resources": pod["spec"]["containers"][0]["resources"]},
                                           {"name": "sidecar", "resources": pod["spec"]["containers"][1]["resources"]}]}
    assert B.job_usage({"pods": [slim]}, gpus=1, resource="example.com/gpu").gpu_seconds == 30.0
