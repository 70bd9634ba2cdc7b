"""Where a run's artifacts live, and the ordered steps of a run.

Both the local runner and the operator's reconcile function plan from here, so they
agree on what "the next step" is and on what proves a step done.

Layout under the run's storage root::

    owner.json                             the run the store belongs to (operator runs)
    run.json                               the spec the run was started with
    usage.json                             GPU-seconds per step (selfreward run; the operator keeps them in the status)
    iterations.json                        the figures of a local run, written at its end
    iter-0/sft/checkpoint/...              M_1 when spec.sft is enabled
    iter-<t>/instruct/prompts.jsonl        self-instructed prompts (optional)
    iter-<t>/generate/shard-00000-of-00002.jsonl  (+ .summary.json per shard)
    iter-<t>/judge/shard-00000-of-00002.jsonl     (+ .summary.json per shard)
    iter-<t>/metajudge/judgments.jsonl     spec.metaJudge: every meta-judgment and the verdicts' ratings
    iter-<t>/metajudge/candidates.jsonl    spec.metaJudge: judge-preference pairs before the caps
    iter-<t>/pairs/pairs.jsonl             response pairs, then the capped judge-preference pairs
    iter-<t>/train/checkpoint/...          M_{t+1}: safetensors + MANIFEST.json
    iter-<t>/train/adapter/...             training.mode lora: the PEFT adapter (before merging)
    iter-<t>/train/resume/checkpoint-<n>/  while training: the newest intermediate checkpoint
    iter-<t>/eval/shard-00000-of-00001.jsonl      evaluation of M_{t+1} (iter-0/eval: of M_1)
    iter-<t>/<phase>/summary.json          written last: the phase's commit marker

Iterations are numbered 1..N. Iteration t trains M_t into M_{t+1}; M_1 is the SFT
checkpoint of iteration 0, or the base model when there is no iteration 0. Which phases
an iteration has, in which order, comes from the phase registry (``phases.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import phases
from .spec import RunSpec

SUMMARY = "summary.json"
CHECKPOINT = "checkpoint"
MANIFEST = "MANIFEST.json"
OWNER = "owner.json"  # selfreward.ownership: written before anything else by the operator's workers


@dataclass(frozen=True)
class Step:
    iteration: int
    phase: str
    shards: int = 1
    host: Optional[str] = None  # the phase whose Job (local tasks) runs this step too (judge.colocate)

    @property
    def key(self) -> str:
        return f"iter-{self.iteration}/{self.phase}"

    @property
    def job_phase(self) -> str:
        """The phase whose Job runs this step: its host's, else its own."""
        return self.host or self.phase

    @property
    def sharded(self) -> bool:
        return phases.get(self.phase).sharded

    @property
    def position(self) -> tuple[int, int]:
        """Where the step sits in a run: (iteration, phase order)."""
        return self.iteration, phases.get(self.phase).order


def phase_dir(iteration: int, phase: str) -> str:
    return f"iter-{iteration}/{phase}"


def summary_path(iteration: int, phase: str) -> str:
    return f"{phase_dir(iteration, phase)}/{SUMMARY}"


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def shard_data_path(iteration: int, phase: str, shard: int, num_shards: int) -> str:
    return f"{phase_dir(iteration, phase)}/{shard_name(shard, num_shards)}.jsonl"


def shard_summary_path(iteration: int, phase: str, shard: int, num_shards: int) -> str:
    return f"{phase_dir(iteration, phase)}/{shard_name(shard, num_shards)}.summary.json"


def checkpoint_dir(iteration: int, phase: str = "train") -> str:
    return f"{phase_dir(iteration, phase)}/{CHECKPOINT}"


def _step(spec: RunSpec, iteration: int, entry: phases.Phase) -> Step:
    return Step(iteration, entry.name, entry.num_shards(spec), entry.host_of(spec))


def steps(spec: RunSpec) -> list[Step]:
    """Every step of the run, in order: per iteration (0 first), the registry's phases
    that run in it and that the spec enables. A step with a host (the judge under
    judge.colocate) is still a step of its own, with its own summary and place in the
    order; it is only run by its host's Job."""
    return [_step(spec, t, p) for t in range(spec.iterations + 1) for p in phases.active(spec, t)]


def iteration_end(spec: RunSpec, iteration: int) -> Optional[Step]:
    """The step that ends an iteration (its last one), or None if it has none."""
    active = phases.active(spec, iteration)
    return _step(spec, iteration, active[-1]) if active else None


def steps_from(spec: RunSpec, iteration: int) -> list[Step]:
    return [s for s in steps(spec) if s.iteration >= iteration]


def policy_checkpoint(spec: RunSpec, iteration: int) -> Optional[str]:
    """Relative path of the checkpoint M_t used in iteration t, or None for the base model."""
    if iteration <= 1:
        return checkpoint_dir(0, "sft") if spec.sft_enabled else None
    return checkpoint_dir(iteration - 1, "train")


def reference_checkpoint(spec: RunSpec, iteration: int) -> Optional[str]:
    """DPO reference for iteration t: M_t (current) or the fixed base/SFT model (base)."""
    if spec.training.reference == "current":
        return policy_checkpoint(spec, iteration)
    return checkpoint_dir(0, "sft") if spec.sft_enabled else None


def final_checkpoint(spec: RunSpec) -> str:
    return checkpoint_dir(spec.iterations, "train")


def adapter_dir(checkpoint_rel: str) -> str:
    """Where a LoRA phase commits its adapter: next to its checkpoint."""
    return checkpoint_rel.rsplit("/", 1)[0] + "/adapter" if "/" in checkpoint_rel else "adapter"
