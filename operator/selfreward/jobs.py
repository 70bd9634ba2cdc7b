"""The batch/v1 Jobs the operator creates: one per step of a run (and attempt).

``build_job`` is a pure function of the run's metadata, the spec the step runs with,
the step and the attempt number; reconcile calls it and the controller only sends the
result. Everything a pod needs is in the manifest: the run (its name, namespace, uid and
spec) as a JSON document in the pod template's ``selfreward.dev/run-document``
annotation, which a downwardAPI volume shows the container as :data:`SPEC_FILE` (an
environment variable could not carry it: Linux refuses one env string over 128 KiB at
exec); the command ``selfreward worker <phase> --spec SPEC_FILE``; credentials only as
``secretKeyRef`` from ``spec.storage.credentialsSecret``; and, for the sharded phases,
an Indexed Job whose ``JOB_COMPLETION_INDEX`` is the shard.

Names fit every limit Kubernetes puts on what is derived from them: a Job name is a
DNS label short enough that the last pod hostname of an Indexed Job (``<job>-<index>``)
is one too, label values stay within 63 characters, Event names within 253.

Also here: reading facts back from observed Jobs and their pods (the step a Job runs,
its attempt, whether it finished, why it failed, the summary its pods reported), so
that reconcile stays free of manifest details.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from . import distributed
from .layout import Step
from .spec import GenerationSpec, JudgeSpec, PhaseResources, RunSpec, SpecError, reserved_env

GROUP = "selfreward.dev"
VERSION = "v1alpha1"
KIND = "SelfRewardRun"
PLURAL = "selfrewardruns"
API_VERSION = f"{GROUP}/{VERSION}"

LABEL_RUN = "selfreward.dev/run"
LABEL_ITERATION = "selfreward.dev/iteration"
LABEL_PHASE = "selfreward.dev/phase"
LABEL_ATTEMPT = "selfreward.dev/attempt"
LABEL_JOB = "selfreward.dev/job"
LABEL_ROLE = "selfreward.dev/role"  # "step" or "cleanup"
LABEL_RANKS = "selfreward.dev/ranks"  # "true" on the pods of a multi-node step (the headless Service selects them)
ANN_RUN_NAME = "selfreward.dev/run-name"
ANN_GENERATION = "selfreward.dev/spec-generation"
ANN_SUSPENDED = "selfreward.dev/suspended-by-operator"
ANN_DOCUMENT = "selfreward.dev/run-document"  # pod template: the run as the worker reads it
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

CONTAINER = "worker"
EXIT_INVALID_SPEC = 2  # `selfreward worker` exits 2 on a SpecError: retrying cannot help
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
MAX_NAME = 63  # a DNS label, a label value, a pod hostname
MAX_OBJECT_NAME = 253  # a DNS subdomain: the run's own name, an Event's


def _max_shards() -> int:
    """The most completions (pods) an Indexed Job of a run can have: the spec's bounds on
    shards and on training nodes."""
    bounds = [m.le for f in (GenerationSpec.model_fields["shards"], JudgeSpec.model_fields["shards"],
                             PhaseResources.model_fields["nodes"])
              for m in f.metadata if getattr(m, "le", None) is not None]
    return max(bounds)


MAX_SHARDS = _max_shards()
# the Job controller names an Indexed Job's pod hostnames <job>-<index>, a DNS label too
MAX_JOB_NAME = MAX_NAME - len(f"-{MAX_SHARDS - 1}")

SPEC_DIR = "/etc/selfreward"
SPEC_FILE = f"{SPEC_DIR}/run.json"
# The run document rides in one pod-template annotation; the API server refuses more than
# 256 KiB of annotations on an object. Leave room for ours and those other controllers add.
MAX_DOCUMENT_BYTES = 256 * 1024 - 8 * 1024


@dataclass(frozen=True)
class Settings:
    """Operator-wide settings that reconcile and build_job read."""

    worker_image: str = "ghcr.io/selfreward/worker:0.1.0"
    image_pull_grace_seconds: float = 120.0  # a pod stuck pulling its image fails the attempt after this
    unschedulable_grace_seconds: float = 900.0  # a pod that cannot be scheduled fails the attempt after this
    run_as_user: int = 1000
    scratch_gib: int = 20  # the scratch size without model.sizeGiB, and the least with it
    rendezvous_port: int = distributed.RENDEZVOUS_PORT  # rank 0's TCP store in multi-node training pods


# --- names and labels ---------------------------------------------------------------

def _hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _dns_label(text: str, limit: int) -> str:
    """A DNS-1123 label of at most ``limit`` chars derived from ``text``; when the text had
    to be changed (too long, or '.' and other characters replaced), a hash of the original
    keeps distinct inputs distinct."""
    clean = re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-") or "run"
    if clean == text and len(clean) <= limit:
        return clean
    h = _hash(text)
    head = clean[: max(1, limit - len(h) - 1)].rstrip("-")
    return f"{head}-{h}" if head else h


def run_label(run_name: str) -> str:
    """The value of the selfreward.dev/run label (label values are at most 63 chars)."""
    if len(run_name) <= MAX_NAME and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", run_name):
        return run_name
    return _dns_label(run_name, MAX_NAME)


def job_suffix(step: Step, attempt: int) -> str:
    suffix = f"-i{step.iteration}-{step.phase}"
    if attempt > 1:
        suffix += f"-r{attempt}"
    return suffix


def job_name(run_name: str, step: Step, attempt: int = 1) -> str:
    """Deterministic: the same run, step and attempt always give the same name, so a
    second create answers 409 and the operator adopts the Job instead of duplicating it.
    At most MAX_JOB_NAME characters whatever the shards, so a later shard count cannot
    rename a step's Jobs; a long or dotted run name is cut and hashed. The step is read
    back from the Job's labels (job_step_of), never parsed from the name."""
    suffix = job_suffix(step, attempt)
    return _dns_label(run_name, MAX_JOB_NAME - len(suffix)) + suffix


