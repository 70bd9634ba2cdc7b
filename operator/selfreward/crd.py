"""The SelfRewardRun CustomResourceDefinition, generated from the spec and status models.

``spec.RunSpec`` and ``status.RunStatus`` are the source of truth; this module turns
their pydantic JSON schemas into a Kubernetes *structural* OpenAPI v3 schema:

- ``$ref`` is inlined (the API server accepts no references);
- ``Optional[X]`` (``anyOf: [X, null]``) becomes plain ``X``; ``nullable: true`` is kept
  only where null means something other than "absent" (a field whose default is not null,
  such as ``ttlSecondsAfterFinished``: writing ``null`` there turns the TTL off);
- draft 2020-12 numeric ``exclusiveMinimum: 0`` becomes OpenAPI's ``minimum: 0`` plus
  ``exclusiveMinimum: true``;
- defaults made by ``default_factory`` are written too (``{}`` for a nested settings
  object, so the API server fills in that object's own defaults);
- ``dict[str, str]`` becomes ``additionalProperties: {type: string}``, a free-form dict
  (``affinity``) ``x-kubernetes-preserve-unknown-fields: true``;
- rules that a JSON schema cannot state are CEL ``x-kubernetes-validations``.

``selfreward crd`` (and ``make crd``) writes :func:`crd_yaml` to
``crds/selfreward.dev_selfrewardruns.yaml``; a test fails when the committed file drifts.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault

from .spec import META_JUDGE_PLACEHOLDERS, PHASES, TRAINING_PHASES, RunSpec
from .status import HISTORY_LIMIT, RunStatus

GROUP = "selfreward.dev"
VERSION = "v1alpha1"
KIND = "SelfRewardRun"
PLURAL = "selfrewardruns"
SINGULAR = "selfrewardrun"
SHORT_NAMES = ["srr"]
CATEGORIES = ["selfreward"]
CRD_NAME = f"{PLURAL}.{GROUP}"
API_VERSION = f"{GROUP}/{VERSION}"

# Bounds the API server needs and the status model does not state (the operator keeps
# both lists short; see status.HISTORY_LIMIT and status.CONDITION_TYPES).
MAX_CONDITIONS = 16

_SCALAR_KEYS = ("type", "format", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
                "minItems", "maxItems", "minProperties", "maxProperties", "multipleOf")


class _FactoryDefaults(GenerateJsonSchema):
    """Pydantic's generator, with defaults made by ``default_factory`` written as well."""

    def get_default_value(self, schema) -> Any:
        if "default_factory" in schema and not schema.get("default_factory_takes_data"):
            value = schema["default_factory"]()
            if isinstance(value, BaseModel):
                # Only what differs from the model's own defaults: usually {}.
                return value.model_dump(mode="json", exclude_defaults=True)
            return value
        return schema.get("default", NoDefault)


class SchemaError(ValueError):
    """A part of the pydantic schema that has no structural OpenAPI equivalent."""


def _resolve(node: dict, defs: dict) -> dict:
    ref = node.get("$ref")
    if ref is None:
        return node
    prefix = "#/$defs/"
    if not ref.startswith(prefix):
        raise SchemaError(f"unsupported $ref {ref!r}")
    target = dict(defs[ref[len(prefix):]])
    # Keys written beside the $ref (a field's description or default) win over the target's.
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return target


