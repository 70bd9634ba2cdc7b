"""The operator end to end: the real `selfreward operator` process (kopf) against the
emulated API server over HTTP, with this test playing the Job controller and kubelet
(creating each Job's pod, writing its termination message and the Job's conditions).
One test runs the Jobs' real container commands with the tiny model and a file:// store."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from kube.emulator import cluster
from kube.kubelet import DeadlineExceeded, ImagePullBackOff, JobRunner, Kubelet, Succeed, TTLController, Unschedulable
from selfreward import jobs as J
from selfreward import layout
from selfreward.crd import crd_manifest
from selfreward.layout import Step
from selfreward.ownership import claim, owner_of
from selfreward.spec import parse_spec
from selfreward.storage import Store

RUNS = ("selfreward.dev/v1alpha1", "selfrewardruns")
VENV_BIN = str(Path(sys.executable).parent)
WAIT = 40


def now() -> str:
    return J.format_time(datetime.now(timezone.utc))


@pytest.fixture(scope="module")
def kube():
    with cluster(namespaces=["a", "b", "c", "d", "e", "f", "g"], crds=[crd_manifest()], validate=True) as c:
        yield c


def start_operator(kube, namespaces, log_path: Path, *extra: str, health_port: int = 0,
                   metrics_port: int = 0, preload: str = "") -> subprocess.Popen:
    """The operator as a process; ``preload``: Python run in it first (a monkeypatch)."""
    entry = ["-m", "selfreward"] if not preload else [
        "-c", f"{preload}\nimport sys\nfrom selfreward.cli import main\nsys.exit(main(sys.argv[1:]))"]
    args = [sys.executable, *entry, "operator", "--metrics-port", str(metrics_port),
            "--health-port", str(health_port),
            "--worker-image", "selfreward/worker:test", *extra]
    for ns in namespaces:
        args += ["-n", ns]
    env = dict(os.environ, KUBECONFIG=kube.kubeconfig, SELFREWARD_IMAGE_PULL_GRACE_SECONDS="1",
               SELFREWARD_UNSCHEDULABLE_GRACE_SECONDS="2")
    log = open(log_path, "ab")
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_operator(proc: subprocess.Popen, kill: bool = False) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def operator(kube, tmp_path_factory):
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    port = _free_port()
    proc = start_operator(kube, ["a", "b", "e"], log, metrics_port=port)
    proc.metrics_port = port
    yield proc
    stop_operator(proc)
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text()[-3000:]


def manifest(name, ns, **spec_over):
    spec = {
        "model": {"uri": "/models/base"},
        "prompts": {"uri": "/data/prompts.jsonl"},
        "iterations": 1,
        "storage": {"uri": f"s3://bucket/{ns}/{name}"},
        "retry": {"maxRetries": 1, "backoffSeconds": 0},
    }
    spec.update(spec_over)
    return {"apiVersion": "selfreward.dev/v1alpha1", "kind": "SelfRewardRun",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


class JobPlayer:
    """Plays the Job controller and the kubelet for one Job at a time."""

    def __init__(self, kube):
        self.c = kube

    def wait_job(self, ns, name, timeout=WAIT):
        return self.c.wait_for(lambda: self.c.get("batch/v1", "jobs", name, ns), timeout=timeout)

    def pod(self, job, index=0, status=None):
        tmpl = job["spec"]["template"]
        meta = job["metadata"]
        name = f"{meta['name']}-{index}"
        self.c.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": meta["namespace"], "labels": dict(tmpl["metadata"]["labels"]),
                         "annotations": dict(tmpl["metadata"].get("annotations") or {}),
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                              "uid": meta["uid"], "controller": True}]},
            "spec": tmpl["spec"],
        })
        if status:
            self.c.patch("v1", "pods", name, {"status": status}, meta["namespace"], subresource="status")

    def finish(self, ns, name, summaries=(None,), ok=True, terminated=None, job_reason=None, ran=None):
        """``ran``: (startedAt, finishedAt) of every pod's container, as a kubelet reports them."""
        job = self.wait_job(ns, name)
        for i, summary in enumerate(summaries):
            term = terminated or {"exitCode": 0 if ok else 1, "reason": "Completed" if ok else "Error",
                                  "message": json.dumps(summary or {"durationSeconds": 0.1})}
            if ran:
                term = {**term, "startedAt": ran[0], "finishedAt": ran[1]}
            self.pod(job, i, {"phase": "Succeeded" if ok else "Failed",
                              "containerStatuses": [{"name": "worker", "state": {"terminated": term}}]})
        ts = now()
        cond = {"type": "Complete" if ok else "Failed", "status": "True", "lastTransitionTime": ts}
        if job_reason:
            cond["reason"] = job_reason
        status = {"startTime": ts, "conditions": [cond]}
        status.update({"succeeded": len(summaries), "completionTime": ts} if ok else {"failed": 1})
        self.c.patch("batch/v1", "jobs", name, {"status": status}, ns, subresource="status")


def run_obj(kube, ns, name):
    return kube.get(*RUNS, name, ns) or {}


def wait_status(kube, ns, name, pred, timeout=WAIT):
    """Wait until pred(status) holds; return that status."""
    def check():
        st = run_obj(kube, ns, name).get("status") or {}
        return st if pred(st) else None
    return kube.wait_for(check, timeout=timeout)


def cond(status, ctype):
    return next((c for c in status.get("conditions", []) if c["type"] == ctype), {})


def events(kube, ns, name):
    return [(e["type"], e["reason"], e["message"]) for e in kube.objects("v1", "events", ns)
            if e["involvedObject"]["name"] == name]


def step_jobs(kube, ns, run):
    return sorted(j["metadata"]["name"] for j in kube.objects("batch/v1", "jobs", ns)
                  if j["metadata"]["labels"].get(J.LABEL_RUN) == run)


