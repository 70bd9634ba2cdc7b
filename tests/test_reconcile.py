"""The pure reconcile function, driven directly: a run's life from its first Job to
Succeeded or Failed, with retries, suspension, spec changes and invalid specs."""
import copy
import json
from datetime import datetime, timedelta, timezone

from selfreward import jobs as J
from selfreward.reconcile import (FINALIZER, CreateJob, CreateService, DeleteJob, Event, SetFinalizer, SetJobTTL,
                                  SuspendJob, reconcile)
from selfreward.status import HISTORY_LIMIT, RunStatus

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
SETTINGS = J.Settings(worker_image="img:1", image_pull_grace_seconds=60, unschedulable_grace_seconds=300)


def make_run(name="r", gen=1, **spec_over):
    spec = {
        "model": {"uri": "/models/base"},
        "prompts": {"uri": "/data/prompts.jsonl"},
        "iterations": 2,
        "storage": {"uri": "s3://bucket/r"},
        "retry": {"maxRetries": 2, "backoffSeconds": 10},
    }
    spec.update(spec_over)
    return {"metadata": {"name": name, "namespace": "ns", "uid": "uid-" + name, "generation": gen},
            "spec": spec}


def finish(manifest, summary=None, ok=True, pod_state=None, reason=None, at=T0):
    """The observed Job after the Job controller and kubelet are done with it."""
    job = copy.deepcopy(manifest)
    ts = J.format_time(at)
    ctype = "Complete" if ok else "Failed"
    job["status"] = {"startTime": ts, "conditions": [{"type": ctype, "status": "True", "lastTransitionTime": ts,
                                                       **({"reason": reason} if reason else {})}]}
    if ok:
        job["status"]["completionTime"] = ts
    term = pod_state or {"exitCode": 0 if ok else 1, "reason": "Completed" if ok else "Error",
                         "message": json.dumps(summary or {})}
    job["pods"] = [{"metadata": {"name": job["metadata"]["name"] + "-0"},
                    "status": {"containerStatuses": [{"name": "worker", "state": {"terminated": term}}]}}]
    return job


def running(manifest, pods=None):
    job = copy.deepcopy(manifest)
    job["status"] = {"active": 1}
    job["pods"] = pods or []
    return job


class Sim:
    """Feeds each Result back as the next call's input, keeping the Jobs it created."""

    def __init__(self, run):
        self.run = run
        self.status = {}
        self.jobs = {}
        self.now = T0
        self.events = []

    def step(self, dt=0.0):
        self.now += timedelta(seconds=dt)
        res = reconcile(self.run, self.status, list(self.jobs.values()), self.now, SETTINGS)
        for a in res.actions:
            if isinstance(a, CreateJob):
                self.jobs.setdefault(a.name, running(a.manifest))
            elif isinstance(a, DeleteJob):
                self.jobs.pop(a.name, None)
            elif isinstance(a, SetJobTTL):
                self.jobs[a.name]["spec"]["ttlSecondsAfterFinished"] = a.seconds
            elif isinstance(a, Event):
                self.events.append(a)
        self.status = res.status
        return res

    def complete(self, name, summary=None):
        self.jobs[name] = finish(self.jobs[name], summary, at=self.now)

    def fail(self, name, **kw):
        self.jobs[name] = finish(self.jobs[name], ok=False, at=self.now, **kw)

    def cond(self, ctype):
        return next(c for c in self.status["conditions"] if c["type"] == ctype)


def created(res):
    return [a.name for a in res.of(CreateJob)]


def test_fresh_run_creates_the_first_job_and_reports_working():
    res = reconcile(make_run(), {}, [], T0, SETTINGS)
    assert created(res) == ["r-i1-generate"]
    st = RunStatus.model_validate(res.status)  # fits the status model (and so the CRD)
    assert st.phase == "Running" and st.activeJob == "r-i1-generate" and st.observedGeneration == 1
    assert st.currentIteration == 1 and st.currentPhase == "generate" and st.progress == "0/2"
    conds = {c.type: c for c in st.conditions}
    assert conds["Reconciling"].status == "True" and conds["Ready"].status == "False"
    assert conds["Stalled"].status == "False"
    assert [(e.reason, e.message) for e in res.of(Event)] == [
        ("RunStarted", "iteration 1/2: generate running (Job r-i1-generate)")]
    assert res.requeue_after is None