def _convert(node: dict, defs: dict, where: str, *, with_defaults: bool = True) -> dict:
    node = _resolve(node, defs)

    if "anyOf" in node or "oneOf" in node:
        options = node.get("anyOf") or node.get("oneOf")
        real = [o for o in options if o.get("type") != "null"]
        has_null = len(real) < len(options)
        if _scalar_or_list(real, defs):
            # "a number, or a list of them" (pairs.lengthControl) has no structural form: the
            # value is kept as written, typed and bounded by the spec model at load, its
            # cross-field rule a CEL twin (VALIDATIONS)
            out = {"x-kubernetes-preserve-unknown-fields": True}
            if "description" in node:
                out["description"] = node["description"]
            if with_defaults and node.get("default") is not None:
                out["default"] = copy.deepcopy(node["default"])
            return out
        if len(real) != 1:
            raise SchemaError(f"{where}: a union of {len(real)} types has no structural form")
        outer = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
        inner = _resolve(real[0], defs)
        merged = {k: v for k, v in inner.items() if k not in ("description", "default", "title")}
        merged.update(outer)
        if "description" not in merged and "description" in inner:
            merged["description"] = inner["description"]
        out = _convert(merged, defs, where, with_defaults=with_defaults)
        if has_null and with_defaults and out.get("default") is not None:
            # null must stay distinguishable from "absent" (which the default fills).
            out["nullable"] = True
        return out

    out: dict[str, Any] = {}
    if "description" in node:
        out["description"] = node["description"]
    for key in _SCALAR_KEYS:
        if key in node:
            out[key] = node[key]
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in node:
            if bound in node:
                raise SchemaError(f"{where}: both {bound} and {key}")
            out[bound] = node[key]
            out[key] = True

    kind = node.get("type")
    if kind is None:
        raise SchemaError(f"{where}: no type")
    if kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {
                name: _convert(sub, defs, f"{where}.{name}", with_defaults=with_defaults)
                for name, sub in props.items()
            }
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = _convert(extra, defs, f"{where}.*", with_defaults=with_defaults)
        else:
            # A free-form mapping (dict[str, Any]): kept as written.
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        if "items" not in node:
            raise SchemaError(f"{where}: array without items")
        out["items"] = _convert(node["items"], defs, f"{where}[]", with_defaults=with_defaults)
    if with_defaults and "default" in node and node["default"] is not None:
        out["default"] = copy.deepcopy(node["default"])
    return out


def _scalar_or_list(options: list[dict], defs: dict) -> bool:
    """A union of one scalar type and an array of that same type."""
    if len(options) != 2:
        return False
    a, b = (_resolve(o, defs) for o in options)
    if a.get("type") == "array":
        a, b = b, a
    return (b.get("type") == "array" and a.get("type") in ("number", "integer", "string")
            and _resolve(b.get("items", {}), defs).get("type") == a.get("type"))


def _at(schema: dict, path: tuple[str, ...]) -> dict:
    node = schema
    for name in path:
        node = node["properties"][name]
    return node


_COLOCATED = "has(self.judge) && has(self.judge.colocate) && self.judge.colocate"


def _has_gpus(phase: str) -> str:
    """CEL: the phase's pods request a GPU; its own ``resources.<phase>.gpus`` wins over
    ``resources.default.gpus`` (ResourcesSpec.for_phase)."""
    own = f"self.resources.{phase}"
    dflt = "self.resources.default"
    return (f"(has(self.resources) && ((has({own}) && has({own}.gpus)) ? {own}.gpus >= 1 : "
            f"(has({dflt}) && has({dflt}.gpus) && {dflt}.gpus >= 1)))")


def _uses_vllm(section: str) -> str:
    return f"(has(self.{section}) && has(self.{section}.backend) && self.{section}.backend == 'vllm')"


def _gpus_rule(section: str, phase: str) -> dict:
    """vLLM runs on CUDA only: the phase's pods must request a GPU. A colocated judge runs
    in the generate pods: generation's rule covers it."""
    skip = f"({_COLOCATED}) || " if section == "judge" else ""
    return {
        "rule": f"{skip}!{_uses_vllm(section)} || {_has_gpus(phase)}",
        "message": f"{section}.backend vllm needs a GPU: set resources.{phase}.gpus or resources.default.gpus to 1 or more",
        "fieldPath": f".{section}.backend",
        "reason": "FieldValueInvalid",
    }


# The eval phase answers with generation.backend and judges with judge.backend
# (worker/eval.py), so a vLLM backend needs GPUs on the eval pods too.
_EVAL_GPUS_RULE = {
    "rule": (f"!has(self.eval) || (has(self.eval.enabled) && !self.eval.enabled) || "
             f"!({_uses_vllm('generation')} || {_uses_vllm('judge')}) || {_has_gpus('eval')}"),
    "message": "eval runs generation.backend and judge.backend: with vllm, set resources.eval.gpus or "
               "resources.default.gpus to 1 or more",
    "fieldPath": ".eval",
    "reason": "FieldValueInvalid",
}


