"""The SelfRewardRun CRD: drift, structural-schema rules, defaults, CEL rules, examples.

No API server runs here, so the server's own steps are played by code in this file:
structural-schema checks after the apiextensions rules, pruning of nulls and defaulting,
OpenAPI validation (jsonschema, with unknown fields rejected as `kubectl apply`'s strict
field validation does), and the CEL rules (two independent CEL implementations).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from selfreward import crd
from selfreward.spec import SpecError, spec_from_document
from selfreward.status import HISTORY_LIMIT, Condition, IterationRecord, RunStatus

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "selfreward.dev_selfrewardruns.yaml"

try:  # common-expression-language: bindings to a native CEL, the second implementation
    import cel as cel_native
except ImportError:  # pragma: no cover - in the test extra; cel-python alone still checks the rules
    cel_native = None


@pytest.fixture(scope="module")
def manifest() -> dict:
    return crd.crd_manifest()


@pytest.fixture(scope="module")
def schema(manifest) -> dict:
    return manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# ---------------------------------------------------------------- drift and shape


def test_committed_crd_matches_generated():
    assert CRD_FILE.exists(), "crds/selfreward.dev_selfrewardruns.yaml is missing: run `make crd`"
    committed = CRD_FILE.read_text()
    assert committed == crd.crd_yaml(), (
        "crds/selfreward.dev_selfrewardruns.yaml is out of date with selfreward.spec/status; regenerate it with "
        "`selfreward crd -o crds/selfreward.dev_selfrewardruns.yaml` (or `make crd`) and commit it"
    )
    assert yaml.safe_load(committed) == crd.crd_manifest()


def test_names_version_and_columns(manifest, schema):
    spec = manifest["spec"]
    assert manifest["metadata"]["name"] == "selfrewardruns.selfreward.dev"
    assert spec["group"] == "selfreward.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "SelfRewardRun"
    assert spec["names"]["plural"] == "selfrewardruns" and spec["names"]["singular"] == "selfrewardrun"
    assert spec["names"]["shortNames"] == ["srr"] and spec["names"]["categories"] == ["selfreward"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c] == [
        "Phase", "Iteration", "Pairs", "Eval", "Age"]
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    # Every column's path exists in the schema, with the column's type.
    for col in version["additionalPrinterColumns"]:
        parts = col["jsonPath"].lstrip(".").split(".")
        if parts[0] == "metadata":
            continue
        node = schema
        for p in parts:
            node = node["properties"][p]
        assert node["type"] == col["type"], col
    # status.kopf survives pruning; kopf writes its progress there.
    kopf_node = schema["properties"]["status"]["properties"]["kopf"]
    assert kopf_node == {**kopf_node, "type": "object", "x-kubernetes-preserve-unknown-fields": True}


def test_crd_validates_as_apiextensions_v1_object(manifest):
    for version in ("1.29.0", "1.30.0", "1.37.0"):  # the chart says kubeVersion >= 1.29
        kubernetes_validate.validate(copy.deepcopy(manifest), version, strict=True)
    # The validator does look inside the schema: a draft-2020 numeric exclusiveMinimum,
    # which the generator turns into OpenAPI's boolean form, is refused.
    bad = copy.deepcopy(manifest)
    top_p = bad["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["generation"]["properties"]["topP"]
    assert top_p["exclusiveMinimum"] is True and top_p["minimum"] == 0.0
    top_p["exclusiveMinimum"] = 0.0
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.37.0", strict=True)


# ---------------------------------------------------------------- structural schema checker

# Keys of apiextensions.k8s.io/v1 JSONSchemaProps.
ALLOWED_KEYS = {
    "$ref", "$schema", "id", "description", "type", "format", "title", "default", "maximum", "exclusiveMaximum",
    "minimum", "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems",
    "multipleOf", "enum", "maxProperties", "minProperties", "required", "items", "allOf", "oneOf", "anyOf", "not",
    "properties", "additionalProperties", "patternProperties", "dependencies", "additionalItems", "definitions",
    "externalDocs", "example", "nullable", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys", "x-kubernetes-list-type", "x-kubernetes-map-type",
    "x-kubernetes-validations",
}
# Not allowed in a v1 CRD at all (apiextensions validation of CRD schemas).
FORBIDDEN_KEYS = {"$ref", "$schema", "id", "definitions", "dependencies", "patternProperties", "additionalItems"}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
NOT_IN_JUNCTORS = ("description", "type", "default", "additionalProperties", "nullable")
RULE_REASONS = {"FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"}


def structural_errors(root: dict) -> list[str]:
    """Violations of Kubernetes' structural-schema rules (and of v1 CRD schema limits).

    A structural schema: (1) gives a non-empty type at the root, for every property,
    additionalProperties value and items schema, unless the node has
    x-kubernetes-int-or-string or x-kubernetes-preserve-unknown-fields; (2) every field
    or item named inside allOf/anyOf/oneOf/not is also named outside them; (3) sets no
    description/type/default/additionalProperties/nullable inside those junctors; (4)
    restricts only name and generateName under metadata. v1 CRDs further forbid $ref and
    friends, uniqueItems: true, additionalProperties: false, and properties beside
    additionalProperties.
    """
    errors: list[str] = []

    def walk(node: Any, where: str, typed: bool, in_junctor: bool, outer: Optional[dict]) -> None:
        if not isinstance(node, dict):
            errors.append(f"{where}: a schema must be an object, got {type(node).__name__}")
            return
        for key in node:
            if key not in ALLOWED_KEYS:
                errors.append(f"{where}: unknown schema key {key!r}")
            if key in FORBIDDEN_KEYS:
                errors.append(f"{where}: {key} is not allowed in a CRD schema")
        if node.get("uniqueItems") is True:
            errors.append(f"{where}: uniqueItems cannot be true")
        if node.get("additionalProperties") is False:
            errors.append(f"{where}: additionalProperties cannot be false")
        if "properties" in node and "additionalProperties" in node:
            errors.append(f"{where}: properties and additionalProperties are mutually exclusive")
        if "x-kubernetes-preserve-unknown-fields" in node and node["x-kubernetes-preserve-unknown-fields"] is not True:
            errors.append(f"{where}: x-kubernetes-preserve-unknown-fields must be true or absent")
        kind = node.get("type")
        exempt = node.get("x-kubernetes-int-or-string") is True or node.get("x-kubernetes-preserve-unknown-fields") is True
        if in_junctor:
            for key in NOT_IN_JUNCTORS:
                if key in node:
                    errors.append(f"{where}: {key} must not be set inside allOf/anyOf/oneOf/not")
            # Fields and items named in a junctor must be specified outside it too.
            for name in node.get("properties", {}):
                if outer is None or name not in outer.get("properties", {}):
                    errors.append(f"{where}: property {name!r} only specified inside a junctor")
            if "items" in node and (outer is None or "items" not in outer):
                errors.append(f"{where}: items only specified inside a junctor")
        elif typed:
            if not kind and not exempt:
                errors.append(f"{where}: missing type")
        if kind is not None and kind not in TYPES:
            errors.append(f"{where}: unknown type {kind!r}")
        if "properties" in node and kind not in (None, "object"):
            errors.append(f"{where}: properties on a {kind}")
        if "items" in node and kind not in (None, "array"):
            errors.append(f"{where}: items on a {kind}")
        if kind == "array" and "items" not in node and not in_junctor:
            errors.append(f"{where}: array without items")
        for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if flag in node and (not isinstance(node[flag], bool) or bound not in node):
                errors.append(f"{where}: {flag} must be a boolean next to {bound}")
        if "enum" in node and kind in ("string", "integer", "number", "boolean"):
            pytype = {"string": str, "integer": int, "number": (int, float), "boolean": bool}[kind]
            for v in node["enum"]:
                if not isinstance(v, pytype):
                    errors.append(f"{where}: enum value {v!r} is not a {kind}")
        if node.get("x-kubernetes-list-type") == "map":
            item = node.get("items", {})
            keys = node.get("x-kubernetes-list-map-keys") or []
            if item.get("type") != "object" or not keys:
                errors.append(f"{where}: a map list needs object items and list-map-keys")
            for k in keys:
                sub = item.get("properties", {}).get(k)
                if sub is None or sub.get("type") not in ("string", "integer", "number", "boolean"):
                    errors.append(f"{where}: map key {k!r} must be a scalar property of the items")
                elif k not in item.get("required", []) and "default" not in sub:
                    errors.append(f"{where}: map key {k!r} must be required or defaulted")
        for rule in node.get("x-kubernetes-validations", []):
            if not isinstance(rule.get("rule"), str) or not rule["rule"].strip():
                errors.append(f"{where}: a validation without a rule")
            if "\n" in rule.get("message", ""):
                errors.append(f"{where}: a rule message must be one line")
            if "reason" in rule and rule["reason"] not in RULE_REASONS:
                errors.append(f"{where}: unknown rule reason {rule['reason']!r}")
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{where}.{name}", not in_junctor, in_junctor, (outer or {}).get("properties", {}).get(name) if in_junctor else None)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{where}.*", True, in_junctor, None)
        if "items" in node:
            walk(node["items"], f"{where}[]", not in_junctor, in_junctor,
                 (outer or {}).get("items") if in_junctor else None)
        for j in JUNCTORS:
            parts = node.get(j)
            if parts is None:
                continue
            for i, sub in enumerate(parts if isinstance(parts, list) else [parts]):
                walk(sub, f"{where}.{j}[{i}]", False, True, node)

    walk(root, "<root>", True, False, None)
    if root.get("type") != "object":
        errors.append("<root>: type must be object")
    meta = root.get("properties", {}).get("metadata")
    if meta is not None:
        extra = set(meta) - {"type", "description", "properties"}
        if extra or set(meta.get("properties", {})) - {"name", "generateName"}:
            errors.append("<root>.metadata: only metadata.name and metadata.generateName may be restricted")
        if meta.get("type") != "object":
            errors.append("<root>.metadata: type must be object")
    return errors


def test_schema_is_structural(schema):
    assert structural_errors(schema) == []


@pytest.mark.parametrize("bad, words", [
    ({"type": "object", "properties": {"a": {"description": "no type"}}}, "missing type"),
    ({"type": "object", "properties": {"a": {"$ref": "#/x"}}}, "$ref is not allowed"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}, "type must not be set inside"),
    ({"type": "object", "properties": {"a": {"type": "object", "anyOf": [{"properties": {"b": {}}}]}}},
     "only specified inside a junctor"),
    ({"type": "object", "properties": {"a": {"type": "object", "additionalProperties": False}}}, "cannot be false"),
    ({"type": "object", "properties": {"a": {"type": "array"}}}, "array without items"),
    ({"type": "object", "properties": {"a": {"type": "number", "exclusiveMinimum": 0}}}, "must be a boolean"),
    ({"type": "object", "properties": {"metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}}},
     "only metadata.name"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True, "items": {"type": "string"}}}},
     "uniqueItems"),
    ({"type": "object", "properties": {"c": {"type": "array", "x-kubernetes-list-type": "map",
                                             "x-kubernetes-list-map-keys": ["type"],
                                             "items": {"type": "object", "properties": {"type": {"type": "string"}}}}}},
     "must be required or defaulted"),
])
def test_structural_checker_catches(bad, words):
    errors = structural_errors(bad)
    assert any(words in e for e in errors), errors


# ---------------------------------------------------------------- the API server's steps, played here


def to_jsonschema(node: dict, strict: bool = True) -> dict:
    """An OpenAPI v3 (structural) schema as a draft-4 JSON schema: nullable becomes a null
    type, x-kubernetes-* are dropped. With ``strict``, objects refuse unknown fields, as
    the API server's strict field validation does (kubectl's default)."""
    out: dict[str, Any] = {}
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
                "pattern", "minItems", "maxItems", "required", "enum"):
        if key in node:
            out[key] = copy.deepcopy(node[key])
    if "type" in node:
        out["type"] = [node["type"], "null"] if node.get("nullable") else node["type"]
        if node.get("nullable") and "enum" in out:
            out["enum"].append(None)
    if "properties" in node:
        out["properties"] = {k: to_jsonschema(v, strict) for k, v in node["properties"].items()}
        if strict and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(node["additionalProperties"], strict)
    if "items" in node:
        out["items"] = to_jsonschema(node["items"], strict)
    return out


def schema_errors(node: dict, value: Any) -> list[str]:
    validator = jsonschema.Draft4Validator(to_jsonschema(node))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(value)]


def apply_defaults(node: dict, value: Any) -> Any:
    """The server's structural defaulting: nulls of non-nullable fields are pruned, then
    absent properties that have a default get it, recursively (defaults included)."""
    value = copy.deepcopy(value)

    def walk(n: dict, v: Any) -> Any:
        if isinstance(v, dict) and "properties" in n:
            for name, sub in n["properties"].items():
                if name in v and v[name] is None and not sub.get("nullable"):
                    del v[name]
                if name not in v and "default" in sub:
                    v[name] = copy.deepcopy(sub["default"])
                if name in v:
                    v[name] = walk(sub, v[name])
        elif isinstance(v, dict) and isinstance(n.get("additionalProperties"), dict):
            for k in v:
                v[k] = walk(n["additionalProperties"], v[k])
        elif isinstance(v, list) and "items" in n:
            v[:] = [walk(n["items"], x) for x in v]
        return v

    return walk(node, value)


def _typed(node: dict, v: Any) -> Any:
    """Values as CEL sees them under the schema: a `number` field is a double even when
    written as 1 (the API server converts it; a CEL int never compares to a double)."""
    if isinstance(v, dict):
        props = node.get("properties")
        if props is not None:
            return {k: _typed(props.get(k, {}), x) for k, x in v.items()}
        extra = node.get("additionalProperties")
        return {k: _typed(extra if isinstance(extra, dict) else {}, x) for k, x in v.items()}
    if isinstance(v, list):
        return [_typed(node.get("items", {}), x) for x in v]
    if node.get("type") == "number" and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


_celpy_env = celpy.Environment()


def _eval_both(rule: str, node: dict, value: Any, old: Any) -> bool:
    """The rule under cel-python and under the native CEL bindings; they must agree."""
    self_v = _typed(node, value)
    activation = {"self": self_v}
    if old is not None:
        activation["oldSelf"] = _typed(node, old)
    program = _celpy_env.program(_celpy_env.compile(rule))
    a = program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})
    assert isinstance(a, celpy.celtypes.BoolType), f"{rule!r} evaluated to {a!r}, not a bool"
    if cel_native is not None:
        b = cel_native.evaluate(rule, activation)
        assert isinstance(b, bool) and b == bool(a), f"CEL implementations disagree on {rule!r}: {a!r} vs {b!r}"
    return bool(a)


def cel_violations(node: dict, value: Any, old: Any = None, where: str = "") -> list[tuple[str, str]]:
    """(path, message) of every failing x-kubernetes-validations rule. Transition rules
    (those with oldSelf) run only on an update where the old value exists, as on the server."""
    out: list[tuple[str, str]] = []
    for rule in node.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"] and old is None:
            continue
        if not _eval_both(rule["rule"], node, value, old):
            out.append((where or "<root>", rule["message"]))
    if isinstance(value, dict) and "properties" in node:
        for name, sub in node["properties"].items():
            if name in value:
                sub_old = old.get(name) if isinstance(old, dict) else None
                out += cel_violations(sub, value[name], sub_old, f"{where}.{name}")
    elif isinstance(value, list) and "items" in node:
        for i, x in enumerate(value):
            out += cel_violations(node["items"], x, None, f"{where}[{i}]")  # atomic lists: no oldSelf per item
    return out


def admit(schema: dict, obj: dict, old: Optional[dict] = None) -> tuple[dict, list[str], list[str]]:
    """What a create (or, with ``old``, an update) does to ``obj``: default, then check
    the OpenAPI schema and the CEL rules. Returns (stored object, schema errors, CEL messages)."""
    stored = apply_defaults(schema, obj)
    old_stored = apply_defaults(schema, old) if old is not None else None
    errors = schema_errors(schema, stored)
    cel_errors = [] if errors else [m for _, m in cel_violations(schema, stored, old_stored)]
    return stored, errors, cel_errors


# ---------------------------------------------------------------- defaults


def _nodes(node: dict, where: str = "") -> Iterator[tuple[str, dict]]:
    yield where or "<root>", node
    for name, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{where}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{where}.*")
    if "items" in node:
        yield from _nodes(node["items"], f"{where}[]")


def test_every_default_validates_against_its_own_schema(schema):
    defaults = [(where, n) for where, n in _nodes(schema) if "default" in n]
    assert len(defaults) > 50  # the spec's many settings, including {} of nested objects
    for where, node in defaults:
        stored = apply_defaults(node, node["default"])
        assert schema_errors(node, stored) == [], where
        assert cel_violations(node, stored) == [], where
    # Status is the operator's: no defaults there.
    assert [w for w, n in _nodes(schema["properties"]["status"]) if "default" in n] == []


def test_nullable_only_where_null_differs_from_absent(schema):
    nullable = [where for where, n in _nodes(schema) if n.get("nullable")]
    assert nullable == [".spec.ttlSecondsAfterFinished"]
    stored, errors, _ = admit(schema, _minimal(ttlSecondsAfterFinished=None))
    assert errors == [] and stored["spec"]["ttlSecondsAfterFinished"] is None
    assert spec_from_document(stored)[0].ttlSecondsAfterFinished is None
    stored, _, _ = admit(schema, _minimal())
    assert stored["spec"]["ttlSecondsAfterFinished"] == 86400


def test_patterns_are_re2(schema):
    re2 = pytest.importorskip("re2")
    patterns = [n["pattern"] for _, n in _nodes(schema) if "pattern" in n]
    assert patterns
    for p in patterns:
        re2.compile(p)  # Go's regexp (RE2) is what the API server runs


def test_rule_targets_are_bounded(schema):
    """CEL cost estimation needs a bound on any string or list a rule reads."""
    for where, node in _nodes(schema):
        for rule in node.get("x-kubernetes-validations", []):
            if node.get("type") == "string":
                assert "maxLength" in node or "enum" in node, where
            for name in re.findall(r"self\.(\w+)", rule["rule"]):
                sub = node.get("properties", {}).get(name, {})
                if sub.get("type") == "string":
                    assert "maxLength" in sub or "enum" in sub, f"{where}.{name}"
                if sub.get("type") == "array":
                    assert "maxItems" in sub, f"{where}.{name}"


def test_cel_rules_compile_in_both_implementations(schema):
    rules = [r["rule"] for _, n in _nodes(schema) for r in n.get("x-kubernetes-validations", [])]
    assert len(rules) >= 8
    for rule in rules:
        _celpy_env.compile(rule)
        if cel_native is not None:
            cel_native.compile(rule)


# ---------------------------------------------------------------- manifests


def _minimal(**spec: Any) -> dict:
    base = {
        "model": {"uri": "Qwen/Qwen2.5-0.5B-Instruct"},
        "prompts": {"uri": "s3://runs/seed.jsonl"},
        "storage": {"uri": "s3://runs/demo"},
    }
    base.update(spec)
    return {"apiVersion": "selfreward.dev/v1alpha1", "kind": "SelfRewardRun",
            "metadata": {"name": "demo", "namespace": "ml"}, "spec": base}


def test_defaults_agree_with_the_spec_model(schema):
    """The API server's defaults and the pydantic model's give the same run."""
    for obj in (_minimal(), _minimal(model={"uri": "m", "lora": {}}, training={"mode": "lora"},
                                     prompts={"uri": "p", "selfInstruct": {}}, sft={"instructionDataUri": "ift"})):
        stored, errors, cel_errors = admit(schema, obj)
        assert errors == [] and cel_errors == []
        assert stored["spec"]["generation"]["responsesPerPrompt"] == 4
        from_raw = spec_from_document(obj)[0]
        from_stored = spec_from_document(stored)[0]
        assert from_stored == from_raw


def _documents() -> list[tuple[str, dict]]:
    docs: list[tuple[str, dict]] = []
    for path in sorted((ROOT / "examples").rglob("*.yaml")) + sorted((ROOT / "examples").rglob("*.yml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and doc.get("kind") == "SelfRewardRun":
                docs.append((f"{path.relative_to(ROOT)}#{i}", doc))
    for path in sorted((ROOT / "docs").rglob("*.md")):
        text = path.read_text()
        for j, block in enumerate(re.findall(r"^```ya?ml[^\n]*\n(.*?)^```", text, flags=re.M | re.S)):
            try:
                loaded = list(yaml.safe_load_all(block))
            except yaml.YAMLError:
                continue  # fragments with placeholders are not manifests
            for i, doc in enumerate(loaded):
                if isinstance(doc, dict) and doc.get("kind") == "SelfRewardRun":
                    docs.append((f"{path.relative_to(ROOT)}[block {j}]#{i}", doc))
    return docs


def test_our_examples_exist():
    names = {p.name for p in (ROOT / "examples" / "runs").glob("*.yaml")}
    assert {"minimal.yaml", "s3-gpu-kueue.yaml", "sft-self-instruct.yaml"} <= names


@pytest.mark.parametrize("where, doc", [pytest.param(w, d, id=w) for w, d in _documents()])
def test_example_manifest_is_admitted_and_loads(schema, where, doc):
    assert doc["apiVersion"] == "selfreward.dev/v1alpha1", where
    stored, errors, cel_errors = admit(schema, doc)
    assert errors == [], where
    assert cel_errors == [], where
    spec, meta = spec_from_document(doc, where)
    assert spec_from_document(stored, where)[0] == spec
    assert meta.get("name"), f"{where}: metadata.name"


def test_status_written_by_the_operator_validates(schema):
    status_node = schema["properties"]["status"]
    conds = [Condition(type=t, status="True" if t in ("Ready", "Succeeded") else "False", reason="Completed",
                       lastTransitionTime="2026-01-01T00:00:00Z", observedGeneration=3)
             for t in ("Ready", "Reconciling", "Stalled", "Succeeded", "Failed", "Suspended")]
    history = [IterationRecord(iteration=i, pairs=12, meanScore=3.5, dpoLoss=0.6) for i in range(1, HISTORY_LIMIT + 1)]
    status = RunStatus(observedGeneration=3, phase="Succeeded", progress="3/3", lastPairs=12,
                       attempts={"iter-1/generate": 1}, conditions=conds, history=history)
    body = status.model_dump(mode="json", exclude_none=True)
    body["kopf"] = {"progress": {"reconcile": {"retries": 1, "started": "2026-01-01T00:00:00Z"}}}
    assert schema_errors(status_node, body) == []
    body["history"].append(body["history"][0])
    assert any("too long" in e for e in schema_errors(status_node, body))
    body["history"].pop()
    body["phase"] = "Done"
    assert schema_errors(status_node, body)


# ---------------------------------------------------------------- invalid manifests, and which layer stops them


def _set(doc: dict, dotted: str, value: Any) -> dict:
    doc = copy.deepcopy(doc)
    node = doc["spec"]
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return doc


_DELETE = object()

# (case, field, value, the layers that refuse it). "schema" = OpenAPI validation with
# strict field validation, "cel" = x-kubernetes-validations, "parse_spec" = the pydantic
# model that the local runner, the worker and the operator all load.
INVALID = [
    ("typo in a field name", "iteratons", 3, {"schema", "parse_spec"}),
    ("iterations zero", "iterations", 0, {"schema", "parse_spec"}),
    ("iterations not a number", "iterations", "three", {"schema", "parse_spec"}),
    ("unknown backend", "generation.backend", "tgi", {"schema", "parse_spec"}),
    ("one response per prompt", "generation.responsesPerPrompt", 1, {"schema", "parse_spec"}),
    ("topP zero (exclusive bound)", "judge.topP", 0, {"schema", "parse_spec"}),
    ("no storage", "storage", _DELETE, {"schema", "parse_spec"}),
    ("empty model uri", "model.uri", "", {"schema", "parse_spec"}),
    ("secret name not DNS", "storage.credentialsSecret", "My_Secret", {"schema", "parse_spec"}),
    ("memory not a quantity", "resources.default.memory", "lots", {"schema", "parse_spec"}),
    ("env name with a space", "resources.default.env", [{"name": "A B", "value": "1"}], {"schema", "parse_spec"}),
    ("template too long", "judge.template", "{prompt}{response}" + "x" * 65536, {"schema", "parse_spec"}),
    ("minScore equals maxScore", "judge", {"minScore": 5, "maxScore": 5}, {"cel", "parse_spec"}),
    ("minScore above maxScore", "judge", {"minScore": 10, "maxScore": 5.5}, {"cel", "parse_spec"}),
    ("template without {response}", "judge.template", "Rate {prompt}. Score: N", {"cel", "parse_spec"}),
    ("template without {prompt}", "judge.template", "Rate {response}.", {"cel", "parse_spec"}),
    ("minChars above maxChars", "prompts.selfInstruct", {"minChars": 500, "maxChars": 100}, {"cel", "parse_spec"}),
    ("storage over http", "storage.uri", "http://example.com/runs", {"cel", "parse_spec"}),
    ("s3 without a bucket", "storage.uri", "s3://", {"cel", "parse_spec"}),
    ("vllm generation without GPUs", "generation.backend", "vllm", {"cel", "parse_spec"}),
    ("zero GPU-hour budget", "budget.maxGpuHours", 0, {"schema", "parse_spec"}),
    ("negative price per GPU-hour", "budget.pricePerGpuHour", -0.5, {"schema", "parse_spec"}),
    ("vllm meta-judge without GPUs", "metaJudge", {"backend": "vllm"}, {"cel", "parse_spec"}),
    ("meta-judge template without {second}", "metaJudge.template", "{prompt} {response} {first}", {"cel", "parse_spec"}),
    ("meta-judge share of all the data", "metaJudge.maxShare", 1.0, {"schema", "parse_spec"}),
    ("a rho per iteration, one short", "pairs.lengthControl", [0.1, 0.2], {"cel", "parse_spec"}),
    ("a rho per iteration, one too many", "pairs.lengthControl", [0.1, 0.2, 0.3, 0.4], {"cel", "parse_spec"}),
    # a number or a list has no structural type: the spec model types and bounds it
    ("rho above 1", "pairs.lengthControl", 1.5, {"parse_spec"}),
    ("rho not a number", "pairs.lengthControl", "0.2", {"parse_spec"}),
    ("colocated judge with other shards", "judge", {"colocate": True, "shards": 2}, {"cel", "parse_spec"}),
    ("colocated judge on another backend", "judge", {"colocate": True, "backend": "vllm"}, {"cel", "parse_spec"}),
    ("colocated judge, other vllm settings", "judge", {"colocate": True, "vllm": {"enforceEager": True}},
     {"cel", "parse_spec"}),
    ("template with another placeholder", "judge.template", "{prompt} {response} {rubric}", {"parse_spec"}),
    ("score pattern without a group", "judge.scorePattern", r"Score: \d+", {"parse_spec"}),
    ("score pattern not a regex", "judge.scorePattern", "Score: ([0-9]", {"parse_spec"}),
]


def _layers(schema: dict, obj: dict, old: Optional[dict] = None) -> set[str]:
    stored = apply_defaults(schema, obj)
    caught = set()
    if schema_errors(schema, stored):
        caught.add("schema")
    else:  # the server runs CEL only on an object that passed the schema
        old_stored = apply_defaults(schema, old) if old is not None else None
        if cel_violations(schema, stored, old_stored):
            caught.add("cel")
    try:
        spec_from_document(obj)
    except SpecError:
        caught.add("parse_spec")
    return caught


@pytest.mark.parametrize("case, field, value, layers", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_refused(schema, case, field, value, layers):
    assert _layers(schema, _minimal()) == set()
    assert _layers(schema, _set(_minimal(), field, value)) == layers


def test_length_control_as_a_number_or_one_per_iteration(schema):
    for value in (0.3, 0, [0.0, 0.2, 1.0]):  # iterations defaults to 3
        obj = _set(_minimal(), "pairs.lengthControl", value)
        stored, errors, msgs = admit(schema, obj)
        assert (errors, msgs) == ([], []) and stored["spec"]["pairs"]["lengthControl"] == value
        assert spec_from_document(stored)[0].pairs.lengthControl == value
    stored, _, _ = admit(schema, _minimal())
    assert stored["spec"]["pairs"]["lengthControl"] == 0.0  # the default, written by the server too
    _, _, msgs = admit(schema, _set(_minimal(iterations=2), "pairs.lengthControl", [0.1, 0.2, 0.3]))
    assert msgs == ["pairs.lengthControl: a list needs one rho per iteration (spec.iterations values), "
                    "or give one number for all"]


def test_cel_messages_name_the_problem(schema):
    _, errors, msgs = admit(schema, _set(_minimal(), "judge", {"minScore": 3, "maxScore": 1}))
    assert errors == [] and msgs == ["judge.minScore must be below judge.maxScore"]
    _, _, msgs = admit(schema, _set(_minimal(), "judge.backend", "vllm"))
    assert msgs == ["judge.backend vllm needs a GPU: set resources.judge.gpus or resources.default.gpus to 1 or more"]


@pytest.mark.parametrize("resources, ok", [
    (None, False),
    ({"default": {"gpus": 1}}, True),
    ({"generate": {"gpus": 2}}, True),
    ({"default": {"gpus": 0}}, False),
    ({"default": {"gpus": 1}, "generate": {"gpus": 0}}, False),  # the phase's own setting wins
    ({"judge": {"gpus": 1}}, False),  # another phase's GPUs do not help generation
    ({"default": {"cpu": "4"}, "generate": {"memory": "8Gi"}}, False),
])
def test_vllm_needs_gpus_where_generation_runs(schema, resources, ok):
    obj = _set(_minimal(), "generation.backend", "vllm")
    if resources is not None:
        obj = _set(obj, "resources", resources)
    _, errors, msgs = admit(schema, obj)
    assert errors == []
    assert (msgs == []) == ok, msgs


_EVAL = {"judgeSet": {"uri": "s3://runs/labelled.jsonl"}}


@pytest.mark.parametrize("spec", [
    {},
    {"resources": {"train": {"gpus": 8}}},
    {"resources": {"default": {"gpus": 4}}},
    {"resources": {"default": {"gpus": 4}, "train": {"gpus": 1}}},  # issue 11: no sft phase to check
    {"resources": {"default": {"gpus": 4}, "train": {"gpus": 1}}, "sft": {"instructionDataUri": "ift"}},
    {"resources": {"default": {"gpus": 4}, "train": {"gpus": 1}}, "sft": {"instructionDataUri": "i", "enabled": False}},
    {"resources": {"train": {"nodes": 2}}},
    {"resources": {"train": {"nodes": 2, "gpus": 8}}, "training": {"distributed": "fsdp"}},
    {"resources": {"generate": {"nodes": 2}}, "training": {"distributed": "fsdp"}},
    {"resources": {"default": {"nodes": 3}}, "training": {"distributed": "fsdp"}},
    {"training": {"distributed": "deepspeed"}},
    # the eval phase answers and judges with the run's backends: vLLM needs GPUs there too
    {"generation": {"backend": "vllm"}, "resources": {"generate": {"gpus": 1}}, "eval": _EVAL},
    {"generation": {"backend": "vllm"}, "resources": {"generate": {"gpus": 1}, "eval": {"gpus": 1}}, "eval": _EVAL},
    {"judge": {"backend": "vllm"}, "resources": {"default": {"gpus": 1}}, "eval": _EVAL},
    {"judge": {"backend": "vllm"}, "resources": {"default": {"gpus": 1}, "eval": {"gpus": 0}}, "eval": _EVAL},
    {"judge": {"backend": "vllm"}, "resources": {"judge": {"gpus": 1}}, "eval": {**_EVAL, "enabled": False}},
    {"resources": {"eval": {"gpus": 0}}, "eval": _EVAL},
], ids=lambda s: json.dumps(s, sort_keys=True))
def test_cel_topology_rules_agree_with_the_spec_model(schema, spec):
    """The CEL rules are a subset of RunSpec's: where CEL refuses, pydantic refuses too,
    and for these cases (no gradientCheckpointing) they agree exactly."""
    obj = _minimal(**spec)
    _, errors, msgs = admit(schema, obj)
    assert errors == []
    try:
        spec_from_document(obj)
        accepted = True
    except SpecError:
        accepted = False
    assert (msgs == []) == accepted, msgs


def test_storage_uri_is_immutable(schema):
    old = apply_defaults(schema, _minimal())
    # Other changes to a stored run are fine, the same uri is fine.
    new = _set(old, "iterations", 5)
    assert admit(schema, new, old)[2] == []
    moved = _set(old, "storage.uri", "s3://runs/elsewhere")
    assert admit(schema, moved, old)[2] == ["storage.uri cannot change"]
    # On create there is no old object: the transition rule does not apply.
    assert admit(schema, moved)[2] == []
    # Only the transition rule catches it: the spec model sees one object at a time.
    assert _layers(schema, moved, old) == {"cel"}


def test_rule_field_paths_name_schema_fields(schema):
    """The API server refuses a fieldPath that does not name a field under the rule's node."""
    paths = 0
    for where, node in _nodes(schema):
        for rule in node.get("x-kubernetes-validations", []):
            if "fieldPath" not in rule:
                continue
            target = node
            for part in rule["fieldPath"].lstrip(".").split("."):
                assert part in target.get("properties", {}), f"{where}: {rule['fieldPath']}"
                target = target["properties"][part]
            paths += 1
    assert paths >= 2


