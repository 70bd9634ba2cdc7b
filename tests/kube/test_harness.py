"""The emulated Kubernetes API and the emulated kubelet, driven by the real clients:
the kubernetes Python client, kubectl 1.37 and a kopf operator."""
from __future__ import annotations

import json
import sys
import threading
import time

import jsonpatch
import kubernetes
import pytest
import yaml
from hypothesis import given, settings as hsettings, strategies as st

from kube.emulator import ResKey, cluster, json_patch, match_labels, merge_patch, parse_label_selector
from kube.kubelet import (DeadlineExceeded, Disrupted, Fail, ImagePullBackOff, JobRunner, Kubelet, OOMKilled,
                          Succeed, TTLController, Unschedulable, _expand, compress_indexes, job_condition,
                          parse_indexes)

GROUP, VERSION, PLURAL = "example.dev", "v1", "things"
JSON_PATCH = "application/json-patch+json"
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP, "scope": "Namespaced",
        "names": {"kind": "Thing", "plural": PLURAL, "singular": "thing", "shortNames": ["th"]},
        "versions": [{
            "name": VERSION, "served": True, "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "spec": {"type": "object", "required": ["size"], "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "mode": {"type": "string", "enum": ["fast", "slow"], "default": "fast"},
                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    }},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                },
            }},
        }],
    },
}


def thing(name, size=1, **meta):
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Thing",
            "metadata": {"name": name, **meta}, "spec": {"size": size}}


@pytest.fixture
def kube():
    with cluster(namespaces=["ns1"], crds=[CRD], validate=True) as c:
        yield c


def _reason(exc: kubernetes.client.ApiException) -> str:
    return json.loads(exc.body)["reason"]


# ------------------------------------------------------------------------- kubernetes client

def test_client_crud_generation_and_status_isolation(kube):
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    created = api.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL,
                                                  {**thing("a"), "status": {"phase": "ignored"}})
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z") and meta["generation"] == 1
    assert "status" not in created                      # create drops status (status subresource)
    assert created["spec"]["mode"] == "fast"            # schema default applied
    rv1 = int(meta["resourceVersion"])

    # A metadata-only change keeps the generation; a spec change bumps it; rv always grows.
    labelled = api.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "a",
                                                  {"metadata": {"labels": {"team": "x"}}})
    assert labelled["metadata"]["generation"] == 1 and int(labelled["metadata"]["resourceVersion"]) > rv1
    resized = api.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "a",
                                                 {"spec": {"size": 3}, "status": {"phase": "sneaky"}})
    assert resized["metadata"]["generation"] == 2 and "status" not in resized

    # The status endpoint changes status only.
    st = api.patch_namespaced_custom_object_status(GROUP, VERSION, "ns1", PLURAL, "a", {
        "spec": {"size": 99}, "metadata": {"labels": {"team": "y"}}, "status": {"phase": "Ready"}})
    assert st["status"] == {"phase": "Ready"} and st["spec"]["size"] == 3
    assert st["metadata"]["labels"] == {"team": "x"} and st["metadata"]["generation"] == 2

    # A no-op patch changes nothing, not even the resourceVersion.
    same = api.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "a", {"spec": {"size": 3}})
    assert same["metadata"]["resourceVersion"] == st["metadata"]["resourceVersion"]

    # PUT with the current resourceVersion works, with a stale one is a 409 Conflict.
    current = api.get_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "a")
    current["spec"]["size"] = 4
    replaced = api.replace_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "a", current)
    assert replaced["spec"]["size"] == 4 and replaced["status"] == {"phase": "Ready"}
    with pytest.raises(kubernetes.client.ApiException) as e:
        api.replace_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "a", current)
    assert e.value.status == 409 and _reason(e.value) == "Conflict"

    with pytest.raises(kubernetes.client.ApiException) as e:
        api.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, thing("a"))
    assert e.value.status == 409 and _reason(e.value) == "AlreadyExists"
    with pytest.raises(kubernetes.client.ApiException) as e:
        api.get_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "missing")
    assert e.value.status == 404 and _reason(e.value) == "NotFound"
    with pytest.raises(kubernetes.client.ApiException) as e:
        api.create_namespaced_custom_object(GROUP, VERSION, "nowhere", PLURAL, thing("b"))
    assert e.value.status == 404 and "namespaces" in json.loads(e.value.body)["message"]

    listing = api.list_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL)
    assert listing["kind"] == "ThingList" and listing["apiVersion"] == f"{GROUP}/{VERSION}"
    assert [i["metadata"]["name"] for i in listing["items"]] == ["a"]
    assert int(listing["metadata"]["resourceVersion"]) >= int(replaced["metadata"]["resourceVersion"])


def test_schema_validation_pruning_and_json_patch_test(kube):
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    for bad in ({"size": 0}, {"size": "big"}, {"mode": "fast"}, {"size": 1, "mode": "warp"}):
        with pytest.raises(kubernetes.client.ApiException) as e:
            api.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, {**thing("bad"), "spec": bad})
        assert e.value.status == 422 and _reason(e.value) == "Invalid"
    made = api.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, {
        **thing("ok"), "spec": {"size": 2, "unknown": 1, "extra": {"kept": True}}})
    assert made["spec"] == {"size": 2, "mode": "fast", "extra": {"kept": True}}   # pruned, defaulted

    # A JSON patch whose `test` fails answers 422 (kopf reads it as a conflict); a passing one applies.
    rv = made["metadata"]["resourceVersion"]
    ops = lambda value: [{"op": "test", "path": "/metadata/resourceVersion", "value": value},  # noqa: E731
                         {"op": "add", "path": "/metadata/finalizers", "value": ["example.dev/guard"]}]
    with pytest.raises(kubernetes.client.ApiException) as e:
        api.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "ok", ops("1"), _content_type=JSON_PATCH)
    assert e.value.status == 422 and _reason(e.value) == "Invalid"
    patched = api.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "ok", ops(rv),
                                                 _content_type=JSON_PATCH)
    assert int(patched["metadata"]["resourceVersion"]) > int(rv)
    assert kube.get(f"{GROUP}/{VERSION}", PLURAL, "ok", "ns1")["metadata"]["finalizers"] == ["example.dev/guard"]


