"""Play the kubelet and the Job controller for batch/v1 Jobs in the emulated cluster.

Nothing runs Jobs in an emulator, so a test that needs a Job to finish does it here::

    from kube.kubelet import Kubelet, JobRunner, Run, Succeed, Fail, OOMKilled, \\
        ImagePullBackOff, Unschedulable, DeadlineExceeded

    kubelet = Kubelet(c, venv_programs=["selfreward", "python"])   # or programs={"x": [argv...]}
    job = kubelet.run_job("job-name", "ns1")                 # run each pod's command locally
    job = kubelet.run_job("job-name", "ns1", outcome=Fail(2, "boom"))   # or script the result
    job = kubelet.run_job(job_dict, outcome=lambda index, attempt: Succeed("{}") if attempt else Fail())

    with JobRunner(c, policy=lambda job: Run(), namespace="ns1") as runner:   # background thread
        ...   # every new (unsuspended) Job in ns1 is played to its end; runner.handled lists them

What it does, as the real components would:
  * creates the Job's Pods from ``spec.template`` (owned by the Job, labelled with
    ``batch.kubernetes.io/job-name``/``controller-uid``); Indexed Jobs get one Pod per
    completion index with the ``batch.kubernetes.io/job-completion-index`` annotation and label
    and the ``JOB_COMPLETION_INDEX`` env variable; ``parallelism`` Pods at a time (bounded by
    ``max_parallel``); failed Pods are retried until ``backoffLimit`` is exceeded;
    ``podFailurePolicy`` rules (onExitCodes, onPodConditions; FailJob, Ignore, Count) are
    honoured; ``ttlSecondsAfterFinished`` deletes a finished Job (Background) after its TTL, as
    the TTL controller does (timers are cancelled by ``close()``).
  * ``Run()`` (the default) runs each container's ``command + args`` as a local process: ``$(VAR)``
    references expanded; env from ``value``, ``valueFrom.secretKeyRef``/``configMapKeyRef``
    (read from the emulator; a missing one leaves the Pod waiting in
    CreateContainerConfigError, as a kubelet does), ``fieldRef`` (metadata.name/namespace/uid,
    ``metadata.annotations['…']``, ``metadata.labels['…']``, spec.nodeName, status.podIP), and
    ``envFrom``; program names mapped through ``programs`` (e.g. ``selfreward`` -> the venv's).
    Cluster DNS on loopback: an env value that is a pod's name under a headless Service
    (``<hostname>.<subdomain>.<ns>.svc``, the pod's own subdomain, the Service existing and
    selecting the pod) becomes ``127.0.0.1``; Indexed pods get the hostname ``<job>-<index>``.
    A Job that fails stops its other pods' processes (their Pods are deleted).
    ``SELFREWARD_TERMINATION_LOG`` points at a temp file whose content (max 4096 bytes)
    becomes ``status.containerStatuses[0].state.terminated.message``; with
    ``terminationMessagePolicy: FallbackToLogsOnError`` a failed empty message falls back to the
    log tail.  ``activeDeadlineSeconds`` kills the process and fails the Job (DeadlineExceeded).
  * scripted outcomes run nothing: ``Succeed(message)``, ``Fail(exit_code, message)``,
    ``OOMKilled(message)`` (reason OOMKilled, exit 137), ``ImagePullBackOff()`` (container waiting,
    Job stays active), ``Unschedulable()`` (PodScheduled False, reason Unschedulable, Job stays
    active), ``DeadlineExceeded()`` (Job Failed with reason DeadlineExceeded, Pods deleted),
    ``Disrupted(message)`` (evicted: exit 143 with condition DisruptionTarget=True).
  * the Job's status goes through the ``/status`` subresource as the Job controller writes it:
    startTime, active/ready/succeeded/failed, completedIndexes (e.g. ``"0-2,4"``), conditions
    SuccessCriteriaMet+Complete (reason CompletionsReached) or FailureTarget+Failed (reason
    BackoffLimitExceeded, DeadlineExceeded or PodFailurePolicy), completionTime.
  * suspended Jobs (``spec.suspend: true``) get no Pods; ``run_job`` returns them as they are,
    ``JobRunner`` starts them once they are unsuspended.  A Job suspended while it runs has its
    active Pods (and processes) deleted and condition Suspended=True (JobSuspended); when
    resumed, only the indexes not yet completed run again (Suspended=False, JobResumed) and
    startTime is reset.  A Job deleted while it runs has its processes killed.

Local processes inherit this process's environment (overlaid with the container's), run in
``workdir`` if given, else the container's ``workingDir`` if it exists here, else a per-pod temp
directory, and their output is kept in ``Kubelet.logs[pod_name]``
and served as the Pod's log (``kubectl logs``, ``read_namespaced_pod_log``).

Volumes with content -- ``downwardAPI`` (items by ``fieldRef``), ``configMap`` and ``secret``
(all keys or the listed ``items``) -- are written, as the kubelet writes them, to a per-pod
directory; a process has no mount namespace here, so a ``command``/``args`` word or env value
at or under such a volume's ``mountPath`` is rewritten to that directory. A missing ConfigMap
or Secret leaves the Pod waiting (CreateContainerConfigError). ``emptyDir`` mounts are the
host's own path. Images, resources and probes are not emulated.

``TTLController`` plays the TTL-after-finished controller for TTLs set on a Job after it
finished (a patch of ``spec.ttlSecondsAfterFinished``), which the real one honours too.
"""
from __future__ import annotations

