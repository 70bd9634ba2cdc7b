"""The run spec: one typed model of a SelfRewardRun's ``spec``.

This module is the single source of truth for what a run may say. The local
runner loads YAML into it, the worker reads it from the artifact store, and the
CRD's openAPIV3Schema is generated from it (``selfreward crd``).

Field names are camelCase, as Kubernetes users write them. Every model forbids
unknown fields, so a typo is an error that names the field rather than a silently
ignored setting.
"""
from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import re2
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .template import PLACEHOLDERS as JUDGE_PLACEHOLDERS, template_problem
from .phases import NAMES as PHASES  # the phase registry is the one list of phases

EVALUATOR_PLACEHOLDERS = ("prompt", "first", "second")


def _template_validator(placeholders: tuple):
    """One check for every prompt template: only its placeholders (template.py)."""
    def check(v: str) -> str:
        problem = template_problem(v, placeholders)
        if problem:
            raise ValueError(problem)
        return v
    return AfterValidator(check)

TRAINING_PHASES = ("sft", "train")  # the phases that may run distributed (resources.<phase>.nodes, gpus > 1)

# Our own wording of the additive 0-5 rubric of Yuan et al. (2024). Its two
# placeholders, {prompt} and {response}, are filled by selfreward.template (not
# str.format: no other brace syntax means anything; {{ and }} are literal braces).
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

# The default score rule (RE2 syntax, case-insensitive, within one line): a statement
# that starts a line or a sentence (after ". ", "! ", "? " or "; ") with "Score"
# (optionally "Final", "Total" or "Overall" before it; at a line's start also a list
# bullet, heading marks or a list number), a separator (":", "=", "is", " - "), the
# number (optionally in <>, [] or ()), an optional "/ N" or "out of N", and then
# nothing that would make the number part of something else (a range "3-4", a decimal
# comma "4,5", "1e1", another digit). The verdict text is normalised first
# (judging.verdict_text: NFKC, so full-width digits and colons count; reasoning blocks,
# block quotes and Markdown emphasis removed) and the last matching line counts.
DEFAULT_SCORE_PATTERN = (
    r"(?im)(?:^[ \t]*(?:[-*+#>][ \t]*)*(?:[0-9]+[.)][ \t]+)?|[.!?;][ \t]+)"
    r"(?:(?:final|total|overall)[ \t]+)?score[ \t]*(?:[:=][ \t]*|is[ \t]+|-[ \t]+)?"
    r"[<\[(]?[ \t]*([0-9]+(?:\.[0-9]+)?)[ \t]*[>\])]?"
    r"(?:[ \t]*(?:/|out of)[ \t]*[0-9]+(?:\.[0-9]+)?)?(?:[ \t]*points?)?"
    r"(?:[ \t]*$|[^0-9A-Za-z\-–,.\s]|[,.](?:[^0-9]|$)|[ \t]+[^0-9\-–\s])"
)

QUANTITY_RE = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E|e[0-9]+)?$"
# Kubernetes' own name rules (k8s.io/apimachinery/pkg/util/validation).
DNS_LABEL_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE_RE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_QUALIFIED_NAME_PART = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
QUALIFIED_NAME_RE = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?" + _QUALIFIED_NAME_PART + "$"

# Integer bounds of what the product hands on: numpy/torch seeds are 32-bit unsigned,
# and the Job fields the spec sets (ttlSecondsAfterFinished, backoffLimit, completions)
# are int32 in batch/v1.
SEED_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
# Bounds that also size a run's Job and pod names (MAX_RUN_NAME_LENGTH).
ITERATIONS_MAX = 100
RETRIES_MAX = 100
SHARDS_MAX = 1024

# What a whole spec may expand to (after YAML aliases) before it is validated at all:
# far above any real spec, far below what could hang validation or exhaust memory.
MAX_SPEC_DEPTH = 32
MAX_SPEC_NODES = 100_000
MAX_SPEC_CHARS = 4 * 1024 * 1024


def _check_qualified_name(v: str) -> str:
    """The length limits of a qualified name's parts (prefix up to 253, name up to 63)."""
    prefix, _, name = v.rpartition("/")
    if len(name) > 63:
        raise ValueError(f"{v!r}: the name part after the prefix may be at most 63 characters")
    if len(prefix) > 253:
        raise ValueError(f"{v!r}: the prefix may be at most 253 characters")
    return v


def _check_extended_resource(v: str) -> str:
    """Kubernetes' IsExtendedResourceName: a domain-prefixed name outside kubernetes.io."""
    prefix, _, _ = v.rpartition("/")
    if not prefix:
        raise ValueError(f"{v!r} is not an extended resource name: it needs a domain prefix, e.g. nvidia.com/gpu")
    if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io") or v.startswith("requests."):
        raise ValueError(f"{v!r} is a native resource name, not an extended one (e.g. nvidia.com/gpu)")
    return v


DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_RE)]
DnsSubdomain = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_RE)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_RE)]
QualifiedName = Annotated[str, Field(min_length=1, max_length=317, pattern=QUALIFIED_NAME_RE),
                          AfterValidator(_check_qualified_name)]
ExtendedResourceName = Annotated[QualifiedName, AfterValidator(_check_extended_resource)]


# --- URIs -------------------------------------------------------------------------
#
# Every URI field names one location in one of the kinds below; each field lists the
# kinds it accepts. A URI with a scheme has an authority (the bucket) where the scheme
# needs one, and no path segment is empty, "." or "..": what a URI names is what it
# says, never a parent reached by traversal. A bare relative path (local runner only)
# is resolved against the spec file's directory and may start with "./" or "../".

