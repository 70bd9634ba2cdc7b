"""A multi-node train step through the operator: an Indexed Job of two pods, each a
``torchrun --nnodes 2`` process played by the test kubelet, meeting at pod 0's DNS name
under the run's headless Service (resolved on loopback by the kubelet, as cluster DNS
would once the Service exists and selects the pods). A failed rank fails the Job; the
operator's retry re-creates every rank and the run succeeds with one committed
checkpoint. Heavy: about 30 s (one real two-process training)."""
from __future__ import annotations

import json
import socket

import pytest

from kube.emulator import cluster
from kube.kubelet import Fail, JobRunner, Kubelet, Run, Succeed
from selfreward import checkpoint, jobs as J, layout
from selfreward.crd import crd_manifest
from selfreward.spec import parse_spec
from selfreward.storage import Store
from selfreward.worker.train import pairs_path
from test_operator import manifest, start_operator, stop_operator, wait_status

RUNS = ("selfreward.dev/v1alpha1", "selfrewardruns")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pairs(n: int = 8) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": "I cannot say.", "chosenScore": 4.0, "rejectedScore": 1.0} for i in range(n)]


@pytest.mark.slow
def test_two_node_train_step_is_an_indexed_job_of_torchrun_pods(tmp_path, tiny_model, monkeypatch):
    port = _free_port()
    monkeypatch.setenv("SELFREWARD_RENDEZVOUS_PORT", str(port))
    store_uri = f"file://{tmp_path}/store"
    m = manifest("multi", "m", model={"uri": tiny_model}, storage={"uri": store_uri},
                 training={"distributed": "fsdp", "batchSize": 2, "maxSteps": 2, "maxLength": 128, "seed": 7},
                 resources={"train": {"nodes": 2}},
                 retry={"maxRetries": 1, "backoffSeconds": 0})
    store = Store.for_spec(parse_spec(m["spec"]))
    store.write_jsonl(pairs_path(1), _pairs())

    def policy(job):
        phase = job["metadata"]["labels"][J.LABEL_PHASE]
        if phase != "train":
            return Succeed(json.dumps({"durationSeconds": 0.1, "pairs": 8}))
        if job["metadata"]["labels"][J.LABEL_ATTEMPT] == "1":
            # rank 1 dies at once; rank 0 runs for real and waits for it at the rendezvous
            return lambda index, attempt: Fail(1, "rank 1 lost its node (test)") if index == 1 else Run()
        return None  # both ranks run for real

    with cluster(namespaces=["m"], crds=[crd_manifest()], validate=True) as kube:
        kubelet = Kubelet(kube, programs={"selfreward": Kubelet.venv_program("selfreward")},
                          extra_env={"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "home")})
        proc = start_operator(kube, ["m"], tmp_path / "operator.log")
        try:
            with JobRunner(kube, policy, namespace="m", kubelet=kubelet) as runner:
                kube.create(m)
                st = wait_status(kube, "m", "multi", lambda s: s.get("phase") in ("Succeeded", "Failed"), timeout=180)
                assert not runner.errors, runner.errors
            assert st["phase"] == "Succeeded", (st, (tmp_path / "operator.log").read_text()[-3000:],
                                                {k: v[-1500:] for k, v in kubelet.logs.items()})
            run_uid = kube.get(*RUNS, "multi", "m")["metadata"]["uid"]

            svc = kube.get("v1", "services", J.service_name("multi"), "m")
            assert svc is not None, "the operator created no headless Service"
            assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
            assert svc["spec"]["selector"] == {J.LABEL_RUN: "multi", J.LABEL_RANKS: "true"}
            assert [r["uid"] for r in svc["metadata"]["ownerReferences"]] == [run_uid]

            first = kube.get("batch/v1", "jobs", "multi-i1-train", "m")
            retry = kube.get("batch/v1", "jobs", "multi-i1-train-r2", "m")
            for job in (first, retry):
                assert job["spec"]["completionMode"] == "Indexed"
                assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
                assert job["spec"]["template"]["spec"]["subdomain"] == J.service_name("multi")
            assert J.job_failed(first) and J.job_condition(first, "Failed")["reason"] == "PodFailurePolicy"
            assert J.job_complete(retry)

            pods = kube.objects("v1", "pods", "m", label_selector=f"{J.LABEL_JOB}=multi-i1-train-r2")
            assert sorted(p["spec"]["hostname"] for p in pods) == ["multi-i1-train-r2-0", "multi-i1-train-r2-1"]
            logs = {p["spec"]["hostname"]: kubelet.logs[p["metadata"]["name"]] for p in pods}
            # both ranks trained; only rank 0 committed, and its summary is the step's
            assert "[selfreward rank 1]" in logs["multi-i1-train-r2-1"]
            commits = [ln for text in logs.values() for ln in text.splitlines() if "iter-1/train: committed" in ln]
            rel = layout.checkpoint_dir(1, "train")
            assert commits == [f"[selfreward] iter-1/train: committed {store.url(rel)} (rank 0 of 2)"], commits
            checkpoint.verify(store, rel)
            summary = store.read_json(layout.summary_path(1, "train"))
            assert summary["processes"] == 2 and summary["steps"] == 2
            assert st["history"][0]["checkpoint"].endswith("iter-1/train/checkpoint")
        finally:
            kubelet.close()
            stop_operator(proc)