import base64
import concurrent.futures
import copy
import dataclasses
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Union

from .emulator import Cluster, KubeError, ResKey

__all__ = [
    "Kubelet", "JobRunner", "TTLController", "Outcome", "Run", "Succeed", "Fail", "OOMKilled", "ImagePullBackOff",
    "Unschedulable", "DeadlineExceeded", "Disrupted", "job_condition", "compress_indexes", "parse_indexes",
]

JOBS = ResKey("batch", "v1", "jobs")
PODS = ResKey("", "v1", "pods")
SECRETS = ResKey("", "v1", "secrets")
CONFIGMAPS = ResKey("", "v1", "configmaps")
SERVICES = ResKey("", "v1", "services")
# <hostname>.<subdomain>.<namespace>.svc[.cluster.local]: a pod's name under a headless Service
POD_DNS_RE = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.([a-z]([-a-z0-9]*[a-z0-9])?)\.([a-z0-9-]+)\.svc(\.cluster\.local)?")
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
NODE_NAME = "emulated-node"
MAX_MESSAGE = 4096


# --------------------------------------------------------------------------------------------
# Outcomes
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str
    exit_code: int = 0
    message: str = ""


def Run() -> Outcome:  # noqa: N802 - reads like a constructor
    """Run the container's command as a local process."""
    return Outcome("run")


def Succeed(message: str = "") -> Outcome:  # noqa: N802
    return Outcome("succeed", 0, message)


def Fail(exit_code: int = 1, message: str = "") -> Outcome:  # noqa: N802
    return Outcome("fail", exit_code, message)


def OOMKilled(message: str = "") -> Outcome:  # noqa: N802
    return Outcome("oomkilled", 137, message)


def ImagePullBackOff() -> Outcome:  # noqa: N802
    return Outcome("imagepullbackoff")


