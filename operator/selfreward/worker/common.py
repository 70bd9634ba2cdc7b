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
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import layout
from ..spec import RunSpec
from ..storage import Store

TERMINATION_LOG = os.environ.get("SELFREWARD_TERMINATION_LOG", "/dev/termination-log")
TERMINATION_LIMIT = 4000  # bytes; the kubelet keeps at most 4096


class PhaseError(RuntimeError):
    """A worker failure with a message meant for the run's status."""


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
    longest fields until it fits."""
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