def test_watch_honours_resource_version_selectors_and_timeout(kube):
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    api.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, thing("old", labels={"app": "x"}))
    since = api.list_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL)["metadata"]["resourceVersion"]
    api.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, thing("new1", labels={"app": "x"}))
    api.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, thing("new2", labels={"app": "y"}))
    api.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "old", {"metadata": {"labels": {"app": "y"}}})

    def collect(**kwargs):
        w = kubernetes.watch.Watch()
        out = [(ev["type"], ev["object"]["metadata"]["name"]) for ev in w.stream(
            api.list_namespaced_custom_object, GROUP, VERSION, "ns1", PLURAL, timeout_seconds=1, **kwargs)]
        return out

    t0 = time.monotonic()
    assert collect(resource_version=since) == [("ADDED", "new1"), ("ADDED", "new2"), ("MODIFIED", "old")]
    assert time.monotonic() - t0 < 30   # timeoutSeconds ended the stream
    # With a selector, an object leaving it arrives as DELETED.
    assert collect(resource_version=since, label_selector="app=x") == [("ADDED", "new1"), ("DELETED", "old")]
    # Without a resourceVersion: what exists now, as ADDED.
    assert sorted(collect(label_selector="app in (y)")) == [("ADDED", "new2"), ("ADDED", "old")]
    assert collect(field_selector="metadata.name=new1") == [("ADDED", "new1")]

    # Selectors on lists, set-based and existence included.
    names = lambda **kw: [i["metadata"]["name"] for i in api.list_namespaced_custom_object(  # noqa: E731
        GROUP, VERSION, "ns1", PLURAL, **kw)["items"]]
    assert names(label_selector="app!=y") == ["new1"]
    assert names(label_selector="app notin (x),app") == ["new2", "old"]
    assert names(label_selector="!app") == []
    assert names(field_selector="metadata.name!=old,metadata.namespace=ns1") == ["new1", "new2"]


def test_label_selector_parsing():
    terms = parse_label_selector("a=1,b!=2,c in (x, y),d notin (z),e,!f")
    assert terms == [("a", "=", ("1",)), ("b", "!=", ("2",)), ("c", "in", ("x", "y")),
                     ("d", "notin", ("z",)), ("e", "exists", ()), ("f", "!exists", ())]
    assert match_labels(terms, {"a": "1", "c": "y", "e": ""})
    assert not match_labels(terms, {"a": "1", "c": "y", "e": "", "f": "1"})
    assert not match_labels(terms, {"a": "1", "c": "q", "e": ""})


def test_finalizers_owner_gc_and_namespace_deletion(kube):
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    core = kubernetes.client.CoreV1Api(kube.api_client())
    owner = api.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL,
                                                thing("owner", finalizers=["example.dev/hold"]))
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Thing", "name": "owner",
           "uid": owner["metadata"]["uid"], "controller": True}
    core.create_namespaced_config_map("ns1", {"metadata": {"name": "dep", "ownerReferences": [ref]}})
    core.create_namespaced_config_map("ns1", {"metadata": {"name": "free"}})
    assert "generation" not in kube.get("v1", "configmaps", "free", "ns1")["metadata"]   # as on a real server

    deleting = api.delete_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "owner")
    assert deleting["metadata"]["deletionTimestamp"]
    held = kube.get(f"{GROUP}/{VERSION}", PLURAL, "owner", "ns1")
    assert held["metadata"]["deletionTimestamp"] and held["metadata"]["generation"] == 2
    assert kube.get("v1", "configmaps", "dep", "ns1") is not None     # owner still exists
    with pytest.raises(kubernetes.client.ApiException) as e:   # no new finalizers while deleting
        api.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "owner",
                                           {"metadata": {"finalizers": ["example.dev/hold", "more"]}})
    assert e.value.status == 422
    api.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "owner", {"metadata": {"finalizers": None}})
    assert kube.get(f"{GROUP}/{VERSION}", PLURAL, "owner", "ns1") is None
    kube.wait_for(lambda: kube.get("v1", "configmaps", "dep", "ns1") is None)
    assert kube.get("v1", "configmaps", "free", "ns1") is not None

    # Deleting the namespace deletes its content; creating in a terminating one is forbidden.
    api.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, thing("stuck", finalizers=["x/y"]))
    core.delete_namespace("ns1")
    kube.wait_for(lambda: kube.get("v1", "configmaps", "free", "ns1") is None)
    assert kube.get("v1", "namespaces", "ns1")["status"]["phase"] == "Terminating"
    with pytest.raises(kubernetes.client.ApiException) as e:
        core.create_namespaced_config_map("ns1", {"metadata": {"name": "late"}})
    assert e.value.status == 403 and _reason(e.value) == "Forbidden"
    kube.patch(f"{GROUP}/{VERSION}", PLURAL, "stuck", {"metadata": {"finalizers": None}}, "ns1")
    kube.wait_for(lambda: kube.get("v1", "namespaces", "ns1") is None)


