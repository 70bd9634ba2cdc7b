"""GPU time, its cost, and the budget that stops a run before a step would cross it.

Both the operator (from pod timings) and the local runner (from its workers' wall
times) count GPU-seconds the same way: how long a worker held its GPUs times how many it
held. Reconcile reads the pods it is handed and keeps the sums in the status; nothing
here does I/O.

A pod's time runs from its first container start to its last container finish (the
``terminated`` states, current or last), else from the pod's ``startTime``. A pod that
has not finished is not counted yet: its Job is charged when it completes or fails.
A pod deleted before the operator read it (a TTL, a person, a node gone) leaves a gap:
the Job's status says how many pods finished (``succeeded`` + ``failed``), so each
missing one is estimated at the Job's whole duration (``startTime`` to its completion)
times the GPUs of the step: an upper bound, since no pod of a Job outlives the Job, and
the step is marked ``gpuSecondsEstimated``.

The budget rule (``spec.budget.maxGpuHours``, see :func:`refusal`): before a step
starts, its cost is estimated as what the same phase cost in the previous iteration.
The step is not started when that estimate would take the run past the budget (a step
that lands exactly on it still runs), or when the run is past it already. With no
estimate (every step of iteration 1 but the eval, which iteration 0 has too) the step
starts unless the budget is used up: a budget bounds what is known, it does not guess.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

from .jobs import CONTAINER, DEFAULT_GPU_RESOURCE, parse_time

SECONDS_PER_HOUR = 3600.0


def _containers(pod: dict) -> list[dict]:
    st = pod.get("status") or {}
    return list(st.get("initContainerStatuses") or []) + list(st.get("containerStatuses") or [])


def pod_window(pod: dict) -> Optional[tuple[datetime, datetime]]:
    """(start, end) of a finished pod: first container start to last container finish;
    None while any container runs or when no finish is known."""
    starts: list[datetime] = []
    ends: list[datetime] = []
    for cs in _containers(pod):
        state = cs.get("state") or {}
        if state.get("running") is not None:
            return None
        for key in ("state", "lastState"):
            term = (cs.get(key) or {}).get("terminated") or {}
            s, e = parse_time(term.get("startedAt")), parse_time(term.get("finishedAt"))
            if s is not None:
                starts.append(s)
            if e is not None:
                ends.append(e)
    pod_start = parse_time((pod.get("status") or {}).get("startTime"))
    start = min(starts) if starts else pod_start
    if start is None or not ends:
        return None
    end = max(ends)
    return start, max(start, end)


def pod_gpus(pod: dict, resource: str) -> Optional[int]:
    """GPUs the pod's worker container asks for (its limit, else its request), or None
    when the pod handed over carries no spec."""
    containers = (pod.get("spec") or {}).get("containers")
    if not containers:
        return None
    total = 0
    for c in containers:
        if c.get("name") not in (None, CONTAINER):
            continue
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(resource, (res.get("requests") or {}).get(resource))
        try:
            total += int(str(value)) if value is not None else 0
        except ValueError:
            continue
    return total


@dataclass(frozen=True)
class Usage:
    """GPU-seconds of one Job (all its pods), and whether part of it is an estimate."""

    gpu_seconds: float
    estimated: bool = False


def job_usage(job: dict, gpus: int, resource: Optional[str] = None) -> Usage:
    """The GPU-seconds of a finished Job from its observed pods (``job["pods"]``);
    ``gpus`` is what the step's spec asks per pod, used when a pod carries no spec and
    for the pods gone before they were read (see the module docstring)."""
    resource = resource or DEFAULT_GPU_RESOURCE
    total = 0.0
    counted = 0
    for pod in job.get("pods") or []:
        window = pod_window(pod)
        if window is None:
            continue
        counted += 1
        n = pod_gpus(pod, resource)
        total += (window[1] - window[0]).total_seconds() * (gpus if n is None else n)
    jst = job.get("status") or {}
    finished = int(jst.get("succeeded") or 0) + int(jst.get("failed") or 0)
    missing = max(0, finished - counted)
    if missing and gpus:
        start = parse_time(jst.get("startTime"))
        end = parse_time(jst.get("completionTime")) or _condition_time(job)
        if start is not None and end is not None:
            total += missing * max(0.0, (end - start).total_seconds()) * gpus
            return Usage(round(total, 3), True)
    return Usage(round(total, 3), False)


def _condition_time(job: dict) -> Optional[datetime]:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return parse_time(c.get("lastTransitionTime"))
    return None


def cost(gpu_seconds: float, price_per_gpu_hour: Optional[float]) -> Optional[float]:
    if price_per_gpu_hour is None:
        return None
    return round(gpu_seconds / SECONDS_PER_HOUR * price_per_gpu_hour, 6)


def hours(gpu_seconds: float) -> str:
    return f"{gpu_seconds / SECONDS_PER_HOUR:.4g}"


def refusal(used: float, estimate: Optional[float], max_gpu_hours: Optional[float],
            estimated_from: str = "") -> Optional[str]:
    """Why a step may not start under the budget (the figures, in GPU-hours), or None.
    ``used``: GPU-seconds the run has used; ``estimate``: the step's, or None, and the
    step it was read from."""
    if max_gpu_hours is None:
        return None
    limit = max_gpu_hours * SECONDS_PER_HOUR
    if estimate is None and used >= limit or used > limit:
        return f"{hours(used)} of {max_gpu_hours:.4g} GPU-hours used"
    if estimate is not None and used + estimate > limit:
        return (f"{hours(used)} of {max_gpu_hours:.4g} GPU-hours used and the step is estimated at "
                f"{hours(estimate)} more" + (f" (what {estimated_from} used)" if estimated_from else ""))
    return None


def add(totals: Optional[dict[str, float]], key: str, value: float) -> dict[str, float]:
    out = dict(totals or {})
    out[key] = round(out.get(key, 0.0) + value, 6)
    return out


def number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0
