"""The operator's reconcile function: pure, deterministic, no I/O.

``reconcile(run, status, jobs, now, settings)`` looks at a SelfRewardRun (metadata and
spec), the status it last wrote, and the Jobs it owns (each with a ``pods`` list of
its observed pods), and returns what to do (:class:`Result`): actions for the adapter
to send, the new status, and when to look again if nothing else happens.

How progress is kept:

- ``status.completedStep`` marks the last step done. A Job with a ``Complete``
  condition also proves its step done (Jobs are created in step order), so a lost
  status recovers from the Jobs and a Job deleted by its TTL is not needed again.
  When a Job completes, the next step's Job is created in the same pass.
- Job names are deterministic per (run, step, attempt): a create that answers 409 is
  an adoption, never a duplicate.
- The spec an iteration started with is read back from its Jobs' run document (the
  pod-template annotation the pods read it from), so a spec change mid-iteration applies
  from the next iteration on (``suspend`` and ``retry`` apply at once). With no Job of
  the iteration left, the current spec is used.
- A finished Job gets its ``ttlSecondsAfterFinished`` only once the status this pass
  started from records its outcome, so a Job that finished while the operator was down
  is still there to be read.
- An exception anywhere in a pass ends as a ``ReconcileError`` (Stalled, a Warning
  Event with the exception's text) and a retry with bounded backoff; a request the API
  server refuses for good (:func:`api_refused`) fails the run with the server's message.
- A failed attempt sets ``status.retryAfter`` (exponential backoff from
  ``retry.backoffSeconds``); after ``retry.maxRetries`` re-creations the run fails with
  the most specific reason found on the Job and its pods.
- Every finished attempt's GPU-seconds (its pods' start and finish times times their GPU
  requests, see selfreward.budget) are added to the status once, when the pass that
  records its outcome runs. Before a step's first Job, ``spec.budget.maxGpuHours`` may
  refuse it (the same phase of the previous iteration is its estimate): the run ends
  with reason BudgetExhausted, and goes on when a raised budget lets the step start.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Optional, Union

from . import budget as B
from . import conditions as cond
from . import jobs as J
from . import layout, phases
from .layout import Step
from .spec import PRUNED_FIELD, RunSpec, SpecError, check_applied_configuration, parse_spec, spec_from_document
from .storage import storage_root_problem
from .status import HISTORY_LIMIT, IterationRecord, RunStatus

FINALIZER = "selfreward.dev/artifacts"
JUDGE_SATURATED = "JudgeSaturated"  # the condition type and the Event reason


# --- actions ----------------------------------------------------------------------

@dataclass(frozen=True)
class CreateJob:
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]


@dataclass(frozen=True)
class CreateService:
    """Create the run's headless Service (a 409 means it is there already: fine)."""

    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]


@dataclass(frozen=True)
class DeleteJob:
    name: str


@dataclass(frozen=True)
class SuspendJob:
    name: str
    suspend: bool


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class SetFinalizer:
    present: bool
    name: str = FINALIZER


@dataclass(frozen=True)
class SetJobTTL:
    """Give a finished Job whose outcome is recorded its ttlSecondsAfterFinished."""
    name: str
    seconds: int


Action = Union[CreateJob, CreateService, DeleteJob, SuspendJob, Event, SetFinalizer, SetJobTTL]

# A pass that raised is retried after this long, growing with how long the error has
# lasted (the Stalled condition's age), between these bounds.
ERROR_RETRY_MIN_SECONDS = 5.0
ERROR_RETRY_MAX_SECONDS = 300.0
# Failures a new spec may cure: the run resumes when its generation changes.
CURABLE_FAILURES = ("InvalidSpec", "ApiRejected", "BudgetExhausted")


@dataclass
class Result:
    actions: list = field(default_factory=list)
    status: dict = field(default_factory=dict)
    requeue_after: Optional[float] = None

    def of(self, kind: type) -> list:
        return [a for a in self.actions if isinstance(a, kind)]


# --- step positions -----------------------------------------------------------------

def _pos(iteration: int, phase: str) -> tuple[int, int]:
    return iteration, phases.get(phase).order


def _pos_of_key(key: Optional[str]) -> tuple[int, int]:
    if not key:
        return (-1, -1)
    try:
        it, phase = key.split("/", 1)
        return _pos(int(it[len("iter-"):]), phase)
    except (ValueError, IndexError, KeyError):
        return (-1, -1)


def _key(iteration: int, phase: str) -> str:
    return layout.phase_dir(iteration, phase)


# --- summaries into history ---------------------------------------------------------

