"""The kopf adapter around :func:`selfreward.reconcile.reconcile`.

Design, and why:

- **Only ``on.event`` handlers.** kopf's change-detection handlers (on.create/update/
  resume) keep the whole last-handled spec in an annotation and add a finalizer to
  every run; reconcile needs neither: it is level-based and idempotent, reading the
  spec, the status it wrote and the Jobs it owns. So kopf here is the watch layer
  (runs, Jobs, pods), peering, the liveness probe and the API credentials; no
  kopf annotation is ever written and ``status.kopf`` stays empty. Our own finalizer
  exists only when ``spec.storage.deleteOnRunDeletion`` asks for it.
- **A work queue, keyed by run.** Every watch event of a run, of a Job with the
  ``selfreward.dev/run`` label, or of such a Job's pod updates an in-memory index and
  enqueues the owning run. A run is never reconciled twice at once; events that arrive
  while it is being reconciled coalesce into one more pass. So a Job's completion
  creates the next Job right away, without a poll interval. ``requeue_after`` from
  reconcile (retry backoff, grace periods) becomes a timer; a slow resync of all runs
  is a safety net only.
- **Actions through the real ``kubernetes`` client** (its configuration and auth,
  kubeconfig or in-cluster), called with plain JSON bodies in a thread so the event
  loop never blocks. A create answered 409 is an adoption. Status goes through the
  ``/status`` subresource as a merge patch of what changed.
- **Deletion.** Jobs carry an ownerReference to their run (controller, blockOwner-
  Deletion), so the garbage collector removes them with the run (background
  propagation). With ``deleteOnRunDeletion`` the operator adds the finalizer
  ``selfreward.dev/artifacts``; on deletion it stops active step Jobs, runs a cleanup
  Job (``selfreward cleanup`` with the run's secretKeyRefs; the operator never holds
  storage credentials) and removes the finalizer when that Job has finished.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import random
import socket
import time
from datetime import datetime, timezone
from typing import Any, Optional
from urllib.parse import quote

from . import jobs as J
from .reconcile import (PERMANENT_API_STATUS, CreateJob, CreateService, DeleteJob, Event, Result, SetFinalizer,
                        SetJobTTL, SuspendJob, api_refused, reconcile, reconcile_error)

try:  # Prometheus metrics (selfreward.metrics); optional so the operator runs without it
    from . import metrics as _metrics
except ImportError:  # pragma: no cover
    _metrics = None

log = logging.getLogger("selfreward.operator")

RUNS_PATH = f"/apis/{J.GROUP}/{J.VERSION}"
RESYNC_SECONDS = 300.0
RECONCILE_WORKERS = int(os.environ.get("SELFREWARD_RECONCILE_WORKERS", "8"))
ERROR_BACKOFF = (1, 2, 5, 10, 30, 60)


def api_threads(workers: int) -> int:
    """Threads that call the API at once: every reconcile worker plus the Events it
    posts side by side. The client's connection pool is sized to match."""
    return 2 * workers + 4


class KubeError(RuntimeError):
    def __init__(self, status: int, body: Any, what: str = ""):
        self.status = status
        self.body = body
        reason = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{what}: HTTP {status}: {reason}")


