"""Training across processes, GPUs and nodes through torch's own launcher.

With ``training.distributed: fsdp`` the sft and train phases run under ``torchrun``
(``python -m torch.distributed.run``): one process per GPU of each pod (one per pod on
a CPU), ``nodes`` pods joined by a static rendezvous on pod 0. Inside, the HF Trainer
(through accelerate) shards the model with FSDP2 on GPUs; on CPUs accelerate 1.15 does
not offer FSDP and runs the same processes as plain data parallel over gloo, which is
what the CPU tests exercise (same launcher, same data split, same rank-0 commit).

What every rank does and what only rank 0 does:

- every rank reads the same input (the pairs or SFT data, from the store) and skips a
  step whose checkpoint is already committed; the trainer's sampler gives each rank
  its own slice of every global batch;
- only rank 0 commits the checkpoint (checkpoint.commit: files, then MANIFEST.json),
  writes the phase summary and the termination message, and reports progress; the
  other ranks wait at a barrier until the commit is done, so a failure in it fails
  the whole launch;
- a rank that dies ends the launch (``--max-restarts=0``): torchrun stops the others
  and exits non-zero, nothing is committed, and the step's retry starts every rank
  again. torchrun itself exits 1 whatever its ranks exited with, so the launch goes
  through ``selfreward launch`` (``launch`` below), which keeps a rank's exit code 2 (an
  invalid spec, a store that is not the run's): the Job's podFailurePolicy then fails the
  Job at once instead of retrying what fails the same way every time.

The launch commands are built here as pure functions: the Job's container command
(``torchrun_command``; node rank from the Indexed Job's completion index, master
address pod 0's DNS name under the run's headless Service) and the local runner's
(``local_launch``; one node, every visible GPU).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from .spec import TRAINING_PHASES, RunSpec

RENDEZVOUS_PORT = 29500  # the fixed port of rank 0's TCP store in a pod (torchrun's default)
NPROC_ENV = "SELFREWARD_NPROC_PER_NODE"  # overrides the local runner's process count (tests on CPU)
MASTER_ADDR_ENV = "SELFREWARD_MASTER_ADDR"  # pod 0's DNS name, expanded into the Job's command


def launches(spec: RunSpec, phase: str) -> bool:
    """Whether the phase runs under torchrun (also for one process: FSDP needs a
    process group)."""
    return phase in TRAINING_PHASES and spec.training.distributed != "none"


def _launcher(nnodes: int, nproc: int) -> list[str]:
    return [f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--max-restarts=0"]


def torchrun_command(spec: RunSpec, phase: str, worker_args: list[str], port: int = RENDEZVOUS_PORT) -> list[str]:
    """The container command of a distributed step: ``torchrun`` around the worker.

    One pod: a standalone rendezvous inside it. Several: a static rendezvous on pod 0
    (``$(SELFREWARD_MASTER_ADDR)``, set by the Job), node rank = ``$(JOB_COMPLETION_INDEX)``;
    the kubelet expands both from the container's env."""
    nnodes, nproc = spec.training_world(phase)
    cmd = ["selfreward", "launch"] + _launcher(nnodes, nproc)
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += ["--node-rank=$(JOB_COMPLETION_INDEX)", f"--master-addr=$({MASTER_ADDR_ENV})", f"--master-port={port}"]
    return cmd + ["-m", "selfreward"] + list(worker_args)


def local_nproc(explicit: Optional[int] = None) -> int:
    """Processes of a local distributed launch: --nproc-per-node, else
    $SELFREWARD_NPROC_PER_NODE, else every visible CUDA GPU, else 1 (a CPU)."""
    if explicit:
        return explicit
    env = os.environ.get(NPROC_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"${NPROC_ENV} must be a whole number of processes, got {env!r}") from None
        if n < 1:
            raise ValueError(f"${NPROC_ENV} must be at least 1, got {n}")
        return n
    return max(1, visible_gpus())


def visible_gpus() -> int:
    """CUDA GPUs this process may use (torch's count honours CUDA_VISIBLE_DEVICES)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the worker
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_launch(python: str, nproc: int, worker_args: list[str]) -> list[str]:
    """The local runner's command: one node, ``nproc`` processes, a rendezvous on a free
    local port (torchrun's --standalone)."""
    return [python, "-m", "selfreward", "launch"] + _launcher(1, nproc) + ["--standalone", "-m", "selfreward"] \
        + list(worker_args)


EXIT_PERMANENT = 2  # jobs.EXIT_INVALID_SPEC and worker.EXIT_STORE_NOT_OURS: retrying cannot help


def launch(torchrun_args: list[str]) -> int:
    """``selfreward launch ARGS``: torchrun (torch.distributed.run) with ARGS, exiting 2
    when a rank exited 2 and 1 on any other failure (torchrun alone exits 1 for both)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        print(f"[selfreward] launch failed: rank exit codes {codes}", file=sys.stderr, flush=True)
        return EXIT_PERMANENT if EXIT_PERMANENT in codes else 1
    return 0


# --- inside a launched process ---

def rank() -> int:
    """This process's global rank (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
