"""What the Jobs say about models and scratch space: pvc:// claims mounted read-only,
the hub token only as a secretKeyRef, scratch volumes (emptyDir sized from
model.sizeGiB, generic ephemeral, an existing claim) and the shared model cache, all
valid batch/v1 for the Kubernetes versions the schemas cover."""
from __future__ import annotations

import json

import pytest

from selfreward import jobs as J
from selfreward import models
from selfreward.layout import Step
from selfreward.spec import SpecError, parse_spec

META = {"name": "demo", "namespace": "ml", "uid": "uid-1", "generation": 1}
TOKEN_SECRET = "hf-token"


def _spec(model=None, resources=None, **over):
    data = {"model": {"uri": "s3://models/base", **(model or {})}, "prompts": {"uri": "s3://data/p.jsonl"},
            "iterations": 2, "storage": {"uri": "s3://runs/demo", "credentialsSecret": "s3-creds"},
            "resources": resources or {}}
    data.update(over)
    return parse_spec(data)


def _pod(job):
    return job["spec"]["template"]["spec"]


def _volumes(job):
    return {v["name"]: v for v in _pod(job)["volumes"]}


def _mounts(job):
    return {m["name"]: m for m in _pod(job)["containers"][0]["volumeMounts"]}


def _env(job):
    return {e["name"]: e for e in _pod(job)["containers"][0]["env"]}


def test_pvc_models_are_mounted_read_only_where_models_load():
    spec = _spec(model={"uri": "pvc://base-models/llama/8b"},
                 prompts={"uri": "s3://d/p.jsonl", "selfInstruct": {"modelUri": "pvc://writer.models/m"}})
    assert J.model_claims(spec) == ["base-models", "writer.models"]
    for phase in ("generate", "judge", "train", "instruct"):
        job = J.build_job(META, spec, Step(1, phase), 1)
        vols, mounts = _volumes(job), _mounts(job)
        for claim in ("base-models", "writer.models"):
            name = [n for n, v in vols.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim][0]
            assert vols[name]["persistentVolumeClaim"]["readOnly"] is True
            assert mounts[name] == {"name": name, "mountPath": f"{J.PVC_MOUNT_ROOT}/{claim}", "readOnly": True}
    # the worker reads pvc://claim/path exactly where the Job mounts the claim
    assert models.PVC_MOUNT_ROOT == J.PVC_MOUNT_ROOT
    pairs = J.build_job(META, spec, Step(1, "pairs"), 1)
    assert not [v for v in _pod(pairs)["volumes"] if "persistentVolumeClaim" in v]
    cleanup = J.build_cleanup_job(META, spec)
    assert not [v for v in _pod(cleanup)["volumes"] if "persistentVolumeClaim" in v]


def test_hub_token_is_only_a_secret_key_ref():
    spec = _spec(model={"uri": "meta-llama/Llama-3.2-1B", "revision": "main", "hubTokenSecret": TOKEN_SECRET})
    for phase in ("generate", "judge", "train"):
        job = J.build_job(META, spec, Step(1, phase), 1)
        hf = _env(job)["HF_TOKEN"]
        assert hf == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": "HF_TOKEN"}}}
    assert "HF_TOKEN" not in _env(J.build_job(META, spec, Step(1, "pairs"), 1))
    # a token as a plain env value is refused at load, naming the field to use instead
    with pytest.raises(SpecError, match=r"resources.default.env\[0\].name: HF_TOKEN is a credential.*model.hubTokenSecret"):
        _spec(model={"uri": "org/m"}, resources={"default": {"env": [{"name": "HF_TOKEN", "value": "hf_literal"}]}})
    with pytest.raises(SpecError, match="model.hubTokenSecret"):
        _spec(model={"uri": "org/m", "hubTokenSecret": "Not A Name"})


def test_trust_remote_code_defaults_off_in_the_spec_and_the_crd():
    from selfreward.crd import crd_yaml
    import yaml

    assert _spec().model.trustRemoteCode is False
    crd = yaml.safe_load(crd_yaml())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["model"]
    assert props["properties"]["trustRemoteCode"].get("default") is False