class Kube:
    """A thin JSON client over the ``kubernetes`` package's ApiClient (its kubeconfig or
    in-cluster configuration, auth and connection pool). Synchronous: call it in a
    thread. Counts its requests."""

    def __init__(self, api_client=None, pool_size: Optional[int] = None):
        if api_client is None:
            from kubernetes import client, config

            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration)
            # one connection per API thread: a smaller pool makes urllib3 drop connections
            # ("Connection pool is full") and open new ones under load
            configuration.connection_pool_maxsize = pool_size or api_threads(RECONCILE_WORKERS)
            api_client = client.ApiClient(configuration)
        self.api = api_client
        self.requests = 0

    def request(self, method: str, path: str, body: Any = None, query: Optional[dict] = None,
                content_type: str = "application/json", ok404: bool = False) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        q = [(k, v) for k, v in (query or {}).items() if v is not None]
        method_, url, hdrs, body_, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=q, header_params=headers, body=body,
            auth_settings=["BearerToken"])
        self.requests += 1
        resp = self.api.call_api(method_, url, header_params=hdrs, body=body_, _request_timeout=30)
        data = resp.read()
        try:
            obj = json.loads(data) if data else None
        except ValueError:
            obj = data.decode(errors="replace") if isinstance(data, bytes) else data
        if resp.status == 404 and ok404:
            return None
        if resp.status >= 400:
            raise KubeError(resp.status, obj, f"{method} {path}")
        return obj

    # --- the calls the operator makes ---
    def create_job(self, ns: str, manifest: dict) -> tuple[dict, bool]:
        """Create a Job; on 409 return the existing one. (object, created?)"""
        path = f"/apis/batch/v1/namespaces/{ns}/jobs"
        try:
            return self.request("POST", path, manifest), True
        except KubeError as e:
            if e.status != 409:
                raise
        name = manifest["metadata"]["name"]
        existing = self.request("GET", f"{path}/{quote(name)}", ok404=True)
        if existing is None:  # deleted in between: try once more
            return self.request("POST", path, manifest), True
        return existing, False

    def create_service(self, ns: str, manifest: dict) -> bool:
        """Create a Service; False when it exists already (409)."""
        try:
            self.request("POST", f"/api/v1/namespaces/{ns}/services", manifest)
            return True
        except KubeError as e:
            if e.status != 409:
                raise
        return False

    def delete_job(self, ns: str, name: str) -> None:
        self.request("DELETE", f"/apis/batch/v1/namespaces/{ns}/jobs/{quote(name)}",
                     body={"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"},
                     ok404=True)

    def patch_job(self, ns: str, name: str, patch: dict) -> Optional[dict]:
        return self.request("PATCH", f"/apis/batch/v1/namespaces/{ns}/jobs/{quote(name)}", patch,
                            content_type="application/merge-patch+json", ok404=True)

    def patch_run(self, ns: str, name: str, patch: dict, status: bool = False) -> Optional[dict]:
        path = f"{RUNS_PATH}/namespaces/{ns}/{J.PLURAL}/{quote(name)}" + ("/status" if status else "")
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json", ok404=True)

    def list(self, path: str, selector: Optional[str] = None) -> list[dict]:
        obj = self.request("GET", path, query={"labelSelector": selector}) or {}
        return list(obj.get("items") or [])

    def post_event(self, ns: str, run: dict, ev: Event, now: datetime) -> None:
        meta = run.get("metadata") or {}
        stamp = J.format_time(now)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": J.event_name(meta.get("name") or "run", time.time_ns()), "namespace": ns},
            "involvedObject": {"apiVersion": J.API_VERSION, "kind": J.KIND, "name": meta.get("name"),
                               "namespace": ns, "uid": meta.get("uid")},
            "reason": ev.reason,
            "message": ev.message[:1024],
            "type": ev.type,
            "source": {"component": "selfreward-operator"},
            "reportingComponent": "selfreward.dev/operator",
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        self.request("POST", f"/api/v1/namespaces/{ns}/events", body)


def _rv(obj: dict) -> Optional[int]:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return None


def _newer(new: dict, old: Optional[dict]) -> bool:
    if old is None:
        return True
    a, b = _rv(new), _rv(old)
    return a is None or b is None or a >= b