def step_nodes(spec: RunSpec, step: Step) -> int:
    """Pods that train together in this step (1 unless training.distributed and nodes say more)."""
    return spec.training_world(step.phase)[0] if distributed.launches(spec, step.phase) else 1


def service_name(run_name: str) -> str:
    """The run's headless Service for multi-node rendezvous (a DNS-1035 label: it starts
    with a letter whatever the run is called)."""
    return "ranks-" + _dns_label(run_name, MAX_NAME - len("ranks-"))


def master_address(run_meta: dict, job: str) -> str:
    """Pod 0's stable DNS name: hostname <job>-0 (the Indexed Job's pod hostnames) under
    the Service's subdomain."""
    return f"{job}-0.{service_name(run_meta['name'])}.{run_meta.get('namespace') or 'default'}.svc"


def cleanup_job_name(run_name: str) -> str:
    return _dns_label(run_name, MAX_JOB_NAME - len("-cleanup")) + "-cleanup"


def event_name(run_name: str, nanos: int) -> str:
    """``<run>.<hex time>`` as client-go names Events, the run's part cut so that the
    whole stays a DNS subdomain of at most 253 characters."""
    stamp = f".{nanos:x}"
    head = run_name[: MAX_OBJECT_NAME - len(stamp)].rstrip(".-") or "run"
    return head + stamp


def owner_reference(run_meta: dict) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": run_meta["name"],
        "uid": run_meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def run_selector(run_name: str) -> str:
    return f"{LABEL_RUN}={run_label(run_name)}"


def base_labels(run_name: str) -> dict[str, str]:
    return {
        LABEL_RUN: run_label(run_name),
        "app.kubernetes.io/name": "selfreward",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "selfreward-operator",
        "app.kubernetes.io/instance": run_label(run_name),
    }


# --- the manifest -------------------------------------------------------------------

