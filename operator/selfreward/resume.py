"""Training that survives preemption: intermediate checkpoints in the artifact store,
resuming from the newest one, and SIGTERM as "save now, then exit".

The checkpoints are the Trainer's own (``Trainer._save_checkpoint``: model or LoRA
adapter, optimizer, scheduler, RNG state, ``trainer_state.json`` with the step), and
resuming is the Trainer's own ``train(resume_from_checkpoint=...)``, which restores all
of it and skips the batches already trained in the current epoch (the data position).
What this module adds is *when* to save and *where* the checkpoint lives:

- a TrainerCallback asks for a save (``control.should_save``) every
  ``checkpointing.everySteps`` optimizer steps, when ``everyMinutes`` have passed since
  the last save, or at the first step end after SIGTERM (then also
  ``control.should_training_stop``). One callback decides all three so the step and
  time triggers never save a pointless checkpoint at the last step (the phase's final
  commit follows it), which the Trainer's ``save_steps`` would.
- each saved checkpoint is committed to the store under
  ``iter-<t>/<phase>/resume/checkpoint-<step>/`` with ``checkpoint.commit`` (files
  first, MANIFEST.json last, sha256 per file), then the older ones are deleted;
- on start, the newest committed resume checkpoint whose fingerprint (the training data
  and the settings that shape the run) matches is fetched and verified; a half-written,
  corrupted or foreign one is skipped with a log line, and training starts over;
- after the phase's final checkpoint commits, the resume checkpoints are deleted.

Under torchrun every rank takes part in a save (FSDP gathers collectively), so the
save/stop decision is the maximum over ranks (one all-reduce of a scalar per step);
rank 0 uploads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from typing import Any, Iterator, Optional

from . import checkpoint
from .storage import Store
from .worker.common import PhaseError, log

RESUME = "resume"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_SAVE, _STOP = 1, 2

_sigterm = threading.Event()


class Preempted(PhaseError):
    """The worker got SIGTERM during training and saved a resume checkpoint."""


# --- SIGTERM ---

def _on_sigterm(signum, frame) -> None:
    _sigterm.set()
    log("SIGTERM: saving a checkpoint at the end of this step, then exiting")


def sigterm_received() -> bool:
    return _sigterm.is_set()


@contextlib.contextmanager
def sigterm_saves() -> Iterator[None]:
    """While inside (a training phase's whole ``run``, used as a decorator), SIGTERM
    does not end the process: it sets a flag that the save callback reads at the next
    step end, and a final commit already under way finishes. Outside (and off the main
    thread, where Python cannot install handlers) SIGTERM keeps its previous meaning."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _sigterm.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- identity of a training run ---

def model_identity(path: Optional[str]) -> Optional[str]:
    """What names a start model's content: a committed checkpoint's file hashes (its
    MANIFEST.json, on a file:// store), else the path (S3 checkpoints are fetched into a
    cache directory named by their manifest's hash; a base model is its path or id)."""
    if path is None:
        return None
    manifest = os.path.join(path, checkpoint.MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                return fingerprint(files=json.load(f).get("files"))
        except (OSError, ValueError, AttributeError):
            pass
    return str(path)


def fingerprint(**parts: Any) -> str:
    """A short hash of what makes a resume checkpoint belong to this training: the rows,
    the start model, the settings that shape the optimizer's path."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _agree(decision: int) -> int:
    """The largest decision of all ranks (a no-op without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return decision
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([decision], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class Resume:
    """Intermediate checkpoints of one training phase in the store.

    ``phase_dir`` is the phase's directory (``iter-<t>/train``), ``settings`` its
    spec.*.checkpointing, ``key`` a :func:`fingerprint` of its inputs."""

    def __init__(self, store: Store, phase_dir: str, settings: Any, key: str, where: str):
        self.store = store
        self.rel = f"{phase_dir}/{RESUME}"
        self.settings = settings
        self.key = key
        self.where = where
        self.resumed_from = 0
        self.saved: list[int] = []
        self.upload_seconds = 0.0
        self.preempted_at: Optional[int] = None
        self.upload_error: Optional[str] = None

    # --- store ---
    def _steps_in_store(self) -> list[int]:
        return sorted((int(m.group(1)) for n in self.store.list(self.rel) if (m := _CHECKPOINT_NAME.match(n))),
                      reverse=True)

    def latest(self) -> Optional[tuple[int, str]]:
        """(step, local directory) of the newest usable resume checkpoint, or None."""
        if not self.settings.enabled:
            return None
        for step in self._steps_in_store():
            rel = f"{self.rel}/checkpoint-{step}"
            try:
                manifest = checkpoint.read_manifest(self.store, rel)
                if (manifest.get("metadata") or {}).get("fingerprint") != self.key:
                    log(f"{self.where}: {self.store.url(rel)} was saved for other data or settings; not resumed")
                    continue
                return step, str(checkpoint.fetch(self.store, rel))
            except checkpoint.CheckpointError as e:
                log(f"{self.where}: resume checkpoint skipped: {e}")
        return None

    def upload(self, local_dir: str, step: int) -> None:
        """Commit one Trainer checkpoint directory, then drop the older ones."""
        t0 = time.perf_counter()
        rel = f"{self.rel}/checkpoint-{step}"
        checkpoint.commit(local_dir, self.store, rel, {"fingerprint": self.key, "step": step, "where": self.where})
        for old in self._steps_in_store():
            if old != step:
                self.store.delete(f"{self.rel}/checkpoint-{old}")
        self.upload_seconds += time.perf_counter() - t0
        self.saved.append(step)
        log(f"{self.where}: resume checkpoint at step {step} saved to {self.store.url(rel)}")

    def clear(self) -> None:
        """Delete every resume checkpoint (the final one has committed)."""
        self.store.delete(self.rel)

    # --- trainer ---
    def callback(self):
        from transformers import TrainerCallback

        owner = self
        every_steps = self.settings.everySteps if self.settings.enabled else None
        every_seconds = self.settings.everyMinutes * 60 if self.settings.enabled and self.settings.everyMinutes else None

        class _SaveForResume(TrainerCallback):
            last = time.monotonic()

            def on_train_begin(self, args, state, control, **kwargs):
                self.last = time.monotonic()

            def on_step_end(self, args, state, control, **kwargs):
                decision = _STOP if sigterm_received() else 0
                if (every_steps and state.global_step % every_steps == 0) or \
                        (every_seconds and time.monotonic() - self.last >= every_seconds):
                    decision = max(decision, _SAVE)
                decision = _agree(decision)
                if state.global_step >= state.max_steps:
                    return  # the last step: the phase's final commit follows, within the grace period
                if decision >= _SAVE:
                    control.should_save = True
                if decision == _STOP:
                    control.should_training_stop = True
                    owner.preempted_at = state.global_step

            def on_save(self, args, state, control, **kwargs):
                self.last = time.monotonic()
                local = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                try:
                    if state.is_world_process_zero:
                        owner.upload(local, state.global_step)
                except Exception as e:  # an intermediate checkpoint must not fail the training
                    owner.upload_error = f"{type(e).__name__}: {e}"
                    log(f"{owner.where}: uploading the resume checkpoint at step {state.global_step} failed: "
                        f"{owner.upload_error}")
                finally:
                    shutil.rmtree(local, ignore_errors=True)

        return _SaveForResume()

    def train(self, trainer):
        """trainer.train(), from the newest resume checkpoint when there is one; raises
        Preempted when SIGTERM stopped it."""
        found = self.latest()
        if found is not None:
            self.resumed_from = found[0]
            log(f"{self.where}: resuming from the checkpoint at step {found[0]}")
        result = trainer.train(resume_from_checkpoint=found[1] if found else None)
        if self.preempted_at is not None:
            if self.upload_error or self.preempted_at not in self.saved:
                raise Preempted(f"{self.where}: stopped by SIGTERM at step {self.preempted_at}; saving the resume "
                                f"checkpoint failed ({self.upload_error}); the next attempt resumes from step "
                                f"{max(self.saved + [self.resumed_from])}")
            raise Preempted(f"{self.where}: stopped by SIGTERM at step {self.preempted_at}; the resume checkpoint "
                            f"is in {self.store.url(self.rel)} and the next attempt continues from it")
        return result

    def figures(self, summary: dict) -> dict:
        """The resume figures for the phase summary; throughput counts this attempt's steps only."""
        steps = int(summary.get("steps") or 0)
        this_run = max(0, steps - self.resumed_from)
        out = {"resumedFromStep": self.resumed_from, "stepsThisAttempt": this_run,
               "resumeCheckpointsSaved": len(self.saved), "resumeUploadSeconds": round(self.upload_seconds, 3)}
        if self.resumed_from and steps and summary.get("trainSeconds"):
            samples = summary.get("samplesSeen", 0) * this_run / steps
            out["samplesPerSecond"] = round(samples / max(float(summary["trainSeconds"]), 1e-9), 3)
        return out