def status_patch(old: dict, new: dict) -> dict:
    """A merge patch turning ``old`` status into ``new`` (kopf's own key is left alone)."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    for k in old:
        if k not in new and k != "kopf":
            patch[k] = None
    return patch


class PeeringGate:
    """Whether this replica may act, mirroring kopf's rule: pause while a live peer with
    a higher priority is listed in the peering object(s). kopf freezes its own handlers
    then, but this controller also acts from timers and resyncs, which kopf does not see;
    this gate holds those too. Read every ``interval`` seconds (and before the first pass)."""

    def __init__(self, kube: "Kube", name: str, priority: int, namespaces: list[str], interval: float = 1.0):
        self.kube = kube
        self.priority = priority
        self.interval = interval
        if namespaces:
            self.paths = [f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings/{quote(name)}" for ns in namespaces]
        else:
            self.paths = [f"/apis/kopf.dev/v1/clusterkopfpeerings/{quote(name)}"]
        self.paused = False

    def check(self) -> bool:
        now = datetime.now(timezone.utc)
        higher = False
        for path in self.paths:
            try:
                obj = self.kube.request("GET", path, ok404=True) or {}
            except Exception as e:  # keep the last verdict on a transient error
                log.warning("peering check failed: %s", e)
                return self.paused
            for peer in (obj.get("status") or {}).values():
                if not isinstance(peer, dict):
                    continue
                seen = J.parse_time(peer.get("lastseen"))
                alive = seen is not None and (now - seen).total_seconds() < float(peer.get("lifetime", 60))
                if alive and int(peer.get("priority", 0)) > self.priority:
                    higher = True
        if higher != self.paused:
            log.info("peering: %s", "paused, a replica with a higher priority is active" if higher else "active")
        self.paused = higher
        return higher

    async def run(self, ctl: "Controller") -> None:
        while True:
            was = self.paused
            await asyncio.to_thread(self.check)
            if was and not self.paused:
                for key in list(ctl.runs):
                    ctl.enqueue(key)
            await asyncio.sleep(self.interval)


def _run_of(obj: dict) -> Optional[str]:
    meta = obj.get("metadata") or {}
    name = (meta.get("annotations") or {}).get(J.ANN_RUN_NAME)
    if name:
        return name
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == J.KIND:
            return ref.get("name")
    return (meta.get("labels") or {}).get(J.LABEL_RUN)


_META_KEEP = ("name", "namespace", "uid", "resourceVersion", "generation", "labels", "annotations",
              "ownerReferences", "creationTimestamp", "deletionTimestamp", "finalizers")


def slim_job(job: dict) -> dict:
    """What reconcile reads of a Job: metadata, status, a few spec fields and the run
    document the iteration's pods read (the rest of the pod template, repeated in every
    Job, is dropped from the cache)."""
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    template = spec.get("template") or {}
    annotations = {k: v for k, v in ((template.get("metadata") or {}).get("annotations") or {}).items()
                   if k == J.ANN_DOCUMENT}
    containers = (template.get("spec") or {}).get("containers") or []
    # a Job of an operator version that passed the spec as an env variable
    env = [e for c in containers[:1] for e in (c.get("env") or []) if e.get("name") == "SELFREWARD_SPEC"]
    kept = ("suspend", "completions", "parallelism", "completionMode", "ttlSecondsAfterFinished")
    return {
        "metadata": {k: meta[k] for k in _META_KEEP if k in meta},
        "spec": {**{k: spec[k] for k in kept if k in spec},
                 "template": {"metadata": {"annotations": annotations},
                              "spec": {"containers": [{"name": J.CONTAINER, "env": env}]}}},
        "status": job.get("status") or {},
    }


def slim_pod(pod: dict) -> dict:
    """What reconcile reads of a pod: metadata, status (termination messages, image IDs,
    start and finish times) and each container's resources (the GPUs it requested, which
    the GPU-seconds are counted with)."""
    meta = pod.get("metadata") or {}
    containers = [{"name": c.get("name"), "resources": c.get("resources") or {}}
                  for c in (pod.get("spec") or {}).get("containers") or []]
    out = {"metadata": {k: meta[k] for k in _META_KEEP if k in meta}, "status": pod.get("status") or {}}
    if containers:
        out["spec"] = {"containers": containers}
    return out


class Controller:
    """The operator's state: indexes fed by watch events, the work queue, the actions."""

    def __init__(self, kube: Kube, settings: Optional[J.Settings] = None, workers: int = RECONCILE_WORKERS,
                 resync_seconds: float = RESYNC_SECONDS):
        self.kube = kube
        self.settings = settings or J.Settings()
        self.workers = workers
        self.resync_seconds = resync_seconds
        self.runs: dict[tuple[str, str], dict] = {}
        self.jobs: dict[tuple[str, str], dict[str, dict]] = {}  # (ns, run) -> job name -> Job
        self.pods: dict[tuple[str, str], dict[str, dict]] = {}  # (ns, job) -> pod name -> Pod
        self.queue: Optional[asyncio.Queue] = None
        self.queued: set = set()
        self.processing: set = set()
        self.dirty: set = set()
        self.timers: dict[tuple[str, str], tuple[float, asyncio.TimerHandle]] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.fetched: set = set()
        self.tasks: list[asyncio.Task] = []
        self.reconciles = 0
        self.gate: Optional[PeeringGate] = None
        self.reported: dict[tuple[str, str], str] = {}

    # --- lifecycle ---
    async def start(self, namespaces: list[str]) -> None:
        self.queue = asyncio.Queue()
        # API calls run in threads (the kubernetes client is synchronous): enough of them
        # for every reconcile worker plus the Events it posts side by side
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=api_threads(self.workers), thread_name_prefix="kube"))
        await self.warm(namespaces)
        if self.gate is not None:
            await asyncio.to_thread(self.gate.check)
            self.tasks.append(asyncio.create_task(self.gate.run(self)))
        for _ in range(self.workers):
            self.tasks.append(asyncio.create_task(self._worker()))
        self.tasks.append(asyncio.create_task(self._resync()))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for _, handle in self.timers.values():
            handle.cancel()

    async def warm(self, namespaces: list[str]) -> None:
        """List the Jobs and pods of runs before the first reconcile, so that a restarted
        operator sees what exists (deterministic names make a miss harmless anyway)."""
        scopes = [f"/namespaces/{ns}" for ns in namespaces] if namespaces else [""]
        sel = f"{J.LABEL_RUN}"
        for scope in scopes:
            for job in await asyncio.to_thread(self.kube.list, f"/apis/batch/v1{scope}/jobs", sel):
                self.job_event("ADDED", job)
            for pod in await asyncio.to_thread(self.kube.list, f"/api/v1{scope}/pods", sel):
                self.pod_event("ADDED", pod)

    # --- index updates from watch events ---
    def run_event(self, etype: Optional[str], obj: dict) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace"), meta.get("name"))
        if etype == "DELETED":
            self.runs.pop(key, None)
            if _metrics is not None:
                _metrics.forget_run(*key)
            return
        if _newer(obj, self.runs.get(key)):
            self.runs[key] = obj
        self.enqueue(key)

    def job_event(self, etype: Optional[str], obj: dict) -> None:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        if J.LABEL_RUN not in labels:
            return
        run = _run_of(obj)
        if not run:
            return
        key = (meta.get("namespace"), run)
        bucket = self.jobs.setdefault(key, {})
        name = meta.get("name")
        if etype == "DELETED":
            bucket.pop(name, None)
            self.pods.pop((key[0], name), None)
        else:
            old = bucket.get(name)
            if _newer(obj, old):
                if (_metrics is not None and J.job_step_of(obj) is not None and J.job_complete(obj)
                        and not (old and J.job_complete(old))):  # a step's phase, not the cleanup
                    self._phase_finished(obj)
                bucket[name] = slim_job(obj)
        self.enqueue(key)

    def pod_event(self, etype: Optional[str], obj: dict) -> None:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        job = labels.get(J.LABEL_JOB)
        if not job or J.LABEL_RUN not in labels:
            return
        ns = meta.get("namespace")
        bucket = self.pods.setdefault((ns, job), {})
        if etype == "DELETED":
            bucket.pop(meta.get("name"), None)
        elif _newer(obj, bucket.get(meta.get("name"))):
            bucket[meta.get("name")] = slim_pod(obj)
        run = _run_of(obj)
        if run:
            self.enqueue((ns, run))

    def _phase_finished(self, job: dict) -> None:
        st = job.get("status") or {}
        start, end = J.parse_time(st.get("startTime")), J.parse_time(st.get("completionTime"))
        phase = ((job.get("metadata") or {}).get("labels") or {}).get(J.LABEL_PHASE)
        if start and end and phase:
            _metrics.phase_finished(phase, max(0.0, (end - start).total_seconds()))

    # --- the queue ---
    def enqueue(self, key: tuple[str, str]) -> None:
        if self.queue is None:
            return
        if key in self.processing:
            self.dirty.add(key)
            return
        if key in self.queued:
            return
        self.queued.add(key)
        self.queue.put_nowait(key)

    def enqueue_after(self, key: tuple[str, str], delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        old = self.timers.get(key)
        if old is not None and old[0] <= due and not old[1].cancelled():
            return
        if old is not None:
            old[1].cancel()
        handle = loop.call_later(delay, self._fire, key)
        self.timers[key] = (due, handle)

    def _fire(self, key) -> None:
        self.timers.pop(key, None)
        self.enqueue(key)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            self.queued.discard(key)
            self.processing.add(key)
            t0 = time.perf_counter()
            error = False
            try:
                await self.reconcile_one(key)
                self.errors.pop(key, None)
                self.reported.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep serving other runs; retry this one with backoff
                error = True
                n = self.errors.get(key, 0)
                self.errors[key] = n + 1
                delay = ERROR_BACKOFF[min(n, len(ERROR_BACKOFF) - 1)]
                log.warning("reconcile of %s/%s failed (%s); again in %ss", key[0], key[1], e, delay)
                self.enqueue_after(key, delay)
                await self.report_error(key, e)
            finally:
                self.processing.discard(key)
                if _metrics is not None:
                    _metrics.reconcile_observed(time.perf_counter() - t0, error=error)
                if key in self.dirty:
                    self.dirty.discard(key)
                    self.enqueue(key)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            for key in list(self.runs):
                self.enqueue(key)

    # --- one pass ---
    async def observed_jobs(self, key: tuple[str, str], status: dict) -> list[dict]:
        ns = key[0]
        out = []
        for name, job in sorted((self.jobs.get(key) or {}).items()):
            pods = list((self.pods.get((ns, name)) or {}).values())
            finished = J.job_complete(job) or J.job_failed(job)
            stamp = (ns, name, (job.get("metadata") or {}).get("resourceVersion"))
            if (finished and stamp not in self.fetched and self._missing_pods(job, pods)
                    and self._unrecorded(job, status)):
                # a Job's final condition can overtake its pods' last watch events: fetch
                # them, once per Job version
                fetched = await asyncio.to_thread(self.kube.list, f"/api/v1/namespaces/{ns}/pods",
                                                  f"{J.LABEL_JOB}={name}")
                for pod in fetched:
                    if ((pod.get("metadata") or {}).get("labels") or {}).get(J.LABEL_JOB) == name:
                        self.pod_event("MODIFIED", pod)
                pods = list((self.pods.get((ns, name)) or {}).values())
                self.fetched.add(stamp)
                if len(self.fetched) > 10000:
                    self.fetched.clear()
            out.append(dict(job, pods=pods))
        return out

    @staticmethod
    def _missing_pods(job: dict, pods: list[dict]) -> bool:
        """A complete Job: fewer succeeded pods with a termination message than its
        completions. A failed Job: no pod that says why."""
        if J.job_failed(job):
            return not any(((cs.get("state") or {}).get("terminated") or (cs.get("state") or {}).get("waiting"))
                           for p in pods for cs in (p.get("status") or {}).get("containerStatuses") or [])
        want = int((job.get("spec") or {}).get("completions") or 1)
        have = 0
        for pod in pods:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated") or {}
                if term.get("exitCode") == 0 and term.get("message"):
                    have += 1
                    break
        return have < want

    @staticmethod
    def _unrecorded(job: dict, status: dict) -> bool:
        from .reconcile import _pos, _pos_of_key

        s = J.job_step_of(job)
        return s is not None and _pos(s[0], s[1]) > _pos_of_key(status.get("completedStep"))

    async def reconcile_one(self, key: tuple[str, str]) -> Optional[Result]:
        run = self.runs.get(key)
        if run is None:
            return None
        if self.gate is not None and self.gate.paused:
            return None  # another replica acts; the gate re-enqueues every run on resuming
        ns, name = key
        self.reconciles += 1
        old_status = dict(run.get("status") or {})
        jobs = await self.observed_jobs(key, old_status)
        now = datetime.now(timezone.utc)
        inner = {k: v for k, v in old_status.items() if k != "kopf"}
        result = reconcile(run, inner, jobs, now, self.settings)
        released = [a for a in result.actions if isinstance(a, SetFinalizer) and not a.present]
        try:
            for action in result.actions:  # Job and finalizer changes first, in order
                if not isinstance(action, Event) and action not in released:
                    await self.apply(key, run, action, now)
        except KubeError as e:
            if e.status not in PERMANENT_API_STATUS or not isinstance(action, (CreateJob, SuspendJob, SetJobTTL)):
                raise
            # refused for good: fail the run with the server's reason instead of retrying
            what = (f"create Job {action.name}" if isinstance(action, CreateJob) else f"update Job {action.name}")
            body_message = e.body.get("message") if isinstance(e.body, dict) else str(e.body)[:500]
            result = api_refused(run, inner, what, e.status, str(body_message or e), now)
            released = []
        # then the Events (side by side), then the status: a crash in between repeats an
        # Event rather than losing it; a finalizer goes last, once its Events are out (the
        # run may vanish with it)
        await asyncio.gather(*(self.apply(key, run, a, now) for a in result.actions if isinstance(a, Event)))
        await self.write_status(key, old_status, result.status)
        for action in released:
            await self.apply(key, run, action, now)
        if _metrics is not None:
            _metrics.observe_status(ns, name, result.status)
        if result.requeue_after is not None:
            self.enqueue_after(key, result.requeue_after + 0.05)
        return result

    async def report_error(self, key: tuple[str, str], err: Exception) -> None:
        """A pass that failed outside reconcile. An API call the server refused (a quota,
        RBAC): say so once per distinct message, as a Warning Event and in status.message.
        Anything else (an adopted Job of another owner, a bug): a ReconcileError on the
        run. Transient server trouble (409, 429, 5xx) is only retried."""
        if not isinstance(err, KubeError):
            run = self.runs.get(key)
            if run is None:
                return
            old = dict(run.get("status") or {})
            result = reconcile_error(run, {k: v for k, v in old.items() if k != "kopf"}, err,
                                     datetime.now(timezone.utc))
            try:
                for ev in result.of(Event):
                    await asyncio.to_thread(self.kube.post_event, key[0], run, ev, datetime.now(timezone.utc))
                await self.write_status(key, old, result.status)
            except Exception as e:
                log.warning("could not report the error on %s/%s: %s", key[0], key[1], e)
            return
        if err.status in (409, 429) or err.status >= 500:
            return
        message = f"the API server refused a request: {err}"[:1000]
        if self.reported.get(key) == message:
            return
        self.reported[key] = message
        run = self.runs.get(key)
        if run is None:
            return
        try:
            await asyncio.to_thread(self.kube.post_event, key[0], run, Event("Warning", "ApiError", message),
                                    datetime.now(timezone.utc))
            await asyncio.to_thread(self.kube.patch_run, key[0], key[1], {"status": {"message": message}}, True)
        except Exception as e:
            log.warning("could not report the error on %s/%s: %s", key[0], key[1], e)

    async def write_status(self, key: tuple[str, str], old: dict, new: dict) -> None:
        patch = status_patch(old, new)
        if not patch:
            return
        updated = await asyncio.to_thread(self.kube.patch_run, key[0], key[1], {"status": patch}, True)
        if updated is not None:
            cached = self.runs.get(key)
            if cached is not None and _newer(updated, cached):
                self.runs[key] = updated

    async def apply(self, key: tuple[str, str], run: dict, action: Any, now: datetime) -> None:
        ns, name = key
        if isinstance(action, CreateJob):
            obj, created = await asyncio.to_thread(self.kube.create_job, ns, action.manifest)
            if not created:
                owners = [r.get("uid") for r in (obj.get("metadata") or {}).get("ownerReferences") or []]
                uid = (run.get("metadata") or {}).get("uid")
                if uid and owners and uid not in owners:
                    raise RuntimeError(f"Job {action.name} exists and belongs to another object; "
                                       "waiting for it to be garbage-collected")
                log.info("adopted existing Job %s/%s", ns, action.name)
            elif _metrics is not None:
                _metrics.job_created(ns, name, action.manifest["metadata"]["labels"].get(J.LABEL_PHASE))
            self.job_event("ADDED", obj)
        elif isinstance(action, CreateService):
            if await asyncio.to_thread(self.kube.create_service, ns, action.manifest):
                log.info("%s/%s: created Service %s", ns, name, action.name)
        elif isinstance(action, DeleteJob):
            log.info("%s/%s: deleting Job %s", ns, name, action.name)
            await asyncio.to_thread(self.kube.delete_job, ns, action.name)
        elif isinstance(action, SuspendJob):
            patch = {"metadata": {"annotations": {J.ANN_SUSPENDED: "true" if action.suspend else None}},
                     "spec": {"suspend": action.suspend}}
            obj = await asyncio.to_thread(self.kube.patch_job, ns, action.name, patch)
            if obj:
                self.job_event("MODIFIED", obj)
        elif isinstance(action, SetJobTTL):
            obj = await asyncio.to_thread(self.kube.patch_job, ns, action.name,
                                          {"spec": {"ttlSecondsAfterFinished": action.seconds}})
            if obj:
                self.job_event("MODIFIED", obj)
        elif isinstance(action, SetFinalizer):
            run = self.runs.get(key) or run  # the status write of this pass may have moved it on
            current = list((run.get("metadata") or {}).get("finalizers") or [])
            want = ([f for f in current if f != action.name] + [action.name]) if action.present \
                else [f for f in current if f != action.name]
            patch = {"metadata": {"finalizers": want or None,
                                  "resourceVersion": (run.get("metadata") or {}).get("resourceVersion")}}
            obj = await asyncio.to_thread(self.kube.patch_run, ns, name, patch)
            if obj is not None and _newer(obj, self.runs.get(key)):
                self.runs[key] = obj
        elif isinstance(action, Event):
            (log.warning if action.type == "Warning" else log.info)("%s/%s %s: %s", ns, name, action.reason,
                                                                    action.message)
            if _metrics is not None:
                # a failed attempt is announced once: JobFailed when a retry follows, else the
                # run's final Warning, whose reason is the failure's (OOMKilled, WorkerError, ...)
                not_a_job = ("JobRetried", "InvalidSpec", "CleanupSkipped", "CleanupRefused", "ApiError",
                             "ApiRejected", "ReconcileError", "BudgetExhausted")
                if action.type == "Warning" and action.reason not in not_a_job:
                    _metrics.job_failed(ns, name)
                elif action.reason == "JobRetried":
                    _metrics.job_retried(ns, name)
            try:
                await asyncio.to_thread(self.kube.post_event, ns, run, action, now)
            except Exception as e:  # an Event is informative: never fail a pass for it
                log.warning("could not post event %s for %s/%s: %s", action.reason, ns, name, e)


# --- kopf wiring ------------------------------------------------------------------------

def _no_diffbase():
    """kopf builds a deep-copied "essence" of every object on every event for its change
    detection, even with no handler that uses it (measured: a third of the operator's CPU
    with Jobs carrying the spec). With only on.event handlers there is nothing to compare,
    so the essence is empty and nothing is ever stored: no last-handled-configuration
    annotation on any object."""
    import kopf

    class NoDiffBase(kopf.DiffBaseStorage):
        def build(self, *, body, extra_fields=None):
            return {}

        def fetch(self, *, body):
            return None

        def store(self, *, body, patch, essence):
            return None

    return NoDiffBase()


def build_registry(ctl: Controller, namespaces: list[str]):
    import kopf

    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def _login(**kwargs):
        # the same credentials as our Kube client: kubeconfig or in-cluster
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def _startup(**_):
        await ctl.start(namespaces)

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(**_):
        await ctl.stop()

    @kopf.on.event(J.GROUP, J.VERSION, J.PLURAL, registry=registry)
    async def _run(event, **_):
        ctl.run_event(event.get("type"), event["object"])  # stored as is, never mutated

    @kopf.on.event("batch", "v1", "jobs", labels={J.LABEL_RUN: kopf.PRESENT}, registry=registry)
    async def _job(event, **_):
        ctl.job_event(event.get("type"), event["object"])  # stored as is, never mutated

    @kopf.on.event("", "v1", "pods", labels={J.LABEL_RUN: kopf.PRESENT}, registry=registry)
    async def _pod(event, **_):
        ctl.pod_event(event.get("type"), event["object"])  # stored as is, never mutated

    return registry


def peering_priority(explicit: Optional[int]) -> int:
    """kopf peers of equal priority both pause; give each replica its own: the explicit
    value, else one drawn from the pod name (plus randomness, so two replicas never tie)."""
    if explicit is not None:
        return explicit
    seed = os.environ.get("POD_ID") or os.environ.get("POD_NAME") or socket.gethostname()
    return (abs(hash(seed)) % 1000) * 1000 + random.randint(0, 999)


def operator_settings(worker_image: str) -> J.Settings:
    """Reconcile settings; the grace periods can be tuned from the environment."""
    defaults = J.Settings()
    return J.Settings(
        worker_image=worker_image,
        image_pull_grace_seconds=float(os.environ.get("SELFREWARD_IMAGE_PULL_GRACE_SECONDS",
                                                      defaults.image_pull_grace_seconds)),
        unschedulable_grace_seconds=float(os.environ.get("SELFREWARD_UNSCHEDULABLE_GRACE_SECONDS",
                                                         defaults.unschedulable_grace_seconds)),
        rendezvous_port=int(os.environ.get("SELFREWARD_RENDEZVOUS_PORT", defaults.rendezvous_port)),
    )


def run_operator(args) -> int:
    import kopf

    verbose = bool(getattr(args, "verbose", False))
    kopf.configure(verbose=verbose)
    if not verbose:  # kopf logs one "Handler ... succeeded" line per watch event: keep its warnings only
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    namespaces: list[str] = [] if args.all_namespaces else list(args.namespace or [])
    if not args.all_namespaces and not namespaces:
        namespaces = [os.environ.get("POD_NAMESPACE") or "default"]

    settings = kopf.OperatorSettings()
    settings.posting.enabled = False  # we post our own Events about runs
    settings.persistence.diffbase_storage = _no_diffbase()
    settings.scanning.disabled = not args.all_namespaces and not any(c in "".join(namespaces) for c in "*?!,")
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.peering.name = args.peering or "default"
    settings.peering.priority = peering_priority(args.priority)

    kube = Kube()
    ctl = Controller(kube, operator_settings(args.worker_image))
    if args.peering:
        ctl.gate = PeeringGate(kube, args.peering, settings.peering.priority, namespaces)
    registry = build_registry(ctl, namespaces)

    if _metrics is not None and args.metrics_port:
        _metrics.serve(args.metrics_port)
        log.info("metrics on :%s/metrics", args.metrics_port)
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None

    kopf.run(
        registry=registry,
        settings=settings,
        standalone=not args.peering,
        peering_name=args.peering or None,
        priority=settings.peering.priority,
        clusterwide=bool(args.all_namespaces),
        namespaces=namespaces,
        liveness_endpoint=liveness,
    )
    return 0
