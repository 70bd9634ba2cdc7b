"""Which run a store belongs to, and deleting only what that run wrote.

A run's store (``spec.storage.uri``) is proved to be the run's by an owner marker,
:data:`selfreward.layout.OWNER` at the store's root, naming the run (namespace, name,
uid). Every worker of the operator's Jobs checks it before writing anything (:func:`claim`):
the first writes it, a run re-created under the same name takes it over, and a store that
names another run is refused, so two runs never mix their artifacts.

The cleanup Job (``selfreward cleanup``, ``storage.deleteOnRunDeletion``) deletes
(:func:`cleanup`) only when the marker names the very run being deleted (same uid), only
the layout's own paths (``run.json``, ``iterations.json``, ``iter-<n>/``), never a
subtree holding another run's marker, and the marker last. Anything else under the prefix
stays. A store URI that is a bucket or filesystem root deletes nothing at all.
"""
from __future__ import annotations

import posixpath
import re
from typing import Any, Optional

from . import layout
from .storage import Store, storage_root_problem

MARKER_KIND = "SelfRewardRunStore"
ITERATION_DIR = re.compile(r"^iter-[0-9]+$")
ROOT_FILES = ("run.json", "iterations.json", "usage.json")  # local.RUN_JSON, ITERATIONS_JSON, USAGE_JSON


class OwnershipError(RuntimeError):
    """The store belongs to another run (or holds something that is not a run's)."""


def owner_of(meta: dict) -> Optional[dict]:
    """The identity a marker records, from a run's metadata; None without a uid."""
    if not (meta.get("name") and meta.get("uid")):
        return None
    return {"namespace": meta.get("namespace") or "", "name": meta["name"], "uid": meta["uid"]}


def _who(marker: dict) -> str:
    return f"{marker.get('namespace', '')}/{marker.get('name', '')} (uid {marker.get('uid', '')})"


def read_marker(store: Store) -> Optional[dict]:
    """The marker at the store's root, None when there is none."""
    if not store.exists(layout.OWNER):
        return None
    try:
        marker = store.read_json(layout.OWNER)
    except ValueError:
        marker = None
    if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
        raise OwnershipError(f"{store.url(layout.OWNER)} is not a selfreward owner marker")
    return marker


def claim(store: Store, owner: dict) -> str:
    """Make sure the store is this run's before a worker writes to it: "new" (marker
    written), "same", or "taken over" (the same namespace/name re-created). Raises
    OwnershipError when another run owns it."""
    marker = read_marker(store)
    if marker is not None and marker.get("uid") == owner["uid"]:
        return "same"
    if marker is not None and (marker.get("namespace"), marker.get("name")) != (owner["namespace"], owner["name"]):
        raise OwnershipError(
            f"spec.storage.uri: {store.url()} holds the artifacts of run {_who(marker)}; "
            "give each run its own storage.uri")
    store.write_json(layout.OWNER, {"kind": MARKER_KIND, **owner})
    # S3 has no compare-and-swap here: read back, so that of two runs claiming at once
    # the one whose write was overwritten stops
    again = read_marker(store)
    if again is None or again.get("uid") != owner["uid"]:
        raise OwnershipError(f"spec.storage.uri: {store.url()} was claimed by run {_who(again or {})} at the same time")
    return "new" if marker is None else "taken over"


def _files_under(store: Store, rel: str) -> list[str]:
    """Files of one layout directory, as paths relative to the store root (a key that
    only shares the directory's name as a prefix, iter-1x for iter-1, is not one)."""
    return [f"{rel}/{f}" for f in store.walk_files(rel) if f and not f.startswith("..") and f != "."]


def _foreign_dirs(files: list[str]) -> set[str]:
    """Directories below the root that hold another owner marker: another run's store."""
    return {posixpath.dirname(f) for f in files if posixpath.basename(f) == layout.OWNER and "/" in f}


def cleanup(store: Store, owner: Optional[dict]) -> dict[str, Any]:
    """Delete what the run wrote. Returns a summary: {"deleted", "kept", "uri"}, or
    {"refused": why} when nothing could be proved the run's (then nothing is deleted)."""
    # the URI as written, and where it resolved to: neither may be a root
    problem = storage_root_problem(store.uri) or storage_root_problem(store.url())
    if problem:
        return {"refused": problem, "uri": store.uri}
    if owner is None:
        return {"refused": "the cleanup was not told which run it cleans up for", "uri": store.uri}
    try:
        marker = read_marker(store)
    except OwnershipError as e:
        return {"refused": str(e), "uri": store.uri}
    top = store.list("")
    ours = [n for n in top if n in ROOT_FILES or ITERATION_DIR.match(n)]
    if marker is None:
        if not ours:
            return {"deleted": 0, "kept": len(top), "uri": store.uri}  # the run never wrote here
        return {"refused": f"{store.url(layout.OWNER)} is missing, so nothing proves that {store.uri} "
                           f"is this run's; nothing was deleted", "uri": store.uri}
    if marker.get("uid") != owner["uid"]:
        return {"refused": f"{store.uri} belongs to run {_who(marker)}, not to {_who(owner)}; nothing was deleted",
                "uri": store.uri}
    doomed: list[str] = []
    kept = 0
    for name in ours:
        if name in ROOT_FILES:
            doomed.append(name)
            continue
        files = _files_under(store, name)
        foreign = _foreign_dirs(files)
        for f in files:
            if any(f == d or f.startswith(d + "/") for d in foreign):
                kept += 1
            else:
                doomed.append(f)
    kept += len([n for n in top if n not in ours and n != layout.OWNER])
    for rel in doomed:
        store.delete(rel, recursive=False)
    store.delete(layout.OWNER, recursive=False)  # last: a cleanup cut short can run again
    store.prune_empty_dirs([n for n in ours if n not in ROOT_FILES])
    return {"deleted": len(doomed) + 1, "kept": kept, "uri": store.uri}