URI_S3, URI_FILE, URI_PVC, URI_PATH = "s3", "file", "pvc", "path"
# scheme -> (prefix, the authority's pattern and what it is; None: file-style absolute path)
URI_SCHEMES: dict[str, tuple[str, Optional[tuple[str, str]]]] = {
    # lowercase letters, digits, '.' and '-', up to 63 (S3-compatible stores also take
    # names shorter than AWS's 3 characters)
    URI_S3: ("s3://", (r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$", "bucket")),
    URI_FILE: ("file://", None),
    # a PersistentVolumeClaim (a DNS subdomain) mounted read-only into the pods, and a path in it
    URI_PVC: ("pvc://", (DNS_SUBDOMAIN_RE, "PersistentVolumeClaim")),
}
STORAGE_URI_KINDS = frozenset({URI_S3, URI_FILE, URI_PATH})
DATA_URI_KINDS = frozenset({URI_S3, URI_FILE, URI_PATH})
MODEL_URI_KINDS = frozenset({URI_S3, URI_FILE, URI_PVC, URI_PATH})  # a bare path may also be a Hugging Face id
MAX_URI_LENGTH = 4096

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def uri_kind(uri: str) -> str:
    """s3, file, path (no scheme) or the unsupported scheme as written."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else URI_PATH


def _segments_problem(path: str, *, relative: bool) -> Optional[str]:
    segments = path.split("/")
    if segments and segments[-1] == "" and len(segments) > 1:
        segments = segments[:-1]  # one trailing slash is the same location
    climbing = relative
    for seg in segments:
        if climbing and seg in (".", ".."):
            continue  # ./x and ../x: relative to the spec file
        climbing = False
        if seg == "":
            return "has an empty path segment ('//')"
        if seg in (".", ".."):
            return f"has a {seg!r} path segment: name the location itself, without traversal"
    return None


def uri_problem(uri: Any, kinds: frozenset, *, prefix: bool = False) -> Optional[str]:
    """Why ``uri`` cannot be used for a field that accepts ``kinds`` (None when it can).
    ``prefix``: the URI is a run's own store root, which must be below a bucket (never
    the bucket's root, which other runs may share) and never the filesystem root."""
    if not isinstance(uri, str) or not uri:
        return "is empty"
    if len(uri) > MAX_URI_LENGTH:
        return f"is longer than {MAX_URI_LENGTH} characters"
    if uri != uri.strip():
        return "has leading or trailing whitespace"
    for ch in uri:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            return f"contains the control character {ch!r}"
    kind = uri_kind(uri)
    allowed = sorted(kinds)
    if kind not in kinds:
        names = ", ".join(f"{URI_SCHEMES[k][0]}..." if k in URI_SCHEMES else "a local path" for k in allowed)
        return f"has the unsupported scheme {kind}://: use {names}"
    if kind == URI_PATH:
        relative = not uri.startswith("/")
        if not [s for s in uri.split("/") if s not in ("", ".", "..")]:
            return "names no file or directory" if relative else "is the filesystem root"
        return _segments_problem(uri if relative else uri[1:], relative=relative)
    scheme_prefix, authority = URI_SCHEMES[kind]
    rest = uri[len(scheme_prefix):]
    if authority is None:  # file:///absolute/path
        if not rest.startswith("/"):
            return f"{scheme_prefix} names an absolute path: write {scheme_prefix}/dir/..."
        if not [s for s in rest.split("/") if s not in ("", ".", "..")]:
            return "is the filesystem root"
        return _segments_problem(rest[1:], relative=False)
    pattern, what = authority
    name, _, path = rest.partition("/")
    if not name:
        return f"has no {what}: write {scheme_prefix}{what}/prefix"
    if not re.match(pattern, name):
        return f"{name!r} is not a valid {what} name"
    if not path.strip("/"):
        if prefix:
            return (f"is the root of {what} {name!r}: a run's store must be a prefix of its own "
                    f"({scheme_prefix}{name}/runs/<run>), never a whole {what} other runs may share")
        return f"names the whole {what} {name!r}: add the object's key"
    return _segments_problem(path, relative=False)


def run_prefix_problem(uri: Any) -> Optional[str]:
    """Why ``uri`` is not provably one run's own store prefix (None when it is). The
    cleanup Job deletes everything below a run's prefix, so a prefix must be absolute,
    below a bucket or the filesystem root, and free of traversal."""
    problem = uri_problem(uri, STORAGE_URI_KINDS, prefix=True)
    if problem:
        return problem
    if uri_kind(uri) == URI_PATH and not uri.startswith("/"):
        return "is a relative path: only an absolute path or a URI can be proven to be the run's own"
    return None


def _uri_validator(kinds: frozenset, prefix: bool = False):
    def check(v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        problem = uri_problem(v, kinds, prefix=prefix)
        if problem:
            raise ValueError(f"{v[:200]!r} {problem}")
        return v
    return AfterValidator(check)


StorageUri = Annotated[str, Field(min_length=1, max_length=MAX_URI_LENGTH), _uri_validator(STORAGE_URI_KINDS, True)]
DataUri = Annotated[str, Field(min_length=1, max_length=MAX_URI_LENGTH), _uri_validator(DATA_URI_KINDS)]
ModelUri = Annotated[str, Field(min_length=1, max_length=MAX_URI_LENGTH), _uri_validator(MODEL_URI_KINDS)]


# --- environment variables the product sets or relies on ------------------------------
#
# User env (resources.*.env) may not set these: jobs.py sets them, the worker reads them,
# or Kubernetes and torch's launcher set them per pod (an overridden JOB_COMPLETION_INDEX
# makes every pod of a sharded Job do shard 0). Hub settings that are not cache paths
# (HF_ENDPOINT, HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, ...) stay the user's.
RESERVED_ENV_NAMES = frozenset({
    # Kubernetes and the device plugins, per pod
    "JOB_COMPLETION_INDEX", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
    # torch.distributed (torchrun) per process
    "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
    "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME",
    # the process and its writable paths (jobs.py: the root filesystem is read-only)
    "HOME", "PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "XDG_CACHE_HOME", "HF_HOME",
    "TRITON_CACHE_DIR", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
    # storage: credentials come only from spec.storage.credentialsSecret as secretKeyRefs
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
})
# every SELFREWARD_ variable is the product's; torchrun reads its arguments from PET_*
RESERVED_ENV_PREFIXES = ("SELFREWARD_", "TORCHELASTIC_", "PET_", "KUBERNETES_")
# cache locations of the ML libraries (HF_HUB_CACHE, HF_DATASETS_CACHE, TORCH_HOME, ...)
_RESERVED_ENV_CACHE = re.compile(r"^(HF|HUGGINGFACE|TRANSFORMERS|TORCH|TORCHINDUCTOR|TRITON|XDG)_\w*(CACHE|HOME)\w*$")


def reserved_env(name: str) -> bool:
    """Whether the product owns the environment variable ``name``."""
    return (name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)
            or _RESERVED_ENV_CACHE.match(name) is not None)


class _Model(BaseModel):
    # strict: "3" is not 3 and true is not 1 (the API server's types); an int is still a
    # float. No NaN or infinity anywhere: every comparison against them is false.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True,
                              strict=True, allow_inf_nan=False)


# --- a core/v1 Affinity, checked field by field ---------------------------------------

_MAX_TERMS = 32
_MAX_VALUES = 256


class _LabelSelectorRequirement(_Model):
    key: QualifiedName
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: Optional[list[LabelValue]] = Field(None, max_length=_MAX_VALUES)


class _LabelSelector(_Model):
    matchLabels: Optional[dict[QualifiedName, LabelValue]] = Field(None, max_length=_MAX_VALUES)
    matchExpressions: Optional[list[_LabelSelectorRequirement]] = Field(None, max_length=_MAX_TERMS)


class _NodeSelectorRequirement(_Model):
    key: QualifiedName
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: Optional[list[LabelValue]] = Field(None, max_length=_MAX_VALUES)


class _NodeSelectorTerm(_Model):
    matchExpressions: Optional[list[_NodeSelectorRequirement]] = Field(None, max_length=_MAX_TERMS)
    matchFields: Optional[list[_NodeSelectorRequirement]] = Field(None, max_length=_MAX_TERMS)


class _NodeSelector(_Model):
    nodeSelectorTerms: list[_NodeSelectorTerm] = Field(..., min_length=1, max_length=_MAX_TERMS)


class _PreferredSchedulingTerm(_Model):
    weight: int = Field(..., ge=1, le=100)
    preference: _NodeSelectorTerm


class _NodeAffinity(_Model):
    requiredDuringSchedulingIgnoredDuringExecution: Optional[_NodeSelector] = None
    preferredDuringSchedulingIgnoredDuringExecution: Optional[list[_PreferredSchedulingTerm]] = Field(
        None, max_length=_MAX_TERMS)


class _PodAffinityTerm(_Model):
    labelSelector: Optional[_LabelSelector] = None
    namespaceSelector: Optional[_LabelSelector] = None
    namespaces: Optional[list[DnsLabel]] = Field(None, max_length=_MAX_VALUES)
    topologyKey: QualifiedName
    matchLabelKeys: Optional[list[QualifiedName]] = Field(None, max_length=_MAX_VALUES)
    mismatchLabelKeys: Optional[list[QualifiedName]] = Field(None, max_length=_MAX_VALUES)


class _WeightedPodAffinityTerm(_Model):
    weight: int = Field(..., ge=1, le=100)
    podAffinityTerm: _PodAffinityTerm


class _PodAffinity(_Model):
    requiredDuringSchedulingIgnoredDuringExecution: Optional[list[_PodAffinityTerm]] = Field(None, max_length=_MAX_TERMS)
    preferredDuringSchedulingIgnoredDuringExecution: Optional[list[_WeightedPodAffinityTerm]] = Field(
        None, max_length=_MAX_TERMS)


class Affinity(_Model):
    """The fields of a core/v1 Affinity, with Kubernetes' rules for keys and values."""

    nodeAffinity: Optional[_NodeAffinity] = None
    podAffinity: Optional[_PodAffinity] = None
    podAntiAffinity: Optional[_PodAffinity] = None


def _size_problem(data: Any, max_depth: int, max_nodes: int, max_chars: int) -> Optional[tuple[str, str]]:
    """(where, why) when ``data`` nests deeper, has more nodes or more text than allowed.
    Iterative, and shared references count once per reference, as a dump would write them."""
    nodes = chars = 0
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            return where or "spec", f"has more than {max_nodes} values (after expanding YAML aliases)"
        if depth > max_depth:
            return where or "spec", f"nests deeper than {max_depth} levels"
        if isinstance(value, dict):
            for k, v in value.items():
                chars += len(k) if isinstance(k, str) else 0
                stack.append((v, f"{where}.{k}" if where else str(k), depth + 1))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                stack.append((v, f"{where}[{i}]", depth + 1))
        elif isinstance(value, str):
            chars += len(value)
        if chars > max_chars:
            return where or "spec", f"holds more than {max_chars} characters of text"
    return None


def _affinity(v: Optional[dict]) -> Optional[dict]:
    if v is None:
        return v
    too_big = _size_problem(v, 12, 5000, 256 * 1024)
    if too_big:
        raise ValueError(f"{too_big[0]} {too_big[1]}")
    try:
        parsed = Affinity.model_validate(v)
    except ValidationError as e:
        first = e.errors()[0]
        where = _loc(first["loc"])
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ValueError(f"not a core/v1 Affinity: {where}: {msg}{more}") from None
    return parsed.model_dump(exclude_unset=True)


# --- judge score patterns --------------------------------------------------------------

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


_RE2_NOCASE = re2.Options()
_RE2_NOCASE.log_errors = False
_RE2_NOCASE.case_sensitive = False


@lru_cache(maxsize=16)
def compile_winner_pattern(pattern: str):
    """The evaluator's winner pattern, compiled by RE2 and case-insensitive: linear-time
    matching, as for the judge's score pattern."""
    return re2.compile(pattern, _RE2_NOCASE)


# The evaluator's and the meta-judge's default: the last "Winner: A|B|tie".
DEFAULT_WINNER_PATTERN = r"Winner:\s*(A|B|tie)\b"


def _winner_pattern(v: str) -> str:
    """A winner pattern RE2 compiles, with a group around A, B or tie."""
    try:
        compiled = compile_winner_pattern(v)
    except re2.error as e:
        raise ValueError(f"not a regular expression RE2 accepts: {e}") from e
    if compiled.groups < 1:
        raise ValueError("needs one capturing group around A, B or tie")
    return v


@lru_cache(maxsize=64)
def compile_score_pattern(pattern: str):
    """The pattern compiled by RE2: matching time is linear in the verdict's length
    whatever the pattern (no backtracking, so "(a+)+$" cannot hang a judge)."""
    return re2.compile(pattern, _RE2_OPTIONS)


def _can_match_a_digit(items) -> bool:
    """Whether a parsed (sre) pattern can match a string that contains a digit."""
    from re import _constants as c  # noqa: PLC0415 - the stdlib's parser, read only

    def in_set(members, ch: str) -> bool:
        negate, hit = False, False
        for op, av in members:
            if op is c.NEGATE:
                negate = True
            elif op is c.LITERAL:
                hit |= chr(av) == ch
            elif op is c.RANGE:
                hit |= av[0] <= ord(ch) <= av[1]
            elif op is c.CATEGORY:
                hit |= av in (c.CATEGORY_DIGIT, c.CATEGORY_WORD, c.CATEGORY_NOT_SPACE)
        return hit != negate

    for op, av in items:
        if op is c.ANY or (op is c.LITERAL and chr(av).isdigit()) or (op is c.NOT_LITERAL):
            return True
        if op is c.IN and any(in_set(av, d) for d in "0123456789"):
            return True
        if op is c.BRANCH and any(_can_match_a_digit(b) for b in av[1]):
            return True
        if op is c.SUBPATTERN and _can_match_a_digit(av[-1]):
            return True
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)) and av[1] > 0 \
                and _can_match_a_digit(av[2]):
            return True
        if op is getattr(c, "ATOMIC_GROUP", None) and _can_match_a_digit(av):
            return True
    return False