def test_secrets_string_data_and_job_defaults(kube):
    core = kubernetes.client.CoreV1Api(kube.api_client())
    batch = kubernetes.client.BatchV1Api(kube.api_client())
    secret = core.create_namespaced_secret("ns1", {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    assert secret.data == {"k": "dg=="} and secret.type == "Opaque"
    job = batch.create_namespaced_job("ns1", {"metadata": {"name": "j"}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}})
    assert job.spec.completions == 1 and job.spec.backoff_limit == 6 and job.spec.completion_mode == "NonIndexed"
    assert job.spec.template.metadata.labels["batch.kubernetes.io/job-name"] == "j"
    with pytest.raises(kubernetes.client.ApiException) as e:   # a Job's template is immutable ...
        batch.patch_namespaced_job("j", "ns1", {"spec": {"template": {"spec": {"containers": [
            {"name": "c", "image": "other"}]}}}})
    assert e.value.status == 422 and "immutable" in json.loads(e.value.body)["message"]
    batch.create_namespaced_job("ns1", {"metadata": {"name": "held"}, "spec": {"suspend": True, "template": {
        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}})
    moved = batch.patch_namespaced_job("held", "ns1", {"spec": {"suspend": False, "template": {"spec": {
        "nodeSelector": {"gpu": "h100"}}}}})   # ... but for a suspended Job's scheduling directives
    assert moved.spec.template.spec.node_selector == {"gpu": "h100"} and moved.spec.suspend is False
    with pytest.raises(kubernetes.client.ApiException) as e:
        batch.create_namespaced_job("ns1", {"metadata": {"name": "k"}, "spec": {"template": {"spec": {
            "containers": [{"name": "c", "image": "busybox"}]}}}})   # restartPolicy Always
    assert e.value.status == 422 and "restartPolicy" in json.loads(e.value.body)["message"]
    with pytest.raises(kubernetes.client.ApiException) as e:
        core.create_namespaced_config_map("ns1", {"metadata": {"name": "Bad_Name"}})
    assert e.value.status == 422


# ------------------------------------------------------------------------- kubectl

def test_kubectl_apply_get_patch_wait_delete(kube, tmp_path):
    manifest = tmp_path / "thing.yaml"
    manifest.write_text(yaml.safe_dump({**thing("k1", size=2), "metadata": {"name": "k1", "namespace": "ns1"}}))
    r = kube.kubectl("apply", "-f", str(manifest))
    assert r.returncode == 0, r.stderr
    r = kube.kubectl("get", "things", "-n", "ns1", "k1", "-o", "json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["spec"] == {"size": 2, "mode": "fast"}
    assert "kubectl.kubernetes.io/last-applied-configuration" in got["metadata"]["annotations"]

    # A second client-side apply changes the spec (a merge patch on a custom resource).
    manifest.write_text(yaml.safe_dump({**thing("k1", size=5), "metadata": {"name": "k1", "namespace": "ns1"}}))
    r = kube.kubectl("apply", "-f", str(manifest))
    assert r.returncode == 0, r.stderr
    assert kube.get(f"{GROUP}/{VERSION}", PLURAL, "k1", "ns1")["spec"]["size"] == 5

    # Server-side apply creates and updates.
    ssa = tmp_path / "ssa.yaml"
    ssa.write_text(yaml.safe_dump({**thing("k2", size=3), "metadata": {"name": "k2", "namespace": "ns1"}}))
    r = kube.kubectl("apply", "--server-side", "-f", str(ssa))
    assert r.returncode == 0, r.stderr
    assert kube.get(f"{GROUP}/{VERSION}", PLURAL, "k2", "ns1")["spec"]["size"] == 3

    # Status through the subresource, then kubectl wait sees it.
    def set_status_later():
        time.sleep(0.5)
        r2 = kube.kubectl("patch", "things", "k1", "-n", "ns1", "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": {"phase": "Done"}}))
        assert r2.returncode == 0, r2.stderr
    t = threading.Thread(target=set_status_later)
    t.start()
    r = kube.kubectl("wait", "things/k1", "-n", "ns1", "--for=jsonpath={.status.phase}=Done", "--timeout=30s")
    t.join()
    assert r.returncode == 0, r.stderr
    assert kube.get(f"{GROUP}/{VERSION}", PLURAL, "k1", "ns1")["status"] == {"phase": "Done"}

    # A CRD applied through kubectl declares its resource.
    crd2 = json.loads(json.dumps(CRD))
    crd2["metadata"]["name"] = f"widgets.{GROUP}"
    crd2["spec"]["names"] = {"kind": "Widget", "plural": "widgets", "singular": "widget"}
    crd_path = tmp_path / "crd.yaml"
    crd_path.write_text(yaml.safe_dump(crd2))
    r = kube.kubectl("apply", "-f", str(crd_path))
    assert r.returncode == 0, r.stderr
    r = kube.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": "w", "namespace": "ns1"},
        "spec": {"size": 0}}))
    assert r.returncode != 0 and "is invalid" in r.stderr and "spec.size" in r.stderr, r.stderr
    r = kube.kubectl("wait", f"crd/widgets.{GROUP}", "--for=condition=Established", "--timeout=10s")
    assert r.returncode == 0, r.stderr
    r = kube.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": "w", "namespace": "ns1"},
        "spec": {"size": 1}}))
    assert r.returncode == 0, r.stderr
    r = kube.kubectl("delete", "crd", f"widgets.{GROUP}")
    assert r.returncode == 0, r.stderr
    assert kube.kubectl("get", "widgets", "-n", "ns1").returncode != 0       # the resource is gone
    assert not kube.emulator.snapshot(ResKey(GROUP, VERSION, "widgets"))

    r = kube.kubectl("delete", "things", "k1", "-n", "ns1")
    assert r.returncode == 0, r.stderr
    assert kube.get(f"{GROUP}/{VERSION}", PLURAL, "k1", "ns1") is None
    r = kube.kubectl("get", "things", "-n", "ns1", "-o", "name")
    assert r.stdout.split() == ["thing.example.dev/k2"]