def test_scratch_defaults_scale_with_the_model_size():
    no_hint = _spec()
    for phase in ("generate", "train", "pairs"):
        assert _volumes(J.build_job(META, no_hint, Step(1, phase), 1))["tmp"] == {
            "name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}}
    eight_b = _spec(model={"sizeGiB": 15})
    size = {p: _volumes(J.build_job(META, eight_b, Step(1, p), 1))["tmp"]["emptyDir"]["sizeLimit"]
            for p in ("generate", "judge", "train", "pairs")}
    assert size == {"generate": "27Gi", "judge": "27Gi", "train": "60Gi", "pairs": "20Gi"}
    assert _volumes(J.build_job(META, eight_b, Step(0, "sft"), 1))["tmp"]["emptyDir"]["sizeLimit"] == "43Gi"
    # with a shared cache the fetched models live there: scratch holds only what train saves
    cached = _spec(model={"sizeGiB": 15}, resources={"modelCache": {"type": "claim", "claimName": "models-rwx"}})
    assert _volumes(J.build_job(META, cached, Step(1, "generate"), 1))["tmp"]["emptyDir"]["sizeLimit"] == "20Gi"
    assert _volumes(J.build_job(META, cached, Step(1, "train"), 1))["tmp"]["emptyDir"]["sizeLimit"] == "27Gi"
    # the phase's own size wins
    own = _spec(model={"sizeGiB": 15}, resources={"train": {"scratch": {"size": "500Gi"}}})
    assert _volumes(J.build_job(META, own, Step(1, "train"), 1))["tmp"]["emptyDir"]["sizeLimit"] == "500Gi"


def test_scratch_variants_and_the_model_cache():
    spec = _spec(model={"sizeGiB": 4},
                 resources={"default": {"scratch": {"type": "ephemeral", "storageClassName": "nvme"}},
                            "train": {"scratch": {"type": "claim", "claimName": "train-scratch"}},
                            "modelCache": {"type": "claim", "claimName": "models-rwx"}})
    gen = J.build_job(META, spec, Step(1, "generate"), 1)
    tmp = _volumes(gen)["tmp"]["ephemeral"]["volumeClaimTemplate"]
    assert tmp["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "nvme",
                           "resources": {"requests": {"storage": "20Gi"}}}
    assert tmp["metadata"]["labels"] == {J.LABEL_RUN: "demo", J.LABEL_PHASE: "generate"}
    assert _mounts(gen)["tmp"]["mountPath"] == "/tmp"
    train = J.build_job(META, spec, Step(1, "train"), 1)
    assert _volumes(train)["tmp"] == {"name": "tmp", "persistentVolumeClaim": {"claimName": "train-scratch"}}
    for job in (gen, train):
        assert _volumes(job)["model-cache"] == {"name": "model-cache",
                                                 "persistentVolumeClaim": {"claimName": "models-rwx"}}
        assert _mounts(job)["model-cache"]["mountPath"] == J.MODEL_CACHE_MOUNT
        env = _env(job)
        assert env["SELFREWARD_CACHE"]["value"] == J.MODEL_CACHE_MOUNT
        assert env["HF_HUB_CACHE"]["value"] == f"{J.MODEL_CACHE_MOUNT}/hub"
    assert "model-cache" not in _volumes(J.build_job(META, spec, Step(1, "pairs"), 1))
    host = _spec(resources={"modelCache": {"type": "hostPath", "path": "/var/lib/selfreward-models"}})
    assert _volumes(J.build_job(META, host, Step(1, "judge"), 1))["model-cache"]["hostPath"] == {
        "path": "/var/lib/selfreward-models", "type": "DirectoryOrCreate"}


@pytest.mark.parametrize("bad, field", [
    ({"default": {"scratch": {"type": "claim"}}}, "resources.default.scratch"),
    ({"default": {"scratch": {"claimName": "x"}}}, "resources.default.scratch"),
    ({"train": {"scratch": {"type": "emptyDir", "storageClassName": "fast"}}}, "resources.train.scratch"),
    ({"train": {"scratch": {"type": "claim", "claimName": "x", "size": "1Gi"}}}, "resources.train.scratch"),
    ({"train": {"scratch": {"size": "lots"}}}, "resources.train.scratch.size"),
    ({"modelCache": {"type": "hostPath"}}, "resources.modelCache"),
    ({"modelCache": {"type": "claim", "path": "/x"}}, "resources.modelCache"),
    ({"modelCache": {"type": "hostPath", "path": "relative"}}, "resources.modelCache.path"),
])
def test_bad_scratch_and_cache_settings_name_the_field(bad, field):
    with pytest.raises(SpecError) as e:
        _spec(resources=bad)
    assert field in str(e.value)


def test_model_volumes_validate_against_the_kubernetes_schemas():
    import kubernetes_validate

    specs = [
        _spec(model={"uri": "pvc://base-models/llama", "sizeGiB": 15, "hubTokenSecret": TOKEN_SECRET},
              resources={"default": {"scratch": {"type": "ephemeral", "size": "100Gi", "storageClassName": "nvme"}},
                         "train": {"scratch": {"type": "claim", "claimName": "train-scratch"}},
                         "modelCache": {"type": "claim", "claimName": "models-rwx"}}),
        _spec(model={"uri": "org/model", "revision": "v1"},
              resources={"default": {"scratch": {"type": "ephemeral"}},
                         "modelCache": {"type": "hostPath", "path": "/var/lib/selfreward-models"}}),
        _spec(model={"sizeGiB": 2.5}, resources={"judge": {"scratch": {"size": "64Gi"}}}),
    ]
    manifests = [J.build_job(META, s, Step(1, p, 2 if p == "judge" else 1), 1)
                 for s in specs for p in ("generate", "judge", "train", "pairs")]
    manifests += [J.build_cleanup_job(META, s) for s in specs]
    for version in ("1.30.0", "1.37.0"):
        for m in manifests:
            kubernetes_validate.validate(m, version, strict=True)


def test_restricted_pod_security_holds_except_for_a_host_path_cache():
    """The Pod Security "restricted" volume types: a pvc model, ephemeral or claim scratch
    and a claim cache keep to them; a hostPath cache is the documented exception."""
    restricted = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                  "projected", "secret"}
    ok = _spec(model={"uri": "pvc://m/x"}, resources={"default": {"scratch": {"type": "ephemeral"}},
                                                     "modelCache": {"type": "claim", "claimName": "c"}})
    host = _spec(resources={"modelCache": {"type": "hostPath", "path": "/var/cache/m"}})
    for phase in ("generate", "train"):
        for v in _pod(J.build_job(META, ok, Step(1, phase), 1))["volumes"]:
            assert set(v) - {"name"} <= restricted, v
    kinds = {k for v in _pod(J.build_job(META, host, Step(1, "generate"), 1))["volumes"] for k in v} - {"name"}
    assert "hostPath" in kinds


