"""`selfreward run SPEC.yaml`: a whole run on this machine.

The local runner plans with the operator's planner (``layout.steps``) and runs every
step the way a Job container does: as a subprocess of ``python -m selfreward worker
<phase> --spec FILE --iteration t [--shard i --num-shards n]``. It reads each worker's
result the way the operator reads a termination message: the worker writes its compact
summary (or ``{"error": ...}``) to ``$SELFREWARD_TERMINATION_LOG``, a per-shard file in
the run's state directory. Live progress comes through ``$SELFREWARD_PROGRESS_FILE``
(the worker keeps its latest progress report there as JSON).

Resuming: a step whose ``summary.json`` exists is shown as done and not run; a shard
whose shard summary exists is not run again. With ``judge.colocate`` a generate task
judges its shard too (``worker.run_step``), so the judge step is normally done when the
generate step is; one left unfinished (stopped mid-judge after the last generate shard)
runs as judge tasks, each judging its generate shard. Re-running the same command after a
failure, Ctrl-C or a crash continues where the run stopped, and the workers themselves
skip committed output, so nothing is produced twice.

run.json: the first run writes the spec (with the runtime it ran with, see
``provenance``) to ``run.json`` at the root of the artifact store. A later ``selfreward run`` against the same store must carry the same recipe;
only the fields in :data:`MUTABLE_FIELDS` may differ (more or fewer iterations, how
fast or where the phases run, Kubernetes-only settings). Anything else, such as another
model, other prompts or judge settings, is refused with the fields named, since the
artifacts already in the store were made with the old values. When only mutable fields
changed, run.json is rewritten with the new spec.

At the end the runner prints per-iteration figures read from the phase summaries and
writes them to ``iterations.json`` in the store.

GPU time: every worker's wall time times the GPUs it was given (its ``gpu_groups`` slot
when shards run side by side; one per torchrun rank, at most the visible ones; else
every visible GPU: it runs alone) is added to
``usage.json`` in the store as it ends, failed attempts too, so the count survives a
re-run. ``spec.budget`` acts as in the operator (``selfreward.budget``): before a step
starts, the same phase of the previous iteration is its estimate; a step that would
cross ``maxGpuHours`` is not started and the run ends with the best model so far
(``BudgetExhausted``, exit 0), or with an error when nothing was trained yet. A re-run
with a raised budget goes on.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import budget as B
from . import distributed, layout, phases, provenance
from .layout import Step
from .spec import RunSpec, parse_spec
from .status import IterationRecord
from .storage import Store

RUN_JSON = provenance.RUN_JSON
ITERATIONS_JSON = "iterations.json"
USAGE_JSON = "usage.json"

# Dotted spec paths that may change between invocations of the same run. Everything
# else is the recipe that produced the artifacts already in the store.
MUTABLE_FIELDS = (
    "iterations",
    "suspend",
    "budget",
    "generation.backend",
    "generation.batchSize",
    "judge.backend",
    "judge.batchSize",
    "generation.vllm",
    "judge.vllm",
    "metaJudge.backend",
    "metaJudge.batchSize",
    "metaJudge.vllm",
    "training.distributed",
    "training.fsdp",
    "storage.endpoint",
    "storage.region",
    "storage.credentialsSecret",
    "storage.deleteOnRunDeletion",
    "image",
    "imagePullPolicy",
    "imagePullSecrets",
    "serviceAccountName",
    "resources",
    "retry",
    "kueue",
    "ttlSecondsAfterFinished",
    "training.checkpointing",
    "sft.checkpointing",
)

TERM_GRACE_SECONDS = 5.0
POLL_SECONDS = 0.2


class RunError(RuntimeError):
    """The run cannot go on; the message is meant for the user."""


# --- run.json ---------------------------------------------------------------------

def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _mutable(path: str) -> bool:
    return any(path == m or path.startswith(m + ".") for m in MUTABLE_FIELDS)


def spec_differences(old: RunSpec, new: RunSpec) -> list[str]:
    """Dotted paths of the recipe fields that differ between two specs (mutable fields
    are left out)."""
    a = _flatten(old.model_dump(mode="json"))
    b = _flatten(new.model_dump(mode="json"))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not _mutable(k))


def check_run_json(store: Store, spec: RunSpec) -> str:
    """Write run.json, or check the one in the store against spec. Returns "new",
    "same" or "updated"; raises RunError for a different recipe."""
    doc = spec.model_dump(mode="json", exclude_none=True)
    if provenance.ensure_run_json(store, spec, "local"):
        return "new"
    try:
        record = store.read_json(RUN_JSON)
        old = parse_spec(provenance.run_json_spec(record), store.url(RUN_JSON))
    except ValueError as e:
        raise RunError(f"{store.url(RUN_JSON)} is not a valid run spec ({e}); this store holds something else") from None
    diffs = spec_differences(old, spec)
    if diffs:
        shown = ", ".join(diffs[:8]) + (f" and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise RunError(
            f"{store.url('')} already holds a run with a different spec ({shown}). Its artifacts were made "
            f"with the old values, so this spec cannot continue it: use another storage.uri, or restore the "
            f"old values (only {', '.join(MUTABLE_FIELDS[:6])}, and Kubernetes settings may change)."
        )
    if old.model_dump(mode="json", exclude_none=True) == doc:
        return "same"
    if not (isinstance(record, dict) and "runJsonVersion" in record):
        record = provenance.run_record(spec, "local")  # a run.json of the bare-spec format
    record["spec"] = doc
    record["updatedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.write_json(RUN_JSON, record)
    return "updated"


# --- per-iteration figures --------------------------------------------------------

def _num(v: Any) -> Any:
    return None if isinstance(v, bool) or not isinstance(v, (int, float)) else v


def _first(summary: dict, *names: str) -> Any:
    for n in names:
        v = _num(summary.get(n))
        if v is not None:
            return v
    return None


def iteration_records(spec: RunSpec, store: Store, usage: Optional[dict] = None) -> list[IterationRecord]:
    """One record per iteration (0 = SFT and the baseline eval) from the phase summaries
    found in the store; the figures are those the phase registry declares, and the GPU
    time of ``usage`` (usage.json's steps)."""
    steps_used = (usage or {}).get("steps") or {}
    out = []
    for t in range(spec.iterations + 1):
        active = phases.active(spec, t)
        if not active:
            continue
        rec = IterationRecord(iteration=t)
        for entry in active:
            rel = layout.summary_path(t, entry.name)
            s = store.read_json(rel) if store.exists(rel) else {}
            for fig in entry.figures:
                v = fig.read(s)
                if v is not None:
                    setattr(rec, fig.name, v)
            if entry.checkpoint and s:
                rec.checkpoint = s.get("checkpoint") or store.url(layout.checkpoint_dir(t, entry.name))
            used = steps_used.get(layout.phase_dir(t, entry.name))
            if used:
                rec.gpuSeconds = round(B.number(rec.gpuSeconds) + B.number(used.get("gpuSeconds")), 3)
                rec.gpuSecondsByPhase = B.add(rec.gpuSecondsByPhase, entry.name, B.number(used.get("gpuSeconds")))
                if used.get("cost") is not None:
                    rec.cost = round(B.number(rec.cost) + B.number(used.get("cost")), 6)
        out.append(rec)
    return out


def gate_stop(store: Store, step: Step) -> Optional[dict]:
    """The eval summary of ``step`` when its gate stopped the run, else None."""
    if step.phase != "eval":
        return None
    rel = layout.summary_path(step.iteration, step.phase)
    s = store.read_json(rel) if store.exists(rel) else {}
    return s if s.get("gateAction") == "stop" and s.get("gatePassed") is False else None


def sft_loss(store: Store) -> Optional[float]:
    rel = layout.summary_path(0, "sft")
    return _first(store.read_json(rel), "trainLoss", "finalTrainLoss") if store.exists(rel) else None


# --- display ----------------------------------------------------------------------

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _figures(summary: dict) -> str:
    keys = (("prompts", "prompts"), ("responses", "responses"), ("judgedResponses", "judged"),
            ("parseFailures", "parse failures"), ("scoreMean", "mean score"), ("pairs", "pairs"),
            ("trainLoss", "loss"), ("dpoLoss", "DPO loss"), ("rewardAccuracy", "reward acc"),
            ("verifierScore", "verifier"), ("judgePairwiseAccuracy", "judge acc"), ("winRateVsPrevious", "win vs prev"),
            ("tokensPerSecond", "tok/s"), ("durationSeconds", "s"))
    parts = [f"{label}={_fmt(summary[k], 2)}" for k, label in keys if _num(summary.get(k)) is not None]
    return ", ".join(parts)


class Display:
    """Plain lines (quiet, or not a terminal) or a rich live progress bar per task."""

    def __init__(self, quiet: bool, title: str = "run"):
        from rich.console import Console

        self.title = title
        self.console = Console(stderr=False)
        self.live = not quiet and self.console.is_terminal
        self.t0 = time.time()
        self.progress = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[rate]}"), console=self.console, transient=False,
            )
            self.progress.start()

    def line(self, text: str) -> None:
        stamp = f"[{time.time() - self.t0:7.1f}s]"
        if self.progress is not None:
            self.progress.console.print(f"{stamp} {text}", markup=False, highlight=False)
        else:
            print(f"{stamp} {text}", flush=True)

    def start(self, label: str) -> Any:
        if self.progress is None:
            self.line(f"{label}: started")
            return None
        return self.progress.add_task(label, total=None, rate="")

    def update(self, task: Any, report: dict) -> None:
        if self.progress is None or task is None:
            return
        done = _num(report.get("done", report.get("step")))
        total = _num(report.get("total", report.get("totalSteps")))
        rate = _num(report.get("tokensPerSecond"))
        loss = _num(report.get("loss"))
        extra = f"{rate:,.0f} tok/s" if rate is not None else (f"loss {loss:.4f}" if loss is not None else "")
        self.progress.update(task, completed=done or 0, total=total, rate=extra)

    def finish(self, task: Any, label: str, text: str) -> None:
        if self.progress is not None and task is not None:
            self.progress.remove_task(task)
        self.line(f"{label}: {text}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def table(self, spec: RunSpec, store: Store, records: list[IterationRecord]) -> None:
        from rich.table import Table

        def rel(uri: Optional[str]) -> str:
            root = store.url("") + "/"
            return uri[len(root):] if uri and uri.startswith(root) else (uri or "-")

        t = Table(title=f"run {self.title}: {store.url('')}")
        # the registry's figures that have a column, for the phases this spec runs, less
        # the ones no iteration measured (an eval without an evaluator has no win rates)
        shown = [f for p, f in phases.figures() if f.column and any(
            p.enabled(spec) and p.runs_in(it) for it in range(spec.iterations + 1))]
        shown = [f for f in shown if not records or any(getattr(r, f.name) is not None for r in records)]
        gpu = any(r.gpuSeconds for r in records)  # GPU-hours, when the workers had GPUs
        t.add_column("iter", justify="right")
        for f in shown:
            t.add_column(f.column, justify="right")
        if gpu:
            t.add_column("GPU-h", justify="right")
        t.add_column("checkpoint", justify="left")
        for r in records:
            label = str(r.iteration) if r.iteration else ("0 (sft)" if spec.sft_enabled else "0 (M1)")
            used = [_fmt(r.gpuSeconds / 3600 if r.gpuSeconds is not None else None, 3)] if gpu else []
            t.add_row(label, *(_fmt(getattr(r, f.name), f.digits) for f in shown), *used, rel(r.checkpoint))
        self.stop()
        if self.live:
            self.console.print(t)
        else:
            from rich.console import Console

            longest = max([len(rel(r.checkpoint)) for r in records] + [10])
            width = max(140, self.console.width, 15 * len(shown) + 20 + longest)  # room for every column
            Console(width=width, force_terminal=False, no_color=True).print(t)


# --- running workers --------------------------------------------------------------

@dataclass
class Task:
    step: Step
    shard: Optional[int]  # None for unsharded phases
    label: str
    files: Path
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    handle: Any = None
    log_path: Optional[Path] = None
    log_file: Any = None
    result: dict = field(default_factory=dict)
    slot: int = 0  # which of the --parallel places it runs in (its GPUs, see gpu_groups)
    gpus: int = 0  # GPUs it was given: its GPU-seconds are its wall time times these

    @property
    def termination_log(self) -> Path:
        return self.files.with_suffix(".result.json")

    @property
    def progress_file(self) -> Path:
        return self.files.with_suffix(".progress.json")


def visible_gpu_ids() -> list[str]:
    """The GPUs this machine lets the runner use: $CUDA_VISIBLE_DEVICES as written, else
    every CUDA device torch sees, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    return [str(i) for i in range(distributed.visible_gpus())]


def gpu_groups(visible: list[str], parallel: int) -> list[list[str]]:
    """The GPUs of each of ``parallel`` concurrently running shards: the visible GPUs split
    into equal disjoint groups (the remainder idle), one GPU per shard when there are at
    least as many shards as GPUs (then shards share them in turn). No GPUs: no groups."""
    if not visible:
        return []
    slots = max(1, parallel)
    if slots >= len(visible):
        return [[visible[i % len(visible)]] for i in range(slots)]
    per = len(visible) // slots
    return [visible[i * per:(i + 1) * per] for i in range(slots)]


def _child_setup() -> None:  # pragma: no cover - runs in the forked child
    """The worker gets its own process group (so the runner can stop it and whatever it
    started), and on Linux dies with the runner even when the runner is SIGKILLed."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except Exception:
            pass


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the worker's process group, SIGKILL it after a grace period."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, TERM_GRACE_SECONDS), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_error_line(log_path: Optional[Path]) -> str:
    if log_path is None or not log_path.exists():
        return ""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "failed:" in ln or "Error" in ln:
            return ln
    return lines[-1] if lines else ""


class Runner:
    def __init__(self, spec: RunSpec, name: str, quiet: bool, python: str, parallel: int, state_dir: Path,
                 nproc_per_node: Optional[int] = None):
        self.spec = spec
        self.nproc_per_node = nproc_per_node
        self.name = name
        self.python = python
        self.parallel = max(1, parallel)
        self.state = state_dir
        self.store = Store.for_spec(spec)
        self.display = Display(quiet, name)
        self.spec_file = state_dir / "spec.json"
        self.logs = state_dir / "logs"
        self._groups: Optional[list[list[str]]] = None
        self.usage: dict = {"steps": {}}  # usage.json: GPU-seconds per step (see _charge)

    def _gpu_groups(self) -> list[list[str]]:
        if self._groups is None:
            self._groups = gpu_groups(visible_gpu_ids(), self.parallel)
        return self._groups

    # one subprocess per shard
    def _start(self, task: Task) -> None:
        step = task.step
        args = ["worker", step.phase, "--spec", str(self.spec_file), "--iteration", str(step.iteration)]
        if task.shard is not None:
            args += ["--shard", str(task.shard), "--num-shards", str(step.shards)]
        nproc = None
        if distributed.launches(self.spec, step.phase):  # torchrun: one process per visible GPU
            nproc = distributed.local_nproc(self.nproc_per_node)
            cmd = distributed.local_launch(self.python, nproc, args)
        else:
            cmd = [self.python, "-m", "selfreward"] + args
        for p in (task.termination_log, task.progress_file):
            p.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update({
            "SELFREWARD_TERMINATION_LOG": str(task.termination_log),
            "SELFREWARD_PROGRESS_FILE": str(task.progress_file),
            "PYTHONUNBUFFERED": "1",
        })
        env.pop("SELFREWARD_PROGRESS_PORT", None)  # one exporter port cannot serve parallel shards
        groups = self._gpu_groups() if task.shard is not None and self.parallel > 1 else []
        if groups:  # each concurrent shard on its own GPUs instead of all on cuda:0
            env["CUDA_VISIBLE_DEVICES"] = ",".join(groups[task.slot % len(groups)])
            task.gpus = len(groups[task.slot % len(groups)])
        else:  # it runs alone and sees every visible GPU (torchrun: its ranks use one each)
            visible = len(visible_gpu_ids())
            task.gpus = min(visible, nproc) if nproc is not None else visible
        stamp = time.strftime("%Y%m%dT%H%M%S")
        task.log_path = self.logs / f"{task.files.name}.{stamp}.{os.getpid()}.{time.time_ns() % 10**6}.log"
        task.log_file = open(task.log_path, "wb")
        task.started = time.time()
        task.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=task.log_file,
                                     stderr=subprocess.STDOUT, preexec_fn=_child_setup)
        task.handle = self.display.start(task.label)

    def _finish(self, task: Task) -> Optional[str]:
        """Collect a finished worker; return an error line, or None on success."""
        rc = task.proc.returncode
        task.log_file.close()
        result: dict = {}
        if task.termination_log.exists():
            try:
                result = json.loads(task.termination_log.read_text() or "{}")
            except ValueError:
                result = {}
        task.result = result
        elapsed = time.time() - task.started
        self._charge(task, elapsed)
        if rc == 0 and "error" not in result:
            parts = result["phases"] if isinstance(result.get("phases"), dict) else {"": result}
            how = "already committed" if all(p.get("skipped") for p in parts.values()) else "done"
            figures = "; ".join(f"{name + ': ' if name else ''}{_figures(p)}" for name, p in parts.items() if _figures(p))
            self.display.finish(task.handle, task.label,
                                f"{how} in {elapsed:.1f}s" + (f" ({figures})" if figures else ""))
            return None
        if result.get("error"):
            why = str(result["error"])
        elif rc < 0:
            why = f"killed by {signal.Signals(-rc).name}" + (" (out of memory?)" if rc == -signal.SIGKILL else "")
        else:
            why = _last_error_line(task.log_path) or f"exit status {rc}"
        self.display.finish(task.handle, task.label, f"FAILED after {elapsed:.1f}s")
        return f"{task.label} failed: {why}\n  worker log: {task.log_path}"

    def _run_tasks(self, tasks: list[Task]) -> None:
        pending = list(tasks)
        running: list[Task] = []
        error: Optional[str] = None
        try:
            while pending or running:
                while pending and len(running) < self.parallel and error is None:
                    t = pending.pop(0)
                    t.slot = min(set(range(self.parallel)) - {r.slot for r in running})
                    self._start(t)
                    running.append(t)
                if not running:
                    break
                time.sleep(POLL_SECONDS)
                for t in list(running):
                    if t.progress_file.exists():
                        try:
                            self.display.update(t.handle, json.loads(t.progress_file.read_text()))
                        except (OSError, ValueError):
                            pass
                    if t.proc.poll() is not None:
                        running.remove(t)
                        err = self._finish(t)
                        if err and error is None:
                            error = err
                if error is not None:
                    pending.clear()  # let running shards finish: their work commits and is kept
        except BaseException:
            for t in running:
                _stop(t.proc)
                if t.log_file and not t.log_file.closed:
                    t.log_file.close()
                try:  # the GPU time of a stopped worker was spent all the same
                    self._charge(t, time.time() - t.started)
                except Exception:  # noqa: BLE001 - stopping must not fail on the count
                    pass
            raise
        if error is not None:
            raise RunError(error)

    def _tasks(self, step: Step) -> list[Task]:
        """One task per shard still to do; a shard of a step that hosts other phases
        (judge.colocate) is done when every one of them committed it."""
        base = f"iter-{step.iteration}-{step.phase}"
        if not step.sharded:
            return [Task(step, None, f"iter-{step.iteration}/{step.phase}", self.state / base)]
        names = phases.step_phases(self.spec, step.phase)
        what = f"iter-{step.iteration}/{'+'.join(names)}"
        out = []
        for i in range(step.shards):
            label = f"{what} shard {i + 1}/{step.shards}"
            files = self.state / f"{base}-{layout.shard_name(i, step.shards)}"
            if all(self.store.exists(layout.shard_summary_path(step.iteration, name, i, step.shards)) for name in names):
                self.display.line(f"{label}: already committed")
                continue
            out.append(Task(step, i, label, files))
        if not out:
            # every shard committed but the phase summary is missing (stopped in between):
            # any shard's worker skips its shard and writes the phase summary
            out.append(Task(step, step.shards - 1, f"{what} (finalize)",
                            self.state / f"{base}-{layout.shard_name(step.shards - 1, step.shards)}"))
        return out

    # GPU time and the budget
    def _load_usage(self) -> dict:
        doc = self.store.read_json(USAGE_JSON) if self.store.exists(USAGE_JSON) else {}
        return doc if isinstance(doc, dict) and isinstance(doc.get("steps"), dict) else {"steps": {}}

    def _charge(self, task: Task, elapsed: float) -> None:
        """Add a finished worker's GPU-seconds to usage.json (at once: a crash later keeps them)."""
        key = task.step.key
        steps = self.usage.setdefault("steps", {})
        row = dict(steps.get(key) or {})
        used = elapsed * task.gpus
        row["gpuSeconds"] = round(B.number(row.get("gpuSeconds")) + used, 3)
        row["wallSeconds"] = round(B.number(row.get("wallSeconds")) + elapsed, 3)
        row["gpus"] = task.gpus
        priced = B.cost(used, self.spec.budget.pricePerGpuHour if self.spec.budget else None)
        if priced is not None:
            row["cost"] = round(B.number(row.get("cost")) + priced, 6)
        steps[key] = row
        self.usage["gpuSeconds"] = round(sum(B.number(r.get("gpuSeconds")) for r in steps.values()), 3)
        costs = [r["cost"] for r in steps.values() if r.get("cost") is not None]
        if costs:
            self.usage["cost"] = round(sum(costs), 6)
        self.store.write_json(USAGE_JSON, self.usage)

    def _budget_refusal(self, step: Step) -> Optional[str]:
        b = self.spec.budget
        if b is None or b.maxGpuHours is None:
            return None
        prev = (self.usage.get("steps") or {}).get(layout.phase_dir(step.iteration - 1, step.phase))
        estimate = B.number(prev.get("gpuSeconds")) if prev else None
        return B.refusal(B.number(self.usage.get("gpuSeconds")), estimate, b.maxGpuHours,
                         layout.phase_dir(step.iteration - 1, step.phase))

    def _best_so_far(self, done: list[Step]) -> Optional[str]:
        """The run's result when the budget stops it: the eval gate's best model, else the
        newest committed checkpoint; None when nothing was trained."""
        trained = [s for s in done if phases.get(s.phase).checkpoint]
        if not trained:
            return None
        for s in reversed(done):
            if s.phase == "eval":
                best = self.store.read_json(layout.summary_path(s.iteration, s.phase)).get("bestCheckpoint")
                if isinstance(best, str):
                    return self.store.url(best) if best else self.spec.model.uri
        return self.store.url(layout.checkpoint_dir(trained[-1].iteration, trained[-1].phase))

    def _saturation_line(self, step: Step) -> None:
        s = self.store.read_json(layout.summary_path(step.iteration, step.phase))
        if s.get("judgeSaturated") is True:
            self.display.line(f"warning: JudgeSaturated: {s.get('saturationMessage') or step.key}")

    def _gate_line(self, step: Step) -> None:
        s = self.store.read_json(layout.summary_path(step.iteration, step.phase))
        if s.get("gatePassed") is False and s.get("gateAction") in ("warn", "rollback"):
            then = ("the next iteration starts again from " + str(s.get("bestModel"))
                    if s["gateAction"] == "rollback" else "continuing")
            self.display.line(f"{step.key}: gate failed: {s.get('gateMetric')}={_fmt(s.get('gateValue'))} "
                              f"against the best {s.get('bestModel')} at {_fmt(s.get('bestValue'))}; {then}")

    def run(self) -> int:
        spec, store = self.spec, self.store
        self.logs.mkdir(parents=True, exist_ok=True)
        self.spec_file.write_text(json.dumps(spec.model_dump(mode="json", exclude_none=True), indent=2))
        state = check_run_json(store, spec)
        steps = layout.steps(spec)
        d = self.display
        d.line(f"run {self.name}: {spec.iterations} iterations{' + sft' if spec.sft_enabled else ''}, "
               f"{len(steps)} steps, artifacts in {store.url('')}"
               + (" (continuing)" if state != "new" else "") + f"; worker logs in {self.logs}")
        t0 = time.time()
        final = store.url(layout.final_checkpoint(spec))
        stopped: Optional[dict] = None
        exhausted: Optional[dict] = None
        self.usage = self._load_usage()
        done: list[Step] = []
        for step in steps:
            if store.exists(layout.summary_path(step.iteration, step.phase)):
                d.line(f"{step.key}: done")
            else:
                why = self._budget_refusal(step)
                if why is not None:
                    best = self._best_so_far(done)
                    text = f"budget exhausted before {step.key}: {why}" + (
                        f"; cost so far {self.usage['cost']:g}" if self.usage.get("cost") is not None else "")
                    if best is None:
                        raise RunError(f"{text}; nothing was trained yet. Raise spec.budget.maxGpuHours to go on.")
                    d.line(f"{text}; the run stops (BudgetExhausted) with the best model so far, {best}")
                    final = best
                    exhausted = {"step": step.key, "message": text}
                    break
                self._run_tasks(self._tasks(step))
                if not store.exists(layout.summary_path(step.iteration, step.phase)):
                    raise RunError(f"{step.key}: every worker succeeded but "
                                   f"{store.url(layout.summary_path(step.iteration, step.phase))} was not written")
            done.append(step)
            if step.phase == "judge":
                self._saturation_line(step)
            if step.phase == "eval":
                self._gate_line(step)
            stopped = gate_stop(store, step)
            if stopped is not None:
                best = stopped.get("bestCheckpoint")
                final = store.url(best) if best else spec.model.uri
                d.line(f"{step.key}: the eval gate stopped the run (EarlyStopped); the best model by "
                       f"{stopped.get('gateMetric')} is {stopped.get('bestModel')}")
                break
        records = iteration_records(spec, store, self.usage)
        doc = {"run": self.name, "storage": store.url(""), "finalCheckpoint": final,
               "sftLoss": sft_loss(store), "iterations": [r.model_dump(exclude_none=True) for r in records],
               "gpuSeconds": B.number(self.usage.get("gpuSeconds"))}
        if self.usage.get("cost") is not None:
            doc["cost"] = self.usage["cost"]
        if spec.eval_enabled:
            doc["earlyStopped"] = stopped is not None
        if exhausted is not None:
            doc["budgetExhausted"] = exhausted
        store.write_json(ITERATIONS_JSON, doc)
        d.line(f"run {self.name} {'stopped by its budget' if exhausted else 'complete'} in {time.time() - t0:.1f}s; "
               f"final checkpoint {final}" + (f"; {B.hours(self.usage['gpuSeconds'])} GPU-hours"
                                              if self.usage.get("gpuSeconds") else ""))
        d.table(spec, store, records)
        d.line(f"figures written to {store.url(ITERATIONS_JSON)}")
        return 0


