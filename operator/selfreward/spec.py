"""The run spec: one typed model of a SelfRewardRun's ``spec``.

This module is the single source of truth for what a run may say. The local
runner loads YAML into it, the worker reads it from the artifact store, and the
CRD's openAPIV3Schema is generated from it (``selfreward crd``).

Field names are camelCase, as Kubernetes users write them. Every model forbids
unknown fields, so a typo is an error that names the field rather than a silently
ignored setting.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .phases import NAMES as PHASES  # the phase registry is the one list of phases

# Our own wording of the additive 0-5 rubric of Yuan et al. (2024). The
# placeholders are filled with str.format: {prompt} and {response}.
DEFAULT_JUDGE_TEMPLATE = """\
Review the user's question and the assistant's answer below, and grade the answer \
with the additive five-point scale that follows. Points add up: each criterion that \
holds earns one point.

- Award 1 point if the answer is relevant to the question and gives some of the \
information asked for, even if it is incomplete or contains some unrelated material.
- Add a 2nd point if the answer deals with a substantial part of the question but \
does not fully resolve it or answer it directly.
- Add a 3rd point if the answer settles the basic elements of the question in a \
useful way, whatever its shortcomings in style or completeness.
- Add a 4th point if the answer is written clearly from an AI assistant's point of \
view, addresses the question directly and completely, and is well organised and \
helpful, with only slight room for more focus or concision.
- Award the 5th point for an answer that is tailored to the question without \
surplus content, reflects expert knowledge, and is of the highest quality: \
engaging, insightful and precise.

<question>{prompt}</question>
<answer>{response}</answer>

Explain your grading in at most 100 words, then end with a line of the form \
"Score: <points>".
"""

DEFAULT_SCORE_PATTERN = r"Score:\s*([0-9]+(?:\.[0-9]+)?)"

QUANTITY_RE = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E|e[0-9]+)?$"
DNS_LABEL_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class LoraSpec(_Model):
    """LoRA adapter settings; used when ``training.mode`` is ``lora``."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA layers.")
    targetModules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Module names that get adapters.",
    )


class ModelSpec(_Model):
    """The base model M_0 (or the model that iteration 0 fine-tunes into M_1)."""

    uri: str = Field(
        ...,
        min_length=1,
        description="Base model: a local path, file://..., s3://..., or a Hugging Face id "
        "(resolved by the worker's own hub or mirror; never fetched by the operator).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for generation and judging; auto = bfloat16 on GPU, float32 on CPU."
    )
    lora: Optional[LoraSpec] = Field(None, description="LoRA settings for training.mode=lora.")


class SelfInstructSpec(_Model):
    """Few-shot self-instruction: the model writes new prompts from the seed set."""

    enabled: bool = Field(True, description="Write new prompts before generating.")
    count: int = Field(16, ge=1, le=1_000_000, description="New prompts to keep per iteration.")
    fewShot: int = Field(8, ge=1, le=64, description="Seed prompts shown per few-shot request.")
    modelUri: Optional[str] = Field(
        None, description="A fixed model that writes the prompts (the paper used one); default: M_t."
    )
    maxSimilarity: float = Field(
        0.7, gt=0.0, le=1.0, description="Drop a new prompt whose word-level similarity to any kept prompt is above this."
    )
    minChars: int = Field(10, ge=1, description="Shortest prompt kept, in characters.")
    maxChars: int = Field(1000, ge=1, description="Longest prompt kept, in characters.")
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    topP: float = Field(0.9, gt=0.0, le=1.0)
    maxNewTokens: int = Field(128, ge=1, le=32768)
    maxAttempts: int = Field(4, ge=1, le=100, description="Sampling rounds per wanted prompt before giving up.")

    @model_validator(mode="after")
    def _lengths(self) -> "SelfInstructSpec":
        if self.minChars > self.maxChars:
            raise ValueError(f"minChars ({self.minChars}) must not exceed maxChars ({self.maxChars})")
        return self


