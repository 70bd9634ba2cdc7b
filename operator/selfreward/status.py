"""The status of a SelfRewardRun, after the Kubernetes API conventions and kstatus.

kstatus (what Flux's health checks and `kubectl wait` read) looks at
``observedGeneration`` and at the ``Ready``, ``Reconciling`` and ``Stalled`` conditions;
Argo CD's health check shipped in this repo reads the same fields. The per-iteration
history is bounded (``HISTORY_LIMIT`` entries); the full record is in the artifact store.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

HISTORY_LIMIT = 20
RUN_PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed", "Terminating")
CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Succeeded", "Failed", "Suspended")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(..., description="CamelCase machine word, e.g. OOMKilled, JobFailed, Completed.")
    message: str = ""
    lastTransitionTime: Optional[str] = None
    observedGeneration: Optional[int] = None


class IterationRecord(_Model):
    """Summary figures of one iteration, from its phase summaries."""

    iteration: int
    startTime: Optional[str] = None
    endTime: Optional[str] = None
    checkpoint: Optional[str] = None
    prompts: Optional[int] = None
    responses: Optional[int] = None
    judged: Optional[int] = None
    parseFailures: Optional[int] = None
    pairs: Optional[int] = None
    pairsDropped: Optional[int] = None
    meanScore: Optional[float] = None
    scoreStd: Optional[float] = None
    margin: Optional[float] = None
    dpoLoss: Optional[float] = None
    rewardAccuracy: Optional[float] = None


class RunStatus(_Model):
    observedGeneration: Optional[int] = None
    phase: Optional[Literal["Pending", "Running", "Suspended", "Succeeded", "Failed", "Terminating"]] = Field(
        None, description="Terminating: the run is being deleted (its Jobs stopped, its artifacts being deleted).")
    currentIteration: Optional[int] = Field(None, description="Iteration now running (0 = SFT).")
    currentPhase: Optional[str] = Field(None, description="Worker phase now running: sft, instruct, generate, judge, pairs, train.")
    progress: Optional[str] = Field(None, description="Completed iterations over total, as 2/3.")
    lastPairs: Optional[int] = Field(None, description="Pairs built by the last completed pairs phase.")
    message: Optional[str] = Field(None, description="What a human reads first.")
    startTime: Optional[str] = None
    completionTime: Optional[str] = None
    activeJob: Optional[str] = None
    completedStep: Optional[str] = Field(None, description="Last step done, as iter-<t>/<phase>; the operator's progress mark.")
    attempts: Optional[dict[str, int]] = Field(None, description="Job attempts per step (iter-<t>/<phase>).")
    retryAfter: Optional[str] = Field(None, description="When the next retry of a failed step may start.")
    finalCheckpoint: Optional[str] = None
    workerImageID: Optional[str] = Field(
        None, description="The worker image with its digest (pod status imageID) of the last completed step."
    )
    conditions: list[Condition] = Field(default_factory=list)
    history: list[IterationRecord] = Field(default_factory=list)


def status_schema() -> dict[str, Any]:
    """JSON schema of RunStatus (used by the CRD generator)."""
    return RunStatus.model_json_schema()
