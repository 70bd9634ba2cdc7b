"""`selfreward worker <phase>`: the one entrypoint of every Job container and local step.

Each phase is a module of this package with ``run(ctx) -> dict`` (its summary figures)
and, for sharded phases, an optional ``finalize(store, spec, iteration, summaries) -> dict``
that aggregates the shard summaries into the phase summary. This dispatcher makes every
phase idempotent in the same way: committed output is skipped, missing shards are
(re)done, and the summary is always written last.
"""
from __future__ import annotations

import importlib
import os
import time
import traceback
from typing import Any, Callable, Optional

from .. import distributed, layout, models, phases, provenance
from ..spec import RunSpec
from ..storage import Store
from .common import (PhaseContext, PhaseError, SharedModels, aggregate, log, progress_file, resolve_shard,
                     shard_summaries, write_termination_log)

SHARDED = tuple(p.name for p in phases.REGISTRY if p.sharded)


def phase_module(phase: str):
    if phase not in phases.BY_NAME:
        raise PhaseError(f"unknown phase {phase!r}; expected one of {', '.join(phases.NAMES)}")
    return importlib.import_module(f"selfreward.worker.{phase}")


def default_shards(spec: RunSpec, phase: str) -> int:
    return phases.get(phase).num_shards(spec)


def _loaded_into(summary: dict) -> None:
    """Name the models the phase used (checkpoint identities) in its summary, and how
    many times it loaded one from disk (0: it used the backend its step's earlier phase
    built)."""
    loaded, loads = models.take_loaded(), models.take_loads()
    if loaded and "loadedModels" not in summary:
        summary["loadedModels"] = loaded
    if summary.get("loadedModels"):
        summary.setdefault("modelLoads", loads)


def _reset_loaded() -> None:
    models.take_loaded()
    models.take_loads()


def phase_done(store: Store, iteration: int, phase: str) -> bool:
    return store.exists(layout.summary_path(iteration, phase))


def finalize_phase(store: Store, spec: RunSpec, iteration: int, phase: str, num_shards: int) -> Optional[dict]:
    """Write the phase summary once every shard has committed; return it, or None if
    shards are still missing."""
    summaries = shard_summaries(store, iteration, phase, num_shards)
    if any(s is None for s in summaries):
        return None
    mod = phase_module(phase)
    finalize = getattr(mod, "finalize", None)
    summary = finalize(store, spec, iteration, summaries) if finalize else aggregate(summaries)
    loaded = [m for s in summaries for m in (s.get("loadedModels") or [])]
    if loaded:  # every shard's models, each once, in shard order
        summary["loadedModels"] = list(dict.fromkeys(loaded))
    if any("modelLoads" in s for s in summaries):  # every pod's loads from disk
        summary["modelLoads"] = sum(int(s.get("modelLoads", 0)) for s in summaries)
    runtimes = [s["runtime"] for s in summaries if isinstance(s.get("runtime"), dict)]
    if runtimes:  # what the phase ran with, as a phase's own finalize does not carry it (shard 0's)
        summary.setdefault("runtime", runtimes[0])
    summary.update({"phase": phase, "iteration": iteration, "numShards": num_shards})
    store.write_json(layout.summary_path(iteration, phase), summary)
    return summary


def _run_module(mod: Any, ctx: PhaseContext) -> dict:
    """The phase module's summary with what the dispatcher adds to every one: its
    duration, the models it loaded and the runtime (image, versions) it ran with."""
    t0 = time.time()
    _reset_loaded()
    summary = dict(mod.run(ctx))
    summary.setdefault("durationSeconds", round(time.time() - t0, 3))
    _loaded_into(summary)
    summary.setdefault("runtime", provenance.runtime())
    return summary