def run_document(run_meta: dict, spec: RunSpec) -> str:
    """The run as the worker reads it from SPEC_FILE: a SelfRewardRun manifest with the
    run's identity (which the store's owner marker records) and the full, lossless spec."""
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {k: run_meta[k] for k in ("name", "namespace", "uid") if run_meta.get(k)},
        "spec": spec.model_dump(mode="json"),
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def checked_document(run_meta: dict, spec: RunSpec) -> str:
    """The run document, or SpecError (naming the limit) for a spec too large to travel
    in a Job."""
    doc = run_document(run_meta, spec)
    size = len(doc.encode())
    if size > MAX_DOCUMENT_BYTES:
        raise SpecError([("spec", f"is {size} bytes as JSON; a run's spec must stay under {MAX_DOCUMENT_BYTES} "
                                  "bytes (it travels to the pods in an annotation, which Kubernetes caps at 256 KiB)")])
    return doc


def _storage_env(spec: RunSpec) -> list[dict]:
    env: list[dict] = []
    st = spec.storage
    if st.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": st.endpoint})
    if st.region:
        env.append({"name": "AWS_REGION", "value": st.region})
    if st.credentialsSecret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": st.credentialsSecret, "key": key}}})
    return env


# --- scratch, model volumes and the model cache ----------------------------------------

PVC_MOUNT_ROOT = "/mnt/selfreward/pvc"  # models.pvc_path reads pvc://claim/path at ROOT/claim/path
MODEL_CACHE_MOUNT = "/cache/selfreward"
# Copies of the model (of model.sizeGiB each) a phase's scratch holds, without and with a
# shared model cache (fetched models then live in the cache): generate, judge and metajudge fetch
# M_t (instruct: M_t or its own writer model); sft and train fetch M_t and, with
# training.reference: base, the base model, and save M_{t+1}. docs/storage.md has the table.
SCRATCH_MODEL_COPIES = {"generate": (1, 0), "judge": (1, 0), "metajudge": (1, 0), "instruct": (1, 0), "sft": (2, 1),
                        "train": (3, 1), "pairs": (0, 0)}
SCRATCH_HEADROOM_GIB = 10  # hub and compile caches, logs, a save's temporary files


def scratch_size(spec: RunSpec, phase: str, res: PhaseResources, settings: Settings) -> str:
    """The scratch volume's size: the phase's own, else 1.1 x the model copies it holds
    + headroom, never less than settings.scratch_gib."""
    if res.scratch is not None and res.scratch.size:
        return res.scratch.size
    if spec.model.sizeGiB is None:
        return f"{settings.scratch_gib}Gi"
    copies = SCRATCH_MODEL_COPIES.get(phase, (0, 0))[1 if spec.resources.modelCache else 0]
    return f"{max(settings.scratch_gib, math.ceil(copies * spec.model.sizeGiB * 1.1) + SCRATCH_HEADROOM_GIB)}Gi"


def _scratch_volume(spec: RunSpec, phase: str, res: PhaseResources, settings: Settings, labels: dict) -> dict:
    scratch = res.scratch
    if scratch is None or scratch.type == "emptyDir":
        return {"name": "tmp", "emptyDir": {"sizeLimit": scratch_size(spec, phase, res, settings)}}
    if scratch.type == "claim":
        return {"name": "tmp", "persistentVolumeClaim": {"claimName": scratch.claimName}}
    claim_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                  "resources": {"requests": {"storage": scratch_size(spec, phase, res, settings)}}}
    if scratch.storageClassName:
        claim_spec["storageClassName"] = scratch.storageClassName
    return {"name": "tmp", "ephemeral": {"volumeClaimTemplate": {
        "metadata": {"labels": {LABEL_RUN: labels[LABEL_RUN], LABEL_PHASE: phase}}, "spec": claim_spec}}}


def model_claims(spec: RunSpec) -> list[str]:
    """The PersistentVolumeClaims that pvc:// model URIs of the spec name."""
    uris = [spec.model.uri]
    if spec.prompts.selfInstruct and spec.prompts.selfInstruct.modelUri:
        uris.append(spec.prompts.selfInstruct.modelUri)
    return sorted({u[len("pvc://"):].partition("/")[0] for u in uris if u.startswith("pvc://")})