# ------------------------------------------------------------------------- kopf

def test_kopf_operator_handles_create_status_finalizer_peering_and_events(kube):
    import kopf
    from kopf.testing import KopfRunner

    registry = kopf.OperatorRegistry()
    seen: list[str] = []

    @kopf.on.login(registry=registry)
    def login(**kwargs):   # the kubernetes client's own kubeconfig loading ($KUBECONFIG -> the emulator)
        return kopf.login_via_client(**kwargs)

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def on_create(spec, name, patch, **_):
        seen.append(f"create:{name}")
        patch.status["phase"] = f"Sized{spec['size']}"
        kopf.info({"metadata": {"name": name, "namespace": "ns1", "uid": "u"}, "kind": "Thing",
                   "apiVersion": f"{GROUP}/{VERSION}"}, reason="Sized", message="sized it")

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def on_delete(name, **_):
        seen.append(f"delete:{name}")

    kube.create({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                 "metadata": {"name": "test-peering", "namespace": "ns1"}})
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    settings.watching.server_timeout = 10
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    with KopfRunner(["run", "--namespace=ns1", "--peering=test-peering"], registry=registry,
                    settings=settings, timeout=30) as runner:
        kube.wait_for(lambda: (kube.get("kopf.dev/v1", "kopfpeerings", "test-peering", "ns1")
                               .get("status")), timeout=30)      # kopf announced itself
        api.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, thing("op", size=7))
        obj = kube.wait_for(lambda: (o := kube.get(f"{GROUP}/{VERSION}", PLURAL, "op", "ns1"))
                            and (o.get("status") or {}).get("phase") == "Sized7" and o, timeout=30)
        assert obj["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        assert obj["spec"] == {"size": 7, "mode": "fast"}
        kube.wait_for(lambda: [e for e in kube.objects("v1", "events", "ns1") if e.get("reason") == "Sized"])
        api.delete_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "op")
        kube.wait_for(lambda: kube.get(f"{GROUP}/{VERSION}", PLURAL, "op", "ns1") is None, timeout=30)
    assert runner.exit_code == 0, runner.output
    assert seen == ["create:op", "delete:op"]


# ------------------------------------------------------------------------- kubelet