def _first_group(items):
    from re import _constants as c  # noqa: PLC0415

    for op, av in items:
        if op is c.SUBPATTERN:
            if av[0] == 1:
                return av[-1]
            inner = _first_group(av[-1])
        elif op is c.BRANCH:
            inner = next((g for b in av[1] if (g := _first_group(b)) is not None), None)
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            inner = _first_group(av[2])
        else:
            inner = None
        if inner is not None:
            return inner
    return None


def score_pattern_problem(pattern: str) -> Optional[str]:
    """Why ``pattern`` cannot be a judge's score pattern (None when it can): RE2 must
    compile it, and its first group must be able to capture a number."""
    try:
        compiled = compile_score_pattern(pattern)
    except re2.error as e:
        detail = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        return (f"not a valid regular expression for RE2 ({detail}); score patterns run on RE2, which takes "
                "linear time and has no backreferences or lookaround")
    if compiled.groups < 1:
        return "needs one capturing group around the score"
    try:
        from re import _parser  # noqa: PLC0415 - Python's parser of (nearly) the same syntax
        group = _first_group(_parser.parse(pattern).data)
    except Exception:  # noqa: BLE001 - RE2-only syntax (\pN, [[:digit:]]): RE2 accepted it
        return None
    if group is not None and not _can_match_a_digit(group.data):
        return "its first group can never capture a number (it matches no digit)"
    return None

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

    uri: ModelUri = Field(
        ...,
        description="Base model: a local path, file://..., s3://bucket/prefix (a committed checkpoint with "
        "MANIFEST.json, or a plain Hugging Face directory, verified by size and ETag), pvc://claim/path "
        "(a PersistentVolumeClaim mounted read-only into the pods), or a Hugging Face id such as "
        "Qwen/Qwen2.5-0.5B-Instruct (downloaded by the worker from its hub or mirror; never by the operator).",
    )
    revision: Optional[str] = Field(
        None, min_length=1, max_length=256, pattern=r"^[^\s]+$",
        description="Hub revision (branch, tag or commit) of model.uri when it is a Hugging Face id.",
    )
    hubTokenSecret: Optional[str] = Field(
        None, pattern=DNS_SUBDOMAIN_RE, max_length=253,
        description="Secret whose key HF_TOKEN is the hub token for gated or private models; given to the pods "
        "as a secretKeyRef (the operator never reads it).",
    )
    trustRemoteCode: bool = Field(
        False, description="Let transformers run the Python code that a model repository ships (auto_map). "
        "Off by default: such code runs with the pod's credentials.",
    )
    sizeGiB: Optional[float] = Field(
        None, gt=0.0, le=100_000.0,
        description="Size of the stored weights in GiB (e.g. 15 for an 8B model in bfloat16); sizes the "
        "default scratch volumes (docs/storage.md).",
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
    modelUri: Optional[ModelUri] = Field(
        None,
        description="A fixed model that writes the prompts (the paper used one), any model URI that "
        "model.uri accepts; default: M_t.",
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
    uri: DataUri = Field(..., description="Seed prompts, JSONL with a 'prompt' field per line.")
    perIteration: Optional[int] = Field(
        None, ge=1, le=10_000_000, description="Prompts used per iteration (a seeded sample); default: all."
    )
    selfInstruct: Optional[SelfInstructSpec] = Field(None, description="Optional self-instruction of new prompts.")


class CheckpointingSpec(_Model):
    """Intermediate checkpoints of a training phase (model, optimizer, scheduler, RNG and
    data position, through the Trainer's own checkpoints), kept in the artifact store under
    ``iter-<t>/<phase>/resume/`` so a killed or preempted pod resumes from the last one.
    Only the newest is kept; they are deleted once the phase's final checkpoint commits.
    SIGTERM (node drain, spot preemption) always saves one before the worker exits."""

    enabled: bool = Field(True, description="Write intermediate checkpoints and resume from them.")
    everySteps: int = Field(500, ge=0, description="Save every this many optimizer steps (0: no step trigger).")
    everyMinutes: float = Field(
        30.0, ge=0.0, le=10080.0, description="Save when this many minutes passed since the last save (0: none)."
    )
    terminationGraceSeconds: int = Field(
        120, ge=1, le=86400,
        description="The training pods' terminationGracePeriodSeconds: time between SIGTERM and SIGKILL for "
        "finishing the current step and uploading a checkpoint.",
    )


class SFTSpec(_Model):
    """Iteration 0: supervised fine-tuning of the base model into M_1 (IFT + optional EFT data)."""

    enabled: bool = Field(True)
    instructionDataUri: DataUri = Field(
        ..., description="JSONL with 'prompt' and 'response' per line (instruction fine-tuning)."
    )
    judgeDataUri: Optional[DataUri] = Field(
        None, description="JSONL with 'prompt' and 'response' per line: judge-training (EFT) examples."
    )
    learningRate: float = Field(5.5e-6, gt=0.0, le=1.0)
    epochs: float = Field(1.0, gt=0.0, le=1000.0)
    batchSize: int = Field(4, ge=1, le=4096)
    gradientAccumulation: int = Field(1, ge=1, le=4096)
    maxLength: int = Field(1024, ge=8, le=1_048_576)
    maxSteps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")
    checkpointing: CheckpointingSpec = Field(
        default_factory=CheckpointingSpec, description="Intermediate checkpoints of the sft phase (preemption)."
    )


class VLLMSpec(_Model):
    """vLLM engine settings (read when the phase's backend is vllm). Tensor parallelism is
    not a setting: it is the GPUs of the phase's pod (resources.<phase>.gpus), so one
    engine spans them; more pods are more shards (data parallel), not a bigger engine."""

    gpuMemoryUtilization: float = Field(
        0.9, gt=0.0, le=1.0,
        description="Fraction of each GPU's memory vLLM may take for weights, activations and KV cache.",
    )
    maxModelLen: Optional[int] = Field(
        None, ge=16, le=1_048_576,
        description="Longest prompt + completion in tokens (sizes the KV cache); default: the model's context length.",
    )
    enforceEager: bool = Field(
        False, description="Skip CUDA graph capture: faster start-up and less memory, slower decoding."
    )
    prefixCaching: bool = Field(
        True,
        description="Reuse the KV cache of shared prompt prefixes (judge prompts share the whole rubric).",
    )


class _SamplingPhase(_Model):
    """Settings that generation and judging share."""

    vllm: VLLMSpec = Field(default_factory=VLLMSpec, description="vLLM engine settings (backend vllm).")


class GenerationSpec(_SamplingPhase):
    responsesPerPrompt: int = Field(4, ge=2, le=64, description="Candidate responses per prompt (paper: 4).")
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    topP: float = Field(0.9, gt=0.0, le=1.0)
    maxNewTokens: int = Field(256, ge=1, le=131072)
    backend: Literal["transformers", "vllm"] = Field("transformers", description="vllm needs a GPU image.")
    batchSize: int = Field(16, ge=1, le=4096, description="Prompts per generate() call (transformers backend).")
    shards: int = Field(1, ge=1, le=SHARDS_MAX, description="Indexed Job completions (pods) for generation.")


class _Sampler(_SamplingPhase):
    """How a phase that samples verdicts from M_t (judge, metaJudge) runs its model."""

    temperature: float = Field(0.7, ge=0.0, le=5.0, description="Sampling temperature; 0 = greedy.")
    topP: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling: the smallest token set of this mass.")
    maxNewTokens: int = Field(256, ge=1, le=131072, description="Longest verdict in tokens.")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="vllm needs a GPU image.")
    batchSize: int = Field(16, ge=1, le=4096, description="Prompts per generate() call.")


class SaturationSpec(_Model):
    """When the judge's scores have compressed toward the top ("always a 5"): the run
    records a JudgeSaturated Warning and condition, and eval.gate.onJudgeSaturated may act."""

    maxTopShare: float = Field(
        0.9, ge=0.0, le=1.0,
        description="Saturated when more than this share (0-1) of the scored responses got judge.maxScore; "
        "1 turns this test off.",
    )
    minStd: float = Field(
        0.25, ge=0.0, le=1e9,
        description="Saturated when the standard deviation of the response scores is below this; 0 turns this "
        "test off.",
    )


class JudgeSpec(_Sampler):
    samplesPerResponse: int = Field(3, ge=1, le=64, description="Judge verdicts per response, aggregated (paper: 3).")
    aggregation: Literal["mean", "median"] = Field("mean", description="How a response's verdict scores combine.")
    template: Optional[Annotated[str, _template_validator(JUDGE_PLACEHOLDERS)]] = Field(
        None, max_length=65536,
        description="Judge prompt with {prompt} and {response} placeholders; default: the additive 0-5 rubric.",
    )
    scorePattern: str = Field(
        DEFAULT_SCORE_PATTERN,
        min_length=1,
        max_length=4096,
        description="RE2 regular expression (linear time: no backreferences or lookaround) whose first group "
        "captures the score; it is matched against the normalised verdict and the last match counts. "
        "Default: the last line that starts with Score (see docs/judging.md).",
    )
    minScore: float = Field(0.0, ge=-1e9, le=1e9, description="Lowest valid score; a verdict below it is a parse failure.")
    maxScore: float = Field(5.0, ge=-1e9, le=1e9, description="Highest valid score; a verdict above it is a parse failure.")
    shards: int = Field(1, ge=1, le=SHARDS_MAX, description="Indexed Job completions (pods) for judging.")
    saturation: SaturationSpec = Field(
        default_factory=SaturationSpec, description="The saturation guard's thresholds (docs/judging.md)."
    )
    colocate: bool = Field(
        False,
        description="Judge in the generate pods: each generate shard's pod (and local task) then judges that "
        "shard's responses on the M_t it loaded, instead of a judge Job loading M_t again. Needs judge.shards "
        "equal to generation.shards, the same backend and vLLM settings (one engine), and no resources.judge "
        "(the pods are generate's). Judge shard i then judges generate shard i's prompts.",
    )

    @field_validator("scorePattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        problem = score_pattern_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _range(self) -> "JudgeSpec":
        if self.minScore >= self.maxScore:
            raise ValueError(f"minScore ({self.minScore}) must be below maxScore ({self.maxScore})")
        return self

    @property
    def prompt_template(self) -> str:
        return self.template or DEFAULT_JUDGE_TEMPLATE


# Our own meta-judge prompt (after the idea of Wu et al. 2024): the model compares two of
# its own judgments of one answer. The judgments reach it with their "Score:" lines
# removed (selfreward.metajudging.strip_score_lines), so it weighs the reasoning, not
# which number is higher.
DEFAULT_META_JUDGE_TEMPLATE = """\
Below are a user's question, an assistant's answer, and two judgments of that answer. \
Each judgment was asked to grade the answer on an additive five-point scale (relevance, \
substantial coverage, a useful answer to the basic question, a clear, direct and \
well-organised answer, and an expert, precise answer without surplus content) and to \
explain its grading. Decide which judgment applies the scale more accurately and \
explains its grading more faithfully to the answer. Ignore the order in which they \
are shown and their length.

<question>{prompt}</question>
<answer>{response}</answer>
<judgment_a>{first}</judgment_a>
<judgment_b>{second}</judgment_b>

Explain your comparison in at most 80 words, then end with a line of the form \
"Winner: A", "Winner: B" or "Winner: tie".
"""
META_JUDGE_PLACEHOLDERS = ("prompt", "response", "first", "second")


class MetaJudgeSpec(_Sampler):
    """The meta-judge (Meta-Rewarding, Wu et al. 2024): M_t compares pairs of its own
    verdicts on the responses its judge samples disagree on most, in both orders; the
    better and worse verdicts become judge-preference pairs that join the DPO data."""

    enabled: bool = Field(True, description="false keeps the settings but skips the phase.")
    responses: int = Field(
        64, ge=1, le=1_000_000,
        description="Meta-judge at most this many responses per iteration: those whose verdict scores have the "
        "highest variance.",
    )
    minVariance: float = Field(
        0.0, ge=0.0, le=1e18,
        description="Only responses whose verdict-score variance is above this (0: any disagreement).",
    )
    maxVerdicts: int = Field(
        4, ge=2, le=16,
        description="Verdicts of one response compared with each other (every pair, in both orders: "
        "maxVerdicts x (maxVerdicts - 1) meta-judge prompts per response).",
    )
    template: Optional[Annotated[str, _template_validator(META_JUDGE_PLACEHOLDERS)]] = Field(
        None, max_length=65536,
        description="Meta-judge prompt with {prompt}, {response}, {first} and {second}; default: a built-in "
        "comparison of two judgments.",
    )
    winnerPattern: str = Field(
        DEFAULT_WINNER_PATTERN, min_length=1, max_length=1000,
        description="RE2 regular expression (case-insensitive) whose first group captures A, B or tie; the last "
        "match counts.",
    )
    maxShare: float = Field(
        0.15, ge=0.0, lt=1.0,
        description="Judge-preference pairs are at most this share (0-1) of the iteration's DPO pairs.",
    )
    maxClassShare: float = Field(
        0.4, gt=0.0, le=1.0,
        description="No score class (the chosen verdict's score, rounded) is more than this share of the "
        "judge-preference pairs, so the judge is not taught to give every response one score.",
    )
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="Sampling temperature; 0 = greedy.")
    maxNewTokens: int = Field(192, ge=1, le=131072, description="Longest meta-judgment in tokens.")

    @field_validator("winnerPattern")
    @classmethod
    def _winner(cls, v: str) -> str:
        return _winner_pattern(v)

    @property
    def prompt_template(self) -> str:
        return self.template or DEFAULT_META_JUDGE_TEMPLATE


_Rho = Annotated[float, Field(ge=0.0, le=1.0)]


class PairsSpec(_Model):
    minMargin: float = Field(
        0.0, ge=0.0, description="Keep a pair only if chosen - rejected mean score is above this (ties always dropped)."
    )
    lengthControl: Union[_Rho, list[_Rho]] = Field(
        0.0,
        description="Length-controlled pair selection (Wu et al. 2024), rho in [0, 1], or a list of one rho per "
        "iteration: chosen = the shortest finished response scored within rho of the top, rejected = the longest "
        "scored within rho of the bottom. 0 is the highest- against lowest-scored rule (docs/judging.md).",
    )

    def rho(self, iteration: int) -> float:
        """rho of iteration ``iteration`` (1..N)."""
        v = self.lengthControl
        return float(v[iteration - 1]) if isinstance(v, list) else float(v)


class FSDPSpec(_Model):
    """FSDP2 settings (``training.distributed: fsdp``): torch's ``fully_shard`` through
    accelerate, one wrapped unit per transformer block."""

    reshardAfterForward: bool = Field(
        True,
        description="Free each block's gathered parameters after its forward pass (FULL_SHARD, ZeRO-3-like: "
        "least memory). false keeps them until backward (SHARD_GRAD_OP, ZeRO-2-like: one all-gather fewer "
        "per step, the full parameters of every block held once).",
    )
    cpuOffload: bool = Field(
        False,
        description="Keep parameter shards, gradients and optimizer state in host memory and run the optimizer "
        "step on the CPU: fits a model several times larger than GPU memory, at a large cost in speed; "
        "size resources.<phase>.memory for it (docs/sizing.md).",
    )
    activationCheckpointing: bool = Field(
        False,
        description="Recompute each block's activations in backward instead of keeping them (FSDP's own "
        "checkpointing; use this, not training.gradientCheckpointing, with fsdp).",
    )


class TrainingSpec(_Model):
    beta: float = Field(0.1, gt=0.0, le=100.0, description="DPO beta.")
    learningRate: float = Field(1e-6, gt=0.0, le=1.0)
    epochs: float = Field(1.0, gt=0.0, le=1000.0)
    batchSize: int = Field(4, ge=1, le=4096, description="Per-device batch size.")
    gradientAccumulation: int = Field(1, ge=1, le=4096)
    maxLength: int = Field(1024, ge=8, le=1_048_576)
    maxSteps: Optional[int] = Field(None, ge=1)
    bf16: Optional[bool] = Field(
        None,
        description="bfloat16 mixed precision: bfloat16 autocast over float32 master weights (AdamW state in "
        "float32); default: on when a GPU is present. model.dtype does not change the training weights.",
    )
    pureBf16: bool = Field(
        False,
        description="Load and update the weights in bfloat16, with no float32 master copy: about half the memory of "
        "weights, gradients and optimizer state, but updates under bfloat16's resolution (about 0.4% of a weight) "
        "are rounded away; at DPO learning rates most weights then never change. See docs/precision.md.",
    )
    checkpointDtype: Literal["stored", "float32", "bfloat16"] = Field(
        "stored",
        description="dtype of the trained checkpoints: stored = the dtype the start model is stored in (a bf16 "
        "base gives bf16 checkpoints, half the bytes of float32). A bf16 checkpoint keeps an update only where it "
        "moves a weight by half a bf16 step; float32 keeps every update of the float32 master weights.",
    )
    precomputeRefLogProbs: bool = Field(
        False,
        description="Compute the DPO reference log-probs of every pair once before training, so no reference model "
        "is in memory during training (saves one copy of the weights in the training dtype).",
    )
    gradientCheckpointing: bool = Field(False)
    mode: Literal["full", "lora"] = Field("full", description="lora uses model.lora (or its defaults).")
    lossType: Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"] = Field(
        "sigmoid"
    )
    reference: Literal["current", "base"] = Field(
        "current", description="DPO reference model: current = M_t (the paper), base = the fixed base/SFT model."
    )
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Training seed (32-bit unsigned).")
    checkpointing: CheckpointingSpec = Field(
        default_factory=CheckpointingSpec, description="Intermediate checkpoints of the train phase (preemption)."
    )
    distributed: Literal["none", "fsdp", "deepspeed"] = Field(
        "none",
        description="How the sft and train phases use more than one GPU or node. none: one process "
        "(resources.<phase>.gpus and nodes at most 1). fsdp: torchrun starts one process per GPU of every "
        "pod (resources.<phase>.gpus x nodes processes; one per pod on CPU) and the model is sharded with "
        "FSDP2; batchSize stays per process, so the global batch is batchSize x processes x "
        "gradientAccumulation. deepspeed: refused, DeepSpeed is not in the worker image; use fsdp.",
    )
    fsdp: FSDPSpec = Field(default_factory=FSDPSpec, description="FSDP settings; read when distributed is fsdp.")