def _model_volumes(spec: RunSpec) -> tuple[list[dict], list[dict], list[dict]]:
    """(volumes, mounts, env) of the phases that load a model: each pvc:// claim mounted
    read-only, the shared model cache, the hub token as a secretKeyRef."""
    volumes, mounts, env = [], [], []
    for claim in model_claims(spec):
        name = f"model-pvc-{_hash(claim)}"
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": name, "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True})
    cache = spec.resources.modelCache
    if cache is not None:
        if cache.type == "claim":
            volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.claimName}})
        else:
            volumes.append({"name": "model-cache", "hostPath": {"path": cache.path, "type": "DirectoryOrCreate"}})
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT})
        env += [{"name": "SELFREWARD_CACHE", "value": MODEL_CACHE_MOUNT},
                {"name": "HF_HUB_CACHE", "value": f"{MODEL_CACHE_MOUNT}/hub"}]
    if spec.model.hubTokenSecret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": spec.model.hubTokenSecret,
                                                                       "key": "HF_TOKEN"}}})
    return volumes, mounts, env


def _security_context_pod(settings: Settings) -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "fsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _security_context_container(settings: Settings) -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _job_shell(
    run_meta: dict,
    spec: RunSpec,
    name: str,
    labels: dict[str, str],
    annotations: dict[str, str],
    command: list[str],
    env: list[dict],
    phase_for_resources: str,
    settings: Settings,
    completions: int = 1,
    backoff_limit: int = 1,
) -> dict:
    document = checked_document(run_meta, spec)
    res = spec.resources.for_phase(phase_for_resources)
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = limits["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus:
        limits[res.gpuResourceName or DEFAULT_GPU_RESOURCE] = str(res.gpus)

    volumes = [
        _scratch_volume(spec, phase_for_resources, res, settings, labels),
        {"name": "run", "downwardAPI": {"items": [
            {"path": SPEC_FILE[len(SPEC_DIR) + 1:],
             "fieldRef": {"fieldPath": f"metadata.annotations['{ANN_DOCUMENT}']"}}]}},
    ]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "run", "mountPath": SPEC_DIR, "readOnly": True}]
    model_env: list[dict] = []
    if phase_for_resources != "pairs":  # pairs (and cleanup, which runs with pairs' settings) load no model
        model_volumes, model_mounts, model_env = _model_volumes(spec)
        volumes += model_volumes
        mounts += model_mounts
    if res.shmSize:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shmSize}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})

    env = list(env) + [
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "HF_HOME", "value": "/tmp/.cache/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": "/tmp/.cache/triton"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # the worker records the image it runs in (run.json, summaries); the digest is in pod status only
        {"name": "SELFREWARD_IMAGE", "value": spec.image or settings.worker_image},
    ]
    env += _storage_env(spec) + model_env
    reserved = {e["name"] for e in env}
    for extra in res.env or []:
        # the spec refuses reserved names at load (spec.reserved_env); never override one here either
        if extra.name not in reserved and not reserved_env(extra.name):
            env.append({"name": extra.name, "value": extra.value})

    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.worker_image,
        "command": command,
        "env": env,
        "volumeMounts": mounts,
        "securityContext": _security_context_container(settings),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.imagePullPolicy:
        container["imagePullPolicy"] = spec.imagePullPolicy
    if requests or limits:
        container["resources"] = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}

    pod_labels = dict(labels)
    pod_labels[LABEL_JOB] = name
    pod_annotations = dict(annotations)
    pod_annotations[ANN_DOCUMENT] = document
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
        "securityContext": _security_context_pod(settings),
        "enableServiceLinks": False,
    }
    if phase_for_resources in ("sft", "train"):  # SIGTERM first saves a resume checkpoint (selfreward.resume)
        owner = spec.sft if phase_for_resources == "sft" else spec.training
        if owner is not None:
            pod_spec["terminationGracePeriodSeconds"] = owner.checkpointing.terminationGraceSeconds
    if res.nodeSelector:
        pod_spec["nodeSelector"] = dict(res.nodeSelector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in res.tolerations]
    if res.affinity:
        pod_spec["affinity"] = res.affinity
    if res.priorityClassName:
        pod_spec["priorityClassName"] = res.priorityClassName
    if spec.imagePullSecrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.imagePullSecrets]
    if spec.serviceAccountName:
        pod_spec["serviceAccountName"] = spec.serviceAccountName
        pod_spec["automountServiceAccountToken"] = True
    else:
        pod_spec["automountServiceAccountToken"] = False

    job_spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "completions": completions,
        "parallelism": completions,
        "podFailurePolicy": {
            "rules": [
                # node drains, preemption, evictions: not the worker's fault, not counted
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # an invalid spec fails the same way on every retry
                {"action": "FailJob",
                 "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_INVALID_SPEC]}},
            ]
        },
        "template": {"metadata": {"labels": pod_labels, "annotations": pod_annotations}, "spec": pod_spec},
    }
    if completions > 1:
        job_spec["completionMode"] = "Indexed"
    if res.activeDeadlineSeconds:
        job_spec["activeDeadlineSeconds"] = res.activeDeadlineSeconds
    # no ttlSecondsAfterFinished here: reconcile sets it once the Job's outcome is in the
    # run's status, so a Job finishing while the operator is down is not lost to its TTL
    if spec.kueue is not None:
        labels = dict(labels)
        labels[KUEUE_QUEUE_LABEL] = spec.kueue.queueName
        job_spec["suspend"] = True  # Kueue admits (unsuspends) it

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": run_meta.get("namespace"),
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(run_meta)],
        },
        "spec": job_spec,
    }