def _job(name, *, command, completions=1, indexed=True, **spec):
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "ns1"},
            "spec": {"completions": completions, "parallelism": completions,
                     **({"completionMode": "Indexed"} if indexed else {}), **spec,
                     "template": {"spec": {"restartPolicy": "Never", "containers": [{
                         "name": "main", "image": "selfreward:test", "command": command,
                         "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                                 {"name": "GREETING", "value": "hi-$(TOKEN)"}]}]}}}}


def test_kubelet_runs_an_indexed_job_locally(kube):
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "ns1"},
                 "stringData": {"token": "s3cr3t"}})
    script = ("import os,json; print('working on', os.environ['JOB_COMPLETION_INDEX']); open(os.environ['SELFREWARD_TERMINATION_LOG'],'w').write(json.dumps("
              "{'index': os.environ['JOB_COMPLETION_INDEX'], 'greeting': os.environ['GREETING'],"
              " 'idx': os.environ['IDX'], 'pod': os.environ['POD']}))")
    job = _job("gen", command=["python", "-c", script], completions=3)
    job["spec"]["template"]["spec"]["containers"][0]["env"] += [
        {"name": "IDX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    kube.create(job)
    kubelet = Kubelet(kube, venv_programs=["python"])
    try:
        job = kubelet.run_job("gen", "ns1")
    finally:
        kubelet.close()
    assert job_condition(job, "Complete")["reason"] == "CompletionsReached"
    assert job_condition(job, "SuccessCriteriaMet")
    assert job["status"]["succeeded"] == 3 and job["status"]["completedIndexes"] == "0-2"
    assert job["status"]["active"] == 0 and job["status"]["startTime"] and job["status"]["completionTime"]
    pods = kube.objects("v1", "pods", "ns1", label_selector="batch.kubernetes.io/job-name=gen")
    assert len(pods) == 3
    by_index = {}
    for pod in pods:
        index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert pod["status"]["phase"] == "Succeeded" and term["reason"] == "Completed" and term["exitCode"] == 0
        assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        message = json.loads(term["message"])
        assert message.pop("pod") == pod["metadata"]["name"] and pod["metadata"]["name"].startswith(f"gen-{index}-")
        by_index[index] = message
        log = kubernetes.client.CoreV1Api(kube.api_client()).read_namespaced_pod_log(pod["metadata"]["name"], "ns1")
        assert log == f"working on {index}\n"
    assert by_index == {str(i): {"index": str(i), "greeting": "hi-s3cr3t", "idx": str(i)} for i in range(3)}


def test_kubelet_writes_content_volumes_and_maps_their_paths(kube):
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "ns1"},
                 "stringData": {"token": "s3cr3t"}})
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": "ns1"},
                 "data": {"a.txt": "from a configmap", "b.txt": "unused"}})
    big = "x" * (200 * 1024)  # more than one env string may hold: a file may
    script = ("import os,sys,json; d=sys.argv[1]; out={n: open(os.path.join(d, n)).read() if n != 'doc' else "
              "len(open(os.path.join(d, n)).read()) for n in ('doc', 'name')}; "
              "out['cfg']=open(os.environ['CFG']).read(); out['tok']=open(sys.argv[2]).read(); "
              "open(os.environ['SELFREWARD_TERMINATION_LOG'],'w').write(json.dumps(out))")
    # paths are mapped where they are whole words of the command or env values
    job = _job("vols", command=["python", "-c", script, "/etc/run", "/etc/secret/token"], indexed=False)
    job["spec"]["template"]["metadata"] = {"annotations": {"example.dev/doc": big}}
    pod = job["spec"]["template"]["spec"]
    pod["volumes"] = [
        {"name": "run", "downwardAPI": {"items": [
            {"path": "doc", "fieldRef": {"fieldPath": "metadata.annotations['example.dev/doc']"}},
            {"path": "name", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
        {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "a.txt", "path": "a.txt"}]}},
        {"name": "sec", "secret": {"secretName": "creds"}},
        {"name": "tmp", "emptyDir": {}}]
    container = pod["containers"][0]
    container["volumeMounts"] = [{"name": "run", "mountPath": "/etc/run"}, {"name": "cfg", "mountPath": "/etc/cfg"},
                                 {"name": "sec", "mountPath": "/etc/secret"}, {"name": "tmp", "mountPath": "/tmp"}]
    container["env"].append({"name": "CFG", "value": "/etc/cfg/a.txt"})
    kube.create(job)
    kubelet = Kubelet(kube, venv_programs=["python"])
    try:
        done = kubelet.run_job("vols", "ns1")
        assert job_condition(done, "Complete"), kubelet.logs
        [p] = kube.objects("v1", "pods", "ns1", label_selector="batch.kubernetes.io/job-name=vols")
        out = json.loads(p["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
        assert out == {"doc": len(big), "name": "ns1", "cfg": "from a configmap", "tok": "s3cr3t"}
        # a volume whose ConfigMap is missing leaves the pod waiting, as a kubelet does
        missing = _job("novol", command=["python", "-c", "pass"], indexed=False)
        missing["spec"]["template"]["spec"]["volumes"] = [{"name": "cfg", "configMap": {"name": "nope"}}]
        missing["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "cfg", "mountPath": "/c"}]
        kube.create(missing)
        kubelet.run_job("novol", "ns1")
        [p] = kube.objects("v1", "pods", "ns1", label_selector="batch.kubernetes.io/job-name=novol")
        assert p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "CreateContainerConfigError"
    finally:
        kubelet.close()


def test_emulator_refuses_what_a_server_does_for_names_and_annotations(kube):
    api = kubernetes.client.BatchV1Api(kube.api_client())
    name = "j" * 60  # a fine Job name, but <name>-1023 is no pod hostname
    with pytest.raises(kubernetes.client.ApiException) as err:
        api.create_namespaced_job("ns1", _job(name, command=["true"], completions=1024))
    assert err.value.status == 422 and "invalid DNS label" in json.loads(err.value.body)["message"]
    api.create_namespaced_job("ns1", _job("j" * 58, command=["true"], completions=1024))  # 58 + "-1023" = 63
    heavy = _job("heavy", command=["true"])
    heavy["spec"]["template"]["metadata"] = {"annotations": {"a": "x" * (256 * 1024)}}
    with pytest.raises(kubernetes.client.ApiException) as err:
        api.create_namespaced_job("ns1", heavy)
    assert err.value.status == 422 and "262144 bytes" in json.loads(err.value.body)["message"]


def test_ttl_controller_honours_a_ttl_set_after_the_job_finished(kube):
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "ns1"},
                 "stringData": {"token": "t"}})
    kube.create(_job("later", command=["true"], indexed=False))
    kubelet = Kubelet(kube, venv_programs=["python"])
    try:
        with TTLController(kube, namespace="ns1") as ttl:
            assert job_condition(kubelet.run_job("later", "ns1"), "Complete")
            time.sleep(0.5)
            assert kube.get("batch/v1", "jobs", "later", "ns1") is not None  # no TTL: kept
            kube.patch("batch/v1", "jobs", "later", {"spec": {"ttlSecondsAfterFinished": 0}}, "ns1")
            kube.wait_for(lambda: kube.get("batch/v1", "jobs", "later", "ns1") is None, 10)
            assert ttl.deleted == ["later"]
    finally:
        kubelet.close()


def test_kubelet_failures_and_retries(kube):
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "ns1"},
                 "data": {"token": "eA=="}})
    kubelet = Kubelet(kube, programs={"python": [sys.executable]})
    try:
        # A real process failing: retried up to backoffLimit, then BackoffLimitExceeded; message kept.
        kube.create(_job("bad", command=["python", "-c",
                                         "import os,sys; open(os.environ['SELFREWARD_TERMINATION_LOG'],'w')"
                                         ".write('boom'); sys.exit(3)"], backoffLimit=1))
        job = kubelet.run_job("bad", "ns1")
        assert job_condition(job, "Failed")["reason"] == "BackoffLimitExceeded"
        assert job_condition(job, "FailureTarget") and job["status"]["failed"] == 2
        term = kube.objects("v1", "pods", "ns1", label_selector="job-name=bad")[0]["status"][
            "containerStatuses"][0]["state"]["terminated"]
        assert (term["exitCode"], term["reason"], term["message"]) == (3, "Error", "boom")

        # Scripted outcomes: fail once then succeed; OOMKilled with a FailJob pod failure policy.
        kube.create(_job("flaky", command=["true"], completions=2, backoffLimit=3, indexed=False))
        job = kubelet.run_job("flaky", "ns1", outcome=lambda i, attempt: Fail(1, "x") if attempt == 0 else Succeed("ok"))
        assert job_condition(job, "Complete") and job["status"]["failed"] == 2 and job["status"]["succeeded"] == 2
        assert "completedIndexes" not in job["status"]          # a NonIndexed Job
        pods = kube.objects("v1", "pods", "ns1", label_selector="job-name=flaky")
        assert len(pods) == 4 and not any("batch.kubernetes.io/job-completion-index" in p["metadata"]["annotations"]
                                          for p in pods)
        kube.create(_job("oom", command=["true"], podFailurePolicy={"rules": [
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [137]}}]}))
        job = kubelet.run_job("oom", "ns1", outcome=OOMKilled("out of memory"))
        assert job_condition(job, "Failed")["reason"] == "PodFailurePolicy"
        term = kube.objects("v1", "pods", "ns1", label_selector="job-name=oom")[0]["status"][
            "containerStatuses"][0]["state"]["terminated"]
        assert (term["exitCode"], term["reason"]) == (137, "OOMKilled")

        # An evicted pod matching an Ignore rule is not counted and is replaced.
        kube.create(_job("evicted", command=["true"], backoffLimit=0, podFailurePolicy={"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}))
        job = kubelet.run_job("evicted", "ns1", outcome=lambda i, attempt: Disrupted() if attempt == 0 else Succeed())
        assert job_condition(job, "Complete") and job["status"].get("failed", 0) == 0
        # ttlSecondsAfterFinished: 0 -> the TTL controller deletes the finished Job and its pods.
        kube.create(_job("shortlived", command=["true"], ttlSecondsAfterFinished=0))
        kubelet.run_job("shortlived", "ns1", outcome=Succeed())
        assert kube.get("batch/v1", "jobs", "shortlived", "ns1") is None
        kube.wait_for(lambda: kube.objects("v1", "pods", "ns1", label_selector="job-name=shortlived") == [])

        # Stuck pods keep the Job active.
        kube.create(_job("pull", command=["true"]))
        job = kubelet.run_job("pull", "ns1", outcome=ImagePullBackOff())
        assert not job_condition(job, "Complete") and not job_condition(job, "Failed")
        pod = kube.objects("v1", "pods", "ns1", label_selector="job-name=pull")[0]
        assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff"
        kube.create(_job("nogpu", command=["true"]))
        kubelet.run_job("nogpu", "ns1", outcome=Unschedulable())
        pod = kube.objects("v1", "pods", "ns1", label_selector="job-name=nogpu")[0]
        assert pod["status"]["conditions"][0]["reason"] == "Unschedulable"

        kube.create(_job("late", command=["true"], activeDeadlineSeconds=60))
        job = kubelet.run_job("late", "ns1", outcome=DeadlineExceeded())
        assert job_condition(job, "Failed")["reason"] == "DeadlineExceeded"
        assert kube.objects("v1", "pods", "ns1", label_selector="job-name=late") == []

        # A missing secret leaves the pod waiting in CreateContainerConfigError.
        k = _job("nosecret", command=["true"])
        k["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"] = "nope"
        kube.create(k)
        kubelet.run_job("nosecret", "ns1")
        pod = kube.objects("v1", "pods", "ns1", label_selector="job-name=nosecret")[0]
        assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "CreateContainerConfigError"
    finally:
        kubelet.close()


def test_job_runner_plays_new_jobs_and_waits_for_unsuspend(kube):
    batch = kubernetes.client.BatchV1Api(kube.api_client())
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "ns1"},
                 "data": {"token": "eA=="}})
    with JobRunner(kube, lambda job: Succeed(f"done:{job['metadata']['name']}"), namespace="ns1") as runner:
        batch.create_namespaced_job("ns1", _job("first", command=["true"]))
        batch.create_namespaced_job("ns1", _job("held", command=["true"], suspend=True))
        kube.wait_for(lambda: job_condition(kube.get("batch/v1", "jobs", "first", "ns1"), "Complete"))
        time.sleep(0.3)
        assert kube.objects("v1", "pods", "ns1", label_selector="job-name=held") == []
        batch.patch_namespaced_job("held", "ns1", {"spec": {"suspend": False}})
        kube.wait_for(lambda: job_condition(kube.get("batch/v1", "jobs", "held", "ns1"), "Complete"))
    assert sorted(runner.handled) == ["first", "held"] and runner.errors == []
    pod = kube.objects("v1", "pods", "ns1", label_selector="job-name=held")[0]
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "done:held"


