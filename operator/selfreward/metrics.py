"""Prometheus metrics of the operator.

One :class:`Metrics` object owns a private ``CollectorRegistry``, so tests and several
instances never collide; the module keeps a default instance that the controller uses
through the module-level functions (``metrics.observe_status(...)`` and so on).

Series and labels (names carry their unit; counters end in ``_total``):

=================================================  ===========  ==========================
name                                               type         labels
=================================================  ===========  ==========================
selfreward_runs                                    gauge        phase (run phase, all 5)
selfreward_run_iteration                           gauge        namespace, run
selfreward_run_phase                               gauge        namespace, run, phase
selfreward_run_failed                              gauge        namespace, run
selfreward_run_phase_started_timestamp_seconds     gauge        namespace, run
selfreward_iteration_number                        gauge        namespace, run
selfreward_iteration_<figure>                      gauge        namespace, run
selfreward_run_eval_score                          gauge        namespace, run
selfreward_run_rollbacks                           gauge        namespace, run
selfreward_run_gpu_seconds_total                   counter      namespace, run, phase
selfreward_run_cost_total                          counter      namespace, run, phase
selfreward_iteration_gpu_seconds                   gauge        namespace, run
selfreward_iteration_cost                          gauge        namespace, run
selfreward_jobs_{created,failed,retried}_total     counter      namespace, run
selfreward_phase_duration_seconds                  histogram    phase (worker phase)
selfreward_reconcile_duration_seconds              histogram    -
selfreward_reconcile_errors_total                  counter      -
=================================================  ===========  ==========================

``selfreward_run_phase`` is a state set: one series per worker phase of the registry
(sft, instruct, generate, judge, metajudge, pairs, train, eval), 1 for the phase now running and 0 for the others, all 0
when no phase runs. ``selfreward_iteration_*`` hold the figures of the last *completed*
iteration (the last ``status.history`` record with an ``endTime``) and
``selfreward_iteration_number`` says which iteration that is; a figure the record lacks
has no series (never NaN). ``selfreward_run_phase_started_timestamp_seconds`` is the
time this operator process saw the current (iteration, phase) start, and has no series
when no phase runs. The ``<figure>`` names come from the phase registry
(``phases.py``: each phase declares its figures). ``selfreward_run_eval_score`` is
``status.lastEval`` (the eval gate's metric of the last evaluated model) and
``selfreward_run_rollbacks`` ``status.rollbacks``; both have no series without
``spec.eval``.

``selfreward_run_gpu_seconds_total`` is ``status.gpuSecondsByPhase`` (GPU-seconds of every
attempt of every step, by worker phase; sum by run for the run's total) and
``selfreward_run_cost_total`` ``status.costByPhase`` (only with
``spec.budget.pricePerGpuHour``): counters read from the status, so they survive an
operator restart and a failover. ``selfreward_iteration_gpu_seconds`` and
``selfreward_iteration_cost`` are those of the last completed iteration, as the other
iteration figures.

Every per-run series is produced at scrape time from the state kept per run, so
:meth:`Metrics.forget_run` removes all of a run's series at once. Label values are
bounded: namespace and run name are the only free ones, phases come from fixed sets.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from . import phases
from .status import RUN_PHASES

PHASES = phases.NAMES

log = logging.getLogger("selfreward.metrics")

# Worker phases last from seconds (instruct on a tiny model) to many hours (train, or
# generate over a large prompt pool): 5 s up to 2 days.
PHASE_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 172800)
# A reconcile pass is pure computation plus a few API calls.
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# selfreward_iteration_<name>: (status.IterationRecord field, help), declared with each
# phase's figures in the phase registry.
ITERATION_FIGURES = {f.metric: (f.name, f"{f.help} (last completed iteration)")
                     for _phase, f in phases.figures() if f.metric}

JOB_EVENTS = ("created", "failed", "retried")

# Figures of the last completed iteration that come from the operator's own accounting,
# not from a phase summary: selfreward_iteration_<name> -> (IterationRecord field, help).
USAGE_FIGURES = {
    "gpu_seconds": ("gpuSeconds", "GPU-seconds the iteration's pods used (last completed iteration)."),
    "cost": ("cost", "The iteration's GPU-seconds at spec.budget.pricePerGpuHour (last completed iteration)."),
}


@dataclass
class _Run:
    """What is known of one run, from its last observed status and the job events."""

    phase: str = "Pending"
    iteration: Optional[int] = None
    worker_phase: Optional[str] = None
    phase_key: Optional[tuple] = None
    phase_started: Optional[float] = None
    completed: Optional[dict] = None  # figures of the last completed iteration
    completed_iteration: Optional[int] = None
    eval_score: Optional[float] = None
    rollbacks: Optional[float] = None
    gpu_seconds: dict = field(default_factory=dict)  # worker phase -> GPU-seconds (status.gpuSecondsByPhase)
    cost: dict = field(default_factory=dict)  # worker phase -> cost (status.costByPhase)
    jobs: dict = field(default_factory=lambda: {e: 0 for e in JOB_EVENTS})


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _by_phase(v: Any) -> dict:
    """A status map of worker phase -> number, less anything that is not one (the phase
    label stays bounded to the registry's phases)."""
    if not isinstance(v, Mapping):
        return {}
    return {p: float(x) for p, x in v.items() if p in PHASES and _number(x) is not None}


class _RunCollector:
    """Yields the per-run families from the runs' state at scrape time."""

    def __init__(self, owner: "Metrics"):
        self._m = owner

    def describe(self):
        return list(self._families())

    def collect(self):
        with self._m._lock:
            runs = {k: (r.phase, r.iteration, r.worker_phase, r.phase_started, dict(r.completed or {}),
                        r.completed_iteration, dict(r.jobs), r.eval_score, r.rollbacks, dict(r.gpu_seconds),
                        dict(r.cost))
                    for k, r in self._m._runs.items()}
        return self._families(runs)

    def _families(self, runs: Optional[dict] = None):
        runs = runs or {}
        ns_run = ["namespace", "run"]

        by_phase = GaugeMetricFamily("selfreward_runs", "SelfRewardRuns known to the operator, by run phase.",
                                     labels=["phase"])
        counts = {p: 0 for p in RUN_PHASES}
        for (phase, *_rest) in runs.values():
            counts[phase] = counts.get(phase, 0) + 1
        for p in RUN_PHASES:
            by_phase.add_metric([p], counts[p])
        yield by_phase

        iteration = GaugeMetricFamily("selfreward_run_iteration", "Iteration the run is at (0 = SFT).", labels=ns_run)
        state = GaugeMetricFamily("selfreward_run_phase",
                                  "1 for the worker phase the run is now in, 0 for the others.",
                                  labels=ns_run + ["phase"])
        failed = GaugeMetricFamily("selfreward_run_failed", "1 when the run has failed.", labels=ns_run)
        started = GaugeMetricFamily("selfreward_run_phase_started_timestamp_seconds",
                                    "Unix time the run's current worker phase started.", labels=ns_run)
        done_it = GaugeMetricFamily("selfreward_iteration_number",
                                    "The iteration the selfreward_iteration_* figures belong to.", labels=ns_run)
        figures = {name: GaugeMetricFamily(f"selfreward_iteration_{name}", doc, labels=ns_run)
                   for name, (_f, doc) in {**ITERATION_FIGURES, **USAGE_FIGURES}.items()}
        jobs = {e: CounterMetricFamily(f"selfreward_jobs_{e}", f"Jobs {e} for the run.", labels=ns_run)
                for e in JOB_EVENTS}
        eval_score = GaugeMetricFamily("selfreward_run_eval_score",
                                       "The eval gate's metric (status.evalMetric) of the last evaluated model.",
                                       labels=ns_run)
        rollbacks = GaugeMetricFamily("selfreward_run_rollbacks",
                                      "Iterations the eval gate restarted from the best model.", labels=ns_run)
        gpu = CounterMetricFamily("selfreward_run_gpu_seconds",
                                  "GPU-seconds the run's pods used (pod run time x GPUs requested), every attempt, "
                                  "by worker phase.", labels=ns_run + ["phase"])
        cost = CounterMetricFamily("selfreward_run_cost",
                                   "The run's GPU-seconds at spec.budget.pricePerGpuHour, by worker phase.",
                                   labels=ns_run + ["phase"])

        for (ns, name), (phase, it, wphase, t0, completed, completed_it, job_counts, score, rolled, gpu_s,
                         costs) in sorted(runs.items()):
            lv = [ns, name]
            if it is not None:
                iteration.add_metric(lv, it)
            for p in PHASES:
                state.add_metric(lv + [p], 1.0 if p == wphase else 0.0)
            failed.add_metric(lv, 1.0 if phase == "Failed" else 0.0)
            if t0 is not None and wphase is not None:
                started.add_metric(lv, t0)
            if completed_it is not None:
                done_it.add_metric(lv, completed_it)
            for fname, value in completed.items():
                figures[fname].add_metric(lv, value)
            for e in JOB_EVENTS:
                jobs[e].add_metric(lv, job_counts.get(e, 0))
            if score is not None:
                eval_score.add_metric(lv, score)
            if rolled is not None:
                rollbacks.add_metric(lv, rolled)
            for p, v in sorted(gpu_s.items()):
                gpu.add_metric(lv + [p], v)
            for p, v in sorted(costs.items()):
                cost.add_metric(lv + [p], v)

        yield from (iteration, state, failed, started, done_it, *figures.values(), *jobs.values(), eval_score, rollbacks,
                    gpu, cost)


class Metrics:
    """The operator's metrics on a registry of their own."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, str], _Run] = {}
        self.registry.register(_RunCollector(self))
        self.phase_duration = Histogram(
            "selfreward_phase_duration_seconds", "Wall time of finished worker phases (one Job each).",
            ["phase"], buckets=PHASE_BUCKETS, registry=self.registry)
        for p in PHASES:  # every phase has its series from the start
            self.phase_duration.labels(p)
        self.reconcile_duration = Histogram(
            "selfreward_reconcile_duration_seconds", "Wall time of one reconcile pass.",
            buckets=RECONCILE_BUCKETS, registry=self.registry)
        self.reconcile_errors = Counter(
            "selfreward_reconcile_errors", "Reconcile passes that raised an error.", registry=self.registry)

    # --- runs ---------------------------------------------------------------------

    def _run(self, namespace: str, name: str) -> _Run:
        key = (namespace, name)
        run = self._runs.get(key)
        if run is None:
            run = self._runs[key] = _Run()
        return run

    def observe_status(self, namespace: str, name: str, status: Any, now: Optional[float] = None) -> None:
        """Set a run's gauges from its status (a dict of the RunStatus shape, a kopf
        status body or a RunStatus). ``now`` is for tests; it defaults to the clock."""
        status = status if status is not None else {}
        if hasattr(status, "model_dump"):
            status = status.model_dump()
        phase = _get(status, "phase") or "Pending"
        if phase not in RUN_PHASES:
            log.warning("run %s/%s has unknown phase %r; counted as Pending", namespace, name, phase)
            phase = "Pending"
        iteration = _get(status, "currentIteration")
        iteration = int(iteration) if _number(iteration) is not None else None
        wphase = _get(status, "currentPhase")
        wphase = wphase if wphase in PHASES and phase not in ("Succeeded", "Failed") else None

        completed, completed_it = None, None
        history = _get(status, "history") or []
        for rec in reversed(list(history)):
            if _get(rec, "endTime"):
                completed_it = _get(rec, "iteration")
                completed = {}
                for metric, (fname, _doc) in {**ITERATION_FIGURES, **USAGE_FIGURES}.items():
                    v = _number(_get(rec, fname))
                    if v is not None:
                        completed[metric] = v
                break

        with self._lock:
            run = self._run(namespace, name)
            run.phase = phase
            run.iteration = iteration
            key = (iteration, wphase) if wphase else None
            if key != run.phase_key:
                run.phase_key = key
                run.phase_started = (time.time() if now is None else now) if key else None
            run.worker_phase = wphase
            run.completed = completed
            run.completed_iteration = int(completed_it) if _number(completed_it) is not None else None
            run.eval_score = _number(_get(status, "lastEval"))
            run.rollbacks = _number(_get(status, "rollbacks"))
            run.gpu_seconds = _by_phase(_get(status, "gpuSecondsByPhase"))
            run.cost = _by_phase(_get(status, "costByPhase"))

    def forget_run(self, namespace: str, name: str) -> None:
        """Drop every series of a deleted run."""
        with self._lock:
            self._runs.pop((namespace, name), None)

    def runs(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._runs)

    # --- jobs and phases ----------------------------------------------------------

    def _job_event(self, event: str, namespace: str, name: str) -> None:
        with self._lock:
            self._run(namespace, name).jobs[event] += 1

    def job_created(self, namespace: str, name: str, phase: Optional[str] = None) -> None:
        """A Job was created for the run (``phase`` is accepted for symmetry; the
        counters are per run)."""
        self._job_event("created", namespace, name)

    def job_failed(self, namespace: str, name: str, phase: Optional[str] = None) -> None:
        self._job_event("failed", namespace, name)

    def job_retried(self, namespace: str, name: str, phase: Optional[str] = None) -> None:
        self._job_event("retried", namespace, name)

    def phase_finished(self, phase: str, seconds: float) -> None:
        """A worker phase (its Job) finished after ``seconds`` of wall time."""
        if phase not in PHASES:
            log.warning("phase_finished: unknown phase %r ignored", phase)
            return
        if _number(seconds) is None or seconds < 0:
            log.warning("phase_finished: bad duration %r ignored", seconds)
            return
        self.phase_duration.labels(phase).observe(seconds)

    # --- reconcile ----------------------------------------------------------------

    def reconcile_observed(self, seconds: float, error: bool = False) -> None:
        self.reconcile_duration.observe(max(0.0, float(seconds)))
        if error:
            self.reconcile_errors.inc()

    @contextlib.contextmanager
    def timed_reconcile(self) -> Iterator[None]:
        """Time the block as one reconcile pass; an exception counts as an error and
        is raised again."""
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.reconcile_observed(time.perf_counter() - t0, error=True)
            raise
        self.reconcile_observed(time.perf_counter() - t0, error=False)

    # --- exposition ---------------------------------------------------------------

    def serve(self, port: int, addr: str = "0.0.0.0") -> "MetricsServer":
        """Serve /metrics on ``addr:port`` from a daemon thread (port 0 picks a free one)."""
        return MetricsServer.start(self.registry, port, addr)


class MetricsServer:
    """A running /metrics endpoint; ``stop()`` closes it."""

    def __init__(self, httpd, thread):
        self._httpd, self._thread = httpd, thread

    @classmethod
    def start(cls, registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> "MetricsServer":
        httpd, thread = start_http_server(int(port), addr=addr, registry=registry)
        return cls(httpd, thread)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        if ":" in host:
            host = f"[{host}]"
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the default instance, for the controller ------------------------------------

_default: Optional[Metrics] = None
_default_lock = threading.Lock()


def default() -> Metrics:
    global _default
    with _default_lock:
        if _default is None:
            _default = Metrics()
        return _default


def observe_status(namespace: str, name: str, status: Any) -> None:
    default().observe_status(namespace, name, status)


def forget_run(namespace: str, name: str) -> None:
    default().forget_run(namespace, name)


def job_created(namespace: str, name: str, phase: Optional[str] = None) -> None:
    default().job_created(namespace, name, phase)


def job_failed(namespace: str, name: str, phase: Optional[str] = None) -> None:
    default().job_failed(namespace, name, phase)


def job_retried(namespace: str, name: str, phase: Optional[str] = None) -> None:
    default().job_retried(namespace, name, phase)


def phase_finished(phase: str, seconds: float) -> None:
    default().phase_finished(phase, seconds)


def reconcile_observed(seconds: float, error: bool = False) -> None:
    default().reconcile_observed(seconds, error)


def timed_reconcile():
    return default().timed_reconcile()


def serve(port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve the default instance's /metrics (the operator calls this at startup)."""
    return default().serve(port, addr)