def default_state_dir(spec: RunSpec, name: str) -> Path:
    """Where spec.json, worker logs and result files go: one directory per (name, store)."""
    key = hashlib.sha1(spec.storage.uri.encode()).hexdigest()[:10]
    root = Path(os.environ.get("SELFREWARD_STATE_DIR") or Path(tempfile.gettempdir()) / "selfreward-runs")
    return root / f"{name}-{key}"


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated()


def run_local(spec: RunSpec, name: str = "run", quiet: bool = False, python: Optional[str] = None,
              parallel: int = 1, state_dir: Optional[str | Path] = None, nproc_per_node: Optional[int] = None) -> int:
    """Run every unfinished step of spec on this machine; 0 when the run is complete.
    With training.distributed fsdp the sft/train steps run under torchrun with
    ``nproc_per_node`` processes (default: selfreward.distributed.local_nproc)."""
    state = Path(state_dir) if state_dir else default_state_dir(spec, name)
    state.mkdir(parents=True, exist_ok=True)
    runner = Runner(spec, name, quiet, python or sys.executable, parallel, state, nproc_per_node)
    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return runner.run()
    except RunError as e:
        runner.display.stop()
        print(f"error: {e}", file=sys.stderr, flush=True)
        print("Re-run the same command to continue from the last committed step.", file=sys.stderr, flush=True)
        return 1
    except (KeyboardInterrupt, _Terminated):
        runner.display.stop()
        print("interrupted: workers stopped; re-run the same command to continue from the last committed step",
              file=sys.stderr, flush=True)
        return 130
    finally:
        runner.display.stop()
        signal.signal(signal.SIGTERM, old_term)