def _num(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v


def _record(st: RunStatus, spec: RunSpec, step: Step, job: dict, summary: Optional[dict], now: datetime) -> None:
    """Fold a completed step's summary into its iteration's history record: the figures
    its registry entry declares, the checkpoint it made, and endTime when it is the
    iteration's last step."""
    recs = {r.iteration: r for r in st.history}
    rec = recs.get(step.iteration) or IterationRecord(iteration=step.iteration)
    jst = job.get("status") or {}
    if rec.startTime is None:
        rec.startTime = jst.get("startTime") or J.format_time(now)
    entry = phases.get(step.phase)
    for fig in entry.figures:
        v = fig.read(summary)
        if v is not None:
            setattr(rec, fig.name, v)
    if step.phase == "pairs" and rec.pairs is not None:
        st.lastPairs = rec.pairs
    if entry.checkpoint:
        rec.checkpoint = f"{spec.storage.uri.rstrip('/')}/{layout.checkpoint_dir(step.iteration, step.phase)}"
    end = layout.iteration_end(spec, step.iteration)
    if end is not None and end.phase == step.phase:
        rec.endTime = jst.get("completionTime") or J.format_time(now)
    recs[step.iteration] = rec
    st.history = [recs[k] for k in sorted(recs)][-HISTORY_LIMIT:]


def _charge(st: RunStatus, spec: RunSpec, it_spec: RunSpec, step: Step, job: dict, now: datetime) -> B.Usage:
    """Add a finished Job's GPU-seconds (its pods' run time x the GPUs each requested,
    see selfreward.budget) to its iteration's history record and the run's totals, and
    their cost at the current spec's price. Called once per finished attempt."""
    res = it_spec.resources.for_phase(step.phase)
    use = B.job_usage(job, res.gpus or 0, res.gpuResourceName)
    recs = {r.iteration: r for r in st.history}
    rec = recs.get(step.iteration)
    if rec is None:
        if not use.gpu_seconds:
            return use  # a failed attempt that used no GPU starts no history record
        rec = IterationRecord(iteration=step.iteration,
                              startTime=(job.get("status") or {}).get("startTime") or J.format_time(now))
    price = spec.budget.pricePerGpuHour if spec.budget is not None else None
    rec.gpuSeconds = round(B.number(rec.gpuSeconds) + use.gpu_seconds, 6)
    rec.gpuSecondsByPhase = B.add(rec.gpuSecondsByPhase, step.phase, use.gpu_seconds)
    if use.estimated:
        rec.gpuSecondsEstimated = True
    st.gpuSeconds = round(B.number(st.gpuSeconds) + use.gpu_seconds, 6)
    st.gpuSecondsByPhase = B.add(st.gpuSecondsByPhase, step.phase, use.gpu_seconds)
    priced = B.cost(use.gpu_seconds, price)
    if priced is not None:
        rec.cost = round(B.number(rec.cost) + priced, 6)
        st.cost = round(B.number(st.cost) + priced, 6)
        st.costByPhase = B.add(st.costByPhase, step.phase, priced)
    recs[step.iteration] = rec
    st.history = [recs[k] for k in sorted(recs)][-HISTORY_LIMIT:]
    return use


def _budget_refusal(spec: RunSpec, st: RunStatus, step: Step) -> Optional[str]:
    """Why ``step`` may not start under spec.budget (its estimate: the same phase of the
    previous iteration, from the history), or None."""
    if spec.budget is None or spec.budget.maxGpuHours is None:
        return None
    prev = next((r for r in st.history if r.iteration == step.iteration - 1), None)
    estimate = (prev.gpuSecondsByPhase or {}).get(step.phase) if prev is not None else None
    return B.refusal(B.number(st.gpuSeconds), estimate, spec.budget.maxGpuHours,
                     layout.phase_dir(step.iteration - 1, step.phase))


def _last_trained(st: RunStatus) -> Optional[str]:
    """The newest checkpoint the history records (train, or iteration 0's SFT)."""
    return next((r.checkpoint for r in sorted(st.history, key=lambda r: -r.iteration) if r.checkpoint), None)


def _budget_exhausted(p: "_Pass", step: Step, why: str) -> None:
    """The run stops before ``step``: Succeeded with the best model so far (the eval
    gate's bestCheckpoint, else the newest trained one), Failed when nothing was trained."""
    st = p.st
    st.activeJob = None
    st.retryAfter = None
    st.currentPhase = None
    if st.completionTime is None or p.old_phase not in ("Succeeded", "Failed"):
        st.completionTime = J.format_time(p.now)
    trained = _last_trained(st)
    text = f"budget exhausted before {step.key}: {why}" + (f"; cost so far {st.cost:g}" if st.cost is not None else "")
    if trained:
        st.phase = "Succeeded"
        st.finalCheckpoint = st.bestCheckpoint or trained
        message = f"{text}; final model (the best so far) at {st.finalCheckpoint}"[:1000]
        ctype, state, kind = "Succeeded", "succeeded", "Normal"
    else:
        st.phase = "Failed"
        st.finalCheckpoint = None
        message = f"{text}; nothing was trained yet"[:1000]
        ctype, state, kind = "Failed", "failed", "Warning"
    was = cond.get(st.conditions, ctype)
    if not (was and was.status == "True" and was.reason == "BudgetExhausted" and was.message == message):
        p.event(kind, "BudgetExhausted", message)
    p.state(state, "BudgetExhausted", message)


def _gate(p: "_Pass", spec: RunSpec, key: str, summary: Optional[dict]) -> bool:
    """Read an eval step's gate verdict (the eval worker decides it from every eval
    summary in the store, see selfreward.evaluation.gate_decision) into the status and
    Events. True when the gate stops the run."""
    if not summary:
        return False
    st = p.st
    best = summary.get("bestCheckpoint")
    if isinstance(best, str):
        st.bestCheckpoint = f"{spec.storage.uri.rstrip('/')}/{best}" if best else spec.model.uri
    metric = summary.get("gateMetric")
    if isinstance(metric, str) and metric:
        st.evalMetric = metric
    value = _num(summary.get("gateValue"))
    st.lastEval = round(float(value), 6) if value is not None else None
    if _num(summary.get("rollbacks")) is not None:
        st.rollbacks = int(summary["rollbacks"])
    action = summary.get("gateAction")
    if summary.get("gatePassed") is not False or action not in ("warn", "rollback", "stop"):
        return False
    change = _num(summary.get("gateChange"))
    shown = "no value" if value is None else f"{value:.4g}" + (f" ({change:+.4g})" if change is not None else "")
    best_value = _num(summary.get("bestValue"))
    why = "the judge is saturated (eval.gate.onJudgeSaturated); " if summary.get("gateReason") == "judgeSaturated" else ""
    text = (f"{key}: gate failed: {why}{metric} {shown}, best so far {summary.get('bestModel', '?')}"
            + (f" at {best_value:.4g}" if best_value is not None else ""))
    if action == "warn":
        p.event("Warning", "GateFailed", text[:1000])
        return False
    if action == "rollback":
        p.event("Warning", "RolledBack", f"{text}; the next iteration starts again from {summary.get('bestModel', '?')}"[:1000])
        return False
    p.event("Normal", "EarlyStopped", f"{text}; the run stops with the best model"[:1000])
    return True


def _judge_saturation(p: "_Pass", key: str, summary: Optional[dict]) -> None:
    """A judge step whose summary says its scores are saturated (judge.saturation): a
    JudgeSaturated Warning Event and the JudgeSaturated condition with the figures; the
    condition turns False at the next judge step that is not saturated."""
    if not summary or not isinstance(summary.get("judgeSaturated"), bool):
        return
    st = p.st
    if summary["judgeSaturated"]:
        text = summary.get("saturationMessage")
        message = (text if isinstance(text, str) and text else f"{key}: the judge looks saturated")[:1000]
        p.event("Warning", JUDGE_SATURATED, message)
        st.conditions = cond.set_condition(st.conditions, JUDGE_SATURATED, "True", JUDGE_SATURATED, message,
                                           p.now, p.gen)
    elif cond.get(st.conditions, JUDGE_SATURATED) is not None:
        st.conditions = cond.set_condition(st.conditions, JUDGE_SATURATED, "False", "NotSaturated",
                                           f"{key}: the judge's scores are not saturated", p.now, p.gen)


def _figures(summary: Optional[dict], use: Optional[B.Usage] = None) -> str:
    summary = dict(summary or {})
    if use is not None and use.gpu_seconds:
        summary["gpuSeconds"] = use.gpu_seconds
    keep = [k for k in ("prompts", "responses", "judgedResponses", "scoreMean", "pairs", "dpoLoss", "trainLoss",
                        "verifierScore", "judgePairwiseAccuracy", "winRateVsPrevious", "durationSeconds", "gpuSeconds")
            if _num(summary.get(k)) is not None]
    if not keep:
        return ""
    return (" (" + ", ".join(f"{k}={round(summary[k], 4)}" for k in keep)
            + (", estimated" if use is not None and use.estimated else "") + ")")


# --- the function -------------------------------------------------------------------

class _Pass:
    def __init__(self, run: dict, status: Any, now: datetime, settings: J.Settings):
        self.meta = run.get("metadata") or {}
        self.name = self.meta.get("name", "")
        self.gen = self.meta.get("generation")
        if isinstance(status, RunStatus):
            self.st = status.model_copy(deep=True)
        else:
            self.st = RunStatus.model_validate(status or {})
        self.old_phase = self.st.phase
        self.now = now
        self.settings = settings
        self.actions: list = []
        self.requeue: Optional[float] = None

    def event(self, type_: str, reason: str, message: str) -> None:
        self.actions.append(Event(type_, reason, message))

    def state(self, state: str, reason: str, message: str) -> None:
        self.st.conditions = cond.apply_state(self.st.conditions, state, reason, message, self.now, self.gen)
        self.st.message = message

    def requeue_in(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)

    def _fold_events(self) -> None:
        """One Event per transition: a step's completion and the next Job's creation in
        the same pass read as one line, and the run's start names its first Job."""
        out: list = []
        last_done: Optional[int] = None
        for a in self.actions:
            if isinstance(a, Event) and a.reason == "StepCompleted":
                last_done = len(out)
            elif isinstance(a, Event) and a.reason == "JobCreated" and last_done is not None:
                prev = out[last_done]
                out[last_done] = Event(prev.type, prev.reason, f"{prev.message}; {a.message.split(': ', 1)[-1]}")
                last_done = None
                continue
            out.append(a)
        self.actions = out

    def result(self) -> Result:
        self.st.observedGeneration = self.gen
        self._fold_events()
        new = self.st.phase
        if new != self.old_phase:
            if new == "Running" and self.old_phase in (None, "Pending"):
                self.actions = [a for a in self.actions if not (isinstance(a, Event) and a.reason == "JobCreated")]
                self.event("Normal", "RunStarted", self.st.message or "run started")
            elif new == "Running" and self.old_phase == "Suspended":
                self.event("Normal", "Resumed", self.st.message or "run resumed")
            elif new == "Suspended":
                self.event("Normal", "Suspended", self.st.message or "run suspended")
            elif new == "Succeeded":
                self.event("Normal", "Succeeded", self.st.message or "run succeeded")
        return Result(self.actions, self.st.model_dump(mode="json", exclude_none=True), self.requeue)


def _owned(job: dict, uid: Optional[str]) -> bool:
    refs = (job.get("metadata") or {}).get("ownerReferences") or []
    if not uid or not refs:
        return True
    return any(r.get("uid") == uid for r in refs)


@lru_cache(maxsize=512)
def _spec_from_document(raw: str) -> Optional[RunSpec]:
    """Parsed once per distinct document (every pass reads the same Jobs' annotation)."""
    try:
        return spec_from_document(json.loads(raw))[0]
    except (SpecError, ValueError):
        return None


def _iteration_spec(by_step: dict, iteration: int) -> Optional[RunSpec]:
    """The spec iteration ``iteration`` started with, from its Jobs' run document."""
    for (it, _phase), attempts in sorted(by_step.items(), key=lambda kv: _pos(*kv[0])):
        if it != iteration:
            continue
        for attempt in sorted(attempts):
            raw = J.job_document(attempts[attempt])
            spec = _spec_from_document(raw) if raw else None
            if spec is not None:
                return spec
    return None


def _next_step(spec: RunSpec, done: tuple[int, int], by_step: dict) -> tuple[Optional[Step], RunSpec]:
    done_iter = done[0]
    if done_iter >= 0:
        it_spec = _iteration_spec(by_step, done_iter) or spec
        for s in layout.steps(it_spec):
            if s.iteration == done_iter and _pos(s.iteration, s.phase) > done:
                return s, it_spec
    for s in layout.steps(spec):
        if s.iteration > done_iter:
            it_spec = _iteration_spec(by_step, s.iteration) or spec
            for s2 in layout.steps(it_spec):
                if s2.iteration == s.iteration:
                    return s2, it_spec
            return None, spec
    return None, spec


def _hosted_by(step: Step, by_step: dict, attempts: dict) -> Optional[dict]:
    """The completed Job of the step's host (judge.colocate: generate) that ran this step
    as well, or None: no host, or its Job is gone (then the step gets a Job of its own,
    whose worker does only what is left)."""
    if step.host is None:
        return None
    seen = by_step.get((step.iteration, step.host), {})
    attempt = max([attempts.get(layout.phase_dir(step.iteration, step.host), 0)] + list(seen))
    job = seen.get(attempt) if attempt else None
    return job if job is not None and J.job_complete(job) else None


def _progress(spec: RunSpec, done: tuple[int, int]) -> str:
    """Iterations 1..N finished: an iteration is finished when its last step is done."""
    it = done[0]
    end = layout.iteration_end(spec, it) if it >= 1 else None
    finished = it if end is not None and done >= end.position else max(0, it - 1)
    return f"{max(0, min(finished, spec.iterations))}/{spec.iterations}"



def _create_step_job(p: "_Pass", it_spec: RunSpec, step: Step, attempt: int) -> dict:
    """Append the actions that create a step's Job; a multi-node step needs the run's
    headless Service first (its pods' DNS names), created before every such Job rather
    than observed: creating it again is a harmless 409, and a deleted one comes back."""
    manifest = J.build_job(p.meta, it_spec, step, attempt, p.settings)
    if J.step_nodes(it_spec, step) > 1:
        p.actions.append(CreateService(J.build_service(p.meta, p.settings)))
    p.actions.append(CreateJob(manifest))
    return manifest


def _working(p, st: RunStatus, where: str, step: Step, queue: Optional[str], note: str = "") -> None:
    """Status of a step whose Job exists: waiting for Kueue admission in `queue`, or running."""
    if queue is not None:
        st.phase = "Pending" if st.completedStep is None else "Running"
        p.state("working", "WaitingForAdmission", f"{where}: {step.phase} queued in {queue} (Job {st.activeJob}){note}")
    else:
        st.phase = "Running"
        p.state("working", "JobRunning", f"{where}: {step.phase} running (Job {st.activeJob}){note}")

def reconcile(run: dict, status: Any, jobs: list[dict], now: datetime,
              settings: Optional[J.Settings] = None) -> Result:
    """One pass (see the module docstring). Never raises: an exception inside the pass
    becomes a ReconcileError result (:func:`reconcile_error`)."""
    try:
        return _reconcile(run, status, jobs, now, settings or J.Settings())
    except Exception as e:  # noqa: BLE001 - every failure must reach the run's status
        return reconcile_error(run, status, e, now)


def _error_text(err: BaseException) -> str:
    """The exception's type and first lines, bounded: what the Event and status show.
    Nothing in a pass holds a secret (credentials are only secretKeyRef names)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {' '.join(text[:3])}"[:600] if text else type(err).__name__


def reconcile_error(run: dict, status: Any, err: BaseException, now: datetime) -> Result:
    """The result of a pass that raised: Stalled with reason ReconcileError and the
    exception text, a Warning Event when the text is new, and a retry after a delay that
    grows with the error's age (ERROR_RETRY_MIN_SECONDS..ERROR_RETRY_MAX_SECONDS). The
    phase is left as it was (the run's work is not known to have failed)."""
    try:
        p = _Pass(run, status, now, J.Settings())
    except Exception:  # noqa: BLE001 - an unreadable status: start from an empty one
        p = _Pass(run, {}, now, J.Settings())
    message = f"reconcile failed: {_error_text(err)}"[:1000]
    was = cond.get(p.st.conditions, "Stalled")
    repeated = bool(was and was.status == "True" and was.reason == "ReconcileError")
    if not (repeated and was.message == message):
        p.event("Warning", "ReconcileError", message)
    p.state("failed", "ReconcileError", message)
    # "failed" also sets Failed=True; the run has not failed, only this pass did
    p.st.conditions = cond.set_condition(p.st.conditions, "Failed", "False", "NotFailed", "", now, p.gen)
    since = J.parse_time(was.lastTransitionTime) if repeated else None
    age = (now - since).total_seconds() if since else 0.0
    p.requeue_in(min(ERROR_RETRY_MAX_SECONDS, max(ERROR_RETRY_MIN_SECONDS, age)))
    return p.result()


# What the API server refuses for good: a malformed (400) or invalid (422) object, or one
# too large (413), fails the same way on every retry. 403 is retried instead: quotas free
# up, and RBAC or an admission policy are fixed by an administrator, not by the run.
PERMANENT_API_STATUS = (400, 413, 422)


def api_refused(run: dict, status: Any, what: str, code: int, message: str, now: datetime) -> Result:
    """The result when the API server refused ``what`` (e.g. "create Job x") with a
    PERMANENT_API_STATUS: the run fails with reason ApiRejected and the server's message
    (it resumes if its spec changes, since the spec makes the manifests)."""
    p = _Pass(run, status, now, J.Settings())
    text = f"the API server refused to {what} (HTTP {code}): {message}"[:1000]
    p.st.phase = "Failed"
    p.st.activeJob = None
    p.st.retryAfter = None
    p.st.completionTime = J.format_time(now)
    p.state("failed", "ApiRejected", text)
    p.event("Warning", "ApiRejected", text)
    return p.result()


def _expire_recorded(p: _Pass, spec: RunSpec, jobs: list[dict], recorded: RunStatus) -> None:
    """SetJobTTL for the finished step Jobs whose outcome ``recorded`` (the status this
    pass started from, hence already written) holds: completed steps up to
    completedStep, failed attempts a later attempt replaced, everything of a failed run."""
    ttl = spec.ttlSecondsAfterFinished
    if ttl is None:
        return
    done = _pos_of_key(recorded.completedStep)
    for job in jobs:
        s = J.job_step_of(job)
        if s is None or (job.get("spec") or {}).get("ttlSecondsAfterFinished") == ttl:
            continue
        if (job.get("metadata") or {}).get("deletionTimestamp"):
            continue
        it, phase, attempt = s
        key = _key(it, phase)
        if J.job_complete(job):
            known = _pos(it, phase) <= done
        elif J.job_failed(job):
            known = recorded.phase == "Failed" or (recorded.attempts or {}).get(key, 0) > attempt
        else:
            known = False
        if known:
            p.actions.append(SetJobTTL(job["metadata"]["name"], ttl))


def _reconcile(run: dict, status: Any, jobs: list[dict], now: datetime, settings: J.Settings) -> Result:
    p = _Pass(run, status, now, settings)
    st = p.st
    recorded = st.model_copy(deep=True)
    uid = p.meta.get("uid")
    jobs = [j for j in jobs if _owned(j, uid)]

    # 1. the spec: what pydantic rejects (and the CRD schema could not) stalls the run;
    # so does one too large to travel in a Job, and a field the API server pruned from
    # what kubectl applied (a typo runs nothing)
    try:
        spec = parse_spec(run.get("spec"))
        J.checked_document(p.meta, spec)
        if not p.meta.get("deletionTimestamp"):
            check_applied_configuration(p.meta)
    except SpecError as e:
        if p.meta.get("deletionTimestamp"):
            if FINALIZER in (p.meta.get("finalizers") or []):
                p.actions.append(SetFinalizer(False))
                p.event("Warning", "CleanupSkipped", "the spec is invalid: artifacts were not deleted")
            return p.result()
        detail = "; ".join(f"{loc}: {msg}" for loc, msg in e.errors)
        message = f"invalid spec: {detail}"[:1000]
        was = cond.get(st.conditions, "Stalled")
        if not (was and was.status == "True" and was.reason == "InvalidSpec" and was.message == message):
            p.event("Warning", "InvalidSpec", message)
        st.phase = "Failed"
        p.state("failed", "InvalidSpec", message)
        return p.result()

    # 2. deletion and the artifacts finalizer
    finalizers = p.meta.get("finalizers") or []
    if p.meta.get("deletionTimestamp"):
        return _deletion(p, spec, jobs, finalizers)
    if spec.storage.deleteOnRunDeletion and FINALIZER not in finalizers:
        p.actions.append(SetFinalizer(True))
    elif not spec.storage.deleteOnRunDeletion and FINALIZER in finalizers:
        p.actions.append(SetFinalizer(False))

    # 3. a failed run stays failed (an invalid spec that was fixed resumes; so does one whose
    # applied manifest lost its pruned typo, which changes no generation)
    if st.phase == "Failed":
        failed = cond.get(st.conditions, "Failed")
        fixed = failed is not None and (failed.observedGeneration != p.gen or PRUNED_FIELD in (failed.message or ""))
        if not (failed and failed.reason in CURABLE_FAILURES and fixed):
            _expire_recorded(p, spec, jobs, recorded)
            return p.result()
    if cond.is_true(st.conditions, "Stalled") and (cond.get(st.conditions, "Stalled").reason == "ReconcileError"):
        p.event("Normal", "Recovered", "reconcile works again")
    _expire_recorded(p, spec, jobs, recorded)

    by_step: dict[tuple[int, str], dict[int, dict]] = {}
    for j in jobs:
        s = J.job_step_of(j)
        if s is not None:
            by_step.setdefault((s[0], s[1]), {})[s[2]] = j

    done = _pos_of_key(st.completedStep)
    attempts = dict(st.attempts or {})
    if st.startTime is None:
        st.startTime = J.format_time(now)

    while True:
        if st.earlyStopped:
            _succeeded(p, spec, done, early=st.earlyStopped)
            break
        step, it_spec = _next_step(spec, done, by_step)
        if step is None:
            _succeeded(p, spec, done)
            break
        key = step.key
        hosted = _hosted_by(step, by_step, attempts)
        if hosted is not None:
            # the host's completed Job ran this step too (judge.colocate): record it from there
            summary = J.job_summary(hosted, step.phase)
            _record(st, it_spec, step, hosted, summary, now)
            done = _pos(step.iteration, step.phase)
            st.completedStep = key
            p.event("Normal", "StepCompleted", f"{key} completed in {hosted['metadata']['name']}{_figures(summary)}")
            if step.phase == "judge":
                _judge_saturation(p, key, summary)
            continue
        seen = by_step.get((step.iteration, step.phase), {})
        attempt = max([attempts.get(key, 0)] + list(seen))
        job = seen.get(attempt) if attempt else None
        st.currentIteration, st.currentPhase = step.iteration, step.phase
        where = (f"iteration {step.iteration}/{it_spec.iterations}" if step.iteration
                 else f"iteration 0 ({'SFT' if step.phase == 'sft' else 'baseline'})")

        if job is not None and J.job_complete(job):
            summary = J.job_summary(job)
            _record(st, it_spec, step, job, summary, now)
            use = _charge(st, spec, it_spec, step, job, now)
            st.workerImageID = J.job_image_id(job) or st.workerImageID
            done = _pos(step.iteration, step.phase)
            st.completedStep = key
            st.retryAfter = None
            st.activeJob = None
            attempts[key] = attempt
            p.event("Normal", "StepCompleted", f"{key} completed{_figures(summary, use)}")
            if step.phase == "judge":
                _judge_saturation(p, key, summary)
            if step.phase == "eval" and _gate(p, it_spec, key, summary):
                st.earlyStopped = key
            continue

        if spec.suspend:
            if job is not None and not J.job_failed(job):
                ann = (job.get("metadata") or {}).get("annotations") or {}
                if ann.get(J.ANN_SUSPENDED) != "true":
                    p.actions.append(SuspendJob(job["metadata"]["name"], True))
            st.phase = "Suspended"
            p.state("suspended", "Suspended", f"suspended before {where}: {step.phase}")
            break
        if job is not None and ((job.get("metadata") or {}).get("annotations") or {}).get(J.ANN_SUSPENDED) == "true":
            p.actions.append(SuspendJob(job["metadata"]["name"], False))

        failure: Optional[J.Failure] = None
        still_active = False
        problem_note = ""
        if job is not None and J.job_failed(job):
            failure = J.job_failure(job)
        elif job is not None:
            problem = J.pod_problem(job.get("pods") or [])
            if problem is not None:
                reason, msg, since = problem
                grace = (settings.image_pull_grace_seconds if reason == "ImagePullError"
                         else settings.unschedulable_grace_seconds)
                waited = (now - since).total_seconds() if since else 0.0
                if waited >= grace:
                    failure, still_active = J.Failure(reason, msg), True
                else:
                    problem_note = f"; {reason}: {msg}"
                    p.requeue_in(grace - waited)

        if failure is None and job is None and attempt > 0 and st.retryAfter and st.activeJob == J.job_name(p.name, step, attempt):
            # the failed attempt's Job is gone already (deleted by us after a pod problem)
            failure = J.Failure("Retrying", st.message or "previous attempt failed")

        if failure is not None:
            name = J.job_name(p.name, step, attempt)
            if still_active:
                p.actions.append(DeleteJob(name))
            retries_used = attempt - 1
            if retries_used < spec.retry.maxRetries:
                retry_at = J.parse_time(st.retryAfter) if st.retryAfter and st.activeJob == name else None
                if retry_at is None:
                    if job is not None:
                        _charge(st, spec, it_spec, step, job, now)
                    base = (J.job_finished_at(job) if job is not None and not still_active else None) or now
                    retry_at = base + timedelta(seconds=spec.retry.backoffSeconds * (2 ** retries_used))
                    st.retryAfter = J.format_time(retry_at)
                    st.activeJob = name
                    p.event("Warning", "JobFailed",
                            f"{key} attempt {attempt} failed ({failure.reason}): {failure.message}"[:1000])
                    st.message = f"{key} attempt {attempt} failed ({failure.reason}): {failure.message}"[:1000]
                if now >= retry_at:
                    nxt = attempt + 1
                    manifest = _create_step_job(p, it_spec, step, nxt)
                    attempts[key] = nxt
                    st.retryAfter = None
                    st.activeJob = manifest["metadata"]["name"]
                    p.event("Warning", "JobRetried", f"{key}: attempt {nxt} of {spec.retry.maxRetries + 1} "
                                                     f"({manifest['metadata']['name']}) after {failure.reason}")
                    st.phase = "Running"
                    p.state("working", "Retrying", f"{where}: {step.phase} attempt {nxt} running")
                else:
                    wait = (retry_at - now).total_seconds()
                    p.requeue_in(wait)
                    st.phase = "Running"
                    p.state("working", "BackingOff",
                            f"{where}: {step.phase} attempt {attempt} failed ({failure.reason}): "
                            f"{failure.message}; retry at {st.retryAfter}"[:1000])
            else:
                if job is not None:
                    _charge(st, spec, it_spec, step, job, now)
                st.phase = "Failed"
                st.activeJob = None
                st.retryAfter = None
                st.completionTime = J.format_time(now)
                message = f"{key} failed after {attempt} attempt(s): {failure.message}"[:1000]
                p.state("failed", failure.reason, message)
                p.event("Warning", failure.reason, message)
            break

        if job is None:
            if not seen and not attempts.get(key):
                # a step not started yet: the budget (the current spec's, like suspend) may refuse it
                why = _budget_refusal(spec, st, step)
                if why is not None:
                    _budget_exhausted(p, step, why)
                    break
            n = attempt or 1
            manifest = _create_step_job(p, it_spec, step, n)
            st.completionTime = None  # a run that stopped (the budget, a refused request) goes on
            st.finalCheckpoint = None
            if attempts.get(key, 0) < n:
                p.event("Normal", "JobCreated", f"{key}: created Job {manifest['metadata']['name']}")
            attempts[key] = n
            st.activeJob = manifest["metadata"]["name"]
            queue = it_spec.kueue.queueName if spec.kueue is not None and it_spec.kueue is not None else None
            _working(p, st, where, step, queue)
            break

        # the step's Job is active
        st.activeJob = job["metadata"]["name"]
        attempts[key] = attempt
        queued = bool((job.get("spec") or {}).get("suspend")) and spec.kueue is not None
        _working(p, st, where, step, spec.kueue.queueName if queued else None, problem_note)
        break

    st.attempts = attempts or None
    st.progress = _progress(spec, done)
    return p.result()


def _succeeded(p: _Pass, spec: RunSpec, done: tuple[int, int], early: Optional[str] = None) -> None:
    st = p.st
    st.phase = "Succeeded"
    st.activeJob = None
    st.retryAfter = None
    st.currentPhase = None
    if st.completionTime is None or p.old_phase != "Succeeded":
        st.completionTime = J.format_time(p.now)
    if early:
        # the eval gate stopped the run: its result is the best model so far
        st.finalCheckpoint = st.bestCheckpoint
        p.state("succeeded", "EarlyStopped", f"stopped early by the eval gate at {early}"
                + (f"; final model (the best by {st.evalMetric}) at {st.finalCheckpoint}" if st.finalCheckpoint else ""))
        return
    final = None
    if done[0] >= 1:
        final = f"{spec.storage.uri.rstrip('/')}/{layout.checkpoint_dir(done[0], 'train')}"
    st.finalCheckpoint = final
    p.state("succeeded", "Succeeded",
            f"{spec.iterations} iteration(s) done" + (f"; final model at {final}" if final else ""))


def _deletion(p: _Pass, spec: RunSpec, jobs: list[dict], finalizers: list[str]) -> Result:
    """The run is being deleted (phase Terminating). Its Jobs go with it by
    ownerReference; with the artifacts finalizer, active step Jobs are stopped first and,
    once they are gone, a cleanup Job deletes what the run wrote (it has the storage
    credentials, the operator has not; see selfreward.ownership), and the finalizer goes
    when that Job has finished, its Event posted first."""
    st = p.st
    st.phase = "Terminating"
    st.activeJob = None
    st.retryAfter = None
    st.currentPhase = None
    if FINALIZER not in finalizers:  # e.g. a foreground deletion waiting for the Jobs
        p.state("working", "Deleting", "deleting: the run's Jobs go with it")
        return p.result()
    active = [j for j in jobs if J.job_step_of(j) is not None and not (J.job_complete(j) or J.job_failed(j))]
    for j in active:
        if not (j.get("metadata") or {}).get("deletionTimestamp"):
            p.actions.append(DeleteJob(j["metadata"]["name"]))
    uri = spec.storage.uri
    if active:
        # the cleanup starts once no step Job is left to write behind it
        p.state("working", "Deleting", f"deleting: stopping Job(s) {', '.join(j['metadata']['name'] for j in active)}")
        p.requeue_in(2.0)
        return p.result()
    problem = storage_root_problem(uri)
    cleanup = next((j for j in jobs if ((j.get("metadata") or {}).get("labels") or {}).get(J.LABEL_ROLE) == "cleanup"),
                   None)
    if problem and cleanup is None:
        p.actions.append(SetFinalizer(False))
        message = f"nothing was deleted: storage.uri {problem}; a run's store must be a prefix of its own"[:1000]
        p.event("Warning", "CleanupRefused", message)
        p.state("working", "CleanupRefused", message)
    elif cleanup is None:
        p.actions.append(CreateJob(J.build_cleanup_job(p.meta, spec, p.settings)))
        p.event("Normal", "CleanupStarted", f"deleting the run's artifacts under {uri}")
        p.state("working", "Deleting", f"deleting: the run's artifacts under {uri}")
    elif J.job_complete(cleanup):
        summary = J.job_summary(cleanup) or {}
        p.actions.append(SetFinalizer(False))
        if summary.get("refused"):
            message = f"nothing was deleted under {uri}: {summary['refused']}"[:1000]
            p.event("Warning", "CleanupRefused", message)
            p.state("working", "CleanupRefused", message)
        else:
            kept = _num(summary.get("kept"))
            message = (f"deleted the run's artifacts under {uri} ({summary.get('deleted', '?')} objects"
                       + (f"; kept {kept} the run did not write" if kept else "") + ")")
            p.event("Normal", "CleanupDone", message)
            p.state("working", "CleanupDone", message)
    elif J.job_failed(cleanup):
        f = J.job_failure(cleanup)
        p.actions.append(SetFinalizer(False))
        message = f"artifacts under {uri} may remain: {f.reason}: {f.message}"[:1000]
        p.event("Warning", "CleanupFailed", message)
        p.state("working", "CleanupFailed", message)
    else:
        p.state("working", "Deleting", f"deleting: the run's artifacts under {uri} (Job {cleanup['metadata']['name']})")
    return p.result()