def test_a_generate_job_reads_its_pvc_model_where_the_job_mounts_it(tmp_path, tiny_model):
    """The Job's real command under the emulated kubelet, with the claim's mount standing
    as a local directory: the worker finds the model at the path the Job mounts it at, and
    the hub token the pod gets from its Secret appears nowhere in the Job, pods or logs."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kube.emulator import cluster
    from kube.kubelet import Kubelet

    token = "hf_tokenvalue_that_must_not_leak_42"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    spec = _spec(model={"uri": "pvc://base-models/llm/tiny", "hubTokenSecret": TOKEN_SECRET},
                 prompts={"uri": str(prompts)}, storage={"uri": f"file://{tmp_path}/store"},
                 generation={"responsesPerPrompt": 2, "maxNewTokens": 6, "batchSize": 4}, iterations=1)
    meta = {**META, "namespace": "m"}
    job = J.build_job(meta, spec, Step(1, "generate"), 1)
    mount = [m for m in _pod(job)["containers"][0]["volumeMounts"] if m["name"].startswith("model-pvc-")][0]
    assert mount["mountPath"] == f"{J.PVC_MOUNT_ROOT}/base-models" and mount["readOnly"] is True
    # the node's view of the mount: <root>/<claim> holds the claim's files
    root = tmp_path / "mnt"
    shutil.copytree(tiny_model, root / "base-models" / "llm" / "tiny")
    with cluster(namespaces=["m"], validate=True) as kube:
        kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": TOKEN_SECRET, "namespace": "m"},
                     "stringData": {"HF_TOKEN": token}})
        job["metadata"].pop("ownerReferences")  # no SelfRewardRun in this cluster
        kube.create(job)
        kubelet = Kubelet(kube, programs={"selfreward": Kubelet.venv_program("selfreward")},
                          extra_env={"SELFREWARD_PVC_ROOT": str(root), "HF_HUB_OFFLINE": "1"})
        try:
            done = kubelet.run_job(job["metadata"]["name"], "m")
            logs = dict(kubelet.logs)
        finally:
            kubelet.close()
        assert J.job_complete(done), (done.get("status"), {k: v[-2000:] for k, v in logs.items()})
        pods = kube.objects("v1", "pods", "m")
        assert J.job_summary({"pods": pods})["responses"] == 6
        assert str(root / "base-models" / "llm" / "tiny") in "".join(logs.values())
        for what in [done, *pods, logs]:
            assert token not in json.dumps(what)