def test_compress_indexes_and_env_expansion():
    assert compress_indexes([0, 1, 2, 4, 6, 7]) == "0-2,4,6-7"
    assert compress_indexes([]) == ""
    assert parse_indexes("0-2,4,6-7") == {0, 1, 2, 4, 6, 7} and parse_indexes("") == set()
    # The kubelet's $(VAR) rules: defined references expand, $$ escapes, the rest stays.
    env = {"A": "x", "B": "$(A)"}
    assert _expand("$(A)-$$(A)-$(C)-$$-$A-$(B)", env) == "x-$(A)-$(C)-$-$A-$(A)"


# ------------------------------------------------------------------------- test controls, patch types

def test_injected_faults_and_expired_watches(kube):
    import urllib.request
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    api.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, thing("f"))
    kube.fail_next("PATCH", r"/things/f$", code=500, times=2)
    for _ in range(2):
        with pytest.raises(kubernetes.client.ApiException) as e:
            api.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "f", {"spec": {"size": 2}})
        assert e.value.status == 500 and _reason(e.value) == "InternalError"
    assert api.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "f", {"spec": {"size": 2}})["spec"]["size"] == 2

    old_rv = api.list_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL)["metadata"]["resourceVersion"]
    api.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "f", {"spec": {"size": 3}})
    kube.emulator.compact()
    url = f"{kube.url}/apis/{GROUP}/{VERSION}/namespaces/ns1/{PLURAL}?watch=true&resourceVersion={old_rv}"
    with urllib.request.urlopen(url, timeout=10) as rsp:
        assert rsp.headers["Content-Type"].startswith("application/json")
        events = [json.loads(line) for line in rsp.read().splitlines() if line.strip()]
    assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in events] == [("ERROR", 410, "Expired")]