class StorageSpec(_Model):
    uri: StorageUri = Field(
        ...,
        description="Artifacts root, the run's own prefix: s3://bucket/prefix (never a bucket's root), "
        "file:///dir/run or a local path (never /); no '..', '.' or empty segments. "
        "Cannot change once set.",
    )
    endpoint: Optional[str] = Field(
        None, max_length=2048, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="S3 endpoint URL (S3-compatible stores): http(s)://host[:port][/path].",
    )
    region: Optional[str] = Field(None, max_length=64, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")
    credentialsSecret: Optional[str] = Field(
        None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_RE,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (operator only; read as secretKeyRefs).",
    )
    deleteOnRunDeletion: bool = Field(False, description="Delete the run's artifacts and checkpoints with the resource.")



# --- Kubernetes scheduling (used by the operator only; the local runner ignores them) ---


# Credentials travel only as secretKeyRefs; a plain env value would sit in the spec,
# the status and every Job for anyone who can read them.
CREDENTIAL_ENV = {"HF_TOKEN": "model.hubTokenSecret", "HUGGING_FACE_HUB_TOKEN": "model.hubTokenSecret",
                  "AWS_ACCESS_KEY_ID": "storage.credentialsSecret",
                  "AWS_SECRET_ACCESS_KEY": "storage.credentialsSecret",
                  "AWS_SESSION_TOKEN": "storage.credentialsSecret"}


class EnvVar(_Model):
    name: str = Field(..., min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$",
                      description="Not one the product sets or relies on (spec.RESERVED_ENV_NAMES and prefixes).")
    value: str = Field("", max_length=32768)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if reserved_env(v):
            raise ValueError(f"{v} is set by selfreward, Kubernetes or torch's launcher and may not be overridden "
                             "(see docs/gpu-scheduling.md#reserved-environment-variables)")
        return v

    @field_validator("name")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        if v in CREDENTIAL_ENV:
            raise ValueError(f"{v} is a credential: env values are plain text in the spec; "
                             f"name a Secret in {CREDENTIAL_ENV[v]} instead")
        return v


class Toleration(_Model):
    key: Optional[QualifiedName] = None
    operator: Optional[Literal["Exists", "Equal"]] = None
    value: Optional[LabelValue] = None
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    tolerationSeconds: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="Only with effect NoExecute.")

    @model_validator(mode="after")
    def _consistent(self) -> "Toleration":
        # the API server's own rules for a toleration
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists has no value")
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without a key needs operator Exists")
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds applies only to effect NoExecute")
        return self