def build_job(run_meta: dict, spec: RunSpec, step: Step, attempt: int, settings: Optional[Settings] = None) -> dict:
    """The Job of one attempt of one step."""
    settings = settings or Settings()
    run_name = run_meta["name"]
    name = job_name(run_name, step, attempt)
    nodes = step_nodes(spec, step)
    labels = base_labels(run_name)
    labels.update({
        LABEL_ITERATION: str(step.iteration),
        LABEL_PHASE: step.phase,
        LABEL_ATTEMPT: str(attempt),
        LABEL_ROLE: "step",
    })
    annotations = {ANN_RUN_NAME: run_name}
    if run_meta.get("generation") is not None:
        annotations[ANN_GENERATION] = str(run_meta["generation"])
    command = ["selfreward", "worker", step.phase, "--iteration", str(step.iteration), "--spec", SPEC_FILE]
    if step.sharded:
        command += ["--num-shards", str(step.shards)]
    if distributed.launches(spec, step.phase):
        command = distributed.torchrun_command(spec, step.phase, command[1:], settings.rendezvous_port)
    env = [
        {"name": "SELFREWARD_RUN", "value": run_name},
        {"name": "SELFREWARD_ITERATION", "value": str(step.iteration)},
        {"name": "SELFREWARD_PHASE", "value": step.phase},
    ]
    if nodes > 1:
        env.append({"name": distributed.MASTER_ADDR_ENV, "value": master_address(run_meta, name)})
    job = _job_shell(run_meta, spec, name, labels, annotations, command, env, step.phase, settings,
                     completions=step.shards if step.sharded else nodes,
                     backoff_limit=spec.retry.podBackoffLimit)
    if nodes > 1:
        _gang(job, run_name)
    return job


def _gang(job: dict, run_name: str) -> None:
    """Make an Indexed Job of N pods one training launch: the pods join the run's headless
    Service (subdomain; the Job controller names each pod's host <job>-<index>), and any
    rank that fails fails the whole Job at once (its other pods are stopped), so the
    operator's retry re-creates every rank in a new Job. A disrupted pod is still not
    counted, but its peers then fail, which fails the Job the same way."""
    template = job["spec"]["template"]
    template["metadata"]["labels"][LABEL_RANKS] = "true"
    template["spec"]["subdomain"] = service_name(run_name)
    job["spec"]["podFailurePolicy"]["rules"].append(
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": [0]}})
    job["spec"]["backoffLimit"] = 0


def build_service(run_meta: dict, settings: Optional[Settings] = None) -> dict:
    """The run's headless Service: DNS names for the pods of its multi-node steps, ready
    or not (rank 0 must be reachable before any probe could pass), owned by the run."""
    settings = settings or Settings()
    run_name = run_meta["name"]
    labels = base_labels(run_name)
    labels[LABEL_ROLE] = "rendezvous"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(run_name),
            "namespace": run_meta.get("namespace"),
            "labels": labels,
            "annotations": {ANN_RUN_NAME: run_name},
            "ownerReferences": [owner_reference(run_meta)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_RUN: run_label(run_name), LABEL_RANKS: "true"},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": settings.rendezvous_port,
                       "targetPort": settings.rendezvous_port, "protocol": "TCP"}],
        },
    }


