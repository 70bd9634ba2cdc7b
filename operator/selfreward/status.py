"""The status of a SelfRewardRun, after the Kubernetes API conventions and kstatus.

kstatus (what Flux's health checks and `kubectl wait` read) looks at
``observedGeneration`` and at the ``Ready``, ``Reconciling`` and ``Stalled`` conditions;
Argo CD's health check shipped in this repo reads the same fields. The per-iteration
history is bounded (``HISTORY_LIMIT`` entries); the full record is in the artifact store.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from . import phases

HISTORY_LIMIT = 20
RUN_PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed", "Terminating")
CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Succeeded", "Failed", "Suspended",
                   "JudgeSaturated")  # the last: set by a saturated judge phase (judge.saturation)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(..., description="CamelCase machine word, e.g. OOMKilled, JobFailed, Completed.")
    message: str = ""
    lastTransitionTime: Optional[str] = None
    observedGeneration: Optional[int] = None


class _IterationBase(_Model):
    iteration: int = Field(..., description="0 = SFT (and the baseline eval of M_1).")
    startTime: Optional[str] = None
    endTime: Optional[str] = Field(None, description="When the iteration's last step finished.")
    checkpoint: Optional[str] = Field(None, description="The model the iteration produced.")
    gpuSeconds: Optional[float] = Field(
        None, description="GPU-seconds the iteration's pods used (every attempt): pod run time x GPUs requested.")
    gpuSecondsByPhase: Optional[dict[str, float]] = Field(None, description="gpuSeconds per worker phase.")
    gpuSecondsEstimated: Optional[bool] = Field(
        None, description="True when pods were gone before they were read and their time was estimated from "
        "their Job's start and completion.")
    cost: Optional[float] = Field(None, description="gpuSeconds priced at spec.budget.pricePerGpuHour.")


# The figures come from the phase registry: each phase declares which of its summary
# figures become history fields (phases.py), so status, metrics and the local table agree.
IterationRecord = create_model(
    "IterationRecord",
    __base__=_IterationBase,
    __doc__="Summary figures of one iteration, from its phase summaries.",
    **{f.name: (Optional[f.kind], Field(None, description=f.help)) for _p, f in phases.figures()},
)


class RunStatus(_Model):
    observedGeneration: Optional[int] = None
    phase: Optional[Literal["Pending", "Running", "Suspended", "Succeeded", "Failed", "Terminating"]] = Field(
        None, description="Terminating: the run is being deleted (its Jobs stopped, its artifacts being deleted).")
    currentIteration: Optional[int] = Field(None, description="Iteration now running (0 = SFT).")
    currentPhase: Optional[str] = Field(None, description="Worker phase now running: sft, instruct, generate, judge, metajudge, pairs, train, eval.")
    progress: Optional[str] = Field(None, description="Completed iterations over total, as 2/3.")
    lastPairs: Optional[int] = Field(None, description="Pairs built by the last completed pairs phase.")
    message: Optional[str] = Field(None, description="What a human reads first.")
    startTime: Optional[str] = None
    completionTime: Optional[str] = None
    activeJob: Optional[str] = None
    completedStep: Optional[str] = Field(None, description="Last step done, as iter-<t>/<phase>; the operator's progress mark.")
    attempts: Optional[dict[str, int]] = Field(None, description="Job attempts per step (iter-<t>/<phase>).")
    retryAfter: Optional[str] = Field(None, description="When the next retry of a failed step may start.")
    finalCheckpoint: Optional[str] = Field(None, description="The run's result: the last model, or the best one after an early stop.")
    bestCheckpoint: Optional[str] = Field(None, description="The best model so far by the eval gate's metric (spec.eval).")
    evalMetric: Optional[str] = Field(None, description="The eval figure that ranks the models (the gate's metric).")
    lastEval: Optional[float] = Field(None, description="evalMetric of the last evaluated model.")
    rollbacks: Optional[int] = Field(None, description="Iterations restarted from the best model by the eval gate.")
    earlyStopped: Optional[str] = Field(None, description="The eval step (iter-<t>/eval) whose gate stopped the run.")
    gpuSeconds: Optional[float] = Field(
        None, description="GPU-seconds the run's pods used so far, every attempt of every step (a total kept "
        "beyond the bounded history).")
    gpuSecondsByPhase: Optional[dict[str, float]] = Field(None, description="gpuSeconds per worker phase.")
    cost: Optional[float] = Field(None, description="gpuSeconds priced at spec.budget.pricePerGpuHour.")
    costByPhase: Optional[dict[str, float]] = Field(None, description="cost per worker phase.")
    workerImageID: Optional[str] = Field(
        None, description="The worker image with its digest (pod status imageID) of the last completed step."
    )
    conditions: list[Condition] = Field(default_factory=list)
    history: list[IterationRecord] = Field(default_factory=list)


def status_schema() -> dict[str, Any]:
    """JSON schema of RunStatus (used by the CRD generator)."""
    return RunStatus.model_json_schema()