def test_sft_and_instruct_steps_come_first():
    run = make_run(sft={"instructionDataUri": "/d/ift.jsonl"},
                   prompts={"uri": "/p.jsonl", "selfInstruct": {"count": 4}})
    sim = Sim(run)
    assert created(sim.step()) == ["r-i0-sft"]
    sim.complete("r-i0-sft")
    assert created(sim.step()) == ["r-i1-instruct"]
    assert sim.status["history"][0]["checkpoint"] == "s3://bucket/r/iter-0/sft/checkpoint"


def test_two_iterations_to_succeeded_next_job_in_the_same_pass():
    sim = Sim(make_run())
    sim.step()
    order = ["generate", "judge", "pairs", "train"]
    summaries = {"generate": {"prompts": 8, "responses": 32}, "judge": {"judgedResponses": 32, "scoreMean": 3.25, "scoreStd": 0.5},
                 "pairs": {"pairs": 6, "pairsDropped": 2, "meanMargin": 1.5}, "train": {"dpoLoss": 0.69, "rewardAccuracy": 0.5}}
    for t in (1, 2):
        for i, phase in enumerate(order):
            name = f"r-i{t}-{phase}"
            sim.complete(name, summaries[phase])
            res = sim.step(5)
            nxt = order[i + 1] if i + 1 < len(order) else ("generate" if t == 1 else None)
            nt = t if i + 1 < len(order) else t + 1
            assert created(res) == ([f"r-i{nt}-{nxt}"] if nxt else [])
            done = [e.message for e in res.of(Event) if e.reason == "StepCompleted"]
            assert len(done) == 1 and done[0].startswith(f"iter-{t}/{phase} completed")
            if nxt:  # the next Job's creation folds into the same Event
                assert done[0].endswith(f"created Job r-i{nt}-{nxt}")
                assert not [e for e in res.of(Event) if e.reason == "JobCreated"]
    st = sim.status
    assert st["phase"] == "Succeeded" and st["progress"] == "2/2"
    assert st["finalCheckpoint"] == "s3://bucket/r/iter-2/train/checkpoint"
    assert sim.cond("Ready")["status"] == "True" and sim.cond("Reconciling")["status"] == "False"
    assert sim.cond("Succeeded")["status"] == "True"
    h = st["history"]
    assert [r["iteration"] for r in h] == [1, 2]
    assert h[0]["margin"] == 1.5 and h[0]["judged"] == 32
    assert h[0]["responses"] == 32 and h[0]["meanScore"] == 3.25 and h[0]["pairs"] == 6 and h[0]["dpoLoss"] == 0.69
    assert h[0]["checkpoint"] == "s3://bucket/r/iter-1/train/checkpoint" and st["lastPairs"] == 6
    assert "Succeeded" in [e.reason for e in sim.events]
    # the last Job gets its TTL once its completion is recorded, then a succeeded run stays put
    assert sim.step(100).actions == [SetJobTTL("r-i2-train", 86400)]
    assert all(j["spec"]["ttlSecondsAfterFinished"] == 86400 for j in sim.jobs.values())
    again = sim.step(100)
    assert again.actions == [] and again.status["phase"] == "Succeeded"


def test_catch_up_after_downtime_records_every_completed_step():
    sim = Sim(make_run())
    sim.step()
    # the operator was down: several steps finished, the Jobs show it
    run, meta = sim.run, sim.run["metadata"]
    from selfreward.layout import Step
    from selfreward.spec import parse_spec
    spec = parse_spec(run["spec"])
    for phase in ("judge", "pairs"):
        m = J.build_job(meta, spec, Step(1, phase), 1)
        sim.jobs[m["metadata"]["name"]] = m
    for name in ("r-i1-generate", "r-i1-judge", "r-i1-pairs"):
        sim.complete(name, {"pairs": 3} if "pairs" in name else {})
    res = sim.step()
    assert created(res) == ["r-i1-train"]
    assert sim.status["completedStep"] == "iter-1/pairs" and sim.status["lastPairs"] == 3


def test_lost_status_recovers_from_the_jobs_without_duplicates():
    sim = Sim(make_run())
    sim.step()
    sim.complete("r-i1-generate")
    sim.step()
    res = reconcile(sim.run, {}, list(sim.jobs.values()), sim.now, SETTINGS)
    assert created(res) == [] and res.status["activeJob"] == "r-i1-judge"