def build_cleanup_job(run_meta: dict, spec: RunSpec, settings: Optional[Settings] = None) -> dict:
    """The Job that deletes a run's artifacts (spec.storage.deleteOnRunDeletion). It runs
    with the same secretKeyRefs as the workers: the operator itself never holds storage
    credentials. It is owned by the run too, so it goes when the run finally does."""
    settings = settings or Settings()
    run_name = run_meta["name"]
    name = cleanup_job_name(run_name)
    labels = base_labels(run_name)
    labels.update({LABEL_ROLE: "cleanup", LABEL_PHASE: "cleanup"})
    annotations = {ANN_RUN_NAME: run_name}
    env = [{"name": "SELFREWARD_RUN", "value": run_name}]
    command = ["selfreward", "cleanup", "--spec", SPEC_FILE]
    job = _job_shell(run_meta, spec, name, labels, annotations, command, env, "pairs", settings,
                     backoff_limit=max(2, spec.retry.podBackoffLimit))
    job["spec"].pop("suspend", None)  # never queued behind training work
    job["metadata"]["labels"].pop(KUEUE_QUEUE_LABEL, None)
    return job


# --- reading observed Jobs and pods ---------------------------------------------------

def parse_time(value: Any) -> Optional[datetime]:
    if not value:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    text = str(value)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def format_time(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_step_of(job: dict) -> Optional[tuple[int, str, int]]:
    """(iteration, phase, attempt) from a Job's labels, or None for non-step Jobs."""
    labels = (job.get("metadata") or {}).get("labels") or {}
    if labels.get(LABEL_ROLE, "step") != "step":
        return None
    try:
        return int(labels[LABEL_ITERATION]), labels[LABEL_PHASE], int(labels.get(LABEL_ATTEMPT, "1"))
    except (KeyError, ValueError):
        return None


def job_condition(job: dict, ctype: str) -> Optional[dict]:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == "True":
            return c
    return None


def job_complete(job: dict) -> bool:
    return job_condition(job, "Complete") is not None


def job_failed(job: dict) -> bool:
    return job_condition(job, "Failed") is not None


def job_finished_at(job: dict) -> Optional[datetime]:
    st = job.get("status") or {}
    c = job_condition(job, "Failed") or job_condition(job, "Complete")
    return parse_time((c or {}).get("lastTransitionTime") or st.get("completionTime"))


def job_document(job: dict) -> Optional[str]:
    """The run document (JSON) a Job's pods read, from its pod template; for a Job made
    by an operator version that still passed the spec in ``SELFREWARD_SPEC``, that
    variable's value as the container saw it."""
    template = (job.get("spec") or {}).get("template") or {}
    doc = ((template.get("metadata") or {}).get("annotations") or {}).get(ANN_DOCUMENT)
    if doc:
        return doc
    for c in (template.get("spec") or {}).get("containers") or []:
        for e in c.get("env") or []:
            if e.get("name") == "SELFREWARD_SPEC" and "value" in e:
                return e["value"].replace("$$", "$")  # the kubelet's $$ -> $
    return None


def _statuses(pod: dict) -> list[dict]:
    st = pod.get("status") or {}
    return list(st.get("initContainerStatuses") or []) + list(st.get("containerStatuses") or [])


def _termination_messages(pod: dict) -> list[str]:
    out = []
    for cs in _statuses(pod):
        for key in ("state", "lastState"):
            term = (cs.get(key) or {}).get("terminated")
            if term and term.get("message"):
                out.append(term["message"])
    return out


def _parse_message(msg: str) -> Optional[dict]:
    """A worker writes its summary (or {"error": ...}) as one JSON line; with
    FallbackToLogsOnError the message may instead be the log tail: take the last JSON
    object line if there is one."""
    for line in reversed(msg.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def pod_reports(pods: list[dict]) -> list[dict]:
    """Every parsed JSON termination message of the pods, in pod-name order."""
    out = []
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        for msg in _termination_messages(pod):
            obj = _parse_message(msg)
            if obj is not None:
                out.append(obj)
    return out


def job_image_id(job: dict) -> Optional[str]:
    """The worker image as the kubelet resolved it (a container status's imageID, which
    carries the digest), from the Job's pods; None until a pod has started."""
    for pod in sorted(job.get("pods") or [], key=lambda p: (p.get("metadata") or {}).get("name", "")):
        for cs in _statuses(pod):
            if cs.get("name") in (None, CONTAINER) and cs.get("imageID"):
                return str(cs["imageID"])
    return None


def job_summary(job: dict, phase: Optional[str] = None) -> Optional[dict]:
    """The summary of ``phase`` (default: the Job's own) a completed Job's pods
    reported: the aggregate one (a sharded phase's last shard writes the phase summary,
    which has no "shard" key), else the shard summaries added up, else None. A pod of a
    step that ran several phases (judge.colocate) reports ``{"phases": {phase: summary}}``."""
    phase = phase or ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_PHASE)
    reports = []
    for r in pod_reports(job.get("pods") or []):
        if isinstance(r.get("phases"), dict):
            r = r["phases"].get(phase)
        if isinstance(r, dict) and "error" not in r:
            reports.append(r)
    if not reports:
        return None
    whole = [r for r in reports if "shard" not in r]
    if whole:
        return whole[-1]
    from .worker.common import aggregate

    by_shard = {r.get("shard"): r for r in reports}
    return aggregate(list(by_shard.values()))


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str


IMAGE_PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")


def pod_problem(pods: list[dict]) -> Optional[tuple[str, str, Optional[datetime]]]:
    """A pod-level reason a Job cannot make progress: (reason, message, since)."""
    for pod in pods:
        st = pod.get("status") or {}
        for cs in _statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in IMAGE_PULL_REASONS:
                msg = waiting.get("message") or f"cannot pull image {cs.get('image', '')}".strip()
                since = parse_time(st.get("startTime")) or parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
                return "ImagePullError", f"{waiting['reason']}: {msg}", since
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return "Unschedulable", c.get("message") or "no node fits the pod", parse_time(c.get("lastTransitionTime"))
    return None


def job_failure(job: dict) -> Failure:
    """Why a failed Job failed, most specific first: OOMKilled, ImagePullError,
    Unschedulable, DeadlineExceeded, the worker's own error line, the Job's reason."""
    pods = job.get("pods") or []
    for pod in pods:
        for cs in _statuses(pod):
            for key in ("state", "lastState"):
                term = (cs.get(key) or {}).get("terminated") or {}
                if term.get("reason") == "OOMKilled":
                    return Failure("OOMKilled", f"pod {pod.get('metadata', {}).get('name', '?')} ran out of memory "
                                                f"(exit code {term.get('exitCode', 137)}); raise resources.memory")
    problem = pod_problem(pods)
    if problem is not None:
        return Failure(problem[0], problem[1])
    cond = job_condition(job, "Failed") or {}
    if cond.get("reason") == "DeadlineExceeded":
        return Failure("DeadlineExceeded", cond.get("message") or "the Job ran past activeDeadlineSeconds")
    errors = [r for r in pod_reports(pods) if "error" in r]
    if errors:
        reason = "InvalidSpec" if str(errors[-1]["error"]).startswith("spec") else "WorkerError"
        return Failure(reason, str(errors[-1]["error"])[:1000])
    for pod in pods:
        for cs in _statuses(pod):
            term = (cs.get("state") or {}).get("terminated") or {}
            if term.get("exitCode") == EXIT_INVALID_SPEC:
                return Failure("InvalidSpec", (term.get("message") or "the worker rejected the spec").strip()[-1000:])
            if term.get("message") and term.get("exitCode"):
                last = term["message"].strip().splitlines()[-1] if term["message"].strip() else ""
                if last:
                    return Failure("WorkerError", last[:1000])
    if cond.get("reason"):
        return Failure(cond["reason"], cond.get("message") or "the Job failed")
    return Failure("JobFailed", "the Job failed")