def Unschedulable(message: str = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.") -> Outcome:  # noqa: N802
    return Outcome("unschedulable", 0, message)


def DeadlineExceeded() -> Outcome:  # noqa: N802
    return Outcome("deadline")


def Disrupted(message: str = "Eviction API: evicting") -> Outcome:  # noqa: N802
    """The pod is evicted/preempted: it fails (exit 143) with condition DisruptionTarget=True."""
    return Outcome("disrupted", 143, message)


OutcomeSpec = Union[None, Outcome, Callable[[int, int], Union[Outcome, None]]]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_indexes(text: str) -> set[int]:
    """``"0-2,4"`` -> ``{0, 1, 2, 4}`` (the inverse of :func:`compress_indexes`)."""
    out: set[int] = set()
    for part in (text or "").split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.add(int(part))
    return out


def compress_indexes(indexes: set[int] | list[int]) -> str:
    """``{0,1,2,4}`` -> ``"0-2,4"`` as in Job ``status.completedIndexes``."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(indexes)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def job_condition(job: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    """The Job's condition of that type if it is True, else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


class _PodStuck(Exception):
    """The pod cannot progress (waiting/pending): the Job stays active."""


class _JobFailed(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class _JobGone(Exception):
    pass


class _Stopped(Exception):
    """The kubelet was closed while the Job ran: leave the Job as it is."""


class _Suspended(Exception):
    """The Job was suspended while it ran: its active pods go, it resumes later."""


# --------------------------------------------------------------------------------------------
# The kubelet + Job controller
# --------------------------------------------------------------------------------------------

class Kubelet:
    """Creates, runs and finishes the Pods of Jobs in an emulated cluster (see module docstring)."""

    def __init__(self, cluster: Cluster, *, programs: Mapping[str, list[str]] | None = None,
                 venv_programs: tuple[str, ...] | list[str] = (), workdir: str | None = None, extra_env: Mapping[str, str] | None = None,
                 inherit_env: bool = True, max_parallel: int = 2, process_timeout: float = 600):
        self.cluster = cluster
        self.api = cluster.emulator
        self.programs = {name: self.venv_program(name) for name in venv_programs}
        self.programs.update(programs or {})
        self.workdir = workdir
        self.extra_env = dict(extra_env or {})
        self.inherit_env = inherit_env
        self.max_parallel = max(1, max_parallel)
        self.process_timeout = process_timeout
        self.logs: dict[str, str] = {}
        self._tmp = tempfile.mkdtemp(prefix="kubelet-")
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._deleted: set[str] = set()  # pods whose process was stopped because the pod was deleted
        self._stopping = threading.Event()
        self._timers: list[threading.Timer] = []

    @staticmethod
    def venv_program(name: str) -> list[str]:
        """The console script ``name`` of this interpreter's environment (or ``python -m name``)."""
        if name in ("python", "python3"):
            return [sys.executable]
        candidate = os.path.join(os.path.dirname(sys.executable), name)
        if os.path.exists(candidate):
            return [candidate]
        return [sys.executable, "-m", name]

    def close(self) -> None:
        self._stopping.set()
        for timer in self._timers:
            timer.cancel()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------ the Job controller

    def run_job(self, job: Mapping[str, Any] | str, namespace: str | None = None, *,
                outcome: OutcomeSpec = None) -> dict[str, Any]:
        """Play a Job to its end (or until a Pod is stuck or the Job is suspended); returns the
        Job as stored afterwards, or ``{}`` if the Job was deleted meanwhile."""
        if isinstance(job, str):
            name = job
        else:
            name = job["metadata"]["name"]
            namespace = namespace or job["metadata"].get("namespace")
        current = self.api.api_get(JOBS, namespace, name)
        if (current.get("spec") or {}).get("suspend"):
            return current
        if job_condition(current, "Complete") or job_condition(current, "Failed"):
            return current
        spec = current["spec"]
        indexed = spec.get("completionMode") == "Indexed"
        completions = int(spec.get("completions") or 1)
        parallelism = int(spec.get("parallelism") or 1)
        backoff_limit = int(spec.get("backoffLimit", 6))
        deadline_s = spec.get("activeDeadlineSeconds")
        started = time.monotonic()
        uid = current["metadata"]["uid"]
        status = current.get("status") or {}
        state = _JobState()
        state.indexed = indexed
        # Resuming (after a suspension): what already succeeded or failed stays counted.
        state.succeeded = (parse_indexes(status.get("completedIndexes") or "") if indexed
                           else set(range(int(status.get("succeeded") or 0))))
        state.failed = int(status.get("failed") or 0)
        resumed = ([{"type": "Suspended", "status": "False", "reason": "JobResumed",
                     "message": "Job resumed", "lastProbeTime": _now(), "lastTransitionTime": _now()}]
                   if job_condition(current, "Suspended") else [])
        try:
            self._set_job_status(namespace, name, {"startTime": _now(), "active": 0, "ready": 0,
                                                   **({"conditions": resumed} if resumed else {})})
        except _JobGone:
            return {}

        def interrupted() -> str | None:
            try:
                now_job = self.api.api_get(JOBS, namespace, name)
            except KubeError:
                return "gone"
            if now_job["metadata"]["uid"] != uid or now_job["metadata"].get("deletionTimestamp"):
                return "gone"
            return "suspended" if (now_job.get("spec") or {}).get("suspend") else None

        def check_interrupted() -> None:
            why = interrupted()
            if why == "gone":
                raise _JobGone(name)
            if why == "suspended":
                raise _Suspended(name)

        def pick(index: int, attempt: int) -> Outcome:
            chosen = outcome(index, attempt) if callable(outcome) else outcome
            return chosen or Run()

        def one_completion(index: int) -> None:
            attempt = 0
            while True:
                if state.stop.is_set() or self._stopping.is_set():
                    raise _Stopped()
                check_interrupted()
                result = pick(index, attempt)
                if result.kind == "deadline":
                    pod = self._create_pod(current, index if indexed else None)
                    self._pod_running(pod)
                    raise _JobFailed("DeadlineExceeded", "Job was active longer than specified deadline")
                remaining = None
                if deadline_s is not None:
                    remaining = float(deadline_s) - (time.monotonic() - started)
                    if remaining <= 0:
                        raise _JobFailed("DeadlineExceeded", "Job was active longer than specified deadline")
                pod = self._create_pod(current, index if indexed else None)
                if state.stop.is_set():  # the Job failed while this pod was being created
                    self._delete_active_pods(namespace, current)
                    raise _Stopped()
                with state.lock:
                    state.active += 1
                self._update_counts(namespace, name, state)
                try:
                    exit_code = self._play_pod(pod, result, remaining, check_interrupted)
                finally:
                    with state.lock:
                        state.active -= 1
                if self._stopping.is_set():
                    raise _Stopped()
                if exit_code is None:  # the deadline killed it
                    raise _JobFailed("DeadlineExceeded", "Job was active longer than specified deadline")
                if exit_code == 0:
                    with state.lock:
                        state.succeeded.add(index)
                    self._update_counts(namespace, name, state)
                    return
                try:   # the rules look at the pod as it ended (exit code, conditions)
                    ended = self.api.api_get(PODS, namespace, pod["metadata"]["name"])
                except KubeError:
                    ended = pod
                action = _failure_policy_action(spec.get("podFailurePolicy"), ended, exit_code)
                if action == "FailJob":
                    with state.lock:
                        state.failed += 1
                    self._update_counts(namespace, name, state)
                    raise _JobFailed("PodFailurePolicy",
                                     f"Container {pod['spec']['containers'][0]['name']} for pod "
                                     f"{namespace}/{pod['metadata']['name']} failed with exit code "
                                     f"{exit_code} matching FailJob rule at index 0")
                if action != "Ignore":
                    with state.lock:
                        state.failed += 1
                        exceeded = state.failed > backoff_limit
                    self._update_counts(namespace, name, state)
                    if exceeded:
                        raise _JobFailed("BackoffLimitExceeded", "Job has reached the specified backoff limit")
                attempt += 1

        indexes = [i for i in range(completions) if not (indexed and i in state.succeeded)]
        if not indexed:
            indexes = indexes[len(state.succeeded):]
        failure: _JobFailed | None = None
        stuck = suspended = gone = False
        workers = max(1, min(parallelism, self.max_parallel, max(1, len(indexes))))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(one_completion, i) for i in indexes]
            for fut in concurrent.futures.as_completed(futures):
                try:
                    fut.result()
                except _JobFailed as e:
                    failure = failure or e
                    state.stop.set()
                    self._delete_active_pods(namespace, current)  # the Job controller stops the rest now
                except (_PodStuck, _Stopped):
                    stuck = True
                except _Suspended:
                    suspended = True
                    state.stop.set()
                except _JobGone:
                    gone = True
                    state.stop.set()
        if gone:
            return {}
        if suspended and failure is None:
            self._delete_active_pods(namespace, current)
            now = _now()
            return self._set_job_status(namespace, name, {
                "active": 0, "ready": 0, "failed": state.failed, "succeeded": len(state.succeeded),
                **({"completedIndexes": compress_indexes(state.succeeded)} if indexed and state.succeeded else {}),
                "conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended",
                                "message": "Job suspended", "lastProbeTime": now, "lastTransitionTime": now}],
            })
        if stuck and failure is None:
            return self.api.api_get(JOBS, namespace, name)
        if failure is not None:
            self._delete_active_pods(namespace, current)
            now = _now()
            return self._finished(namespace, self._set_job_status(namespace, name, {
                "active": 0, "ready": 0, "failed": state.failed, "succeeded": len(state.succeeded),
                **({"completedIndexes": compress_indexes(state.succeeded)} if indexed and state.succeeded else {}),
                "conditions": [
                    {"type": "FailureTarget", "status": "True", "reason": failure.reason,
                     "message": failure.message, "lastProbeTime": now, "lastTransitionTime": now},
                    {"type": "Failed", "status": "True", "reason": failure.reason,
                     "message": failure.message, "lastProbeTime": now, "lastTransitionTime": now},
                ],
            }))
        now = _now()
        return self._finished(namespace, self._set_job_status(namespace, name, {
            "active": 0, "ready": 0, "failed": state.failed, "succeeded": len(state.succeeded),
            **({"completedIndexes": compress_indexes(state.succeeded)} if indexed else {}),
            "completionTime": now,
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                 "message": "Reached expected number of succeeded pods",
                 "lastProbeTime": now, "lastTransitionTime": now},
                {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                 "message": "Reached expected number of succeeded pods",
                 "lastProbeTime": now, "lastTransitionTime": now},
            ],
        }))

    def _finished(self, namespace: str | None, job: dict[str, Any]) -> dict[str, Any]:
        """The TTL-after-finished controller: delete a finished Job (Background) after its TTL."""
        ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is None or not job:
            return job
        uid, name = job["metadata"]["uid"], job["metadata"]["name"]

        def expire() -> None:
            try:
                current = self.api.api_get(JOBS, namespace, name)
                if current["metadata"]["uid"] == uid:
                    self.api.api_delete(JOBS, namespace, name, {"propagationPolicy": "Background"})
            except KubeError:
                pass
        if float(ttl) <= 0:
            expire()
            return job
        timer = threading.Timer(float(ttl), expire)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()
        return job

    def _update_counts(self, namespace: str | None, name: str, state: "_JobState") -> None:
        with state.lock:
            status = {"active": state.active, "ready": state.active, "failed": state.failed,
                      "succeeded": len(state.succeeded)}
            if state.succeeded and state.indexed:
                status["completedIndexes"] = compress_indexes(state.succeeded)
        self._set_job_status(namespace, name, status)

    def _set_job_status(self, namespace: str | None, name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        def mutate(job: dict[str, Any]) -> dict[str, Any]:
            status = job.setdefault("status", {})
            for key, value in fields.items():
                if key in ("failed", "succeeded", "active") and value == 0 and key not in status:
                    continue
                if key == "conditions":  # one condition per type, as the Job controller keeps them
                    merged = [c for c in status.get("conditions") or []
                              if c.get("type") not in {n["type"] for n in value}]
                    status["conditions"] = merged + copy.deepcopy(list(value))
                    continue
                status[key] = copy.deepcopy(value)
            status.setdefault("uncountedTerminatedPods", {})
            return job
        try:
            return self.api.api_update(JOBS, namespace, name, mutate, subresource="status")
        except KubeError as e:
            if e.code == 404:
                raise _JobGone(name)
            raise

    def _delete_active_pods(self, namespace: str | None, job: Mapping[str, Any]) -> None:
        uid = job["metadata"]["uid"]
        for pod in self.cluster.objects("v1", "pods", namespace,
                                        label_selector=f"batch.kubernetes.io/controller-uid={uid}"):
            if pod.get("status", {}).get("phase") in ("Pending", "Running"):
                try:
                    self.api.api_delete(PODS, namespace, pod["metadata"]["name"], {})
                except KubeError:
                    pass
                with self._lock:  # as a kubelet does, a deleted pod's container is stopped
                    proc = self._procs.get(pod["metadata"]["name"])
                    self._deleted.add(pod["metadata"]["name"])
                if proc is not None and proc.poll() is None:
                    proc.kill()

    # ------------------------------------------------------------ pods

    def _create_pod(self, job: Mapping[str, Any], index: int | None) -> dict[str, Any]:
        meta = job["metadata"]
        template = copy.deepcopy(job["spec"].get("template") or {})
        tmeta = template.get("metadata") or {}
        labels = dict(tmeta.get("labels") or {})
        annotations = dict(tmeta.get("annotations") or {})
        pod_spec = template.get("spec") or {}
        if index is not None:
            labels[INDEX_KEY] = str(index)
            annotations[INDEX_KEY] = str(index)
            prefix = f"{meta['name']}-{index}-"
            pod_spec.setdefault("hostname", f"{meta['name']}-{index}")
            for container in pod_spec.get("containers") or []:
                env = container.setdefault("env", [])
                if not any(e.get("name") == "JOB_COMPLETION_INDEX" for e in env):
                    env.insert(0, {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                        "fieldPath": f"metadata.labels['{INDEX_KEY}']"}}})
        else:
            prefix = f"{meta['name']}-"
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "generateName": prefix, "namespace": meta.get("namespace"),
                "labels": labels, "annotations": annotations,
                "ownerReferences": [{
                    "apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"],
                    "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": pod_spec,
        }
        created = self.api.api_create(PODS, meta.get("namespace"), pod)
        return created

    def _write_pod_status(self, pod: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
        ns, name = pod["metadata"].get("namespace"), pod["metadata"]["name"]
        try:
            return self.api.api_update(PODS, ns, name, lambda p: {**p, "status": copy.deepcopy(dict(status))},
                                       subresource="status")
        except KubeError as e:
            if e.code == 404:
                return dict(pod)
            raise

    def _pod_running(self, pod: Mapping[str, Any]) -> dict[str, Any]:
        now = _now()
        containers = pod["spec"]["containers"]
        return self._write_pod_status(pod, {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": now,
            "qosClass": "BestEffort",
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                           for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{
                "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True,
                "started": True, "restartCount": 0, "state": {"running": {"startedAt": now}},
            } for c in containers],
        })

    def _pod_terminated(self, pod: Mapping[str, Any], exit_code: int, reason: str, message: str,
                        started: str, disruption: str | None = None) -> dict[str, Any]:
        now = _now()
        containers = pod["spec"]["containers"]
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": reason,
                                      "startedAt": started, "finishedAt": now}
        if message:
            terminated["message"] = message[:MAX_MESSAGE]
        return self._write_pod_status(pod, {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": started, "qosClass": "BestEffort",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
                {"type": "Initialized", "status": "True", "lastTransitionTime": started},
                {"type": "ContainersReady", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now},
                {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now},
            ] + ([{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                   "message": disruption, "lastTransitionTime": now}] if disruption else []),
            "containerStatuses": [{
                "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                "started": False, "restartCount": 0,
                "state": {"terminated": terminated if i == 0 else {
                    "exitCode": 0, "reason": "Completed", "startedAt": started, "finishedAt": now}},
            } for i, c in enumerate(containers)],
        })

    def _pod_waiting(self, pod: Mapping[str, Any], reason: str, message: str) -> dict[str, Any]:
        now = _now()
        return self._write_pod_status(pod, {
            "phase": "Pending", "hostIP": "127.0.0.1", "startTime": now, "qosClass": "BestEffort",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady",
                 "lastTransitionTime": now},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now},
            ],
            "containerStatuses": [{
                "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                "started": False, "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}},
            } for c in pod["spec"]["containers"]],
        })

    def _play_pod(self, pod: dict[str, Any], outcome: Outcome, deadline: float | None,
                  check_interrupted: Callable[[], None] = lambda: None) -> int | None:
        """Drive one pod to its end; returns the exit code, None if the deadline killed it."""
        kind = outcome.kind
        if kind == "unschedulable":
            now = _now()
            self._write_pod_status(pod, {"phase": "Pending", "qosClass": "BestEffort", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": outcome.message, "lastProbeTime": None, "lastTransitionTime": now}]})
            raise _PodStuck(pod["metadata"]["name"])
        if kind == "imagepullbackoff":
            image = pod["spec"]["containers"][0].get("image", "")
            self._pod_waiting(pod, "ImagePullBackOff", f'Back-off pulling image "{image}"')
            raise _PodStuck(pod["metadata"]["name"])
        started = _now()
        if kind == "run":
            try:
                env = self._container_env(pod, pod["spec"]["containers"][0])
                self._volumes(pod, pod["spec"]["containers"][0],
                              os.path.join(self._tmp, pod["metadata"]["name"]))  # fails here, not in the process
            except _ConfigError as e:
                self._pod_waiting(pod, "CreateContainerConfigError", str(e))
                raise _PodStuck(pod["metadata"]["name"])
            self._pod_running(pod)
            exit_code, message, oom = self._run_container(pod, env, deadline, check_interrupted)
            if exit_code is None:
                self._pod_terminated(pod, 137, "Error", "", started)
                return None
            reason = "OOMKilled" if oom else ("Completed" if exit_code == 0 else "Error")
            self._pod_terminated(pod, exit_code, reason, message, started)
            return exit_code
        self._pod_running(pod)
        if kind == "succeed":
            self._pod_terminated(pod, 0, "Completed", outcome.message, started)
            return 0
        if kind == "fail":
            code = outcome.exit_code or 1
            self._pod_terminated(pod, code, "Error", outcome.message, started)
            return code
        if kind == "oomkilled":
            self._pod_terminated(pod, 137, "OOMKilled", outcome.message, started)
            return 137
        if kind == "disrupted":
            self._pod_terminated(pod, 143, "Error", "", started, disruption=outcome.message)
            return 143
        raise ValueError(f"unknown outcome {outcome!r}")

    # ------------------------------------------------------------ local processes

    def _container_env(self, pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
        ns = pod["metadata"].get("namespace")
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._lookup(SECRETS, ns, source["secretRef"], None, decode=True)
            elif "configMapRef" in source:
                data = self._lookup(CONFIGMAPS, ns, source["configMapRef"], None, decode=False)
            else:
                continue
            for k, v in (data or {}).items():
                env[prefix + k] = v
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = _expand(str(item["value"]), env)
            elif "valueFrom" in item:
                vf = item["valueFrom"]
                if "secretKeyRef" in vf:
                    value = self._lookup(SECRETS, ns, vf["secretKeyRef"], vf["secretKeyRef"].get("key"), decode=True)
                elif "configMapKeyRef" in vf:
                    value = self._lookup(CONFIGMAPS, ns, vf["configMapKeyRef"], vf["configMapKeyRef"].get("key"),
                                         decode=False)
                elif "fieldRef" in vf:
                    value = _field_ref(pod, vf["fieldRef"].get("fieldPath", ""))
                elif "resourceFieldRef" in vf:
                    value = "0"
                else:
                    value = None
                if value is not None:
                    env[name] = value
            else:
                env[name] = ""
        return {k: self._resolve_pod_dns(pod, v) for k, v in env.items()}

    def _resolve_pod_dns(self, pod: Mapping[str, Any], value: str) -> str:
        """Cluster DNS for the pods of a headless Service, on loopback: a value that is a
        pod's DNS name (``<hostname>.<subdomain>.<ns>.svc``) in this pod's own subdomain
        becomes ``127.0.0.1`` when that Service exists, is headless and selects this pod,
        which is when a cluster's DNS would answer for the name. Every pod "runs" on this
        machine, so every such name is this machine."""
        m = POD_DNS_RE.fullmatch(value)
        if not m:
            return value
        subdomain, namespace = m.group(3), m.group(5)
        if subdomain != pod["spec"].get("subdomain") or namespace != pod["metadata"].get("namespace"):
            return value
        try:
            svc = self.api.api_get(SERVICES, namespace, subdomain)
        except KubeError:
            return value
        spec = svc.get("spec") or {}
        labels = pod["metadata"].get("labels") or {}
        selector = spec.get("selector") or {}
        if spec.get("clusterIP") != "None" or not selector or any(labels.get(k) != v for k, v in selector.items()):
            return value
        return "127.0.0.1"

    def _lookup(self, res: ResKey, namespace: str | None, ref: Mapping[str, Any], key: str | None,
                *, decode: bool) -> Any:
        optional = bool(ref.get("optional"))
        what = "secret" if res == SECRETS else "configmap"
        try:
            obj = self.api.api_get(res, namespace, ref.get("name", ""))
        except KubeError:
            if optional:
                return None
            raise _ConfigError(f'{what} "{ref.get("name")}" not found')
        data = dict(obj.get("data") or {})
        if decode:
            data = {k: base64.b64decode(v).decode() for k, v in data.items()}
        if key is None:
            return data
        if key not in data:
            if optional:
                return None
            raise _ConfigError(f"couldn't find key {key} in {what} {namespace}/{ref.get('name')}")
        return data[key]

    def _volumes(self, pod: Mapping[str, Any], container: Mapping[str, Any], poddir: str) -> dict[str, str]:
        """Write the content volumes the container mounts; return mountPath -> local dir."""
        ns = pod["metadata"].get("namespace")
        by_name = {v.get("name"): v for v in pod["spec"].get("volumes") or []}
        out: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            vol = by_name.get(mount.get("name"))
            if vol is None:
                raise _ConfigError(f'volume "{mount.get("name")}" not found')
            files: dict[str, str] = {}
            if "downwardAPI" in vol:
                for item in vol["downwardAPI"].get("items") or []:
                    value = _field_ref(pod, (item.get("fieldRef") or {}).get("fieldPath", ""))
                    if value is None:
                        raise _ConfigError(f"unsupported downwardAPI item {item!r}")
                    files[item["path"]] = value
            elif "configMap" in vol or "secret" in vol:
                res, ref = (CONFIGMAPS, vol["configMap"]) if "configMap" in vol else (SECRETS, vol["secret"])
                ref = dict(ref, name=ref.get("name") or ref.get("secretName", ""))
                data = self._lookup(res, ns, ref, None, decode=res == SECRETS) or {}
                items = ref.get("items")
                files = ({i["path"]: data[i["key"]] for i in items if i["key"] in data} if items else dict(data))
            else:
                continue  # emptyDir and the like: the host's path
            root = os.path.join(poddir, "volumes", mount["name"])
            for rel, value in files.items():
                path = os.path.join(root, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(value)
            os.makedirs(root, exist_ok=True)
            out[mount["mountPath"].rstrip("/")] = root
        return out

    @staticmethod
    def _remap(value: str, mounts: Mapping[str, str]) -> str:
        for mount_path, local in mounts.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                return local + value[len(mount_path):]
        return value

    def _run_container(self, pod: Mapping[str, Any], container_env: Mapping[str, str],
                       deadline: float | None,
                       check_interrupted: Callable[[], None] = lambda: None) -> tuple[int | None, str, bool]:
        container = pod["spec"]["containers"][0]
        name = pod["metadata"]["name"]
        poddir = os.path.join(self._tmp, name)
        os.makedirs(poddir, exist_ok=True)
        mounts = self._volumes(pod, container, poddir)
        container_env = {k: self._remap(v, mounts) for k, v in container_env.items()}
        argv = [self._remap(_expand(str(a), container_env), mounts) for a in
                list(container.get("command") or []) + list(container.get("args") or [])]
        if not argv:
            return 128, "the emulated kubelet runs only containers with an explicit command", False
        if argv[0] in self.programs:
            argv = list(self.programs[argv[0]]) + argv[1:]
        term_log = os.path.join(poddir, "termination-log")
        open(term_log, "w").close()
        env = dict(os.environ) if self.inherit_env else {"PATH": os.environ.get("PATH", "")}
        env.update(self.extra_env)
        env.update(container_env)
        env["SELFREWARD_TERMINATION_LOG"] = term_log
        env.setdefault("HOSTNAME", pod["spec"].get("hostname") or name)
        log_path = os.path.join(poddir, "log")
        limit = self.process_timeout if deadline is None else min(self.process_timeout, deadline)
        with open(log_path, "wb") as log:
            cwd = self.workdir or (container.get("workingDir") if os.path.isdir(container.get("workingDir") or "")
                                   else poddir)
            try:
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            except OSError as e:
                self.logs[name] = str(e)
                return 128, f"failed to start the container process: {e}", False
            with self._lock:
                self._procs[name] = proc
                if name in self._deleted:  # the pod was deleted while its process started
                    proc.kill()
            ends = time.monotonic() + limit
            code: int | None = None
            try:
                while True:
                    try:
                        code = proc.wait(timeout=0.2)
                        break
                    except subprocess.TimeoutExpired:
                        if time.monotonic() > ends:
                            code = None
                            break
                        check_interrupted()   # a suspended or deleted Job stops its pods
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                with self._lock:
                    self._procs.pop(name, None)
        with open(log_path, "rb") as f:
            self.logs[name] = f.read().decode(errors="replace")
        self.api.pod_logs[(pod["metadata"].get("namespace") or "", name)] = self.logs[name]
        with open(term_log, "rb") as f:
            message = f.read(MAX_MESSAGE).decode(errors="replace")
        if code is None:
            return None, message, False
        with self._lock:
            deleted = name in self._deleted
        oom = code in (-9, 137) and not self._stopping.is_set() and not deleted
        if code < 0:  # killed by a signal: report it like a container runtime (128 + signal)
            code = 128 - code
        if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = "\n".join(self.logs[name].splitlines()[-80:])[-2048:]
        return code, message, oom


class _ConfigError(Exception):
    pass


class _JobState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.failed = 0
        self.succeeded: set[int] = set()
        self.stop = threading.Event()
        self.indexed = False


_VAR_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: unknown references stay, ``$$`` escapes."""
    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR_RE.sub(repl, text)


def _field_ref(pod: Mapping[str, Any], path: str) -> str | None:
    meta = pod["metadata"]
    m = re.match(r"^metadata\.(annotations|labels)\['([^']+)'\]$", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": NODE_NAME,
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
    }
    return simple.get(path)


def _failure_policy_action(policy: Mapping[str, Any] | None, pod: Mapping[str, Any], exit_code: int) -> str | None:
    """The first matching podFailurePolicy rule's action (onExitCodes or onPodConditions)."""
    present = {(c.get("type"), c.get("status")) for c in (pod.get("status") or {}).get("conditions") or []}
    for rule in (policy or {}).get("rules") or []:
        on_conditions = rule.get("onPodConditions")
        if on_conditions:
            if any((c.get("type"), c.get("status", "True")) in present for c in on_conditions):
                return rule.get("action")
            continue
        codes = rule.get("onExitCodes")
        if not codes:
            continue
        if codes.get("containerName") and codes["containerName"] != pod["spec"]["containers"][0]["name"]:
            continue
        values = set(codes.get("values") or [])
        hit = exit_code in values if codes.get("operator", "In") == "In" else exit_code not in values
        if hit:
            return rule.get("action")
    return None


# --------------------------------------------------------------------------------------------
# A background Job runner
# --------------------------------------------------------------------------------------------

class TTLController:
    """Delete finished Jobs (Background) whose ``ttlSecondsAfterFinished`` has passed since
    they finished, whenever the TTL was set: the part of the TTL-after-finished controller
    that ``Kubelet`` (which starts a timer when it finishes a Job) does not cover. Polls one
    namespace (or all) every ``interval`` seconds; ``deleted`` lists what it deleted."""

    def __init__(self, cluster: Cluster, *, namespace: str | None = None, interval: float = 0.1):
        self.cluster = cluster
        self.namespace = namespace
        self.interval = interval
        self.deleted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ttl-controller", daemon=True)

    def __enter__(self) -> "TTLController":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    @staticmethod
    def _finished_at(job: Mapping[str, Any]) -> float | None:
        cond = job_condition(job, "Complete") or job_condition(job, "Failed")
        if cond is None:
            return None
        stamp = (job.get("status") or {}).get("completionTime") or cond.get("lastTransitionTime")
        try:
            return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=datetime.timezone.utc).timestamp()
        except (TypeError, ValueError):
            return time.time()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = self.cluster.objects("batch/v1", "jobs", self.namespace)
            except Exception:  # the cluster is gone
                return
            for job in jobs:
                ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
                done = self._finished_at(job)
                if ttl is None or done is None or job["metadata"].get("deletionTimestamp"):
                    continue
                if time.time() >= done + float(ttl):
                    try:
                        self.cluster.emulator.api_delete(JOBS, job["metadata"].get("namespace"),
                                                         job["metadata"]["name"], {"propagationPolicy": "Background"})
                        self.deleted.append(job["metadata"]["name"])
                    except KubeError:
                        pass
            self._stop.wait(self.interval)


class JobRunner:
    """Watch for Jobs (in one namespace or all) and play each to its end in the background.

    ``policy(job) -> Outcome | callable(index, attempt) | None`` decides how each Job's pods end
    (None: run the commands); return the string ``"skip"`` to leave a Job alone.  Suspended Jobs
    are picked up once unsuspended.  Use as a context manager or with ``start()``/``stop()``;
    ``handled`` lists the names of the Jobs played to an end (not those deleted meanwhile),
    ``errors`` any exception raised doing it.
    """

    def __init__(self, cluster: Cluster, policy: Callable[[dict[str, Any]], Any] | None = None, *,
                 namespace: str | None = None, kubelet: Kubelet | None = None, interval: float = 0.05,
                 **kubelet_kwargs: Any):
        self.cluster = cluster
        self.policy = policy or (lambda job: None)
        self.namespace = namespace
        self.kubelet = kubelet or Kubelet(cluster, **kubelet_kwargs)
        self._own_kubelet = kubelet is None
        self.interval = interval
        self.handled: list[str] = []
        self.errors: list[BaseException] = []
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="job-runner")

    def start(self) -> "JobRunner":
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._own_kubelet:
            self.kubelet.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "JobRunner":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = self.cluster.objects("batch/v1", "jobs", self.namespace)
            except Exception as e:  # the cluster is gone
                self.errors.append(e)
                return
            for job in jobs:
                uid = job["metadata"]["uid"]
                if uid in self._seen or (job.get("spec") or {}).get("suspend"):
                    continue
                if job["metadata"].get("deletionTimestamp"):
                    continue
                if job_condition(job, "Complete") or job_condition(job, "Failed"):
                    self._seen.add(uid)
                    continue
                self._seen.add(uid)
                self._pool.submit(self._play, job)
            self._stop.wait(self.interval)

    def _play(self, job: dict[str, Any]) -> None:
        try:
            decision = self.policy(job)
            if decision == "skip":
                return
            after = self.kubelet.run_job(job, outcome=decision)
            if not after:   # deleted while it ran
                return
            if (after.get("spec") or {}).get("suspend"):
                self._seen.discard(job["metadata"]["uid"])   # play the rest once unsuspended
                return
            self.handled.append(job["metadata"]["name"])
        except _JobGone:
            pass
        except BaseException as e:  # reported to the test through .errors
            self.errors.append(e)