class PromptsSpec(_Model):
    uri: str = Field(..., min_length=1, description="Seed prompts, JSONL with a 'prompt' field per line.")
    perIteration: Optional[int] = Field(
        None, ge=1, le=10_000_000, description="Prompts used per iteration (a seeded sample); default: all."
    )
    selfInstruct: Optional[SelfInstructSpec] = Field(None, description="Optional self-instruction of new prompts.")


class SFTSpec(_Model):
    """Iteration 0: supervised fine-tuning of the base model into M_1 (IFT + optional EFT data)."""

    enabled: bool = Field(True)
    instructionDataUri: str = Field(
        ..., min_length=1, description="JSONL with 'prompt' and 'response' per line (instruction fine-tuning)."
    )
    judgeDataUri: Optional[str] = Field(
        None, description="JSONL with 'prompt' and 'response' per line: judge-training (EFT) examples."
    )
    learningRate: float = Field(5.5e-6, gt=0.0, le=1.0)
    epochs: float = Field(1.0, gt=0.0, le=1000.0)
    batchSize: int = Field(4, ge=1, le=4096)
    gradientAccumulation: int = Field(1, ge=1, le=4096)
    maxLength: int = Field(1024, ge=8, le=1_048_576)
    maxSteps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")


class GenerationSpec(_Model):
    responsesPerPrompt: int = Field(4, ge=2, le=64, description="Candidate responses per prompt (paper: 4).")
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    topP: float = Field(0.9, gt=0.0, le=1.0)
    maxNewTokens: int = Field(256, ge=1, le=131072)
    backend: Literal["transformers", "vllm"] = Field("transformers", description="vllm needs a GPU image.")
    batchSize: int = Field(16, ge=1, le=4096, description="Prompts per generate() call (transformers backend).")
    shards: int = Field(1, ge=1, le=1024, description="Indexed Job completions (pods) for generation.")


class JudgeSpec(_Model):
    samplesPerResponse: int = Field(3, ge=1, le=64, description="Judge verdicts per response, aggregated (paper: 3).")
    aggregation: Literal["mean", "median"] = Field("mean")
    template: Optional[str] = Field(
        None, max_length=65536,
        description="Judge prompt with {prompt} and {response} placeholders; default: the additive 0-5 rubric.",
    )
    scorePattern: str = Field(
        DEFAULT_SCORE_PATTERN,
        min_length=1,
        description="Regular expression with one group that captures the score; the last match counts.",
    )
    minScore: float = Field(0.0)
    maxScore: float = Field(5.0)
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    topP: float = Field(0.9, gt=0.0, le=1.0)
    maxNewTokens: int = Field(256, ge=1, le=131072)
    backend: Literal["transformers", "vllm"] = Field("transformers")
    batchSize: int = Field(16, ge=1, le=4096)
    shards: int = Field(1, ge=1, le=1024)

    @field_validator("scorePattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            compiled = re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from e
        if compiled.groups < 1:
            raise ValueError("needs one capturing group around the score")
        return v

    @field_validator("template")
    @classmethod
    def _template(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        for key in ("{prompt}", "{response}"):
            if key not in v:
                raise ValueError(f"must contain the placeholder {key}")
        try:
            v.format(prompt="p", response="r")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"has a placeholder other than {{prompt}} and {{response}} ({e!r}); write literal braces as {{{{ }}}}") from e
        return v

    @model_validator(mode="after")
    def _range(self) -> "JudgeSpec":
        if self.minScore >= self.maxScore:
            raise ValueError(f"minScore ({self.minScore}) must be below maxScore ({self.maxScore})")
        return self

    @property
    def prompt_template(self) -> str:
        return self.template or DEFAULT_JUDGE_TEMPLATE


class PairsSpec(_Model):
    minMargin: float = Field(
        0.0, ge=0.0, description="Keep a pair only if chosen - rejected mean score is above this (ties always dropped)."
    )


class TrainingSpec(_Model):
    beta: float = Field(0.1, gt=0.0, le=100.0, description="DPO beta.")
    learningRate: float = Field(1e-6, gt=0.0, le=1.0)
    epochs: float = Field(1.0, gt=0.0, le=1000.0)
    batchSize: int = Field(4, ge=1, le=4096, description="Per-device batch size.")
    gradientAccumulation: int = Field(1, ge=1, le=4096)
    maxLength: int = Field(1024, ge=8, le=1_048_576)
    maxSteps: Optional[int] = Field(None, ge=1)
    bf16: Optional[bool] = Field(None, description="bfloat16 training; default: on when a GPU is present.")
    gradientCheckpointing: bool = Field(False)
    mode: Literal["full", "lora"] = Field("full", description="lora uses model.lora (or its defaults).")
    lossType: Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"] = Field(
        "sigmoid"
    )
    reference: Literal["current", "base"] = Field(
        "current", description="DPO reference model: current = M_t (the paper), base = the fixed base/SFT model."
    )
    seed: int = Field(42, ge=0)