class ScratchSpec(_Model):
    """The pod's scratch volume at /tmp: the hub cache, the fetched checkpoints (unless
    resources.modelCache is set) and the directory a trained model is saved to."""

    type: Literal["emptyDir", "ephemeral", "claim"] = Field(
        "emptyDir",
        description="emptyDir: node-local disk, limited to size; ephemeral: a generic ephemeral volume (a PVC "
        "made for the pod and deleted with it) of size from storageClassName; claim: the existing "
        "PersistentVolumeClaim claimName (shared by every pod of the phase).",
    )
    size: Optional[str] = Field(
        None, pattern=QUANTITY_RE,
        description="emptyDir sizeLimit or the ephemeral volume's storage request; default: from model.sizeGiB "
        "(the table in docs/storage.md), 20Gi without it.",
    )
    storageClassName: Optional[str] = Field(None, min_length=1, description="StorageClass of an ephemeral volume.")
    claimName: Optional[str] = Field(None, pattern=DNS_SUBDOMAIN_RE, max_length=253,
                                     description="The PersistentVolumeClaim of type claim.")

    @model_validator(mode="after")
    def _fits_type(self) -> "ScratchSpec":
        if self.type == "claim" and not self.claimName:
            raise ValueError("type claim needs claimName")
        if self.type != "claim" and self.claimName:
            raise ValueError(f"claimName is only for type claim (type is {self.type})")
        if self.type != "ephemeral" and self.storageClassName:
            raise ValueError(f"storageClassName is only for type ephemeral (type is {self.type})")
        if self.type == "claim" and self.size:
            raise ValueError("size does not apply to type claim (the claim has its own size)")
        return self