def _one_process_rule(phase: str) -> dict:
    """training.distributed none runs the phase as one process: at most one GPU and one
    node, the phase's own value winning over resources.default's. The sft rule applies
    only when the run has iteration 0 (spec.sft set and enabled), as in RunSpec."""
    own = f"self.resources.{phase}"
    dflt = "self.resources.default"

    def value(field: str) -> str:
        return (f"((has({own}) && has({own}.{field})) ? {own}.{field} : "
                f"((has({dflt}) && has({dflt}.{field})) ? {dflt}.{field} : 0))")

    has_phase = "" if phase == "train" else "!has(self.sft) || (has(self.sft.enabled) && !self.sft.enabled) || "
    return {
        "rule": (
            f"{has_phase}(has(self.training) && has(self.training.distributed) && self.training.distributed != 'none') || "
            f"!has(self.resources) || ({value('gpus')} <= 1 && {value('nodes')} <= 1)"
        ),
        "message": f"resources.{phase}.gpus and nodes above 1 need training.distributed fsdp (none is one process)",
        "fieldPath": f".resources.{phase}",
        "reason": "FieldValueInvalid",
    }


def _same_as_generation(field: str, default: str) -> str:
    """judge.<field> equals generation.<field>, each at its default when unset."""
    return (f"(has(self.judge.{field}) ? self.judge.{field} : {default}) == "
            f"((has(self.generation) && has(self.generation.{field})) ? self.generation.{field} : {default})")


# judge.colocate: the twins of RunSpec._colocated_judge (one pod, one engine per shard)
_COLOCATE = [
    {"rule": f"!({_COLOCATED}) || {_same_as_generation('shards', '1')}",
     "message": "judge.colocate needs judge.shards equal to generation.shards (each generate pod judges its shard)",
     "fieldPath": ".judge.shards", "reason": "FieldValueInvalid"},
    {"rule": f"!({_COLOCATED}) || {_same_as_generation('backend', chr(39) + 'transformers' + chr(39))}",
     "message": "judge.colocate needs judge.backend equal to generation.backend (one engine)",
     "fieldPath": ".judge.backend", "reason": "FieldValueInvalid"},
    {"rule": (f"!({_COLOCATED}) || (has(self.judge.vllm) ? (has(self.generation) && has(self.generation.vllm) && "
              "self.generation.vllm == self.judge.vllm) : !(has(self.generation) && has(self.generation.vllm)))"),
     "message": "judge.colocate needs judge.vllm equal to generation.vllm (one engine)",
     "fieldPath": ".judge.vllm", "reason": "FieldValueInvalid"},
    {"rule": f"!({_COLOCATED}) || !has(self.resources) || !has(self.resources.judge)",
     "message": "judge.colocate runs the judge in the generate pods: set resources.generate, not resources.judge",
     "fieldPath": ".resources.judge", "reason": "FieldValueInvalid"},
]


_ONE_NODE = [{"rule": "!has(self.nodes) || self.nodes <= 1",
              "message": "nodes above 1: only resources.train and resources.sft run across nodes"}]