def run_phase(
    spec: RunSpec,
    phase: str,
    iteration: int,
    shard: Optional[int] = None,
    num_shards: Optional[int] = None,
    store: Optional[Store] = None,
    progress: Optional[Callable[[dict], Any]] = None,
    shared: Optional[SharedModels] = None,
) -> dict:
    """Run one phase (one shard of it, if sharded) and return its summary. ``shared``:
    the models and backends of the step this phase is part of (see run_step)."""
    mod = phase_module(phase)
    store = store or Store.for_spec(spec)
    entry = phases.get(phase)
    if not entry.runs_in(iteration) or not 0 <= iteration <= spec.iterations:
        if entry.iterations == "zero":
            raise PhaseError(f"the {phase} phase belongs to iteration 0")
        first = 0 if entry.runs_in(0) else 1
        raise PhaseError(f"iteration {iteration} is outside {first}..{spec.iterations}")

    provenance.ensure_run_json(store, spec)  # on the cluster, the run's first worker writes it

    if phase_done(store, iteration, phase):
        summary = store.read_json(layout.summary_path(iteration, phase))
        summary["skipped"] = True
        log(f"iter-{iteration}/{phase}: already committed, skipped")
        return summary

    if entry.sharded:
        shard, num_shards = resolve_shard(shard, num_shards, default_shards(spec, phase))
    else:
        shard, num_shards = 0, 1
    ctx = PhaseContext(spec=spec, store=store, iteration=iteration, phase=phase,
                       shard=shard, num_shards=num_shards, progress=progress, shared=shared)

    if entry.sharded:
        if store.exists(ctx.shard_summary):
            log(f"iter-{iteration}/{phase} shard {shard}/{num_shards}: already committed, skipped")
            summary = store.read_json(ctx.shard_summary)
            summary["skipped"] = True
        else:
            summary = _run_module(mod, ctx)
            summary.update({"phase": phase, "iteration": iteration, "shard": shard, "numShards": num_shards})
            store.write_json(ctx.shard_summary, summary)  # the shard's commit marker
        final = finalize_phase(store, spec, iteration, phase, num_shards)
        return final if final is not None else summary

    summary = _run_module(mod, ctx)
    summary.update({"phase": phase, "iteration": iteration})
    if distributed.is_main():  # one summary per launch: rank 0's (selfreward.distributed)
        store.write_json(layout.summary_path(iteration, phase), summary)  # the phase's commit marker
    return summary


def run_step(
    spec: RunSpec,
    phase: str,
    iteration: int,
    shard: Optional[int] = None,
    num_shards: Optional[int] = None,
    store: Optional[Store] = None,
    progress: Optional[Callable[[dict], Any]] = None,
) -> dict[str, dict]:
    """What one Job pod (local task) of ``phase``'s step does: the phase, then every
    phase it hosts, for the same shard, in this process and on the models they share
    (fetched and loaded once); {phase: summary} in order. Each phase commits as when run
    alone (its shard files, shard summary and phase summary), so a phase already
    committed is skipped, and a pod re-created after a kill mid-judge loads M_t once
    for the judge and redoes no generation."""
    store = store or Store.for_spec(spec)
    names = phases.step_phases(spec, phase)
    shared = SharedModels() if len(names) > 1 else None  # alone, a phase closes its backend itself
    out: dict[str, dict] = {}
    try:
        for name in names:
            try:
                out[name] = run_phase(spec, name, iteration, shard, num_shards, store, progress, shared)
            except Exception as e:
                if name == phase:
                    raise
                # the pod is the host's: say which of its phases failed
                msg = str(e) if isinstance(e, PhaseError) else f"{type(e).__name__}: {e}"
                raise PhaseError(f"iter-{iteration}/{name} (in the {phase} pod): {msg}") from e
    finally:
        if shared is not None:
            shared.close()
    return out


def step_report(summaries: dict[str, dict]) -> dict:
    """The termination message of a step: its one phase's summary, or ``{"phases":
    {phase: summary}}`` when it ran several (jobs.job_summary reads either)."""
    if len(summaries) == 1:
        return next(iter(summaries.values()))
    return {"phases": summaries}


EXIT_STORE_NOT_OURS = 2  # as an invalid spec (jobs.EXIT_INVALID_SPEC): the Job fails at once


def main_phase(spec: RunSpec, phase: str, iteration: int, shard: Optional[int], num_shards: Optional[int],
               termination_log: str = "", progress=None, owner: Optional[dict] = None) -> int:
    """CLI body: claim the store for ``owner`` (the operator's Jobs; see ownership), run,
    write the termination message, map failures to exit codes."""
    from ..ownership import OwnershipError, claim

    main = distributed.is_main()  # under torchrun, rank 0 reports for the whole launch
    if progress is None and main:  # live progress for a PodMonitor when $SELFREWARD_PROGRESS_PORT is set (not 0)
        from .progress import progress_from_env
        progress = progress_from_env()
    if main:
        progress = progress_file(os.environ.get("SELFREWARD_PROGRESS_FILE", ""), progress)  # for `selfreward run`
    else:
        progress = None
    try:
        if owner is not None:
            claim(Store.for_spec(spec), owner)
        summary = step_report(run_step(spec, phase, iteration, shard, num_shards, progress=progress))
    except OwnershipError as e:
        log(f"iter-{iteration}/{phase} refused: {e}")
        write_termination_log({"error": str(e)[:1500], "phase": phase, "iteration": iteration}, termination_log)
        return EXIT_STORE_NOT_OURS
    except Exception as e:  # every failure leaves a readable line for the operator
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, PhaseError) else str(e)
        log(f"iter-{iteration}/{phase} failed: {msg}")
        traceback.print_exc()
        write_termination_log({"error": msg[:1500], "phase": phase, "iteration": iteration}, termination_log)
        return 1
    if main:
        write_termination_log(summary, termination_log)
    return 0
