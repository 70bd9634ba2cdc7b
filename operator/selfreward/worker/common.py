"""What every worker phase shares: its context, summaries, the termination message.

A phase module exposes ``run(ctx: PhaseContext) -> dict`` returning its summary
figures. The dispatcher (``selfreward.worker.main``) handles skipping committed work,
timing, writing the summary and the termination message, so phase modules only do
their one job.

Sharded phases (generate, judge) run once per shard; each shard writes its own data
file then its own shard summary. After a shard commits, the worker checks whether all
shards are there and, if so, writes the phase summary (a deterministic aggregate, so
two pods doing it at once write the same bytes).
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from .. import layout, models
from ..spec import RunSpec
from ..storage import Store

TERMINATION_LOG = os.environ.get("SELFREWARD_TERMINATION_LOG", "/dev/termination-log")
TERMINATION_LIMIT = 4000  # bytes; the kubelet keeps at most 4096


class PhaseError(RuntimeError):
    """A worker failure with a message meant for the run's status."""


class SharedModels:
    """What the phases of one step share in one process: the model directories they
    resolved and the generation backends they built, kept open from one phase to the
    next. Under judge.colocate a generate shard and the judge shard after it thus fetch
    and load M_t once. The dispatcher closes it when the step ends."""

    def __init__(self) -> None:
        self._dirs: dict[Any, str] = {}
        self._backends: dict[Any, Any] = {}

    def model_dir(self, key: Any, resolve: Callable[[], str]) -> str:
        if key not in self._dirs:
            self._dirs[key] = resolve()
        return self._dirs[key]

    def backend(self, key: Any, build: Callable[[], Any]) -> tuple[Any, bool]:
        """The backend built for ``key``, building it first if need be; (backend, built now)."""
        if key in self._backends:
            return self._backends[key], False
        self._backends[key] = build()
        return self._backends[key], True

    def close(self) -> None:
        backends, self._backends = list(self._backends.values()), {}
        for b in backends:
            b.close()


@dataclass
class PhaseContext:
    spec: RunSpec
    store: Store
    iteration: int
    phase: str
    shard: int = 0
    num_shards: int = 1
    progress: Any = None  # a callable(dict) for live progress, or None
    started: float = field(default_factory=time.time)
    shared: Optional[SharedModels] = None  # set when the phase's step runs other phases in this process too

    def policy_model(self) -> str:
        """M_t as a local directory (fetched and verified once per step)."""
        def fetch() -> str:
            return models.policy_model(self.spec, self.store, self.iteration)

        return fetch() if self.shared is None else self.shared.model_dir(("policy", self.iteration), fetch)

    @contextmanager
    def backend(self, name: str, model_dir: str, batch_size: int, vllm_settings: Any) -> Iterator[Any]:
        """A generation backend over ``model_dir`` in the pod this phase runs in (its
        GPUs: resources of phases.pod_phase). Within a step with several phases, the one
        a phase before built is reused (counted as used, not loaded) and stays open."""
        from .. import phases
        from ..backends import make_backend

        spec = self.spec
        gpus = spec.resources.for_phase(phases.pod_phase(spec, self.phase)).gpus

        def build():
            return make_backend(name, model_dir, spec.model.dtype, batch_size, trust_remote_code=spec.model.trustRemoteCode,
                                vllm_settings=vllm_settings, gpus=gpus)

        if self.shared is None:
            with build() as backend:
                yield backend
            return
        key = (name, model_dir, spec.model.dtype, json.dumps(vllm_settings.model_dump(mode="json"), sort_keys=True), gpus)
        backend, built = self.shared.backend(key, build)
        if not built:
            models.note_loaded(model_dir, load=False)
            # each phase counts its own tokens, as on a backend built for it
            backend.generated_tokens = backend.truncated_prompts = 0
        backend.resize(batch_size)
        yield backend

    @property
    def dir(self) -> str:
        return layout.phase_dir(self.iteration, self.phase)

    @property
    def shard_data(self) -> str:
        return layout.shard_data_path(self.iteration, self.phase, self.shard, self.num_shards)

    @property
    def shard_summary(self) -> str:
        return layout.shard_summary_path(self.iteration, self.phase, self.shard, self.num_shards)

    def report(self, **figures: Any) -> None:
        """Live progress (items done, tokens/s) for the progress display / metrics."""
        if self.progress is not None:
            self.progress({"iteration": self.iteration, "phase": self.phase, "shard": self.shard, **figures})