def test_patch_types_and_deletion_propagation(kube):
    core = kubernetes.client.CoreV1Api(kube.api_client())
    batch = kubernetes.client.BatchV1Api(kube.api_client())
    core.create_namespaced_pod("ns1", {"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}]},
        {"name": "b", "image": "y"}]}})
    # kubectl patch defaults to a strategic merge patch: containers merge by name.
    r = kube.kubectl("patch", "pod", "p", "-n", "ns1", "-p", json.dumps(
        {"spec": {"containers": [{"name": "b", "image": "z"}]}}))
    assert r.returncode == 0, r.stderr
    pod = kube.get("v1", "pods", "p", "ns1")
    assert [(c["name"], c["image"]) for c in pod["spec"]["containers"]] == [("a", "x"), ("b", "z")]
    assert pod["status"]["phase"] == "Pending"
    # ... which a real server refuses for custom resources (415).
    kube.create({**thing("t"), "metadata": {"name": "t", "namespace": "ns1"}})
    r = kube.kubectl("patch", "things", "t", "-n", "ns1", "-p", json.dumps({"spec": {"size": 2}}))
    assert r.returncode != 0 and "unknown format" in r.stderr, r.stderr

    # A Job deleted through the API without a policy orphans its pods (the batch/v1 default);
    # with propagationPolicy=Background its pods are garbage-collected.
    for name in ("orphaning", "cascading"):
        job = batch.create_namespaced_job("ns1", {"metadata": {"name": name}, "spec": {"template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}})
        core.create_namespaced_pod("ns1", {"metadata": {"name": f"{name}-pod", "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job.metadata.uid, "controller": True}]},
            "spec": {"containers": [{"name": "c", "image": "x"}]}})
    batch.delete_namespaced_job("orphaning", "ns1")
    batch.delete_namespaced_job("cascading", "ns1", propagation_policy="Background")
    kube.wait_for(lambda: kube.get("v1", "pods", "cascading-pod", "ns1") is None)
    kube.wait_for(lambda: kube.get("batch/v1", "jobs", "orphaning", "ns1") is None)
    orphan = kube.get("v1", "pods", "orphaning-pod", "ns1")
    assert orphan is not None and not orphan["metadata"].get("ownerReferences")

    # Foreground: the owner waits (deletionTimestamp + foregroundDeletion) until dependents are gone.
    owner = core.create_namespaced_config_map("ns1", {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map("ns1", {"metadata": {"name": "child", "finalizers": ["x/hold"],
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]}})
    core.delete_namespaced_config_map("owner", "ns1", propagation_policy="Foreground")
    kube.wait_for(lambda: kube.get("v1", "configmaps", "child", "ns1")["metadata"].get("deletionTimestamp"))
    assert "foregroundDeletion" in kube.get("v1", "configmaps", "owner", "ns1")["metadata"]["finalizers"]
    kube.patch("v1", "configmaps", "child", {"metadata": {"finalizers": None}}, "ns1")
    kube.wait_for(lambda: kube.get("v1", "configmaps", "owner", "ns1") is None)


# ------------------------------------------------------------------------- patch algebra

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text("ab/~", max_size=3),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text("ab/~", max_size=3), children, max_size=3),
    max_leaves=12)
_json_docs = st.dictionaries(st.text("ab/~", max_size=3), _json_values, max_size=4)


@hsettings(max_examples=150, deadline=None)
@given(_json_docs, _json_docs)
def test_json_patch_agrees_with_the_jsonpatch_library(a, b):
    # jsonpatch (a dependency of kopf) computes the RFC 6902 ops; ours must apply them to b.
    ops = jsonpatch.make_patch(a, b).patch
    assert json_patch(a, ops) == b == jsonpatch.apply_patch(a, ops)
    assert json_patch(a, []) == a


@hsettings(max_examples=150, deadline=None)
@given(_json_docs, _json_docs)
def test_merge_patch_laws(a, b):
    # RFC 7386: a patch without nulls, applied to anything, yields its keys; applying twice is idempotent.
    once = merge_patch(a, b)
    assert merge_patch(once, b) == once
    for key, value in b.items():
        if value is None:
            assert key not in once
        elif not isinstance(value, dict):
            assert once[key] == value


def test_job_suspended_mid_run_stops_its_pods_and_resumes_the_rest(kube, tmp_path):
    flag = tmp_path / "go"
    script = ("import os,time; i=os.environ['JOB_COMPLETION_INDEX']\n"
              f"while i == '1' and not os.path.exists({str(flag)!r}): time.sleep(0.05)")
    job = _job("pausable", command=["python", "-c", script], completions=2)
    job["spec"]["parallelism"] = 1
    job["spec"]["template"]["spec"]["containers"][0]["env"] = []
    kube.create(job)
    index_of = lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]  # noqa: E731
    with JobRunner(kube, namespace="ns1", venv_programs=["python"]) as runner:
        # index 0 finishes, index 1 blocks on the flag: suspend the Job under it.
        kube.wait_for(lambda: [p for p in kube.objects("v1", "pods", "ns1", label_selector="job-name=pausable")
                               if index_of(p) == "1" and p["status"]["phase"] == "Running"])
        kube.patch("batch/v1", "jobs", "pausable", {"spec": {"suspend": True}}, "ns1")
        suspended = kube.wait_for(lambda: job_condition(kube.get("batch/v1", "jobs", "pausable", "ns1"), "Suspended"))
        assert suspended["reason"] == "JobSuspended"
        paused = kube.get("batch/v1", "jobs", "pausable", "ns1")
        assert paused["status"]["completedIndexes"] == "0" and paused["status"]["active"] == 0
        assert [index_of(p) for p in kube.objects("v1", "pods", "ns1", label_selector="job-name=pausable")] == ["0"]
        flag.write_text("go")
        kube.patch("batch/v1", "jobs", "pausable", {"spec": {"suspend": False}}, "ns1")
        done = kube.wait_for(lambda: (j := kube.get("batch/v1", "jobs", "pausable", "ns1"))
                             and job_condition(j, "Complete") and j, timeout=30)
    assert runner.errors == [] and runner.handled == ["pausable"]
    assert done["status"]["completedIndexes"] == "0-1" and done["status"]["succeeded"] == 2
    resumed = [c for c in done["status"]["conditions"] if c["type"] == "Suspended"]
    assert [(c["status"], c["reason"]) for c in resumed] == [("False", "JobResumed")]
    pods = kube.objects("v1", "pods", "ns1", label_selector="job-name=pausable")
    assert sorted(index_of(p) for p in pods) == ["0", "1"]      # index 0 did not run again


def test_deleting_a_running_job_kills_its_process(kube, tmp_path):
    import os
    pidfile = tmp_path / "pid"
    script = f"import os,time; open({str(pidfile)!r},'w').write(str(os.getpid())); time.sleep(60)"
    job = _job("doomed", command=["python", "-c", script])
    job["spec"]["template"]["spec"]["containers"][0]["env"] = []
    kube.create(job)
    with JobRunner(kube, namespace="ns1", venv_programs=["python"]) as runner:
        kube.wait_for(lambda: pidfile.exists() and pidfile.read_text())
        pid = int(pidfile.read_text())
        kube.delete("batch/v1", "jobs", "doomed", "ns1")

        def dead():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False
        kube.wait_for(dead, timeout=10)
        kube.wait_for(lambda: kube.objects("v1", "pods", "ns1", label_selector="job-name=doomed") == [])
    assert runner.errors == [] and runner.handled == []


def test_a_failed_pod_fails_the_job_and_stops_its_other_pods(kube):
    """FailJob (podFailurePolicy) on one pod: the Job controller deletes the others at once,
    and the kubelet stops their processes (a rank waiting for a dead peer does not hang)."""
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "ns1"},
                 "stringData": {"token": "t"}})
    job = _job("gang", command=["python", "-c", "import time; time.sleep(60)"], completions=2, backoffLimit=0,
               podFailurePolicy={"rules": [{"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [0]}}]})
    kube.create(job)
    kubelet = Kubelet(kube, venv_programs=["python"])
    t0 = time.monotonic()
    try:
        job = kubelet.run_job("gang", "ns1", outcome=lambda index, attempt: Fail(1, "lost") if index == 1 else None)
    finally:
        kubelet.close()
    assert time.monotonic() - t0 < 30  # not the sleeping pod's 60 s
    assert job_condition(job, "Failed")["reason"] == "PodFailurePolicy"
    pods = kube.objects("v1", "pods", "ns1", label_selector="batch.kubernetes.io/job-name=gang")
    # the failed pod stays for its logs; the stopped one is deleted, and not taken for an OOM kill
    assert [p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods] == ["1"]


def test_pod_dns_names_resolve_on_loopback_under_a_headless_service(kube):
    """An env value naming a pod under a headless Service (hostname.subdomain.ns.svc)
    resolves to 127.0.0.1 once that Service exists and selects the pod, as cluster DNS would."""
    script = "import os,json; open(os.environ['SELFREWARD_TERMINATION_LOG'],'w').write(os.environ['ADDR'])"

    def run(name, *, service):
        job = _job(name, command=["python", "-c", script], completions=1)
        job["spec"]["template"]["metadata"] = {"labels": {"app": name}}
        spec = job["spec"]["template"]["spec"]
        spec["subdomain"] = "ranks"
        spec["containers"][0]["env"] = [{"name": "ADDR", "value": f"{name}-0.ranks.ns1.svc"}]
        kube.create(job)
        if service is not None:
            kube.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ranks", "namespace": "ns1"},
                         "spec": service})
        kubelet = Kubelet(kube, venv_programs=["python"])
        try:
            done = kubelet.run_job(name, "ns1")
        finally:
            kubelet.close()
        (pod,) = kube.objects("v1", "pods", "ns1", label_selector=f"batch.kubernetes.io/job-name={name}")
        assert pod["spec"]["hostname"] == f"{name}-0"
        if service is not None:
            kube.delete("v1", "services", "ranks", "ns1")
        assert job_condition(done, "Complete")
        return pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]

    assert run("nosvc", service=None) == "nosvc-0.ranks.ns1.svc"  # no Service: no DNS record
    assert run("other", service={"clusterIP": "None", "selector": {"app": "else"}}) == "other-0.ranks.ns1.svc"
    assert run("yes", service={"clusterIP": "None", "selector": {"app": "yes"}}) == "127.0.0.1"