class StorageSpec(_Model):
    uri: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        description="Artifacts root: file:///path, a local path, or s3://bucket/prefix. Cannot change once set.",
    )
    endpoint: Optional[str] = Field(None, description="S3 endpoint URL (S3-compatible stores).")
    region: Optional[str] = Field(None)
    credentialsSecret: Optional[str] = Field(
        None,
        pattern=DNS_LABEL_RE[:-1] + r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (operator only; read as secretKeyRefs).",
    )
    deleteOnRunDeletion: bool = Field(False, description="Delete the run's artifacts and checkpoints with the resource.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if "://" in v and not (v.startswith("s3://") or v.startswith("file://")):
            raise ValueError(f"unsupported scheme in {v!r}: use file://, s3:// or a local path")
        if v.startswith("s3://") and len(v) <= len("s3://"):
            raise ValueError("s3:// URI needs a bucket")
        return v


# --- Kubernetes scheduling (used by the operator only; the local runner ignores them) ---


class EnvVar(_Model):
    name: str = Field(..., min_length=1, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str = Field("")


class Toleration(_Model):
    key: Optional[str] = None
    operator: Optional[Literal["Exists", "Equal"]] = None
    value: Optional[str] = None
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    tolerationSeconds: Optional[int] = None


class PhaseResources(_Model):
    """Pod settings of one phase's Jobs. Unset fields fall back to ``resources.default``."""

    gpus: Optional[int] = Field(None, ge=0, le=64, description="GPUs per pod.")
    gpuResourceName: Optional[str] = Field(None, description="Extended resource name; default nvidia.com/gpu.")
    cpu: Optional[str] = Field(None, pattern=QUANTITY_RE)
    memory: Optional[str] = Field(None, pattern=QUANTITY_RE)
    shmSize: Optional[str] = Field(None, pattern=QUANTITY_RE, description="Memory-backed /dev/shm for NCCL/vLLM.")
    nodeSelector: Optional[dict[str, str]] = None
    tolerations: Optional[list[Toleration]] = None
    affinity: Optional[dict[str, Any]] = Field(None, description="A core/v1 Affinity, passed through as written.")
    priorityClassName: Optional[str] = None
    env: Optional[list[EnvVar]] = None
    activeDeadlineSeconds: Optional[int] = Field(None, ge=1)


class ResourcesSpec(_Model):
    default: PhaseResources = Field(default_factory=PhaseResources)
    sft: Optional[PhaseResources] = None
    instruct: Optional[PhaseResources] = None
    generate: Optional[PhaseResources] = None
    judge: Optional[PhaseResources] = None
    pairs: Optional[PhaseResources] = None
    train: Optional[PhaseResources] = None
    eval: Optional[PhaseResources] = None

    def for_phase(self, phase: str) -> PhaseResources:
        """The default settings overlaid with the phase's own."""
        merged = self.default.model_dump(exclude_none=True)
        own = getattr(self, phase, None)
        if own is not None:
            merged.update(own.model_dump(exclude_none=True))
        return PhaseResources.model_validate(merged)


class RetrySpec(_Model):
    maxRetries: int = Field(2, ge=0, le=100, description="Job re-creations per step before the run fails.")
    backoffSeconds: int = Field(30, ge=0, le=86400, description="First retry delay; doubles per retry.")
    podBackoffLimit: int = Field(1, ge=0, le=100, description="The Job's own backoffLimit (pod restarts).")


class KueueSpec(_Model):
    queueName: str = Field(..., min_length=1, description="kueue.x-k8s.io/queue-name; Jobs are created suspended.")


DEFAULT_EVALUATOR_TEMPLATE = """\
Two assistants answered the same question. Decide which answer is better: more \
correct, more helpful, closer to what was asked. Ignore the order in which they are \
shown and do not prefer an answer for its length.

<question>{prompt}</question>
<answer_a>{first}</answer_a>
<answer_b>{second}</answer_b>

Explain your decision in at most 60 words, then end with a line of the form \
"Winner: A", "Winner: B" or "Winner: tie".
"""

DEFAULT_WINNER_PATTERN = r"Winner:\s*(A|B|tie)\b"


def _check_verifier(v: Optional[str]) -> Optional[str]:
    if v is None:
        return v
    module, sep, func = v.partition(":")
    ident = r"[A-Za-z_][A-Za-z0-9_]*"
    if not sep or not re.fullmatch(rf"{ident}(\.{ident})*", module) or not re.fullmatch(rf"{ident}(\.{ident})*", func):
        raise ValueError(f"{v!r} is not of the form module.path:function")
    return v


class EvalDataSpec(_Model):
    uri: str = Field(..., min_length=1, max_length=4096, description="JSONL file (local path, file://, s3://).")
    limit: Optional[int] = Field(None, ge=1, le=10_000_000, description="Use only the first N lines.")


class EvaluatorSpec(_Model):
    """A fixed evaluator model that compares two answers head to head (the role GPT-4
    plays in AlpacaEval)."""

    modelUri: str = Field(..., min_length=1, description="The evaluator model; same URI forms as model.uri.")
    template: Optional[str] = Field(
        None, max_length=65536,
        description="Pairwise prompt with {prompt}, {first} and {second}; default: a built-in comparison prompt.",
    )
    pattern: str = Field(
        DEFAULT_WINNER_PATTERN, min_length=1, max_length=1000,
        description="Regular expression whose one group captures A, B or tie (case-insensitive); the last match counts.",
    )
    maxNewTokens: int = Field(64, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy.")
    batchSize: int = Field(16, ge=1, le=4096)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            compiled = re.compile(v, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from e
        if compiled.groups < 1:
            raise ValueError("needs one capturing group around A, B or tie")
        return v

    @field_validator("template")
    @classmethod
    def _template(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        for key in ("{prompt}", "{first}", "{second}"):
            if key not in v:
                raise ValueError(f"must contain the placeholder {key}")
        return v

    @property
    def prompt_template(self) -> str:
        return self.template or DEFAULT_EVALUATOR_TEMPLATE


class EvalGenerationSpec(_Model):
    """How the evaluated model answers the held-out prompts."""

    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy, so a model's answers are reproducible.")
    topP: float = Field(1.0, gt=0.0, le=1.0)
    maxNewTokens: Optional[int] = Field(None, ge=1, le=131072, description="Default: generation.maxNewTokens.")
    batchSize: int = Field(16, ge=1, le=4096)


# Eval summary figures a gate may watch, and whether higher is better.
GATE_METRICS = {
    "verifierScore": True, "judgePairwiseAccuracy": True, "judgeSpearman": True, "judgeKendall": True,
    "judgeExactMatch": True, "judgeBestAgreement": True, "judgeParseFailureRate": False,
    "winRateVsPrevious": True, "winRateVsBaseline": True, "winRateVsPreviousLengthMatched": True,
    "winRateVsBaselineLengthMatched": True,
}


class GateSpec(_Model):
    """What to do when an iteration's model does not improve on the best one so far."""

    metric: Literal[tuple(GATE_METRICS)] = Field(  # type: ignore[valid-type]
        "verifierScore", description="Eval summary figure the gate watches (judgeParseFailureRate: lower is better)."
    )
    minChange: float = Field(
        0.0, ge=-1e6, le=1e6,
        description="The gate fails when the model's figure minus the best figure so far is below this.",
    )
    action: Literal["warn", "stop", "rollback"] = Field(
        "warn", description="warn: a Warning Event; stop: the run ends Succeeded (EarlyStopped) with the best model; "
        "rollback: the next iteration starts again from the best model.",
    )
    maxRollbacks: int = Field(1, ge=0, le=100, description="Rollbacks allowed; a later failure acts as stop.")


class EvalSpec(_Model):
    """The eval phase: after every iteration's training on M_{t+1}, and once on M_1 as the baseline."""

    enabled: bool = Field(True)
    shards: int = Field(1, ge=1, le=1024, description="Indexed Job completions (pods) for evaluation.")
    prompts: Optional[EvalDataSpec] = Field(
        None, description="Held-out prompts: JSONL with a 'prompt' per line; the whole line reaches the verifier."
    )
    verifier: Optional[str] = Field(
        None, max_length=512,
        description="module:function scoring an answer, called as fn(prompt, response, record) -> float in [0, 1].",
    )
    judgeSet: Optional[EvalDataSpec] = Field(
        None, description="Labelled judge set: JSONL {prompt, responses: [{response, score}]} per line."
    )
    evaluator: Optional[EvaluatorSpec] = Field(None, description="A fixed evaluator model for head-to-head win rates.")
    generation: EvalGenerationSpec = Field(default_factory=EvalGenerationSpec)
    gate: Optional[GateSpec] = Field(None, description="Stop, roll back or warn when a model does not improve.")

    @field_validator("verifier")
    @classmethod
    def _verifier(cls, v: Optional[str]) -> Optional[str]:
        return _check_verifier(v)

    @model_validator(mode="after")
    def _inputs(self) -> "EvalSpec":
        if (self.verifier or self.evaluator) and self.prompts is None:
            raise ValueError("eval.verifier and eval.evaluator need eval.prompts (the held-out prompts)")
        if self.gate is not None:
            needs = {"verifierScore": ("verifier", self.verifier), "winRateVsPrevious": ("evaluator", self.evaluator),
                     "winRateVsBaseline": ("evaluator", self.evaluator),
                     "winRateVsPreviousLengthMatched": ("evaluator", self.evaluator),
                     "winRateVsBaselineLengthMatched": ("evaluator", self.evaluator)}
            what, present = needs.get(self.gate.metric, ("judgeSet", self.judgeSet))
            if present is None:
                raise ValueError(f"gate.metric {self.gate.metric} needs eval.{what}")
        return self


class RunSpec(_Model):
    """spec of a SelfRewardRun."""

    model: ModelSpec
    prompts: PromptsSpec
    iterations: int = Field(3, ge=1, le=100, description="Self-rewarding iterations after iteration 0.")
    sft: Optional[SFTSpec] = Field(None, description="Optional iteration 0 (SFT on IFT + EFT data) that makes M_1.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    pairs: PairsSpec = Field(default_factory=PairsSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    eval: Optional[EvalSpec] = Field(None, description="Optional evaluation after each iteration (and of M_1).")
    storage: StorageSpec
    seed: int = Field(0, ge=0, description="Seed of prompt sampling and generation.")
    suspend: bool = Field(False, description="Stop creating Jobs and suspend running ones (operator).")
    # Kubernetes-only settings
    image: Optional[str] = Field(None, description="Worker image; default: the operator's configured worker image.")
    imagePullPolicy: Optional[Literal["Always", "IfNotPresent", "Never"]] = None
    imagePullSecrets: Optional[list[str]] = None
    serviceAccountName: Optional[str] = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    kueue: Optional[KueueSpec] = None
    ttlSecondsAfterFinished: Optional[int] = Field(86400, ge=0)

    @model_validator(mode="after")
    def _one_gpu_for_training(self) -> "RunSpec":
        # The sft and train phases run one training process per pod (no distributed
        # launcher), and one process drives one GPU: refuse more at load time rather
        # than in a pod that has already been scheduled on a multi-GPU node.
        for phase in ("sft", "train"):
            gpus = self.resources.for_phase(phase).gpus
            if gpus is not None and gpus > 1:
                raise ValueError(
                    f"resources.{phase}.gpus is {gpus} (or inherited from resources.default): the {phase} phase "
                    "trains in one process on one GPU; set resources.train.gpus (and resources.sft.gpus) to 1"
                )
        return self

    # --- derived facts used by planning ---
    @property
    def sft_enabled(self) -> bool:
        return self.sft is not None and self.sft.enabled

    @property
    def instruct_enabled(self) -> bool:
        si = self.prompts.selfInstruct
        return si is not None and si.enabled

    @property
    def eval_enabled(self) -> bool:
        return self.eval is not None and self.eval.enabled


class SpecError(ValueError):
    """A run spec that does not validate; the message names each field and reason."""

    def __init__(self, errors: list[tuple[str, str]], source: str = "spec"):
        self.errors = errors
        lines = [f"{source}: invalid run spec"] + [f"  {loc}: {msg}" for loc, msg in errors]
        super().__init__("\n".join(lines))


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "spec"


def parse_spec(data: Any, source: str = "spec") -> RunSpec:
    """Validate a spec mapping; raise SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError([("spec", f"expected a mapping, got {type(data).__name__}")], source)
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        errors = []
        for err in e.errors():
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            errors.append((_loc(err["loc"]), msg))
        raise SpecError(errors, source) from None


def spec_from_document(doc: Any, source: str = "spec") -> tuple[RunSpec, dict]:
    """Accept a bare spec or a ``kind: SelfRewardRun`` manifest; return (spec, metadata)."""
    if isinstance(doc, dict) and "kind" in doc:
        if doc.get("kind") != "SelfRewardRun":
            raise SpecError([("kind", f"expected SelfRewardRun, got {doc.get('kind')!r}")], source)
        api = str(doc.get("apiVersion", ""))
        if api and not api.startswith("selfreward.dev/"):
            raise SpecError([("apiVersion", f"expected selfreward.dev/v1alpha1, got {api!r}")], source)
        return parse_spec(doc.get("spec"), source), dict(doc.get("metadata") or {})
    return parse_spec(doc, source), {}


def load_spec_file(path: str | Path) -> tuple[RunSpec, dict]:
    """Load a YAML file (bare spec or SelfRewardRun manifest). Relative local URIs in the
    spec are resolved against the file's directory, so examples run from anywhere."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError([("yaml", str(e))], str(path)) from None
    spec, meta = spec_from_document(doc, str(path))
    return resolve_relative_uris(spec, path.parent.resolve()), meta


def _resolve(uri: Optional[str], base: Path, model: bool = False) -> Optional[str]:
    """Make a relative local path absolute. For model URIs a bare ``org/name`` that is
    not a local directory stays as written: it may be a Hugging Face id."""
    if uri is None or "://" in uri or uri.startswith("/"):
        return uri
    if model and not (uri.startswith("./") or uri.startswith("../") or (base / uri).exists()):
        return uri
    return str((base / uri).resolve())


def resolve_relative_uris(spec: RunSpec, base: Path) -> RunSpec:
    spec = spec.model_copy(deep=True)
    spec.model.uri = _resolve(spec.model.uri, base, model=True)
    spec.prompts.uri = _resolve(spec.prompts.uri, base)
    if spec.prompts.selfInstruct and spec.prompts.selfInstruct.modelUri:
        spec.prompts.selfInstruct.modelUri = _resolve(spec.prompts.selfInstruct.modelUri, base, model=True)
    if spec.sft:
        spec.sft.instructionDataUri = _resolve(spec.sft.instructionDataUri, base)
        spec.sft.judgeDataUri = _resolve(spec.sft.judgeDataUri, base)
    if spec.eval:
        for data in (spec.eval.prompts, spec.eval.judgeSet):
            if data is not None:
                data.uri = _resolve(data.uri, base)
        if spec.eval.evaluator:
            spec.eval.evaluator.modelUri = _resolve(spec.eval.evaluator.modelUri, base, model=True)
    spec.storage.uri = _resolve(spec.storage.uri, base)
    return spec