def test_two_iterations_from_apply_to_succeeded(kube, operator):
    player = JobPlayer(kube)
    m = manifest("two", "a", iterations=2, judge={"shards": 2})
    r = kube.kubectl("apply", "-f", "-", input=json.dumps(m))
    assert r.returncode == 0, r.stderr
    uid = run_obj(kube, "a", "two")["metadata"]["uid"]
    figures = {"generate": [{"prompts": 4, "responses": 16}],
               "judge": [{"shard": 0, "numShards": 2, "judgedResponses": 8},
                         {"judgedResponses": 16, "scoreMean": 3.5, "scoreStd": 0.25, "numShards": 2}],
               "pairs": [{"pairs": 3, "pairsDropped": 1, "meanMargin": 1.25}],
               "train": [{"dpoLoss": 0.68, "rewardAccuracy": 0.75}]}
    for t in (1, 2):
        for phase in ("generate", "judge", "pairs", "train"):
            name = f"two-i{t}-{phase}"
            job = player.wait_job("a", name)
            assert job["metadata"]["ownerReferences"][0]["uid"] == uid
            assert job["metadata"]["labels"][J.LABEL_ITERATION] == str(t)
            assert job["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["selfreward", "worker", phase]
            if phase == "judge":
                assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
            st = run_obj(kube, "a", "two").get("status") or {}
            assert st.get("phase") in (None, "Running")
            player.finish("a", name, figures[phase])
    r = kube.kubectl("wait", "--for=condition=Ready", "selfrewardrun/two", "-n", "a", "--timeout=30s")
    assert r.returncode == 0, r.stderr
    st = wait_status(kube, "a", "two", lambda s: s.get("phase") == "Succeeded")
    assert st["progress"] == "2/2" and st["observedGeneration"] == 1
    assert st["finalCheckpoint"] == "s3://bucket/a/two/iter-2/train/checkpoint"
    assert cond(st, "Ready")["status"] == "True" and cond(st, "Reconciling")["status"] == "False"
    assert [h["iteration"] for h in st["history"]] == [1, 2]
    h = st["history"][0]
    assert (h["responses"], h["judged"], h["meanScore"], h["pairs"], h["dpoLoss"]) == (16, 16, 3.5, 3, 0.68)
    assert "kopf.zalando.org/last-handled-configuration" not in (run_obj(kube, "a", "two")["metadata"].get("annotations") or {})
    reasons = [e[1] for e in events(kube, "a", "two")]
    assert reasons.count("StepCompleted") == 8 and "Succeeded" in reasons and "RunStarted" in reasons
    created = [m for _, _, m in events(kube, "a", "two") if "created Job" in m or "running (Job" in m]
    assert len(created) == 8  # one Event line per Job, no duplicates
    assert len(step_jobs(kube, "a", "two")) == 8


def test_gpu_seconds_reach_status_and_metrics_and_the_budget_stops_the_run(kube, operator):
    player = JobPlayer(kube)
    m = manifest("bud", "a", iterations=2, resources={"default": {"gpus": 1}, "judge": {"gpus": 2}},
                 budget={"maxGpuHours": 5.5, "pricePerGpuHour": 2.5})
    kube.create(m)
    hour = ("2026-03-01T10:00:00Z", "2026-03-01T11:00:00Z")  # every pod ran one hour
    for phase in ("generate", "judge", "pairs", "train"):
        job = player.wait_job("a", f"bud-i1-{phase}")
        limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == ("2" if phase == "judge" else "1")
        player.finish("a", f"bud-i1-{phase}", ran=hour)
    # iteration 1 used 5 GPU-hours (judge 2); iteration 2's generate, estimated at what
    # iteration 1's used (1), would take the run to 6 of 5.5: it is not started
    st = wait_status(kube, "a", "bud", lambda s: s.get("phase") in ("Succeeded", "Failed"))
    assert cond(st, "Succeeded")["reason"] == "BudgetExhausted", st.get("message")
    assert st["gpuSeconds"] == 5 * 3600 and st["cost"] == pytest.approx(12.5)
    assert st["gpuSecondsByPhase"] == {"generate": 3600.0, "judge": 7200.0, "pairs": 3600.0, "train": 3600.0}
    (h,) = st["history"]
    assert h["gpuSeconds"] == 5 * 3600 and h["cost"] == pytest.approx(12.5)
    assert st["finalCheckpoint"] == "s3://bucket/a/bud/iter-1/train/checkpoint"
    assert "5 of 5.5 GPU-hours used and the step is estimated at 1 more" in st["message"]
    time.sleep(1)
    assert "bud-i2-generate" not in step_jobs(kube, "a", "bud")
    assert ("Normal", "BudgetExhausted") in [(e[0], e[1]) for e in events(kube, "a", "bud")]
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
    gpu = {line.split('phase="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
           if line.startswith("selfreward_run_gpu_seconds_total") and 'run="bud"' in line}
    assert gpu == {"generate": 3600.0, "judge": 7200.0, "pairs": 3600.0, "train": 3600.0}

    # a raised budget lets the run go on
    kube.patch(*RUNS, "bud", {"spec": {"budget": {"maxGpuHours": 20}}}, "a")
    player.wait_job("a", "bud-i2-generate")
    wait_status(kube, "a", "bud", lambda s: s.get("phase") == "Running")


def test_failed_job_is_retried_then_the_run_fails_with_oomkilled(kube, operator):
    player = JobPlayer(kube)
    kube.create(manifest("oom", "a", retry={"maxRetries": 1, "backoffSeconds": 0}))
    oom = {"exitCode": 137, "reason": "OOMKilled"}
    player.finish("a", "oom-i1-generate", ok=False, terminated=oom, job_reason="BackoffLimitExceeded")
    player.finish("a", "oom-i1-generate-r2", ok=False, terminated=oom, job_reason="BackoffLimitExceeded")
    st = wait_status(kube, "a", "oom", lambda s: s.get("phase") == "Failed")
    assert cond(st, "Failed")["reason"] == "OOMKilled" and cond(st, "Stalled")["status"] == "True"
    assert "memory" in cond(st, "Failed")["message"] and cond(st, "Ready")["status"] == "False"
    assert st["attempts"] == {"iter-1/generate": 2}
    evs = events(kube, "a", "oom")
    assert ("Warning", "JobRetried") in [(e[0], e[1]) for e in evs]
    assert ("Warning", "OOMKilled") in [(e[0], e[1]) for e in evs]
    time.sleep(1)
    assert step_jobs(kube, "a", "oom") == ["oom-i1-generate", "oom-i1-generate-r2"]  # no third attempt
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
    figures = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("selfreward_jobs_") and 'run="oom"' in line}
    assert figures['selfreward_jobs_created_total{namespace="a",run="oom"}'] == 2
    assert figures['selfreward_jobs_failed_total{namespace="a",run="oom"}'] == 2
    assert figures['selfreward_jobs_retried_total{namespace="a",run="oom"}'] == 1


def test_worker_error_line_becomes_the_reason(kube, operator):
    player = JobPlayer(kube)
    kube.create(manifest("err", "a", retry={"maxRetries": 0}))
    msg = json.dumps({"error": "PhaseError: prompts file /data/prompts.jsonl is empty", "phase": "generate"})
    player.finish("a", "err-i1-generate", ok=False, job_reason="BackoffLimitExceeded",
                  terminated={"exitCode": 1, "reason": "Error", "message": msg})
    st = wait_status(kube, "a", "err", lambda s: s.get("phase") == "Failed")
    assert cond(st, "Failed")["reason"] == "WorkerError" and "is empty" in st["message"]


def test_suspend_and_resume(kube, operator):
    player = JobPlayer(kube)
    kube.create(manifest("sus", "a"))
    player.wait_job("a", "sus-i1-generate")
    kube.patch(*RUNS, "sus", {"spec": {"suspend": True}}, "a")
    kube.wait_for(lambda: kube.get("batch/v1", "jobs", "sus-i1-generate", "a")["spec"].get("suspend") is True, WAIT)
    st = wait_status(kube, "a", "sus", lambda s: s.get("phase") == "Suspended" and s.get("observedGeneration") == 2)
    assert cond(st, "Suspended")["status"] == "True" and cond(st, "Reconciling")["status"] == "False"
    kube.patch(*RUNS, "sus", {"spec": {"suspend": False}}, "a")
    kube.wait_for(lambda: kube.get("batch/v1", "jobs", "sus-i1-generate", "a")["spec"].get("suspend") is False, WAIT)
    wait_status(kube, "a", "sus", lambda s: s.get("phase") == "Running")
    player.finish("a", "sus-i1-generate")
    player.wait_job("a", "sus-i1-judge")
    reasons = [e[1] for e in events(kube, "a", "sus")]
    assert "Suspended" in reasons and "Resumed" in reasons


def test_spec_update_mid_run_applies_from_the_next_iteration(kube, operator):
    player = JobPlayer(kube)
    kube.create(manifest("upd", "a"))
    player.wait_job("a", "upd-i1-generate")
    kube.patch(*RUNS, "upd", {"spec": {"iterations": 2, "generation": {"shards": 2}}}, "a")
    wait_status(kube, "a", "upd", lambda s: s.get("observedGeneration") == 2)
    for phase in ("generate", "judge", "pairs", "train"):
        job = player.wait_job("a", f"upd-i1-{phase}")
        assert json.loads(J.job_document(job))["spec"]["iterations"] == 1  # the iteration keeps its spec
        player.finish("a", f"upd-i1-{phase}")
    gen2 = player.wait_job("a", "upd-i2-generate")
    assert gen2["spec"]["completions"] == 2
    assert json.loads(J.job_document(gen2))["spec"]["iterations"] == 2


def test_deleting_the_run_removes_its_jobs(kube, operator):
    player = JobPlayer(kube)
    kube.create(manifest("gone", "a"))
    player.wait_job("a", "gone-i1-generate")
    kube.delete(*RUNS, "gone", "a")
    kube.wait_for(lambda: kube.get("batch/v1", "jobs", "gone-i1-generate", "a") is None, WAIT)
    assert run_obj(kube, "a", "gone") == {}


def test_delete_on_run_deletion_runs_the_cleanup_job_then_lets_go(kube, operator, tmp_path):
    store = tmp_path / "store"
    kube.create(manifest("tidy", "e", storage={"uri": f"file://{store}", "deleteOnRunDeletion": True}))
    kube.wait_for(lambda: "selfreward.dev/artifacts" in (run_obj(kube, "e", "tidy")["metadata"].get("finalizers") or []),
                  WAIT)
    JobPlayer(kube).wait_job("e", "tidy-i1-generate")
    # what the run's first worker does: claim the store, then write; plus a file it did not write
    claim(Store(f"file://{store}"), owner_of(run_obj(kube, "e", "tidy")["metadata"]))
    (store / "iter-1" / "generate").mkdir(parents=True)
    (store / "iter-1" / "generate" / "summary.json").write_text("{}")
    (store / "notes.txt").write_text("mine, not the run's")

    def policy(job):  # run the cleanup Job's real command; leave the step Jobs alone
        return None if job["metadata"]["name"] == "tidy-cleanup" else "skip"

    with JobRunner(kube, policy, namespace="e",
                   programs={"selfreward": Kubelet.venv_program("selfreward")}) as runner:
        kube.delete(*RUNS, "tidy", "e")
        wait_status(kube, "e", "tidy", lambda s: s.get("phase") == "Terminating" and not s.get("activeJob"))
        kube.wait_for(lambda: run_obj(kube, "e", "tidy") == {}, WAIT)
    assert not runner.errors and runner.handled == ["tidy-cleanup"]
    assert sorted(p.name for p in store.iterdir()) == ["notes.txt"]  # the run's files and marker went
    # the Event is posted before the finalizer goes, so it is there once the run is gone
    done = [e for e in events(kube, "e", "tidy") if e[1] == "CleanupDone"]
    assert len(done) == 1 and "kept 1" in done[0][2]
    assert "CleanupStarted" in [e[1] for e in events(kube, "e", "tidy")]
    kube.wait_for(lambda: step_jobs(kube, "e", "tidy") == [], WAIT)  # garbage-collected with the run


def test_cleanup_refuses_a_store_it_cannot_prove_is_the_runs(kube, operator, tmp_path):
    store = tmp_path / "store"
    other = {"namespace": "e", "name": "someone-else", "uid": "uid-of-another-run"}
    claim(Store(f"file://{store}"), other)
    (store / "iter-1" / "train").mkdir(parents=True)
    (store / "iter-1" / "train" / "model.safetensors").write_text("weights")
    kube.create(manifest("nosy", "e", storage={"uri": f"file://{store}", "deleteOnRunDeletion": True}))
    kube.wait_for(lambda: "selfreward.dev/artifacts" in (run_obj(kube, "e", "nosy")["metadata"].get("finalizers") or []),
                  WAIT)

    def policy(job):
        return None if job["metadata"]["name"] == "nosy-cleanup" else "skip"

    with JobRunner(kube, policy, namespace="e",
                   programs={"selfreward": Kubelet.venv_program("selfreward")}) as runner:
        kube.delete(*RUNS, "nosy", "e")
        kube.wait_for(lambda: run_obj(kube, "e", "nosy") == {}, WAIT)
    assert not runner.errors and runner.handled == ["nosy-cleanup"]
    assert (store / "iter-1" / "train" / "model.safetensors").read_text() == "weights"
    assert Store(f"file://{store}").read_json(layout.OWNER)["uid"] == "uid-of-another-run"
    refused = [e for e in events(kube, "e", "nosy") if e[1] == "CleanupRefused"]
    assert len(refused) == 1 and refused[0][0] == "Warning" and "someone-else" in refused[0][2]
    assert "CleanupDone" not in [e[1] for e in events(kube, "e", "nosy")]


def test_kube_client_adopts_on_409(kube):
    from selfreward.controller import Kube

    client = Kube(kube.api_client())
    m = J.build_job({"name": "adopt", "namespace": "d", "uid": "u-1"}, parse_spec(manifest("adopt", "d")["spec"]),
                    Step(1, "pairs"), 1)
    first, created = client.create_job("d", m)
    again, created_again = client.create_job("d", m)
    assert created and not created_again
    assert again["metadata"]["uid"] == first["metadata"]["uid"]
    assert [j["metadata"]["name"] for j in kube.objects("batch/v1", "jobs", "d")].count("adopt-i1-pairs") == 1
    client.delete_job("d", "adopt-i1-pairs")
    client.delete_job("d", "adopt-i1-pairs")  # a 404 is fine


def test_refused_api_calls_are_reported_and_retried(kube, operator):
    kube.fail_next("POST", r"/namespaces/b/jobs$", code=403, reason="Forbidden",
                   message='jobs "quota-i1-generate" is forbidden: exceeded quota: compute')
    kube.fail_next("POST", r"/namespaces/b/jobs$", code=500, reason="InternalError", message="etcd timeout")
    kube.create(manifest("quota", "b"))
    JobPlayer(kube).wait_job("b", "quota-i1-generate")  # created once the server accepts it
    evs = [e for e in events(kube, "b", "quota") if e[1] == "ApiError"]
    assert len(evs) == 1 and evs[0][0] == "Warning" and "exceeded quota" in evs[0][2]
    wait_status(kube, "b", "quota", lambda s: s.get("activeJob") == "quota-i1-generate")


def test_a_request_refused_for_good_fails_the_run_with_the_servers_reason(kube, operator):
    kube.fail_next("POST", r"/namespaces/b/jobs$", code=422, reason="Invalid",
                   message='Job.batch "bad-i1-generate" is invalid: spec.template.spec.nodeSelector: Invalid value')
    kube.create(manifest("bad", "b"))
    st = wait_status(kube, "b", "bad", lambda s: s.get("phase") == "Failed")
    assert cond(st, "Failed")["reason"] == "ApiRejected" and "HTTP 422" in cond(st, "Failed")["message"]
    assert "nodeSelector: Invalid value" in st["message"]
    evs = [e for e in events(kube, "b", "bad") if e[1] == "ApiRejected"]
    assert len(evs) == 1 and evs[0][0] == "Warning" and "nodeSelector" in evs[0][2]
    def posts():
        return len([e for e in kube.emulator.log if e[0] == "POST" and e[1] == "/apis/batch/v1/namespaces/b/jobs"])
    before = posts()
    time.sleep(3)  # no retry loop (the error backoff's first steps are 1, 2 s)
    assert posts() == before and step_jobs(kube, "b", "bad") == []
    assert run_obj(kube, "b", "bad")["status"]["phase"] == "Failed"
    # a new spec (the cause was in it) resumes the run
    kube.patch(*RUNS, "bad", {"spec": {"resources": {"default": {"cpu": "1"}}}}, "b")
    JobPlayer(kube).wait_job("b", "bad-i1-generate")


def test_a_run_name_at_the_length_limit_gets_jobs_and_events_the_api_accepts(kube, operator):
    name = ".".join(["n" * 63] * 3) + "." + "n" * 61  # 253 characters, the most a name may have
    assert len(name) == 253
    kube.create(manifest(name, "a", generation={"shards": 1024}))
    expected = J.job_name(name, Step(1, "generate", 1024))
    job = JobPlayer(kube).wait_job("a", expected)  # the emulator checks the last pod hostname as a server does
    assert job["spec"]["completions"] == 1024 and len(f"{expected}-1023") <= 63
    st = wait_status(kube, "a", name, lambda s: s.get("activeJob") == expected)
    assert st["phase"] == "Running"
    kube.wait_for(lambda: "RunStarted" in [e[1] for e in events(kube, "a", name)], WAIT)  # Event name <= 253
    kube.delete(*RUNS, name, "a")


def test_two_runs_of_the_same_name_in_two_namespaces(kube, operator):
    player = JobPlayer(kube)
    kube.create(manifest("same", "a"))
    kube.create(manifest("same", "b"))
    player.wait_job("a", "same-i1-generate")
    player.wait_job("b", "same-i1-generate")
    player.finish("b", "same-i1-generate")
    player.wait_job("b", "same-i1-judge")
    time.sleep(0.5)
    assert step_jobs(kube, "a", "same") == ["same-i1-generate"]
    assert run_obj(kube, "a", "same")["status"]["currentPhase"] == "generate"
    assert run_obj(kube, "b", "same")["status"]["currentPhase"] == "judge"


def test_schema_rejects_what_it_can_and_the_operator_reports_the_rest(kube, operator):
    bad = manifest("bad", "a", iterations=0)
    r = kube.kubectl("apply", "-f", "-", input=json.dumps(bad))
    assert r.returncode != 0 and "iterations" in r.stderr
    # a cross-field rule the schema check here does not evaluate: pydantic does
    odd = manifest("odd", "a", judge={"minScore": 5, "maxScore": 1})
    r = kube.kubectl("apply", "-f", "-", input=json.dumps(odd))
    if r.returncode != 0:  # a CEL-evaluating server rejects it up front: fine too
        assert "minScore" in r.stderr or "maxScore" in r.stderr
        return
    st = wait_status(kube, "a", "odd", lambda s: cond(s, "Stalled").get("reason") == "InvalidSpec")
    assert st["phase"] == "Failed" and "minScore" in cond(st, "Stalled")["message"]
    assert ("Warning", "InvalidSpec") in [(e[0], e[1]) for e in events(kube, "a", "odd")]
    assert step_jobs(kube, "a", "odd") == []
    # fixed: the run starts
    kube.patch(*RUNS, "odd", {"spec": {"judge": {"minScore": 0, "maxScore": 5}}}, "a")
    JobPlayer(kube).wait_job("a", "odd-i1-generate")


SUMMARIES = {"generate": {"prompts": 2, "responses": 8}, "judge": {"judgedResponses": 8, "scoreMean": 2.5},
             "pairs": {"pairs": 2, "meanMargin": 1.0}, "train": {"dpoLoss": 0.6}}


def test_job_runner_plays_a_two_iteration_run(kube, operator):
    def policy(job):
        labels = job["metadata"]["labels"]
        if labels.get(J.LABEL_RUN) != "auto":
            return "skip"
        return Succeed(json.dumps(SUMMARIES[labels[J.LABEL_PHASE]]))

    with JobRunner(kube, policy, namespace="e") as runner:
        kube.create(manifest("auto", "e", iterations=2, generation={"shards": 3}))
        st = wait_status(kube, "e", "auto", lambda s: s.get("phase") == "Succeeded")
    assert not runner.errors
    assert [h["pairs"] for h in st["history"]] == [2, 2] and st["history"][1]["meanScore"] == 2.5
    assert sorted(runner.handled) == step_jobs(kube, "e", "auto") and len(runner.handled) == 8


@pytest.mark.parametrize("outcome, reason", [(ImagePullBackOff, "ImagePullError"), (Unschedulable, "Unschedulable"),
                                             (DeadlineExceeded, "DeadlineExceeded")])
def test_pod_level_failures_fail_the_run_with_their_reason(kube, operator, outcome, reason):
    name = "pf-" + reason.lower()

    def policy(job):
        return outcome() if job["metadata"]["labels"].get(J.LABEL_RUN) == name else "skip"

    with JobRunner(kube, policy, namespace="e") as runner:
        kube.create(manifest(name, "e", retry={"maxRetries": 1, "backoffSeconds": 0}))
        st = wait_status(kube, "e", name, lambda s: s.get("phase") == "Failed")
    assert not runner.errors
    assert cond(st, "Failed")["reason"] == reason and cond(st, "Stalled")["status"] == "True"
    assert st["attempts"] == {"iter-1/generate": 2}
    if reason != "DeadlineExceeded":  # a stuck Job is deleted, not left waiting forever
        kube.wait_for(lambda: step_jobs(kube, "e", name) == [], WAIT)


def test_operator_killed_mid_phase_restarts_without_duplicates(kube, tmp_path):
    player = JobPlayer(kube)
    log = tmp_path / "operator.log"
    proc = start_operator(kube, ["c"], log)
    try:
        kube.create(manifest("crash", "c"))
        player.wait_job("c", "crash-i1-generate")
        wait_status(kube, "c", "crash", lambda s: s.get("activeJob") == "crash-i1-generate")
    finally:
        stop_operator(proc, kill=True)
    player.finish("c", "crash-i1-generate", [{"responses": 8}])  # completes while no operator runs
    proc = start_operator(kube, ["c"], log)
    try:
        player.finish("c", "crash-i1-judge")
        # once more, between steps: judge recorded (so its pass, which created the pairs
        # Job and posted its Event, is over), pairs finishing while no operator runs. A
        # kill inside a pass could lose that pass's Event, which the count below reads.
        wait_status(kube, "c", "crash", lambda s: s.get("completedStep") == "iter-1/judge")
        stop_operator(proc, kill=True)
        player.finish("c", "crash-i1-pairs")
        proc = start_operator(kube, ["c"], log)
        player.finish("c", "crash-i1-train")
        st = wait_status(kube, "c", "crash", lambda s: s.get("phase") == "Succeeded")
        assert st["history"][0]["responses"] == 8
        assert step_jobs(kube, "c", "crash") == ["crash-i1-generate", "crash-i1-judge", "crash-i1-pairs",
                                                  "crash-i1-train"]
        reasons = [e[1] for e in events(kube, "c", "crash")]
        assert reasons.count("StepCompleted") == 4 and reasons.count("RunStarted") == 1
        created = [m for _, _, m in events(kube, "c", "crash") if "created Job" in m or "running (Job" in m]
        assert len(created) == 4  # the restarts created nothing twice
    finally:
        stop_operator(proc)
        kube.delete(*RUNS, "crash", "c")


@pytest.mark.slow
def test_the_jobs_real_commands_run_a_tiny_iteration(kube, tmp_path, tiny_model):
    """Run each Job's container command as written (command, env, Indexed shard index)
    on this machine: the manifest the operator writes is one that works."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question number {i}: what is {i} plus {i}?"}) + "\n"
                               for i in range(6)))
    store = tmp_path / "store"
    m = manifest("real", "d", model={"uri": tiny_model}, prompts={"uri": str(prompts)},
                 storage={"uri": f"file://{store}"},
                 generation={"responsesPerPrompt": 3, "maxNewTokens": 8, "batchSize": 6},
                 # the tiny model writes random tokens, digits among them: a one-digit
                 # score pattern gives scores that differ, hence preference pairs
                 judge={"samplesPerResponse": 2, "maxNewTokens": 16, "shards": 2, "batchSize": 8,
                        "scorePattern": r"([0-9])", "minScore": 0, "maxScore": 9},
                 seed=3,
                 training={"maxSteps": 1, "batchSize": 2, "maxLength": 128},
                 retry={"maxRetries": 0})
    kubelet = Kubelet(kube, programs={"selfreward": Kubelet.venv_program("selfreward")},
                      extra_env={"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "home")})
    player = JobPlayer(kube)
    proc = start_operator(kube, ["d"], tmp_path / "operator.log")
    try:
        kube.create(m)
        for phase in ("generate", "judge", "pairs", "train"):
            name = f"real-i1-{phase}"
            player.wait_job("d", name)
            job = kubelet.run_job(name, "d")
            assert J.job_complete(job), (job.get("status"), {k: v[-2000:] for k, v in kubelet.logs.items()})
        st = wait_status(kube, "d", "real", lambda s: s.get("phase") == "Succeeded", timeout=60)
        assert (store / "iter-1" / "train" / "checkpoint" / "MANIFEST.json").exists()
        h = st["history"][0]
        assert h["responses"] == 18 and h["judged"] == 18 and h["pairs"] >= 1
        assert h["checkpoint"].endswith("iter-1/train/checkpoint") and h.get("dpoLoss") is not None
    finally:
        kubelet.close()
        stop_operator(proc)


def test_a_colocated_judge_runs_in_the_generate_jobs_real_pods(kube, tmp_path, tiny_model):
    """judge.colocate through the real operator and the Jobs' real commands: one Indexed
    generate Job whose two pods generate and judge their shard each, no judge Job, and
    the run's status, history and store as with a judge Job of its own."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question number {i}: what is {i} plus {i}?"}) + "\n"
                               for i in range(6)))
    store = tmp_path / "store"
    m = manifest("fused", "d", model={"uri": tiny_model}, prompts={"uri": str(prompts)},
                 storage={"uri": f"file://{store}"},
                 generation={"responsesPerPrompt": 3, "maxNewTokens": 8, "batchSize": 6, "shards": 2},
                 judge={"samplesPerResponse": 2, "maxNewTokens": 16, "shards": 2, "batchSize": 8, "colocate": True,
                        "scorePattern": r"([0-9])", "minScore": 0, "maxScore": 9},
                 seed=4,  # a seed whose verdicts give this tiny run a preference pair
                 training={"maxSteps": 1, "batchSize": 2, "maxLength": 128},
                 retry={"maxRetries": 0})
    kubelet = Kubelet(kube, programs={"selfreward": Kubelet.venv_program("selfreward")},
                      extra_env={"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "home")})
    player = JobPlayer(kube)
    proc = start_operator(kube, ["d"], tmp_path / "operator.log")
    try:
        kube.create(m)
        for phase in ("generate", "pairs", "train"):
            name = f"fused-i1-{phase}"
            player.wait_job("d", name)
            job = kubelet.run_job(name, "d")
            assert J.job_complete(job), (job.get("status"), {k: v[-2000:] for k, v in kubelet.logs.items()})
            if phase == "generate":
                assert job["spec"]["completions"] == 2
                judged = wait_status(kube, "d", "fused", lambda s: s.get("completedStep") == "iter-1/judge")
                assert judged["history"][0]["judged"] == 18  # from the generate pods' termination messages
        st = wait_status(kube, "d", "fused", lambda s: s.get("phase") == "Succeeded", timeout=60)
        assert step_jobs(kube, "d", "fused") == ["fused-i1-generate", "fused-i1-pairs", "fused-i1-train"]
        h = st["history"][0]
        assert h["responses"] == 18 and h["judged"] == 18 and h["pairs"] >= 1 and h.get("meanScore") is not None
        s = Store(f"file://{store}")
        assert s.read_json(layout.summary_path(1, "judge"))["modelLoads"] == 0  # both pods judged on generate's model
        assert s.read_json(layout.summary_path(1, "generate"))["modelLoads"] == 2
        reasons = [e[2] for e in events(kube, "d", "fused") if e[1] == "StepCompleted"]
        assert any(r.startswith("iter-1/judge completed in fused-i1-generate") for r in reasons), reasons
    finally:
        kubelet.close()
        stop_operator(proc)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_peered_replicas_act_once_and_report_health(kube, tmp_path):
    import urllib.request

    kube.create({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "sr", "namespace": "f"}})
    ports = [_free_port(), _free_port()]
    procs = [start_operator(kube, ["f"], tmp_path / f"op{i}.log", "--peering", "sr", "--priority", str(p),
                            health_port=port) for i, (p, port) in enumerate(zip((100, 200), ports))]
    try:
        for port in ports:
            kube.wait_for(lambda: _healthy(urllib.request, port), WAIT)
        # both replicas have announced themselves: the lower priority one is paused
        kube.wait_for(lambda: len(kube.get("kopf.dev/v1", "kopfpeerings", "sr", "f").get("status") or {}) == 2, WAIT)
        time.sleep(1.5)

        def policy(job):
            return Succeed(json.dumps(SUMMARIES[job["metadata"]["labels"][J.LABEL_PHASE]]))

        with JobRunner(kube, policy, namespace="f") as runner:
            kube.create(manifest("peer", "f"))
            wait_status(kube, "f", "peer", lambda s: s.get("phase") == "Succeeded")
        assert not runner.errors
        time.sleep(1)
        reasons = [e[1] for e in events(kube, "f", "peer")]
        assert reasons.count("StepCompleted") == 4 and reasons.count("RunStarted") == 1  # one replica acted
        # the active replica goes: the other takes over once its record is gone
        stop_operator(procs[1])
        kube.wait_for(lambda: len(kube.get("kopf.dev/v1", "kopfpeerings", "sr", "f").get("status") or {}) == 1, WAIT)
        with JobRunner(kube, policy, namespace="f") as runner:
            kube.create(manifest("peer2", "f"))
            wait_status(kube, "f", "peer2", lambda s: s.get("phase") == "Succeeded")
        assert not runner.errors
    finally:
        for proc in procs:
            stop_operator(proc)
    log = (tmp_path / "op0.log").read_text()
    assert "paused" in log.lower()


def _healthy(urllib_request, port) -> bool:
    try:
        return urllib_request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
    except OSError:
        return False


def test_a_completion_the_operator_has_not_recorded_survives_the_ttl(kube, tmp_path):
    """ttlSecondsAfterFinished: 0 and the emulated TTL controller: a Job gets its TTL only
    once the run's status records it, so one that finished while the operator was down is
    read after the restart, and no step Job is ever created twice."""
    player = JobPlayer(kube)
    log = tmp_path / "operator.log"
    with TTLController(kube, namespace="g") as ttl:
        proc = start_operator(kube, ["g"], log)
        try:
            kube.create(manifest("ttl", "g", ttlSecondsAfterFinished=0))
            player.finish("g", "ttl-i1-generate", [{"responses": 8}])
            kube.wait_for(lambda: "ttl-i1-generate" in ttl.deleted, WAIT)  # recorded, then expired
            wait_status(kube, "g", "ttl", lambda s: s.get("activeJob") == "ttl-i1-judge")
        finally:
            stop_operator(proc, kill=True)
        player.finish("g", "ttl-i1-judge", [{"judgedResponses": 8, "scoreMean": 2.0}])  # while no operator runs
        time.sleep(1)
        assert kube.get("batch/v1", "jobs", "ttl-i1-judge", "g") is not None  # no TTL yet: still there to read
        proc = start_operator(kube, ["g"], log)
        try:
            player.finish("g", "ttl-i1-pairs", [{"pairs": 2}])
            player.finish("g", "ttl-i1-train")
            st = wait_status(kube, "g", "ttl", lambda s: s.get("phase") == "Succeeded")
            kube.wait_for(lambda: step_jobs(kube, "g", "ttl") == [], WAIT)
        finally:
            stop_operator(proc)
            kube.delete(*RUNS, "ttl", "g")
    h = st["history"][0]
    assert (h["responses"], h["judged"], h["meanScore"], h["pairs"]) == (8, 8, 2.0, 2)
    assert sorted(ttl.deleted) == ["ttl-i1-generate", "ttl-i1-judge", "ttl-i1-pairs", "ttl-i1-train"]  # once each
    reasons = [e[1] for e in events(kube, "g", "ttl")]
    assert reasons.count("StepCompleted") == 4


FAILING_BUILDER = """
import os
import selfreward.jobs as J
_real = J.build_job
def build_job(run_meta, *args, **kwargs):
    if run_meta.get("name") == "boom" and os.path.exists({flag!r}):
        raise MemoryError("formatting the judge template ran out of memory")
    return _real(run_meta, *args, **kwargs)
J.build_job = build_job
"""


def test_an_exception_in_reconcile_ends_as_a_condition_and_an_event(kube, tmp_path):
    flag = tmp_path / "failing"
    flag.write_text("")
    proc = start_operator(kube, ["g"], tmp_path / "operator.log", preload=FAILING_BUILDER.format(flag=str(flag)))
    try:
        kube.create(manifest("boom", "g"))
        kube.create(manifest("fine", "g"))
        st = wait_status(kube, "g", "boom", lambda s: cond(s, "Stalled").get("reason") == "ReconcileError")
        assert "MemoryError: formatting the judge template ran out of memory" in cond(st, "Stalled")["message"]
        assert cond(st, "Stalled")["status"] == "True" and st.get("phase") != "Failed"
        JobPlayer(kube).wait_job("g", "fine-i1-generate")  # other runs go on
        time.sleep(6)  # a retry or two (bounded backoff), reported once
        evs = [e for e in events(kube, "g", "boom") if e[1] == "ReconcileError"]
        assert len(evs) == 1 and evs[0][0] == "Warning" and "MemoryError" in evs[0][2]
        flag.unlink()  # the cause goes away: the next retry recovers
        JobPlayer(kube).wait_job("g", "boom-i1-generate", timeout=30)
        st = wait_status(kube, "g", "boom", lambda s: cond(s, "Stalled").get("status") == "False")
        assert "Recovered" in [e[1] for e in events(kube, "g", "boom")]
    finally:
        stop_operator(proc)
        kube.delete(*RUNS, "boom", "g")
        kube.delete(*RUNS, "fine", "g")


@pytest.mark.slow
def test_a_spec_over_128_kib_reaches_the_pods_as_a_file(kube, tmp_path, tiny_model):
    """Linux refuses one environment string over 128 KiB at exec: a valid spec that large
    (here a long list of tolerations) travels in the run document, read from the
    downwardAPI volume, and the step's real command runs with it."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?"}) + "\n" for i in range(2)))
    store = tmp_path / "store"
    tolerations = [{"key": f"example.com/pool-{i:04d}", "operator": "Equal", "value": "v" * 60, "effect": "NoSchedule"}
                   for i in range(900)]
    m = manifest("big", "g", model={"uri": tiny_model}, prompts={"uri": str(prompts)},
                 storage={"uri": f"file://{store}"}, resources={"default": {"tolerations": tolerations}},
                 generation={"responsesPerPrompt": 2, "maxNewTokens": 4, "batchSize": 2}, retry={"maxRetries": 0})
    kubelet = Kubelet(kube, programs={"selfreward": Kubelet.venv_program("selfreward")},
                      extra_env={"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "home")})
    proc = start_operator(kube, ["g"], tmp_path / "operator.log")
    try:
        kube.create(m)
        job = JobPlayer(kube).wait_job("g", "big-i1-generate")
        assert len(J.job_document(job)) > 128 * 1024
        assert all(len(e.get("value", "")) < 4096 for e in job["spec"]["template"]["spec"]["containers"][0]["env"])
        job = kubelet.run_job("big-i1-generate", "g")
        assert J.job_complete(job), (job.get("status"), {k: v[-2000:] for k, v in kubelet.logs.items()})
        st = wait_status(kube, "g", "big", lambda s: s.get("completedStep") == "iter-1/generate")
        assert st["history"][0]["responses"] == 4
        owner = Store(f"file://{store}").read_json(layout.OWNER)  # the worker claimed the store for this run
        assert (owner["namespace"], owner["name"], owner["uid"]) == ("g", "big", run_obj(kube, "g", "big")["metadata"]["uid"])
    finally:
        kubelet.close()
        stop_operator(proc)
        kube.delete(*RUNS, "big", "g")


def test_the_api_client_pool_fits_the_api_threads(kube, caplog):
    import concurrent.futures
    import logging

    from selfreward.controller import RECONCILE_WORKERS, Kube, api_threads

    with kube.activated():
        client = Kube()
    threads = api_threads(RECONCILE_WORKERS)
    assert client.api.rest_client.pool_manager.connection_pool_kw["maxsize"] == threads
    caplog.set_level(logging.WARNING, logger="urllib3.connectionpool")
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: client.list("/api/v1/namespaces/d/pods"), range(threads * 5)))
    assert "Connection pool is full" not in caplog.text


def test_only_step_jobs_reach_the_phase_duration_metric(caplog, monkeypatch):
    import logging

    from selfreward import metrics
    from selfreward.controller import Controller

    calls = []
    monkeypatch.setattr(metrics, "phase_finished", lambda phase, seconds: calls.append((phase, seconds)))

    ctl = Controller(kube=None)
    meta = {"name": "m", "namespace": "d", "uid": "u"}
    spec = parse_spec(manifest("m", "d")["spec"])
    stamp = {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:01:00Z",
             "conditions": [{"type": "Complete", "status": "True"}]}
    caplog.set_level(logging.WARNING)
    for job in (J.build_cleanup_job(meta, spec), J.build_job(meta, spec, Step(1, "pairs"), 1)):
        job["metadata"]["resourceVersion"] = "1"
        ctl.job_event("ADDED", dict(job, status=stamp))
    assert calls == [("pairs", 60.0)] and "unknown phase" not in caplog.text  # not the cleanup Job


def test_events_are_posted_before_the_finalizer_goes():
    """The run can vanish the moment its finalizer is removed: its Events and status are
    written first (the order of the requests the controller sends)."""
    import asyncio

    from selfreward.controller import Controller
    from selfreward.reconcile import FINALIZER

    calls = []

    class Recorder:  # records the controller's requests in order; answers like a server would
        def post_event(self, ns, run, ev, now):
            calls.append(("event", ev.reason))

        def patch_run(self, ns, name, patch, status=False):
            calls.append(("status" if status else "finalizers", patch))
            return None

    meta = {"name": "fin", "namespace": "e", "uid": "u-fin", "resourceVersion": "7", "generation": 1,
            "finalizers": [FINALIZER], "deletionTimestamp": now()}
    run = {"metadata": meta, "spec": manifest("fin", "e", storage={"uri": "s3://b/fin", "deleteOnRunDeletion": True})["spec"]}
    cleanup = J.build_cleanup_job(meta, parse_spec(run["spec"]))
    cleanup["metadata"].update(resourceVersion="8", uid="u-job")
    cleanup["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    ctl = Controller(Recorder())
    ctl.runs[("e", "fin")] = run
    ctl.job_event("ADDED", cleanup)
    result = asyncio.run(ctl.reconcile_one(("e", "fin")))
    assert any(a.__class__.__name__ == "SetFinalizer" for a in result.actions)
    kinds = [c[0] for c in calls]
    assert kinds.index("event") < kinds.index("finalizers") and kinds[-1] == "finalizers"
    assert ("event", "CleanupDone") in calls and kinds.index("status") < kinds.index("finalizers")