def test_recreate_of_a_missing_job_uses_the_same_name():
    sim = Sim(make_run())
    sim.step()
    sim.jobs.clear()  # not in the cache yet, or deleted by hand
    res = sim.step()
    assert created(res) == ["r-i1-generate"]
    assert not [e for e in res.of(Event) if e.reason == "JobCreated"]  # not a new attempt


def test_failure_backs_off_exponentially_then_fails_with_the_reason():
    sim = Sim(make_run())
    sim.step()
    sim.fail("r-i1-generate", pod_state={"exitCode": 137, "reason": "OOMKilled"})
    res = sim.step()
    assert created(res) == [] and res.requeue_after == 10
    assert sim.status["retryAfter"] and sim.cond("Reconciling")["reason"] == "BackingOff"
    assert "OOMKilled" in sim.status["message"]
    assert any(e.type == "Warning" and e.reason == "JobFailed" for e in res.of(Event))
    assert created(sim.step(4)) == [] and sim.step(0).requeue_after == 6
    res = sim.step(6)
    assert created(res) == ["r-i1-generate-r2"] and sim.status["attempts"]["iter-1/generate"] == 2
    assert any(e.reason == "JobRetried" for e in res.of(Event))
    sim.fail("r-i1-generate-r2", pod_state={"exitCode": 137, "reason": "OOMKilled"})
    assert sim.step().requeue_after == 20  # doubled
    assert created(sim.step(20)) == ["r-i1-generate-r3"]
    sim.fail("r-i1-generate-r3", pod_state={"exitCode": 137, "reason": "OOMKilled"})
    res = sim.step()
    st = sim.status
    assert st["phase"] == "Failed" and created(res) == []
    failed, stalled, ready = sim.cond("Failed"), sim.cond("Stalled"), sim.cond("Ready")
    assert failed["status"] == "True" and failed["reason"] == "OOMKilled"
    assert stalled["status"] == "True" and stalled["reason"] == "OOMKilled" and ready["status"] == "False"
    assert "3 attempt" in failed["message"] and "memory" in failed["message"]
    assert any(e.type == "Warning" and e.reason == "OOMKilled" for e in res.of(Event))
    # terminal: the last recorded failure gets its TTL (the replaced attempts got theirs
    # once the retry was recorded), then nothing more happens
    assert sim.step(1000).actions == [SetJobTTL("r-i1-generate-r3", 86400)]
    assert all(j["spec"]["ttlSecondsAfterFinished"] == 86400 for j in sim.jobs.values())
    assert sim.step(1000).actions == []


def test_a_retry_that_succeeds_moves_on():
    sim = Sim(make_run(retry={"maxRetries": 1, "backoffSeconds": 0}))
    sim.step()
    msg = json.dumps({"error": "RuntimeError: disk full", "phase": "generate", "iteration": 1})
    sim.fail("r-i1-generate", pod_state={"exitCode": 1, "reason": "Error", "message": msg})
    res = sim.step()
    assert created(res) == ["r-i1-generate-r2"]  # zero backoff retries in the same pass
    sim.complete("r-i1-generate-r2")
    assert created(sim.step()) == ["r-i1-judge"]


def test_worker_error_line_and_deadline_reasons():
    sim = Sim(make_run(retry={"maxRetries": 0}))
    sim.step()
    msg = json.dumps({"error": "PhaseError: no prompts left after filtering"})
    sim.fail("r-i1-generate", pod_state={"exitCode": 1, "message": msg})
    sim.step()
    assert sim.cond("Failed")["reason"] == "WorkerError"
    assert "no prompts left" in sim.status["message"]
    sim2 = Sim(make_run(retry={"maxRetries": 0}))
    sim2.step()
    sim2.fail("r-i1-generate", reason="DeadlineExceeded", pod_state={"exitCode": 143, "reason": "Error"})
    sim2.step()
    assert sim2.cond("Failed")["reason"] == "DeadlineExceeded"


