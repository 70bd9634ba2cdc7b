"""The Job manifests the operator writes, and what it reads back from Jobs and pods."""
import json
import re

from selfreward import jobs as J
from selfreward.layout import Step
from selfreward.spec import SpecError, parse_spec

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
META = {"name": "demo", "namespace": "ml", "uid": "uid-1", "generation": 3}


def _spec(**over):
    data = {
        "model": {"uri": "s3://models/base"},
        "prompts": {"uri": "s3://data/prompts.jsonl"},
        "iterations": 2,
        "storage": {"uri": "s3://runs/demo", "endpoint": "http://s3.local:8333", "region": "eu-1",
                    "credentialsSecret": "s3-creds"},
    }
    data.update(over)
    return parse_spec(data)


def _container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


def _env(job):
    return {e["name"]: e for e in _container(job)["env"]}


def test_names_are_deterministic_dns_labels_and_hash_long_names():
    s = Step(2, "generate", 4)
    assert J.job_name("demo", s) == "demo-i2-generate"
    assert J.job_name("demo", s, 3) == "demo-i2-generate-r3"
    long = "a" * 200
    names = {J.job_name(long, Step(100, "instruct"), 100), J.job_name(long + "b", Step(100, "instruct"), 100)}
    assert len(names) == 2
    for n in names:
        assert len(n) <= 63 and DNS_LABEL.match(n), n
    dotted = J.job_name("my.run", Step(1, "pairs"))
    assert DNS_LABEL.match(dotted) and dotted != J.job_name("my-run", Step(1, "pairs"))
    assert J.run_label("my.run") == "my.run"
    assert len(J.run_label(long)) <= 63 and J.run_label(long) != J.run_label(long + "b")


