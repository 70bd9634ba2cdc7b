"""Live progress of a running worker phase, as Prometheus gauges a PodMonitor scrapes.

A phase reports its progress with ``ctx.report(**figures)``; the dispatcher passes each
report (a dict with ``iteration``, ``phase``, ``shard`` and the figures) to the
callback returned by :func:`start_progress_exporter`, which keeps the latest values in
a registry of its own and serves them on ``/metrics``. The worker starts it when
``SELFREWARD_PROGRESS_PORT`` is set to a port (e.g. 9400); unset or ``0`` disables it
(:func:`progress_from_env`). ``SELFREWARD_PROGRESS_ADDR`` sets the bind address
(default ``0.0.0.0``, so the pod IP is scrapable).

Series, all labelled ``phase``, ``iteration``, ``shard``:

- ``selfreward_worker_items_done`` / ``selfreward_worker_items_total``: work done and
  to do (from the figures ``done``/``total``; a trainer's ``step``/``totalSteps``);
- ``selfreward_worker_progress_ratio``: done / total, 0 to 1;
- ``selfreward_worker_tokens_per_second``: from ``tokensPerSecond``, or else the
  growth of the cumulative ``tokens`` figure since the first report that had it;
- ``selfreward_worker_started_timestamp_seconds`` and
  ``selfreward_worker_last_report_timestamp_seconds`` (a stalled worker stops
  advancing the latter);
- ``selfreward_worker_figure{figure=...}``: every other numeric figure (``loss``,
  ``rewardAccuracy``, ...), under its name as the phase reports it.

Label cardinality: the endpoint belongs to one pod that runs one phase of one
iteration on one shard, so each label has one value at a time; when a report arrives
with another (phase, iteration, shard), the previous series are removed. ``iteration``
is bounded by the run's length and ``figure`` by the phases' code. Reporting never
raises: a metrics problem must not fail a phase.
"""
from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Gauge

from ..metrics import MetricsServer
from .common import log

LABELS = ("phase", "iteration", "shard")
DONE_KEYS = ("done", "itemsDone", "step")
TOTAL_KEYS = ("total", "itemsTotal", "totalSteps")
RATE_KEYS = ("tokensPerSecond",)
CUMULATIVE_TOKENS = "tokens"
_RESERVED = set(LABELS) | set(DONE_KEYS) | set(TOTAL_KEYS) | set(RATE_KEYS)


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _first(figures: dict, keys: tuple) -> Optional[float]:
    for k in keys:
        v = _number(figures.get(k))
        if v is not None:
            return v
    return None


class ProgressExporter:
    """The progress callback, with the /metrics endpoint that serves what it was told."""

    def __init__(self, port: int, addr: str = "0.0.0.0"):
        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str, extra: tuple = ()) -> Gauge:
            return Gauge(name, doc, LABELS + extra, registry=r)

        self.done = gauge("selfreward_worker_items_done", "Items (prompts, responses, steps) done by this worker.")
        self.total = gauge("selfreward_worker_items_total", "Items this worker has to do.")
        self.ratio = gauge("selfreward_worker_progress_ratio", "Fraction of this worker's items done (0-1).")
        self.rate = gauge("selfreward_worker_tokens_per_second", "Tokens generated (or trained on) per second.")
        self.started = gauge("selfreward_worker_started_timestamp_seconds", "Unix time of the phase's first report.")
        self.last = gauge("selfreward_worker_last_report_timestamp_seconds", "Unix time of the latest report.")
        self.figure = gauge("selfreward_worker_figure", "Other figures the phase reports (loss, ...).", ("figure",))
        self._plain = (self.done, self.total, self.ratio, self.rate, self.started, self.last)
        self._lock = threading.Lock()
        self._labels: Optional[tuple[str, str, str]] = None
        self._tokens0: Optional[tuple[float, float]] = None  # (time, tokens) of the first report with tokens
        self._figures: set[str] = set()
        self._set: set[Gauge] = set()
        self._warned = False
        self.server = MetricsServer.start(self.registry, port, addr)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    def __call__(self, report: dict) -> None:
        try:
            self._update(report)
        except Exception as e:  # never fail the phase for its metrics
            if not self._warned:
                self._warned = True
                log(f"progress exporter: report ignored ({type(e).__name__}: {e})")

    def _forget(self) -> None:
        if self._labels is None:
            return
        for g in self._set:
            g.remove(*self._labels)
        for name in self._figures:
            self.figure.remove(*self._labels, name)
        self._set.clear()
        self._figures.clear()

    def _put(self, g: Gauge, value: float) -> None:
        g.labels(*self._labels).set(value)
        self._set.add(g)

    def _update(self, report: dict) -> None:
        now = time.time()
        labels = tuple(str(report.get(k, "")) for k in LABELS)
        with self._lock:
            if labels != self._labels:
                self._forget()
                self._labels = labels
                self._tokens0 = None
                self._put(self.started, now)
            done, total = _first(report, DONE_KEYS), _first(report, TOTAL_KEYS)
            if done is not None:
                self._put(self.done, done)
            if total is not None:
                self._put(self.total, total)
            if done is not None and total is not None and total > 0:
                self._put(self.ratio, min(1.0, max(0.0, done / total)))
            rate = _first(report, RATE_KEYS)
            tokens = _number(report.get(CUMULATIVE_TOKENS))
            if tokens is not None and self._tokens0 is None:
                self._tokens0 = (now, tokens)
            elif rate is None and tokens is not None and now > self._tokens0[0]:
                rate = (tokens - self._tokens0[1]) / (now - self._tokens0[0])
            if rate is not None:
                self._put(self.rate, rate)
            for name, value in report.items():
                v = _number(value)
                if name in _RESERVED or v is None:
                    continue
                self.figure.labels(*self._labels, str(name)).set(v)
                self._figures.add(str(name))
            self._put(self.last, now)


def start_progress_exporter(port: int, addr: str = "0.0.0.0") -> ProgressExporter:
    """Serve live progress on ``addr:port`` (0 picks a free port) and return the
    callback to pass as the phase's ``progress``."""
    return ProgressExporter(port, addr)


# The exporter progress_from_env started last (a worker process runs one), so that its
# owner can stop it; its server thread is a daemon and ends with the process anyway.
last_started: Optional[ProgressExporter] = None


def progress_from_env(environ: Optional[dict] = None) -> Optional[ProgressExporter]:
    """The exporter ``SELFREWARD_PROGRESS_PORT`` asks for, or None when it is unset or 0
    (or the port cannot be bound: the phase runs on without live metrics)."""
    global last_started
    env = os.environ if environ is None else environ
    raw = (env.get("SELFREWARD_PROGRESS_PORT") or "").strip()
    if raw in ("", "0"):
        return None
    try:
        port = int(raw)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range")
        exporter = start_progress_exporter(port, env.get("SELFREWARD_PROGRESS_ADDR") or "0.0.0.0")
    except (ValueError, OSError) as e:
        log(f"live progress disabled: SELFREWARD_PROGRESS_PORT={raw!r}: {e}")
        return None
    log(f"live progress on :{exporter.port}/metrics")
    last_started = exporter
    return exporter