def resolve_shard(shard: Optional[int], num_shards: Optional[int], default_shards: int) -> tuple[int, int]:
    """--shard defaults to the Indexed Job's JOB_COMPLETION_INDEX, --num-shards to the spec."""
    n = num_shards if num_shards is not None else default_shards
    if shard is None:
        idx = os.environ.get("JOB_COMPLETION_INDEX")
        shard = int(idx) if idx not in (None, "") else 0
    if n < 1:
        raise PhaseError(f"--num-shards must be at least 1, got {n}")
    if not 0 <= shard < n:
        raise PhaseError(f"shard index {shard} is outside 0..{n - 1}")
    return shard, n


def shard_summaries(store: Store, iteration: int, phase: str, num_shards: int) -> list[Optional[dict]]:
    out = []
    for i in range(num_shards):
        rel = layout.shard_summary_path(iteration, phase, i, num_shards)
        out.append(store.read_json(rel) if store.exists(rel) else None)
    return out


def aggregate(summaries: list[dict]) -> dict:
    """Combine shard summaries: counts add up, durations take the max, tokens/s the sum
    of parallel shards; score statistics are recomputed by the phase where needed."""
    out: dict[str, Any] = {}
    for s in summaries:
        for k, v in s.items():
            if k in ("shard", "numShards", "phase", "iteration"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                out.setdefault(k, v)
            elif k.endswith("Seconds"):
                out[k] = max(out.get(k, 0), v)
            else:
                out[k] = out.get(k, 0) + v
    return out


def compact(summary: dict, limit: int = TERMINATION_LIMIT) -> str:
    """The summary as one JSON line under `limit` bytes: drop non-scalar and then the
    longest fields until it fits. A step of several phases reports ``{"phases": {phase:
    summary}}``: each phase's summary compacted in an equal share of the limit."""
    steps = summary.get("phases")
    if isinstance(steps, dict) and steps and all(isinstance(v, dict) for v in steps.values()):
        share = (limit - len('{"phases":{}}')) // len(steps) - max(len(json.dumps(k)) + 2 for k in steps)
        inner = ",".join(f"{json.dumps(k)}:{compact(v, share)}" for k, v in steps.items())
        return '{"phases":{' + inner + "}}"
    flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
    for k, v in list(flat.items()):
        if isinstance(v, float):
            flat[k] = round(v, 6)
    text = json.dumps(flat, separators=(",", ":"), sort_keys=True)
    while len(text.encode()) > limit and flat:
        longest = max(flat, key=lambda k: len(json.dumps(flat[k])))
        del flat[longest]
        text = json.dumps(flat, separators=(",", ":"), sort_keys=True)
    return text


def write_termination_log(summary: dict, path: str = "") -> bool:
    """Write the compact summary where the kubelet reads the termination message."""
    path = path or TERMINATION_LOG
    try:
        if path == "/dev/termination-log" and not os.path.exists(path):
            return False
        with open(path, "w") as f:
            f.write(compact(summary))
        return True
    except OSError:
        return False


def progress_file(path: str, inner: Any = None) -> Any:
    """A progress callback that also keeps the latest report as JSON in ``path`` (atomic
    replace), the channel `selfreward run` reads live progress from; ``inner`` (another
    callback, or None) still gets every report. An empty path returns ``inner``."""
    if not path:
        return inner

    def report(figures: dict) -> None:
        if inner is not None:
            inner(figures)
        try:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump({**figures, "time": time.time()}, f)
            os.replace(tmp, path)
        except (OSError, TypeError, ValueError):
            pass  # progress must never fail the phase

    return report


def log(msg: str) -> None:
    rank = os.environ.get("RANK", "0")  # under torchrun every process logs; rank 0's lines look as before
    print(f"[selfreward{'' if rank in ('', '0') else ' rank ' + rank}] {msg}", file=sys.stderr, flush=True)
