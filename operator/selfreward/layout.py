"""Where a run's artifacts live, and the ordered steps of a run.

Both the local runner and the operator's reconcile function plan from here, so they
agree on what "the next step" is and on what proves a step done.

Layout under the run's storage root::

    owner.json                             the run the store belongs to (operator runs)
    run.json                               the spec the run was started with
    iter-0/sft/checkpoint/...              M_1 when spec.sft is enabled
    iter-<t>/instruct/prompts.jsonl        self-instructed prompts (optional)
    iter-<t>/generate/shard-00000-of-00002.jsonl  (+ .summary.json per shard)
    iter-<t>/judge/shard-00000-of-00002.jsonl     (+ .summary.json per shard)
    iter-<t>/pairs/pairs.jsonl
    iter-<t>/train/checkpoint/...          M_{t+1}: safetensors + MANIFEST.json
    iter-<t>/train/adapter/...             training.mode lora: the PEFT adapter (before merging)
    iter-<t>/train/resume/checkpoint-<n>/  while training: the newest intermediate checkpoint
    iter-<t>/<phase>/summary.json          written last: the phase's commit marker

Iterations are numbered 1..N. Iteration t trains M_t into M_{t+1}; M_1 is the SFT
checkpoint of iteration 0, or the base model when there is no iteration 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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

    @property
    def key(self) -> str:
        return f"iter-{self.iteration}/{self.phase}"

    @property
    def sharded(self) -> bool:
        return self.phase in ("generate", "judge")


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


def steps(spec: RunSpec) -> list[Step]:
    """Every step of the run, in order."""
    out: list[Step] = []
    if spec.sft_enabled:
        out.append(Step(0, "sft"))
    for t in range(1, spec.iterations + 1):
        if spec.instruct_enabled:
            out.append(Step(t, "instruct"))
        out.append(Step(t, "generate", spec.generation.shards))
        out.append(Step(t, "judge", spec.judge.shards))
        out.append(Step(t, "pairs"))
        out.append(Step(t, "train"))
    return out


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