class ModelCacheSpec(_Model):
    """A cache of fetched models shared by the pods of a run: a model that generate fetched
    is not fetched again by judge. Entries are named by the checksum of the model's manifest
    (or listing) and written to a temporary name, then renamed, so concurrent pods are safe."""

    type: Literal["claim", "hostPath"] = Field(
        ...,
        description="claim: a ReadWriteMany PersistentVolumeClaim (works under Pod Security restricted); "
        "hostPath: a directory on each node (needs a namespace at Pod Security level privileged).",
    )
    claimName: Optional[str] = Field(None, pattern=DNS_SUBDOMAIN_RE, max_length=253,
                                     description="The PersistentVolumeClaim of type claim.")
    path: Optional[str] = Field(None, pattern=r"^/", description="The node directory of type hostPath.")

    @model_validator(mode="after")
    def _fits_type(self) -> "ModelCacheSpec":
        if self.type == "claim" and (not self.claimName or self.path):
            raise ValueError("type claim needs claimName (and no path)")
        if self.type == "hostPath" and (not self.path or self.claimName):
            raise ValueError("type hostPath needs path (and no claimName)")
        return self


class PhaseResources(_Model):
    """Pod settings of one phase's Jobs. Unset fields fall back to ``resources.default``."""

    gpus: Optional[int] = Field(None, ge=0, le=64, description="GPUs per pod.")
    nodes: Optional[int] = Field(
        None, ge=1, le=512,
        description="Pods that train together (sft and train only; needs training.distributed fsdp): an Indexed "
        "Job of this many pods plus a headless Service for the rendezvous; default 1.",
    )
    gpuResourceName: Optional[ExtendedResourceName] = Field(None, description="Extended resource name; default nvidia.com/gpu.")
    cpu: Optional[str] = Field(None, pattern=QUANTITY_RE)
    memory: Optional[str] = Field(None, pattern=QUANTITY_RE)
    shmSize: Optional[str] = Field(None, pattern=QUANTITY_RE, description="Memory-backed /dev/shm for NCCL/vLLM.")
    nodeSelector: Optional[dict[QualifiedName, LabelValue]] = Field(
        None, max_length=64, description="Node labels (Kubernetes label keys and values).")
    tolerations: Optional[list[Toleration]] = None
    affinity: Annotated[Optional[dict[str, Any]], AfterValidator(_affinity)] = Field(
        None, max_length=3, description="A core/v1 Affinity (nodeAffinity, podAffinity, podAntiAffinity), "
        "checked field by field at load.")
    priorityClassName: Optional[DnsSubdomain] = None
    env: Optional[list[EnvVar]] = None
    activeDeadlineSeconds: Optional[int] = Field(None, ge=1, le=INT32_MAX)
    scratch: Optional[ScratchSpec] = Field(
        None, description="The scratch volume at /tmp; a phase's own setting replaces the default's whole."
    )

    @field_validator("env")
    @classmethod
    def _unique_env(cls, v: Optional[list[EnvVar]]) -> Optional[list[EnvVar]]:
        names = [e.name for e in v or []]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sets {', '.join(dup)} more than once")
        return v


class ResourcesSpec(_Model):
    default: PhaseResources = Field(default_factory=PhaseResources)
    modelCache: Optional[ModelCacheSpec] = Field(None, description="Opt-in cache of fetched models shared by the pods.")
    sft: Optional[PhaseResources] = None
    instruct: Optional[PhaseResources] = None
    generate: Optional[PhaseResources] = None
    judge: Optional[PhaseResources] = None
    metajudge: Optional[PhaseResources] = None
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
    maxRetries: int = Field(2, ge=0, le=RETRIES_MAX, description="Job re-creations per step before the run fails.")
    backoffSeconds: int = Field(30, ge=0, le=86400, description="First retry delay; doubles per retry.")
    podBackoffLimit: int = Field(1, ge=0, le=100, description="The Job's own backoffLimit (pod restarts).")