def test_cli_writes_the_crd(tmp_path, capsys):
    from selfreward.cli import main

    out = tmp_path / "crd.yaml"
    assert main(["crd", "-o", str(out)]) == 0
    assert out.read_text() == crd.crd_yaml()
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == crd.crd_yaml()


def test_converter_on_its_own_models():
    """The conversion rules on a small model: Optional, factory defaults, nullable,
    exclusive bounds, maps, free-form dicts, and a union it must refuse."""
    from typing import Optional as Opt, Union

    from pydantic import BaseModel, Field

    class Inner(BaseModel):
        n: int = Field(3, gt=0, lt=10)

    class Outer(BaseModel):
        """An outer model."""
        inner: Inner = Field(default_factory=Inner)
        maybe: Opt[Inner] = None
        ttl: Opt[int] = Field(60, ge=0)
        tags: dict[str, str] = Field(default_factory=dict)
        free: Opt[dict[str, Any]] = None
        names: list[str] = Field(default_factory=lambda: ["a"])

    raw = Outer.model_json_schema(schema_generator=crd._FactoryDefaults)
    out = crd._convert(raw, raw.get("$defs", {}), "outer")
    assert structural_errors(out) == []
    p = out["properties"]
    assert out["description"] == "An outer model."
    assert p["inner"]["default"] == {} and p["inner"]["type"] == "object"
    assert p["inner"]["properties"]["n"] == {"type": "integer", "minimum": 0, "exclusiveMinimum": True,
                                             "maximum": 10, "exclusiveMaximum": True, "default": 3}
    assert "default" not in p["maybe"] and "nullable" not in p["maybe"] and p["maybe"]["type"] == "object"
    assert p["ttl"] == {"type": "integer", "minimum": 0, "default": 60, "nullable": True}
    assert p["tags"] == {"type": "object", "additionalProperties": {"type": "string"}, "default": {}}
    assert p["free"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert p["names"]["default"] == ["a"]
    # Defaulting {} for `inner` then fills n.
    assert apply_defaults(out, {})["inner"] == {"n": 3}

    class Bad(BaseModel):
        either: Union[int, str] = 0

    raw = Bad.model_json_schema()
    with pytest.raises(crd.SchemaError, match="union"):
        crd._convert(raw, raw.get("$defs", {}), "bad")


@pytest.mark.parametrize("spec", [
    {"judge": {"colocate": True}},
    {"judge": {"colocate": True, "shards": 3}, "generation": {"shards": 3}},
    {"judge": {"colocate": True, "shards": 3}},
    {"judge": {"colocate": True}, "generation": {"shards": 2}},
    {"judge": {"colocate": True}, "resources": {"judge": {"cpu": "1"}}},
    {"judge": {"colocate": False}, "resources": {"judge": {"cpu": "1"}}},
    {"judge": {"colocate": True, "backend": "vllm"}, "generation": {"backend": "vllm"},
     "resources": {"generate": {"gpus": 1}}},  # the judge runs on generate's GPUs
    {"judge": {"colocate": False, "backend": "vllm"}, "generation": {"backend": "vllm"},
     "resources": {"generate": {"gpus": 1}}},  # not colocated: the judge pods have none
    {"judge": {"colocate": True, "vllm": {"maxModelLen": 2048}}, "generation": {"vllm": {"maxModelLen": 2048}}},
    {"judge": {"colocate": True, "vllm": {"maxModelLen": 2048}}},
    {"judge": {"colocate": True}, "generation": {"vllm": {"maxModelLen": 2048}}},
], ids=lambda s: json.dumps(s, sort_keys=True))
def test_cel_colocate_rules_agree_with_the_spec_model(schema, spec):
    """judge.colocate's CEL twins refuse exactly what RunSpec refuses, naming the field."""
    obj = _minimal(**spec)
    _, errors, msgs = admit(schema, obj)
    assert errors == []
    try:
        spec_from_document(obj)
        refused = []
    except SpecError as e:
        refused = [loc for loc, _ in e.errors]
    assert (msgs == []) == (refused == []), (msgs, refused)
    for field in refused:  # the CEL message names the field pydantic names
        assert any(field in m for m in msgs), (field, msgs)