# Rules per schema node, as paths of property names from the CRD's version schema root.
VALIDATIONS: dict[tuple[str, ...], list[dict]] = {
    ("spec",): [_gpus_rule("generation", "generate"), _gpus_rule("judge", "judge"), _EVAL_GPUS_RULE,
                _gpus_rule("metaJudge", "metajudge"),
                _one_process_rule("train"), _one_process_rule("sft"), *_COLOCATE, {
                    "rule": "!has(self.pairs) || !has(self.pairs.lengthControl) || "
                            "type(self.pairs.lengthControl) != list || size(self.pairs.lengthControl) == self.iterations",
                    "message": "pairs.lengthControl: a list needs one rho per iteration (spec.iterations values), "
                               "or give one number for all",
                    "fieldPath": ".pairs.lengthControl",
                    "reason": "FieldValueInvalid",
                }],
    ("spec", "training"): [{
        "rule": "!has(self.distributed) || self.distributed != 'deepspeed'",
        "message": "training.distributed deepspeed is not supported (DeepSpeed is not in the worker image): use fsdp",
        "fieldPath": ".distributed",
    }],
    **{("spec", "resources", phase): _ONE_NODE for phase in ("default",) + tuple(p for p in PHASES if p not in TRAINING_PHASES)},
    ("spec", "judge"): [{
        "rule": "!has(self.minScore) || !has(self.maxScore) || self.minScore < self.maxScore",
        "message": "judge.minScore must be below judge.maxScore",
    }],
    ("spec", "judge", "template"): [
        {"rule": "self.contains('{prompt}')", "message": "judge.template must contain the placeholder {prompt}"},
        {"rule": "self.contains('{response}')", "message": "judge.template must contain the placeholder {response}"},
    ],
    ("spec", "metaJudge", "template"): [
        {"rule": f"self.contains('{{{name}}}')", "message": f"metaJudge.template must contain the placeholder {{{name}}}"}
        for name in META_JUDGE_PLACEHOLDERS
    ],
    ("spec", "prompts", "selfInstruct"): [{
        "rule": "!has(self.minChars) || !has(self.maxChars) || self.minChars <= self.maxChars",
        "message": "prompts.selfInstruct.minChars must not exceed maxChars",
    }],
    ("spec", "storage", "uri"): [
        {"rule": "self == oldSelf", "message": "storage.uri cannot change", "reason": "FieldValueForbidden"},
        {"rule": "!self.contains('://') || self.startsWith('s3://') || self.startsWith('file://')",
         "message": "storage.uri: use file://, s3:// or a local path"},
        {"rule": "self != 's3://'", "message": "storage.uri: an s3:// URI needs a bucket"},
    ],
}


def spec_schema() -> dict:
    raw = RunSpec.model_json_schema(schema_generator=_FactoryDefaults)
    return _convert(raw, raw.get("$defs", {}), "spec")


def status_schema() -> dict:
    raw = RunStatus.model_json_schema()
    # The operator writes status; the server should not invent any of it.
    out = _convert(raw, raw.get("$defs", {}), "status", with_defaults=False)
    props = out["properties"]
    props["conditions"].update({
        "maxItems": MAX_CONDITIONS,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
    props["history"]["maxItems"] = HISTORY_LIMIT
    # kopf keeps its own handler progress under status.kopf; a structural schema would
    # prune it silently without this.
    props["kopf"] = {
        "description": "kopf's handler bookkeeping (written by the operator framework).",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    return out


def openapi_schema() -> dict:
    """The openAPIV3Schema of the served version."""
    spec = {"description": "What the run trains and how (selfreward.spec.RunSpec).",
            **{k: v for k, v in spec_schema().items() if k != "description"}}
    status = {"description": "Observed state, written by the operator: phase, progress, and the kstatus "
                             "conditions Ready/Reconciling/Stalled.",
              **{k: v for k, v in status_schema().items() if k != "description"}}
    schema = {
        "description": "SelfRewardRun runs Self-Rewarding Language Model training (Yuan et al., 2024): "
                       "iterations of generate, self-judge, build preference pairs and DPO.",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    for path, rules in VALIDATIONS.items():
        _at(schema, path).setdefault("x-kubernetes-validations", []).extend(copy.deepcopy(rules))
    return schema


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Iteration", "type": "string", "jsonPath": ".status.progress",
     "description": "Completed iterations over total"},
    {"name": "Pairs", "type": "integer", "jsonPath": ".status.lastPairs",
     "description": "Preference pairs built by the last pairs phase"},
    {"name": "Eval", "type": "number", "jsonPath": ".status.lastEval",
     "description": "The eval gate's metric (status.evalMetric) of the last evaluated model (spec.eval)"},
    {"name": "Step", "type": "string", "jsonPath": ".status.currentPhase", "priority": 1},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest() -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "selfreward", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                "schema": {"openAPIV3Schema": openapi_schema()},
            }],
        },
    }


_HEADER = (
    "# Generated from selfreward.spec.RunSpec and selfreward.status.RunStatus; do not edit.\n"
    "# Regenerate: selfreward crd -o crds/selfreward.dev_selfrewardruns.yaml  (or: make crd)\n"
)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def crd_yaml(manifest: Optional[dict] = None) -> str:
    body = yaml.dump(manifest if manifest is not None else crd_manifest(), Dumper=_Dumper,
                     sort_keys=False, default_flow_style=False, width=100, allow_unicode=True)
    return _HEADER + body