class KueueSpec(_Model):
    queueName: str = Field(
        ..., min_length=1, max_length=63, pattern=DNS_SUBDOMAIN_RE,
        description="kueue.x-k8s.io/queue-name (a LocalQueue's name, also a label value); Jobs are created suspended.",
    )


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
    template: Optional[Annotated[str, _template_validator(EVALUATOR_PLACEHOLDERS)]] = Field(
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
        return _winner_pattern(v)

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
    onJudgeSaturated: Optional[Literal["warn", "stop", "rollback"]] = Field(
        None,
        description="Also fail the gate, with this action, when the iteration's judge phase was saturated "
        "(judge.saturation); default: a saturated judge only records its JudgeSaturated Warning.",
    )


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


class BudgetSpec(_Model):
    """What the run's GPU time may cost. GPU-seconds are counted from the pods' start and
    finish times times the GPUs each pod requested (see docs/gpu-scheduling.md#budgets)."""

    maxGpuHours: Optional[float] = Field(
        None, gt=0, le=1e9,
        description="GPU-hours the run may use. Before a step starts, its cost is estimated from the same phase "
        "of the previous iteration (no estimate: the step starts); a step that would cross this is not started "
        "and the run ends Succeeded with reason BudgetExhausted and the best model so far (Failed when nothing "
        "was trained yet). Raising it resumes the run.",
    )
    pricePerGpuHour: Optional[float] = Field(
        None, gt=0, le=1e9,
        description="Price of one GPU-hour, a unit-free number (write it in your own currency): with it, status, "
        "history and metrics show the cost beside the GPU-seconds.",
    )


class RunSpec(_Model):
    """spec of a SelfRewardRun."""

    model: ModelSpec
    prompts: PromptsSpec
    iterations: int = Field(3, ge=1, le=ITERATIONS_MAX, description="Self-rewarding iterations after iteration 0.")
    sft: Optional[SFTSpec] = Field(None, description="Optional iteration 0 (SFT on IFT + EFT data) that makes M_1.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    metaJudge: Optional[MetaJudgeSpec] = Field(
        None, description="Optional meta-judge after the judge (Meta-Rewarding): judge-preference pairs join DPO."
    )
    pairs: PairsSpec = Field(default_factory=PairsSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    eval: Optional[EvalSpec] = Field(None, description="Optional evaluation after each iteration (and of M_1).")
    budget: Optional[BudgetSpec] = Field(
        None, description="GPU-hour budget and price; the operator and `selfreward run` stop before a step that "
        "would cross it.")
    storage: StorageSpec
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of prompt sampling and generation (32-bit unsigned).")
    ablation: Literal["none", "swapPairs", "randomJudge"] = Field(
        "none", description="For experiments only (bench/reproduce.py): swapPairs trains DPO with every pair's "
        "chosen and rejected swapped; randomJudge replaces the model's verdicts by random scores. none: the "
        "self-rewarding method itself.",
    )
    suspend: bool = Field(False, description="Stop creating Jobs and suspend running ones (operator).")
    # Kubernetes-only settings
    image: Optional[str] = Field(None, max_length=4096, pattern=r"^[^\s]+$",
                                 description="Worker image; default: the operator's configured worker image.")
    imagePullPolicy: Optional[Literal["Always", "IfNotPresent", "Never"]] = None
    imagePullSecrets: Optional[list[DnsSubdomain]] = Field(None, max_length=16, description="Secret names.")
    serviceAccountName: Optional[DnsSubdomain] = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    kueue: Optional[KueueSpec] = None
    ttlSecondsAfterFinished: Optional[int] = Field(86400, ge=0, le=INT32_MAX)

    @model_validator(mode="after")
    def _training_topology(self) -> "RunSpec":
        # Only combinations that can run are accepted, each refusal naming the field to
        # change; only the phases this run has are checked (no sft phase without spec.sft).
        for phase in TRAINING_PHASES:
            if phase == "sft" and not self.sft_enabled:
                continue
            own = getattr(self.resources, phase)
            res = self.resources.for_phase(phase)
            gpus, nodes = res.gpus or 0, res.nodes or 1
            if self.training.distributed == "none" and (gpus > 1 or nodes > 1):
                where = (f"resources.{phase}.gpus" if gpus > 1 and own is not None and own.gpus is not None
                         else "resources.default.gpus" if gpus > 1
                         else f"resources.{phase}.nodes")
                value = gpus if gpus > 1 else nodes
                raise FieldError(where,
                    f"{where} is {value} for the {phase} phase but training.distributed is none (one process): "
                    f"set training.distributed to fsdp, or resources.{phase}.gpus and nodes to 1"
                )
        for phase in ("default",) + tuple(p for p in PHASES if p not in TRAINING_PHASES):
            res = getattr(self.resources, phase)
            if res is not None and (res.nodes or 1) > 1:
                raise FieldError(f"resources.{phase}.nodes",
                    f"resources.{phase}.nodes is {res.nodes}: only the sft and train phases run across nodes "
                    "(generation and judging scale with shards); set nodes on resources.train / resources.sft"
                )
        if self.training.distributed == "deepspeed":
            raise FieldError("training.distributed",
                "training.distributed deepspeed is not supported: DeepSpeed is not in the worker image; use "
                "fsdp (training.fsdp.reshardAfterForward true shards like ZeRO-3)"
            )
        if self.training.distributed == "fsdp" and self.training.gradientCheckpointing:
            raise FieldError("training.gradientCheckpointing",
                "training.gradientCheckpointing with training.distributed fsdp: use "
                "training.fsdp.activationCheckpointing (FSDP's own checkpointing) instead"
            )
        return self

    @model_validator(mode="after")
    def _colocated_judge(self) -> "RunSpec":
        # the twins of the CRD's CEL rules (crd._COLOCATE): one pod, one engine, one M_t
        # for a generate shard and the judge shard after it
        if not self.judge.colocate:
            return self
        why = "judge.colocate judges each generate shard in its own pod on the model it loaded"
        if self.judge.shards != self.generation.shards:
            raise FieldError("judge.shards", f"judge.shards is {self.judge.shards} but generation.shards is "
                             f"{self.generation.shards}: {why}, so set both to the same number")
        if self.judge.backend != self.generation.backend:
            raise FieldError("judge.backend", f"judge.backend is {self.judge.backend} but generation.backend is "
                             f"{self.generation.backend}: {why} (one engine), so set both alike")
        if self.judge.vllm != self.generation.vllm:
            raise FieldError("judge.vllm", f"judge.vllm differs from generation.vllm: {why} (one engine, built "
                             "once), so give both the same settings")
        if self.resources.judge is not None:
            raise FieldError("resources.judge", f"resources.judge is set but {why}: the judge runs in the "
                             "generate pods, so move these settings to resources.generate")
        return self

    @model_validator(mode="after")
    def _vllm_needs_a_gpu(self) -> "RunSpec":
        # the twin of the CRD's CEL rule (crd._gpus_rule): vLLM runs on CUDA only; a
        # colocated judge runs in the generate pods, whose check is generation's (same backend)
        for section, phase in (("generation", "generate"), ("judge", "judge"), ("metaJudge", "metajudge")):
            if section == "judge" and self.judge.colocate:
                continue
            sampler = getattr(self, section)
            if sampler is not None and sampler.backend == "vllm" and not self.resources.for_phase(phase).gpus:
                raise FieldError(f"{section}.backend", f"vllm needs a GPU: set resources.{phase}.gpus or "
                                 "resources.default.gpus to 1 or more")
        # the eval phase answers with generation.backend and judges with judge.backend
        if self.eval_enabled and "vllm" in (self.generation.backend, self.judge.backend) \
                and not self.resources.for_phase("eval").gpus:
            raise FieldError("eval", "eval runs generation.backend and judge.backend: with vllm, set "
                             "resources.eval.gpus or resources.default.gpus to 1 or more")
        return self

    @model_validator(mode="after")
    def _shards_have_prompts(self) -> "RunSpec":
        # With perIteration set, an iteration has at most perIteration seed prompts plus
        # the self-instructed ones; a shard beyond that would have no prompt to work on.
        if self.prompts.perIteration is None:
            return self
        most = self.prompts.perIteration + (self.prompts.selfInstruct.count if self.instruct_enabled else 0)
        for section in ("generation", "judge"):
            shards = getattr(self, section).shards
            if shards > most:
                raise FieldError(f"{section}.shards", f"{shards} shards for at most {most} prompts per iteration "
                                 "(prompts.perIteration, plus prompts.selfInstruct.count when on): a shard would "
                                 "have nothing to do")
        return self

    @model_validator(mode="after")
    def _length_control_per_iteration(self) -> "RunSpec":
        # the twin of the CRD's CEL rule on spec (crd.VALIDATIONS)
        rho = self.pairs.lengthControl
        if isinstance(rho, list) and len(rho) != self.iterations:
            raise FieldError("pairs.lengthControl", f"a list of {len(rho)} values for {self.iterations} iterations: "
                             "give one rho per iteration, or one number for all")
        return self

    def training_world(self, phase: str) -> tuple[int, int]:
        """(nodes, processes per node) of a training phase: one process per GPU of a pod
        (one on CPU) with training.distributed fsdp, else one process."""
        if self.training.distributed == "none":
            return 1, 1
        res = self.resources.for_phase(phase)
        return res.nodes or 1, max(1, res.gpus or 0)

    # --- derived facts used by planning ---
    @property
    def sft_enabled(self) -> bool:
        return self.sft is not None and self.sft.enabled

    @property
    def instruct_enabled(self) -> bool:
        si = self.prompts.selfInstruct
        return si is not None and si.enabled

    @property
    def meta_judge_enabled(self) -> bool:
        return self.metaJudge is not None and self.metaJudge.enabled

    @property
    def eval_enabled(self) -> bool:
        return self.eval is not None and self.eval.enabled


class FieldError(ValueError):
    """A model-level rule's failure that names the field it is about, relative to the model."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


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


_TYPE_ERRORS = ("int_type", "float_type", "bool_type", "string_type", "dict_type", "list_type", "model_type",
                "literal_error", "finite_number")


def _messages(e: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    errors = []
    for err in e.errors():
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        loc = _loc(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc = cause.field if loc == "spec" else f"{loc}.{cause.field}"
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] in _TYPE_ERRORS and err["type"] != "literal_error":
            shown = repr(err["input"])
            msg += f" (got {type(err['input']).__name__} {shown[:60]})"
        errors.append((f"{prefix}{loc}" if prefix else loc, msg))
    return errors


def parse_spec(data: Any, source: str = "spec") -> RunSpec:
    """Validate a spec mapping; raise SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError([("spec", f"expected a mapping, got {type(data).__name__}")], source)
    too_big = _size_problem(data, MAX_SPEC_DEPTH, MAX_SPEC_NODES, MAX_SPEC_CHARS)
    if too_big:
        raise SpecError([too_big], source)
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_messages(e), source) from None
    except (RecursionError, MemoryError) as e:  # bounded above; never a traceback either way
        raise SpecError([("spec", f"cannot be validated: {type(e).__name__}")], source) from None


# --- the manifest around the spec -------------------------------------------------------

API_VERSION = "selfreward.dev/v1alpha1"
KIND = "SelfRewardRun"
# The API server checks that a custom resource's name is a DNS subdomain (253). Job and
# pod names derived from it are cut and hashed by jobs.job_name to fit 63, so any name
# the API server accepts works: no tighter bound here.
MAX_RUN_NAME_LENGTH = 253


def metadata_problems(meta: Any) -> list[tuple[str, str]]:
    """What the API server, or the Jobs named after the run, would refuse in metadata."""
    if not isinstance(meta, dict):
        return [("metadata", f"expected a mapping, got {type(meta).__name__}")]
    out = []
    name, generate = meta.get("name"), meta.get("generateName")
    if name is None and generate is None:
        out.append(("metadata.name", "required (or metadata.generateName)"))
    for field, value, room in (("name", name, 0), ("generateName", generate, 5)):
        if value is None:
            continue
        limit = MAX_RUN_NAME_LENGTH - room  # the API server appends 5 characters to generateName
        if not isinstance(value, str):
            out.append((f"metadata.{field}", f"must be a string, got {type(value).__name__}"))
        elif len(value) > limit:
            out.append((f"metadata.{field}", f"{len(value)} characters; at most {limit} (a DNS subdomain)"))
        elif not re.match(DNS_SUBDOMAIN_RE if field == "name" else r"^[a-z0-9]([-.a-z0-9]*)?$", value):
            out.append((f"metadata.{field}", f"{value[:80]!r} is not a DNS subdomain (lowercase letters, digits, "
                        "'-' and '.', each part starting and ending with a letter or digit)"))
    ns = meta.get("namespace")
    if ns is not None and not (isinstance(ns, str) and len(ns) <= 63 and re.match(DNS_LABEL_RE, ns)):
        out.append(("metadata.namespace", f"{str(ns)[:80]!r} is not a DNS label"))
    return out


def spec_from_document(doc: Any, source: str = "spec", require_name: bool = False) -> tuple[RunSpec, dict]:
    """Accept a bare spec or a ``kind: SelfRewardRun`` manifest; return (spec, metadata).
    A manifest's apiVersion and kind are checked; with ``require_name`` (selfreward
    validate: as the API server will check it) also its metadata, name required. A worker
    reading its run document does not judge the name again: the cluster accepted it."""
    if isinstance(doc, dict) and ("kind" in doc or "apiVersion" in doc):
        errors: list[tuple[str, str]] = []
        if doc.get("kind") != KIND:
            errors.append(("kind", f"expected {KIND}, got {doc.get('kind')!r}"))
        if doc.get("apiVersion") != API_VERSION:
            errors.append(("apiVersion", f"expected {API_VERSION}, got {doc.get('apiVersion')!r}"))
        meta = doc.get("metadata")
        if require_name:
            errors += metadata_problems(meta if meta is not None else {})
        elif meta is not None and not isinstance(meta, dict):
            errors.append(("metadata", f"expected a mapping, got {type(meta).__name__}"))
        extra = sorted(str(k) for k in doc if k not in ("apiVersion", "kind", "metadata", "spec", "status"))
        errors += [(k, "unknown field") for k in extra]
        try:
            spec = parse_spec(doc.get("spec"), source)
        except SpecError as e:
            errors += e.errors  # named as in a bare spec: storage.uri is spec.storage.uri
            spec = None
        if errors:
            raise SpecError(errors, source)
        return spec, dict(meta or {})
    return parse_spec(doc, source), {}


# --- YAML, bounded ----------------------------------------------------------------------

MAX_FILE_BYTES = 8 * 1024 * 1024


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the limits a spec needs: nesting depth while composing
    (before Python's recursion limit), no duplicate keys (kubectl refuses them), and the
    size each document expands to once its aliases are followed (a "billion laughs"
    document is a few lines that expand to gigabytes when dumped or validated)."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_SPEC_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nests deeper than {MAX_SPEC_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                duplicate = False  # an unhashable key: the constructor names it below
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key) if not isinstance(key, (list, dict)) else None
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where a float needs a dot: "1e-6" would be the string "1e-6".
# kubectl's YAML (go-yaml), YAML 1.2 and JSON read it as a number, and so does a spec
# file here (tried after YAML 1.1's own int and float rules, so "12" stays an int).
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _check_expansion(root) -> None:
    """Nodes, characters and depth of the document with every alias expanded, computed
    over the node graph once per distinct node (linear in the document, not in its
    expansion); a node that contains itself is refused."""
    memo: dict[int, tuple[int, int, int]] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = ([k for pair in node.value for k in pair] if isinstance(node, yaml.MappingNode)
                        else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
            count, chars, depth = 1, (len(node.value) if isinstance(node, yaml.ScalarNode) else 0), 0
            for c in children:
                n, ch, d = memo[id(c)]
                count, chars, depth = count + n, chars + ch, max(depth, d)
            memo[key] = (count, chars, depth + 1)
            if count > MAX_SPEC_NODES:
                raise yaml.composer.ComposerError(None, None, f"expands to more than {MAX_SPEC_NODES} values "
                                                  "(YAML aliases)", node.start_mark)
            if chars > MAX_SPEC_CHARS:
                raise yaml.composer.ComposerError(None, None, f"expands to more than {MAX_SPEC_CHARS} characters "
                                                  "(YAML aliases)", node.start_mark)
            if depth + 1 > MAX_SPEC_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nests deeper than {MAX_SPEC_DEPTH} levels "
                                                  "(YAML aliases)", node.start_mark)
            continue
        if key in memo:
            continue
        if key in on_path:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it", node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        if isinstance(node, yaml.MappingNode):
            stack.extend((c, False) for pair in node.value for c in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((c, False) for c in node.value)


class SpecFileError(SpecError):
    """The spec file itself cannot be read (missing, a directory, no permission)."""


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SpecFileError([("file", f"cannot read: {e.strerror or e}")], str(path)) from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError([("file", f"is larger than {MAX_FILE_BYTES} bytes")], str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError([("file", f"is not UTF-8 text (byte {e.start})")], str(path)) from None


def _yaml_error(e: BaseException) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return f"{where}{e.problem or e.context}"
    if isinstance(e, (RecursionError, MemoryError)):
        return f"cannot be read ({type(e).__name__})"
    return str(e)[:500]


def load_yaml_documents(text: str, source: str = "yaml") -> list[Any]:
    """Every document of a YAML stream, with the loader's limits; SpecError naming the
    line on any failure (never a traceback, never an unbounded expansion)."""
    try:
        return list(yaml.load_all(text, Loader=_BoundedLoader))
    except (yaml.YAMLError, RecursionError, MemoryError, ValueError, TypeError) as e:
        raise SpecError([("yaml", _yaml_error(e))], source) from None


def load_spec_documents(path: str | Path) -> list[Any]:
    """Every YAML document of a file, loaded within the limits (not validated)."""
    return load_yaml_documents(_read_text(Path(path)), str(path))


def load_spec_file(path: str | Path) -> tuple[RunSpec, dict]:
    """Load a YAML file (bare spec or SelfRewardRun manifest). Relative local URIs in the
    spec are resolved against the file's directory, so examples run from anywhere."""
    path = Path(path)
    docs = [d for d in load_spec_documents(path) if d is not None]
    if len(docs) != 1:
        raise SpecError([("yaml", f"expected one document, found {len(docs)}")], str(path))
    return load_document(docs[0], path)


def load_document(doc: Any, path: Path, source: Optional[str] = None,
                  require_name: bool = False) -> tuple[RunSpec, dict]:
    """One loaded document of the file ``path``: validated, relative URIs resolved."""
    source = source or str(path)
    spec, meta = spec_from_document(doc, source, require_name)
    base = path.parent.resolve()
    storage = _resolve(spec.storage.uri, base)
    problem = run_prefix_problem(storage)
    if problem:
        raise SpecError([("storage.uri", f"resolves to {storage!r}, which {problem}")],
                        source)
    try:
        return resolve_relative_uris(spec, base), meta
    except ValidationError as e:
        raise SpecError([("spec", f"a relative path resolves to an invalid one: {msg}") for _, msg in _messages(e)],
                        source) from None


def is_run_manifest(doc: Any) -> bool:
    """A document that claims to be a SelfRewardRun (whatever else is wrong with it)."""
    return isinstance(doc, dict) and doc.get("kind") == KIND


# --- what the API server pruned ----------------------------------------------------------

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
PRUNED_FIELD = "unknown field: the API server dropped it; fix the manifest"
_MAX_LAST_APPLIED = 2 * 1024 * 1024


@lru_cache(maxsize=256)
def _pruned_fields(raw: str) -> tuple[tuple[str, str], ...]:
    try:
        applied = json.loads(raw)
    except (ValueError, RecursionError):
        return ()
    if not isinstance(applied, dict) or not isinstance(applied.get("spec"), dict):
        return ()
    spec = applied["spec"]
    if _size_problem(spec, MAX_SPEC_DEPTH, MAX_SPEC_NODES, MAX_SPEC_CHARS):
        return ()
    try:
        RunSpec.model_validate(spec)
    except ValidationError as e:
        return tuple((f"spec.{_loc(err['loc'])}", PRUNED_FIELD)
                     for err in e.errors() if err["type"] == "extra_forbidden")
    except (RecursionError, MemoryError):
        return ()
    return ()


def applied_configuration_problems(meta: Any) -> list[tuple[str, str]]:
    """Unknown fields in what ``kubectl apply`` (client-side, also Argo CD's default) sent.

    The CRD's structural schema prunes unknown fields silently when a client does not ask
    for strict field validation, so a typo (``gpu:`` for ``gpus:``) would run with the
    default. kubectl keeps the manifest it sent in the last-applied-configuration
    annotation; a field there that the spec model does not know was pruned. Only unknown
    fields count: other errors in an old annotation are not the stored object's."""
    annotations = (meta or {}).get("annotations") if isinstance(meta, dict) else None
    raw = (annotations or {}).get(LAST_APPLIED) if isinstance(annotations, dict) else None
    if not isinstance(raw, str) or len(raw) > _MAX_LAST_APPLIED:
        return []
    return list(_pruned_fields(raw))


def check_applied_configuration(meta: Any) -> None:
    """SpecError when the last applied manifest had fields the API server pruned."""
    problems = applied_configuration_problems(meta)
    if problems:
        raise SpecError(problems, "last-applied-configuration")


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