def test_image_pull_errors_fail_the_attempt_after_a_grace_and_delete_the_job():
    sim = Sim(make_run(retry={"maxRetries": 1, "backoffSeconds": 30}))
    sim.step()
    pod = {"metadata": {"name": "p", "creationTimestamp": J.format_time(T0)},
           "status": {"startTime": J.format_time(T0),
                      "containerStatuses": [{"name": "worker", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                                    "message": "manifest unknown"}}}]}}
    sim.jobs["r-i1-generate"]["pods"] = [pod]
    res = sim.step(10)
    assert res.of(DeleteJob) == [] and 49 <= res.requeue_after <= 50
    assert "ImagePullError" in sim.status["message"]
    res = sim.step(50)
    assert [a.name for a in res.of(DeleteJob)] == ["r-i1-generate"]
    assert res.requeue_after == 30 and created(res) == []
    assert created(sim.step(30)) == ["r-i1-generate-r2"]  # the deleted Job is not re-created
    sim.jobs["r-i1-generate-r2"]["pods"] = [dict(pod, status=dict(pod["status"], startTime=J.format_time(sim.now)))]
    res = sim.step(61)
    assert sim.status["phase"] == "Failed" and sim.cond("Failed")["reason"] == "ImagePullError"
    assert [a.name for a in res.of(DeleteJob)] == ["r-i1-generate-r2"]