def test_sharded_step_is_an_indexed_job_with_labels_owner_and_command():
    job = J.build_job(META, _spec(), Step(1, "judge", 3), 1)
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    md = job["metadata"]
    assert md["namespace"] == "ml"
    assert md["labels"][J.LABEL_RUN] == "demo"
    assert md["labels"][J.LABEL_ITERATION] == "1" and md["labels"][J.LABEL_PHASE] == "judge"
    assert md["labels"][J.LABEL_ATTEMPT] == "1"
    assert md["labels"]["app.kubernetes.io/managed-by"] == "selfreward-operator"
    assert md["labels"]["app.kubernetes.io/instance"] == "demo"
    assert md["ownerReferences"] == [{"apiVersion": "selfreward.dev/v1alpha1", "kind": "SelfRewardRun", "name": "demo",
                                      "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert _container(job)["command"] == ["selfreward", "worker", "judge", "--iteration", "1", "--spec", J.SPEC_FILE,
                                          "--num-shards", "3"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert pod_labels[J.LABEL_JOB] == "demo-i1-judge" and pod_labels[J.LABEL_RUN] == "demo"
    single = J.build_job(META, _spec(), Step(1, "pairs"), 2)
    assert "completionMode" not in single["spec"] and single["spec"]["completions"] == 1
    assert single["metadata"]["name"] == "demo-i1-pairs-r2"


def _document(job):
    return job["spec"]["template"]["metadata"]["annotations"][J.ANN_DOCUMENT]


def test_the_run_travels_as_a_file_from_an_annotation_and_credentials_only_as_secret_refs():
    spec = _spec()
    job = J.build_job(META, spec, Step(1, "generate"), 1)
    env = _env(job)
    doc = json.loads(_document(job))
    assert doc["kind"] == "SelfRewardRun" and doc["metadata"] == {"name": "demo", "namespace": "ml", "uid": "uid-1"}
    assert parse_spec(doc["spec"]) == spec
    assert J.job_document(job) == _document(job)
    assert J.ANN_DOCUMENT not in job["metadata"]["annotations"]  # once, in the pod template only
    # a downwardAPI volume shows the annotation as the file the command names
    pod = job["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "run")
    assert vol["downwardAPI"]["items"] == [{"path": "run.json", "fieldRef": {
        "fieldPath": f"metadata.annotations['{J.ANN_DOCUMENT}']"}}]
    assert {"name": "run", "mountPath": J.SPEC_DIR, "readOnly": True} in _container(job)["volumeMounts"]
    assert J.SPEC_FILE == f"{J.SPEC_DIR}/run.json" and J.SPEC_FILE in _container(job)["command"]
    assert not any(len(e.get("value", "")) > 4096 for e in _container(job)["env"])  # no payload in env
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://s3.local:8333"
    assert env["AWS_REGION"]["value"] == "eu-1"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": key}}
    assert env["HOME"]["value"] == "/tmp"
    # annotations are not expanded by the kubelet: $(VAR) and $ arrive as written
    dollars = _spec(judge={"scorePattern": r"Score: ([0-9])$", "template": "$(HOME) {prompt} {response}"})
    assert parse_spec(json.loads(J.job_document(J.build_job(META, dollars, Step(1, "judge"), 1)))["spec"]) == dollars
    # a Job made by the previous operator version (spec in env, $ doubled) still reads back
    legacy = {"spec": {"template": {"spec": {"containers": [{"env": [
        {"name": "SELFREWARD_SPEC", "value": json.dumps(dollars.model_dump(mode="json")).replace("$", "$$")}]}]}}}}
    assert parse_spec(json.loads(J.job_document(legacy))) == dollars
    no_creds = J.build_job(META, _spec(storage={"uri": "file:///data/run"}), Step(1, "generate"), 1)
    assert not any("AWS" in k for k in _env(no_creds))


def test_resources_scheduling_and_security():
    spec = _spec(
        image="registry.local/worker:1",
        imagePullPolicy="IfNotPresent",
        imagePullSecrets=["regcred"],
        serviceAccountName="trainer",
        resources={
            "default": {"cpu": "2", "memory": "8Gi", "nodeSelector": {"pool": "cpu"},
                        "env": [{"name": "EXTRA", "value": "1"}]},
            "train": {"gpus": 1, "gpuResourceName": "amd.com/gpu", "memory": "64Gi", "shmSize": "16Gi",
                      "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                      "affinity": {"nodeAffinity": {}}, "priorityClassName": "high", "activeDeadlineSeconds": 3600},
        },
        retry={"podBackoffLimit": 3},
        ttlSecondsAfterFinished=600,
    )
    job = J.build_job(META, spec, Step(2, "train"), 1)
    c = _container(job)
    pod = job["spec"]["template"]["spec"]
    assert c["image"] == "registry.local/worker:1" and c["imagePullPolicy"] == "IfNotPresent"
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "64Gi"}
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "64Gi", "amd.com/gpu": "1"}
    assert pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == {"nodeAffinity": {}} and pod["priorityClassName"] == "high"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["serviceAccountName"] == "trainer"
    shm = [v for v in pod["volumes"] if v["name"] == "dshm"][0]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    env = _env(job)
    assert env["EXTRA"]["value"] == "1"
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = c["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"} and csc["runAsNonRoot"] is True
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    js = job["spec"]
    assert js["backoffLimit"] == 3 and js["activeDeadlineSeconds"] == 3600
    assert "ttlSecondsAfterFinished" not in js  # set by reconcile once the outcome is recorded
    rules = js["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [J.EXIT_INVALID_SPEC]
    # generate does not inherit train's GPUs
    gen = J.build_job(META, spec, Step(2, "generate"), 1)
    assert "amd.com/gpu" not in _container(gen)["resources"]["limits"]
    assert "dshm" not in [v["name"] for v in gen["spec"]["template"]["spec"]["volumes"]]


def test_kueue_jobs_are_created_suspended_with_the_queue_label():
    job = J.build_job(META, _spec(kueue={"queueName": "team-a"}), Step(1, "generate"), 1)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][J.KUEUE_QUEUE_LABEL] == "team-a"
    plain = J.build_job(META, _spec(), Step(1, "generate"), 1)
    assert "suspend" not in plain["spec"] and J.KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"]


def test_cleanup_job_carries_the_secret_refs_and_the_cleanup_command():
    job = J.build_cleanup_job(META, _spec(kueue={"queueName": "q"}))
    assert job["metadata"]["name"] == "demo-cleanup"
    assert _container(job)["command"] == ["selfreward", "cleanup", "--spec", J.SPEC_FILE]
    assert json.loads(J.job_document(job))["metadata"]["uid"] == "uid-1"  # the cleanup proves ownership with it
    assert "ttlSecondsAfterFinished" not in job["spec"]  # goes with the run
    assert _env(job)["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert "suspend" not in job["spec"] and J.KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]
    assert J.job_step_of(job) is None


def _pod(name, terminated=None, waiting=None, conditions=None, last=None):
    cs = {"name": "worker", "image": "img"}
    if terminated is not None:
        cs["state"] = {"terminated": terminated}
    if waiting is not None:
        cs["state"] = {"waiting": waiting}
    if last is not None:
        cs["lastState"] = {"terminated": last}
    return {"metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"containerStatuses": [cs], "conditions": conditions or [], "startTime": "2026-01-01T00:00:00Z"}}


def _failed_job(reason="BackoffLimitExceeded", pods=()):
    return {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": reason,
                                                               "message": "Job has reached the specified backoff limit"}]},
            "pods": list(pods)}


def test_failure_reasons_most_specific_first():
    oom = _failed_job(pods=[_pod("p", terminated={"exitCode": 137, "reason": "OOMKilled"})])
    assert J.job_failure(oom).reason == "OOMKilled"
    oom_last = _failed_job(pods=[_pod("p", last={"exitCode": 137, "reason": "OOMKilled"}, terminated={"exitCode": 1})])
    assert J.job_failure(oom_last).reason == "OOMKilled"
    pull = _failed_job(pods=[_pod("p", waiting={"reason": "ImagePullBackOff", "message": "not found"})])
    assert J.job_failure(pull).reason == "ImagePullError"
    sched = _failed_job(pods=[_pod("p", conditions=[{"type": "PodScheduled", "status": "False",
                                                     "reason": "Unschedulable", "message": "0/3 nodes"}])])
    assert J.job_failure(sched) == J.Failure("Unschedulable", "0/3 nodes")
    assert J.job_failure(_failed_job("DeadlineExceeded")).reason == "DeadlineExceeded"
    msg = json.dumps({"error": "RuntimeError: CUDA error", "phase": "train", "iteration": 1})
    worker = _failed_job(pods=[_pod("p", terminated={"exitCode": 1, "reason": "Error", "message": msg})])
    assert J.job_failure(worker) == J.Failure("WorkerError", "RuntimeError: CUDA error")
    logs = _failed_job(pods=[_pod("p", terminated={"exitCode": 1, "message": "Traceback...\nValueError: boom"})])
    assert J.job_failure(logs) == J.Failure("WorkerError", "ValueError: boom")
    spec_err = _failed_job("PodFailurePolicy", pods=[_pod("p", terminated={"exitCode": 2, "message": "spec: invalid"})])
    assert J.job_failure(spec_err).reason == "InvalidSpec"
    assert J.job_failure(_failed_job()).reason == "BackoffLimitExceeded"


def test_summary_prefers_the_aggregate_then_adds_up_shards():
    def term(obj):
        return {"exitCode": 0, "reason": "Completed", "message": json.dumps(obj)}
    shards = [_pod("a-0", terminated=term({"shard": 0, "numShards": 2, "responses": 4})),
              _pod("a-1", terminated=term({"shard": 1, "numShards": 2, "responses": 6}))]
    assert J.job_summary({"pods": shards})["responses"] == 10
    whole = shards + [_pod("a-2", terminated=term({"responses": 10, "meanScore": 3.5, "numShards": 2}))]
    assert J.job_summary({"pods": whole})["meanScore"] == 3.5
    assert J.job_summary({"pods": []}) is None


def test_manifests_validate_against_the_kubernetes_schemas():
    """Every field the operator writes exists, with the right type, in batch/v1 Job of
    the oldest and newest Kubernetes versions the schemas cover here (strict: no unknown
    fields)."""
    import kubernetes_validate

    spec = _spec(
        imagePullSecrets=["regcred"], serviceAccountName="trainer", kueue={"queueName": "q"},
        resources={"default": {"cpu": "2", "memory": "8Gi", "env": [{"name": "X", "value": "1"}]},
                   "train": {"gpus": 1, "shmSize": "8Gi", "nodeSelector": {"gpu": "a100"},
                             "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                             "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                                 "nodeSelectorTerms": [{"matchExpressions": [
                                     {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
                             "priorityClassName": "high", "activeDeadlineSeconds": 600}},
    )
    manifests = [J.build_job(META, spec, Step(1, "judge", 4), 2), J.build_job(META, spec, Step(1, "train"), 1),
                 J.build_cleanup_job(META, spec)]
    for version in ("1.30.0", "1.37.0"):
        for m in manifests:
            kubernetes_validate.validate(m, version, strict=True)


# --- every name the CRD accepts fits every limit ------------------------------------

from hypothesis import example, given, settings, strategies as st  # noqa: E402

from selfreward.spec import PHASES  # noqa: E402

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_label = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


@st.composite
def run_names(draw):
    """Any metadata.name the API server accepts for a SelfRewardRun: a DNS subdomain of
    at most 253 characters (often at or near the limit)."""
    parts = draw(st.lists(_label, min_size=1, max_size=8))
    name = ".".join(parts)
    if draw(st.booleans()):  # pad towards the limit
        name = (name + "-" + draw(_label) * 10)
    name = name[:253].rstrip(".-")
    while not DNS_SUBDOMAIN.match(name) or ".." in name or "-." in name or ".-" in name:
        name = re.sub(r"\.-|-\.|\.\.", "a", name).rstrip(".-") or "a"
    return name


steps = st.builds(lambda it, ph, shards: Step(it, ph, shards), st.integers(0, 100), st.sampled_from(PHASES),
                  st.integers(1, J.MAX_SHARDS))
attempts = st.integers(1, 101)  # retry.maxRetries <= 100


@settings(max_examples=300, deadline=None)
@given(run_names(), steps, attempts, st.integers(0, 2 ** 64 - 1))
def test_names_fit_kubernetes_limits_for_every_run_name(run, step, attempt, nanos):
    assert DNS_SUBDOMAIN.match(run) and len(run) <= 253
    name = J.job_name(run, step, attempt)
    assert name == J.job_name(run, step, attempt)  # deterministic: a re-create is a 409, an adoption
    assert DNS_LABEL.match(name) and len(name) <= J.MAX_JOB_NAME
    host = f"{name}-{step.shards - 1}"  # the last pod hostname of an Indexed Job
    assert DNS_LABEL.match(host) and len(host) <= 63
    cleanup = J.cleanup_job_name(run)
    assert DNS_LABEL.match(cleanup) and len(cleanup) <= J.MAX_JOB_NAME
    label = J.run_label(run)
    assert LABEL_VALUE.match(label) and len(label) <= 63
    event = J.event_name(run, nanos)
    assert DNS_SUBDOMAIN.match(event) and len(event) <= 253


@settings(max_examples=200, deadline=None)
@given(run_names(), steps, attempts, run_names(), steps, attempts)
@example("a" * 253, Step(1, "judge", 8), 1, "a" * 252 + "b", Step(1, "judge", 8), 1)  # differ past the cut
@example("my.run", Step(1, "pairs"), 1, "my-run", Step(1, "pairs"), 1)  # differ in a replaced character
@example("r", Step(1, "generate"), 2, "r-i1-generate", Step(2, "generate"), 1)
@example("r", Step(2, "judge", 3), 1, "r", Step(2, "judge", 1024), 1)  # shards do not rename
def test_job_names_are_distinct_for_distinct_run_steps_and_attempts(run_a, step_a, att_a, run_b, step_b, att_b):
    same = (run_a, step_a.iteration, step_a.phase, att_a) == (run_b, step_b.iteration, step_b.phase, att_b)
    # (the shard count is not part of a name: a later spec with more shards keeps the step's Jobs)
    assert (J.job_name(run_a, step_a, att_a) == J.job_name(run_b, step_b, att_b)) == same


_SPEC_FOR_NAMES = _spec()


@settings(max_examples=60, deadline=None)
@given(run_names(), steps, attempts)
def test_every_manifest_label_and_the_step_read_back(run, step, attempt):
    job = J.build_job({"name": run, "namespace": "ml", "uid": "u"}, _SPEC_FOR_NAMES, step, attempt)
    labels = dict(job["metadata"]["labels"], **job["spec"]["template"]["metadata"]["labels"])
    for value in labels.values():
        assert LABEL_VALUE.match(value) and len(value) <= 63, value
    assert J.job_step_of(job) == (step.iteration, step.phase, attempt)  # from labels, not the name
    assert job["metadata"]["annotations"][J.ANN_RUN_NAME] == run  # the full name, for the controller's index


def test_a_document_over_the_bound_is_refused_with_the_limit_named():
    import pytest

    huge = _spec(resources={"default": {"env": [{"name": f"V{i}", "value": "x" * 1000} for i in range(300)]}})
    with pytest.raises(SpecError, match=f"under {J.MAX_DOCUMENT_BYTES} bytes"):
        J.build_job(META, huge, Step(1, "generate"), 1)
    assert J.MAX_DOCUMENT_BYTES + 8 * 1024 == 256 * 1024  # the API server's annotation limit, less headroom
    assert J.MAX_JOB_NAME == 63 - len(f"-{J.MAX_SHARDS - 1}")


def _multi_node(**over):
    return _spec(training={"distributed": "fsdp"},
                 resources={"train": {"gpus": 8, "nodes": 4, "shmSize": "16Gi"}}, **over)


def test_multi_node_step_is_an_indexed_job_of_torchrun_pods_under_a_headless_service():
    spec = _multi_node()
    job = J.build_job(META, spec, Step(2, "train"), 1)
    s = job["spec"]
    assert s["completionMode"] == "Indexed" and s["completions"] == s["parallelism"] == 4
    pod = s["template"]["spec"]
    assert pod["subdomain"] == J.service_name("demo") == "ranks-demo"
    assert s["template"]["metadata"]["labels"][J.LABEL_RANKS] == "true"
    cmd = _container(job)["command"]
    assert cmd[:4] == ["selfreward", "launch", "--nnodes=4", "--nproc-per-node=8"]
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in cmd and "--master-port=29500" in cmd
    assert cmd[cmd.index("-m"):] == ["-m", "selfreward", "worker", "train", "--iteration", "2", "--spec", J.SPEC_FILE]
    # rank 0's stable DNS name: hostname <job>-0 under the Service, in the run's namespace
    assert _env(job)["SELFREWARD_MASTER_ADDR"]["value"] == "demo-i2-train-0.ranks-demo.ml.svc"
    assert _container(job)["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # any rank's failure fails the Job (the retry re-creates all ranks); disruptions still first
    rules = s["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "Ignore"
    assert rules[-1] == {"action": "FailJob",
                         "onExitCodes": {"containerName": "worker", "operator": "NotIn", "values": [0]}}
    assert s["backoffLimit"] == 0

    svc = J.build_service(META)
    assert svc["metadata"]["name"] == pod["subdomain"] and svc["metadata"]["namespace"] == "ml"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    # the selector picks the Job's pods (their labels), and only pods of this run that join ranks
    labels = s["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert J.LABEL_RANKS in svc["spec"]["selector"] and J.LABEL_RUN in svc["spec"]["selector"]
    assert svc["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]

    # other phases, and one-node training, stay as they were
    gen = J.build_job(META, spec, Step(2, "generate", 2), 1)
    assert _container(gen)["command"][0] == "selfreward" and "subdomain" not in gen["spec"]["template"]["spec"]
    one = J.build_job(META, _spec(training={"distributed": "fsdp"}, resources={"train": {"gpus": 4}}),
                      Step(1, "train"), 1)
    assert "--standalone" in _container(one)["command"] and "completionMode" not in one["spec"]
    assert "SELFREWARD_MASTER_ADDR" not in _env(one) and "subdomain" not in one["spec"]["template"]["spec"]


def test_multi_node_names_leave_room_for_the_pod_index():
    long = "r" * 80
    spec = _multi_node()
    job = J.build_job({**META, "name": long}, spec, Step(12, "train"), 3)
    name = job["metadata"]["name"]
    assert name == J.job_name(long, Step(12, "train"), 3)
    for index in range(512):  # resources.train.nodes is at most 512
        assert len(f"{name}-{index}") <= 63 and DNS_LABEL.match(f"{name}-{index}")
    svc = J.service_name(long)
    assert len(svc) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", svc)
    assert J.service_name("1run")[0].isalpha()  # a Service name is a DNS-1035 label


def test_multi_node_manifests_validate_against_the_kubernetes_schemas():
    import kubernetes_validate

    spec = _multi_node(kueue={"queueName": "q"})
    for version in ("1.30.0", "1.37.0"):
        kubernetes_validate.validate(J.build_job(META, spec, Step(1, "train"), 2), version, strict=True)
        kubernetes_validate.validate(J.build_service(META), version, strict=True)