def test_unschedulable_pods_show_in_the_message_then_fail():
    sim = Sim(make_run(retry={"maxRetries": 0}))
    sim.step()
    sim.jobs["r-i1-generate"]["pods"] = [{"metadata": {"name": "p"}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/4 nodes: insufficient nvidia.com/gpu", "lastTransitionTime": J.format_time(T0)}]}}]
    sim.step(100)
    assert "insufficient nvidia.com/gpu" in sim.status["message"] and sim.status["phase"] == "Running"
    sim.step(200)
    assert sim.status["phase"] == "Failed" and sim.cond("Stalled")["reason"] == "Unschedulable"


def test_suspend_suspends_the_active_job_and_resume_unsuspends_it():
    sim = Sim(make_run())
    sim.step()
    sim.run = make_run(gen=2, suspend=True)
    res = sim.step()
    assert res.of(SuspendJob) == [SuspendJob("r-i1-generate", True)]
    assert sim.status["phase"] == "Suspended" and sim.cond("Suspended")["status"] == "True"
    assert sim.cond("Reconciling")["status"] == "False" and sim.status["observedGeneration"] == 2
    assert "Suspended" in [e.reason for e in res.of(Event)]
    job = sim.jobs["r-i1-generate"]
    job["spec"]["suspend"] = True
    job["metadata"]["annotations"][J.ANN_SUSPENDED] = "true"
    assert sim.step().of(SuspendJob) == []  # already suspended: no repeat
    # a Job completing while suspended is recorded, but nothing new starts
    sim.run = make_run(gen=3, suspend=False)
    res = sim.step()
    assert res.of(SuspendJob) == [SuspendJob("r-i1-generate", False)]
    assert sim.status["phase"] == "Running" and "Resumed" in [e.reason for e in res.of(Event)]


def test_suspended_before_a_step_creates_nothing():
    sim = Sim(make_run(suspend=True))
    res = sim.step()
    assert created(res) == [] and sim.status["phase"] == "Suspended"
    sim.run = make_run(gen=2)
    assert created(sim.step()) == ["r-i1-generate"]


def test_kueue_admission_is_not_taken_for_the_operators_suspension():
    sim = Sim(make_run(kueue={"queueName": "q"}))
    res = sim.step()
    job = sim.jobs["r-i1-generate"]
    assert job["spec"]["suspend"] is True
    res = sim.step()
    assert res.of(SuspendJob) == [] and sim.status["phase"] == "Pending"
    assert sim.cond("Reconciling")["reason"] == "WaitingForAdmission"
    job["spec"]["suspend"] = False  # Kueue admitted it
    res = sim.step()
    assert res.of(SuspendJob) == [] and sim.status["phase"] == "Running"


def test_spec_change_mid_iteration_applies_from_the_next_iteration():
    sim = Sim(make_run())
    sim.step()
    sim.run = make_run(gen=2, generation={"shards": 3}, iterations=3)
    sim.complete("r-i1-generate")
    sim.step()
    assert sim.status["observedGeneration"] == 2
    judge = json.loads(J.job_document(sim.jobs["r-i1-judge"]))["spec"]
    assert judge["generation"]["shards"] == 1  # iteration 1 keeps its spec
    assert judge["iterations"] == 2
    for phase in ("judge", "pairs", "train"):
        sim.complete(f"r-i1-{phase}")
        sim.step()
    gen2 = sim.jobs["r-i2-generate"]
    assert gen2["spec"]["completions"] == 3 and gen2["spec"]["completionMode"] == "Indexed"
    assert sim.status["progress"] == "1/3"


def test_fewer_iterations_mid_run_finishes_after_the_current_one():
    sim = Sim(make_run(iterations=3))
    sim.step()
    sim.run = make_run(gen=2, iterations=1)
    for phase in ("generate", "judge", "pairs", "train"):
        sim.complete(f"r-i1-{phase}")
        sim.step()
    assert sim.status["phase"] == "Succeeded" and "r-i2-generate" not in sim.jobs


def test_invalid_spec_stalls_with_an_event_and_recovers_when_fixed():
    bad = make_run()
    bad["spec"]["judge"] = {"minScore": 5, "maxScore": 1}
    bad["spec"]["iterations"] = 0
    res = reconcile(bad, {}, [], T0, SETTINGS)
    st = res.status
    assert st["phase"] == "Failed" and res.of(CreateJob) == []
    stalled = next(c for c in st["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "InvalidSpec"
    assert "iterations" in stalled["message"] and "minScore" in stalled["message"]
    assert [e.reason for e in res.of(Event)] == ["InvalidSpec"]
    again = reconcile(bad, st, [], T0 + timedelta(seconds=5), SETTINGS)
    assert again.of(Event) == []  # no event spam for the same problem
    stalled2 = next(c for c in again.status["conditions"] if c["type"] == "Stalled")
    assert stalled2["lastTransitionTime"] == stalled["lastTransitionTime"]
    fixed = make_run(gen=2)
    res = reconcile(fixed, again.status, [], T0 + timedelta(seconds=10), SETTINGS)
    assert created(res) == ["r-i1-generate"] and res.status["phase"] == "Running"
    assert not reconcile({"metadata": {"name": "x"}, "spec": None}, {}, [], T0).of(CreateJob)


def test_jobs_of_another_owner_are_ignored():
    sim = Sim(make_run())
    sim.step()
    stranger = finish(sim.jobs["r-i1-generate"])
    stranger["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    res = reconcile(sim.run, {}, [stranger], T0, SETTINGS)
    assert created(res) == ["r-i1-generate"]


def test_conditions_transition_time_moves_only_on_flips():
    sim = Sim(make_run())
    sim.step()
    t_ready = sim.cond("Ready")["lastTransitionTime"]
    sim.complete("r-i1-generate")
    sim.step(30)
    assert sim.cond("Ready")["lastTransitionTime"] == t_ready
    assert sim.cond("Reconciling")["message"].startswith("iteration 1/2: judge")


def test_history_is_bounded():
    sim = Sim(make_run(iterations=HISTORY_LIMIT + 3))
    sim.step()
    for t in range(1, HISTORY_LIMIT + 4):
        for phase in ("generate", "judge", "pairs", "train"):
            sim.complete(f"r-i{t}-{phase}")
            sim.step()
    h = sim.status["history"]
    assert len(h) == HISTORY_LIMIT and h[-1]["iteration"] == HISTORY_LIMIT + 3
    assert sim.status["phase"] == "Succeeded"


def test_finalizer_and_cleanup_job_on_deletion():
    run = make_run(storage={"uri": "s3://bucket/r", "deleteOnRunDeletion": True, "credentialsSecret": "creds"})
    res = reconcile(run, {}, [], T0, SETTINGS)
    assert SetFinalizer(True) in res.actions
    run["metadata"]["finalizers"] = [FINALIZER]
    res = reconcile(run, {}, [], T0, SETTINGS)
    active = running(res.of(CreateJob)[0].manifest)
    run["metadata"]["deletionTimestamp"] = J.format_time(T0)
    res = reconcile(run, res.status, [active], T0, SETTINGS)
    assert [a.name for a in res.of(DeleteJob)] == ["r-i1-generate"]
    assert created(res) == [] and not res.of(SetFinalizer) and res.requeue_after  # the Job goes first
    res = reconcile(run, res.status, [], T0, SETTINGS)
    assert created(res) == ["r-cleanup"] and not res.of(SetFinalizer)
    cleanup = finish(res.of(CreateJob)[0].manifest)
    res = reconcile(run, res.status, [cleanup], T0, SETTINGS)
    assert res.of(SetFinalizer) == [SetFinalizer(False)]
    # without the setting there is no finalizer and deletion needs nothing
    plain = make_run()
    plain["metadata"]["finalizers"] = [FINALIZER]
    assert SetFinalizer(False) in reconcile(plain, {}, [], T0, SETTINGS).actions
    plain["metadata"]["deletionTimestamp"] = J.format_time(T0)
    plain["metadata"]["finalizers"] = []
    assert reconcile(plain, {}, [], T0, SETTINGS).actions == []


def test_ttl_is_set_only_once_the_status_it_started_from_records_the_outcome():
    sim = Sim(make_run(ttlSecondsAfterFinished=0))
    sim.step()
    sim.complete("r-i1-generate")  # finishes while the operator is away: no TTL on it yet
    assert "ttlSecondsAfterFinished" not in sim.jobs["r-i1-generate"]["spec"]
    res = sim.step()
    assert sim.status["completedStep"] == "iter-1/generate" and created(res) == ["r-i1-judge"]
    assert res.of(SetJobTTL) == []  # recorded in this pass's status, which is not written yet
    res = sim.step()
    assert res.of(SetJobTTL) == [SetJobTTL("r-i1-generate", 0)]
    assert sim.step().of(SetJobTTL) == []  # once
    # a lost status: the completed Job proves its step, but gets its TTL only once recorded again
    sim.status = {}
    sim.jobs["r-i1-generate"]["spec"].pop("ttlSecondsAfterFinished")
    assert sim.step().of(SetJobTTL) == [] and sim.step().of(SetJobTTL) == [SetJobTTL("r-i1-generate", 0)]
    # no TTL asked for: none set
    plain = Sim(make_run(ttlSecondsAfterFinished=None))
    plain.step()
    plain.complete("r-i1-generate")
    plain.step()
    assert plain.step().of(SetJobTTL) == []


def test_an_exception_in_a_pass_ends_as_a_condition_and_an_event(monkeypatch):
    real = J.build_job
    sim = Sim(make_run())

    def boom(*a, **k):
        raise MemoryError("cannot render the judge template")

    monkeypatch.setattr(J, "build_job", boom)
    res = sim.step()
    stalled = sim.cond("Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ReconcileError"
    assert "MemoryError: cannot render the judge template" in stalled["message"]
    assert sim.cond("Failed")["status"] == "False" and sim.cond("Ready")["status"] == "False"
    assert [(e.type, e.reason) for e in res.of(Event)] == [("Warning", "ReconcileError")]
    assert created(res) == [] and res.requeue_after == 5.0
    # the same error again: no second Event, a longer wait (bounded)
    res = sim.step(60)
    assert res.of(Event) == [] and res.requeue_after == 60.0
    assert sim.step(3600).requeue_after == 300.0
    # fixed (an upgrade, a transient cause gone): the run goes on and says so
    monkeypatch.setattr(J, "build_job", real)
    res = sim.step(1)
    assert created(res) == ["r-i1-generate"] and sim.cond("Stalled")["status"] == "False"
    assert "Recovered" in [e.reason for e in res.of(Event)]
    # an unreadable status or spec type is no exception either
    assert reconcile({"metadata": {"name": "x"}, "spec": {"storage": 3}}, {"phase": "Nonsense"}, [], T0).of(Event)


def test_a_permanent_api_refusal_fails_the_run_and_a_new_spec_resumes_it():
    from selfreward.reconcile import api_refused

    run = make_run()
    first = reconcile(run, {}, [], T0, SETTINGS)
    res = api_refused(run, first.status, "create Job r-i1-generate", 422,
                      'Job.batch "r-i1-generate" is invalid: metadata.name: Invalid value', T0)
    st = RunStatus.model_validate(res.status)
    failed = next(c for c in st.conditions if c.type == "Failed")
    assert st.phase == "Failed" and failed.reason == "ApiRejected" and "HTTP 422" in failed.message
    assert "metadata.name: Invalid value" in failed.message
    assert [(e.type, e.reason) for e in res.of(Event)] == [("Warning", "ApiRejected")]
    assert reconcile(run, res.status, [], T0, SETTINGS).actions == []  # stays failed, no retry loop
    fixed = make_run(gen=2, resources={"default": {"cpu": "1"}})
    assert created(reconcile(fixed, res.status, [], T0, SETTINGS)) == ["r-i1-generate"]


def test_a_spec_too_large_for_a_job_is_refused_as_an_invalid_spec():
    big = make_run(resources={"default": {"tolerations": [
        # toleration values are label values (at most 63 characters): many of them instead
        {"key": f"example.com/taint-{i:05d}", "operator": "Equal", "value": "v" * 60, "effect": "NoSchedule"}
        for i in range(2400)]}})
    res = reconcile(big, {}, [], T0, SETTINGS)
    assert created(res) == [] and res.status["phase"] == "Failed"
    assert next(c for c in res.status["conditions"] if c["type"] == "Failed")["reason"] == "InvalidSpec"
    assert f"under {J.MAX_DOCUMENT_BYTES} bytes" in res.status["message"]
    # one over 128 KiB (too big for an env variable) but under the bound goes through
    ok = make_run(resources={"default": {"tolerations": [
        {"key": f"example.com/taint-{i:05d}", "operator": "Equal", "value": "v" * 60, "effect": "NoSchedule"}
        for i in range(900)]}})
    res = reconcile(ok, {}, [], T0, SETTINGS)
    doc = J.job_document(res.of(CreateJob)[0].manifest)
    assert 128 * 1024 < len(doc) <= J.MAX_DOCUMENT_BYTES


def _deleting(run, status=None, jobs=()):
    run["metadata"]["finalizers"] = [FINALIZER]
    run["metadata"]["deletionTimestamp"] = J.format_time(T0)
    return reconcile(run, status or {}, list(jobs), T0, SETTINGS)


def test_deletion_shows_terminating_and_reports_what_the_cleanup_did():
    run = make_run(storage={"uri": "s3://bucket/r", "deleteOnRunDeletion": True})
    live = reconcile(run, {}, [], T0, SETTINGS)
    active = running(live.of(CreateJob)[0].manifest)
    assert live.status["activeJob"] == "r-i1-generate"
    res = _deleting(run, live.status, [active])
    assert res.status["phase"] == "Terminating" and "activeJob" not in res.status
    assert res.status["message"] == "deleting: stopping Job(s) r-i1-generate"
    res = _deleting(run, res.status, [])
    assert res.status["phase"] == "Terminating" and "r-i1-generate" not in res.status["message"]
    cleanup_manifest = res.of(CreateJob)[0].manifest
    done = finish(cleanup_manifest, {"deleted": 12, "kept": 2, "uri": "s3://bucket/r"})
    res = _deleting(run, res.status, [done])
    assert res.of(SetFinalizer) == [SetFinalizer(False)]
    [ev] = res.of(Event)
    assert (ev.type, ev.reason) == ("Normal", "CleanupDone") and "12 objects" in ev.message and "kept 2" in ev.message
    refused = finish(cleanup_manifest, {"refused": "s3://bucket/r/owner.json is missing", "uri": "s3://bucket/r"})
    res = _deleting(run, {}, [refused])
    [ev] = res.of(Event)
    assert (ev.type, ev.reason) == ("Warning", "CleanupRefused") and "owner.json is missing" in ev.message
    assert res.of(SetFinalizer) == [SetFinalizer(False)]


def test_a_store_at_a_root_is_never_cleaned_up():
    for uri in ("s3://bucket", "s3://bucket/", "file:///", "/"):
        run = make_run(storage={"uri": uri, "deleteOnRunDeletion": True})
        res = _deleting(run)
        if res.status.get("phase") == "Failed" or [e for e in res.of(Event) if e.reason == "CleanupSkipped"]:
            # the spec itself refuses such a URI (spec.uri_problem): no cleanup either
            assert not res.of(CreateJob) and res.of(SetFinalizer) == [SetFinalizer(False)]
            continue
        assert not res.of(CreateJob), uri
        assert res.of(SetFinalizer) == [SetFinalizer(False)]
        [ev] = res.of(Event)
        assert (ev.type, ev.reason) == ("Warning", "CleanupRefused") and "nothing was deleted" in ev.message


def test_multi_node_train_step_creates_the_headless_service_before_each_of_its_jobs():
    run = make_run(iterations=1, training={"distributed": "fsdp"}, resources={"train": {"nodes": 2, "gpus": 4}})
    sim = Sim(run)
    for phase in ("generate", "judge", "pairs"):
        res = sim.step()
        assert res.of(CreateService) == []  # one-pod steps need no Service
        sim.complete(f"r-i1-{phase}")
    res = sim.step()
    kinds = [type(a).__name__ for a in res.actions if isinstance(a, (CreateService, CreateJob))]
    assert kinds == ["CreateService", "CreateJob"]  # the DNS names exist before the pods
    (svc,) = res.of(CreateService)
    assert svc.manifest == J.build_service(run["metadata"], SETTINGS)
    assert svc.manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-r"
    job = res.of(CreateJob)[0].manifest
    assert job["spec"]["completions"] == 2 and job["spec"]["template"]["spec"]["subdomain"] == svc.name
    # one rank fails: the Job fails as a whole, and the retry re-creates the Service (409 if
    # it is there) and a new Job of every rank
    sim.fail("r-i1-train")
    sim.step()  # the failure is recorded and the retry scheduled
    res = sim.step(dt=10)
    assert [a.name for a in res.of(CreateService)] == [svc.name]
    assert created(res) == ["r-i1-train-r2"]
    assert res.of(CreateJob)[0].manifest["spec"]["completions"] == 2
    sim.complete("r-i1-train-r2")
    assert sim.step().status["phase"] == "Succeeded"


def test_a_colocated_judge_is_recorded_from_the_generate_job_and_gets_no_job():
    """judge.colocate: one Job per iteration for generate and judge; its pods report both
    phases' summaries, and the judge step completes from it (history, completedStep)
    without a Job of its own."""
    sim = Sim(make_run(iterations=1, generation={"shards": 2}, judge={"shards": 2, "colocate": True}))
    assert created(sim.step()) == ["r-i1-generate"]
    job = sim.jobs["r-i1-generate"]
    assert job["spec"]["completions"] == 2 and job["spec"]["completionMode"] == "Indexed"
    gen = {"prompts": 8, "responses": 32}
    judge = {"judgedResponses": 32, "scoreMean": 3.25, "scoreStd": 0.5, "parseFailures": 1}
    sim.complete("r-i1-generate", {"phases": {"generate": {**gen, "shard": 1}, "judge": {**judge, "shard": 1}}})
    res = sim.step(5)
    assert created(res) == ["r-i1-pairs"]  # straight to pairs: no r-i1-judge
    done = [e.message for e in res.of(Event) if e.reason == "StepCompleted"]
    assert done[0].startswith("iter-1/generate completed (prompts=8, responses=32")
    assert done[1].startswith("iter-1/judge completed in r-i1-generate (judgedResponses=32, scoreMean=3.25")
    st = sim.status
    assert st["completedStep"] == "iter-1/judge" and st["currentPhase"] == "pairs"
    h = st["history"][0]
    assert (h["prompts"], h["responses"], h["judged"], h["meanScore"], h["scoreStd"], h["parseFailures"]) == \
        (8, 32, 32, 3.25, 0.5, 1)
    for phase in ("pairs", "train"):
        sim.complete(f"r-i1-{phase}", {"pairs": 6} if phase == "pairs" else {"dpoLoss": 0.6})
        sim.step(5)
    assert sim.status["phase"] == "Succeeded" and sorted(sim.jobs) == ["r-i1-generate", "r-i1-pairs", "r-i1-train"]


def test_a_colocated_judge_whose_generate_job_is_gone_gets_a_job_of_its_own():
    """A lost status and a generate Job already deleted (its TTL): the judge step cannot
    be proved done by that Job, so it gets a judge Job, whose worker judges only what is
    left (each shard its generate shard)."""
    run = make_run(iterations=1, judge={"colocate": True})
    res = reconcile(run, {"completedStep": "iter-1/generate"}, [], T0, SETTINGS)
    assert created(res) == ["r-i1-judge"]
    cmd = res.of(CreateJob)[0].manifest["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["selfreward", "worker", "judge"]


def test_a_failed_colocated_step_is_retried_as_the_generate_step():
    sim = Sim(make_run(iterations=1, judge={"colocate": True}))
    sim.step()
    sim.fail("r-i1-generate")
    assert created(sim.step(10)) == ["r-i1-generate-r2"]
    sim.complete("r-i1-generate-r2", {"phases": {"generate": {"responses": 4}, "judge": {"judgedResponses": 4}}})
    assert created(sim.step(5)) == ["r-i1-pairs"]
    assert sim.status["history"][0]["judged"] == 4
    assert sim.status["attempts"] == {"iter-1/generate": 2, "iter-1/pairs": 1}  # the judge had no Job
