"""Atomic checkpoint commits and verified reads.

A checkpoint is a directory in the artifact store. `commit` uploads every file first and
writes ``MANIFEST.json`` (each file's size and sha256) last; a checkpoint without a
manifest is half-written and is never read. `fetch` downloads a checkpoint to a local
cache and accepts it only when every file's size and sha256 match the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from .layout import MANIFEST
from .storage import Store

MANIFEST_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, half-written or corrupted."""


def sha256_file(path: str | Path, bufsize: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _local_files(local_dir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(local_dir)).replace(os.sep, "/")
        for p in local_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


def build_manifest(local_dir: str | Path, metadata: Optional[dict] = None) -> dict:
    local_dir = Path(local_dir)
    files = {name: {"size": (local_dir / name).stat().st_size, "sha256": sha256_file(local_dir / name)}
             for name in _local_files(local_dir)}
    if not any(n.endswith(".safetensors") for n in files):
        raise CheckpointError(f"{local_dir} holds no .safetensors weights")
    return {"version": MANIFEST_VERSION, "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files, "metadata": metadata or {}}


def commit(local_dir: str | Path, store: Store, rel: str, metadata: Optional[dict] = None) -> dict:
    """Upload local_dir to store/rel: files first, MANIFEST.json last. Returns figures."""
    local_dir = Path(local_dir)
    manifest = build_manifest(local_dir, metadata)
    if store.exists(f"{rel}/{MANIFEST}"):
        store.delete(f"{rel}/{MANIFEST}")  # an older commit is void while we rewrite it
    t0 = time.time()
    total = 0
    for name, info in manifest["files"].items():
        store.put_file(local_dir / name, f"{rel}/{name}")
        total += info["size"]
    seconds = max(time.time() - t0, 1e-9)
    store.write_json(f"{rel}/{MANIFEST}", manifest)
    return {"checkpointBytes": total, "uploadSeconds": round(seconds, 3),
            "uploadMBps": round(total / seconds / 1e6, 2), "checkpoint": store.url(rel)}


def read_manifest(store: Store, rel: str) -> dict:
    if not store.exists(f"{rel}/{MANIFEST}"):
        if store.exists(rel) and store.list(rel):
            raise CheckpointError(f"checkpoint {store.url(rel)} has no {MANIFEST}: it is half-written and is refused")
        raise CheckpointError(f"checkpoint {store.url(rel)} does not exist")
    try:
        manifest = store.read_json(f"{rel}/{MANIFEST}")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {store.url(rel)}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise CheckpointError(f"checkpoint {store.url(rel)}: {MANIFEST} lists no files")
    return manifest


def is_committed(store: Store, rel: str) -> bool:
    return store.exists(f"{rel}/{MANIFEST}")


def verify_local(local_dir: str | Path, manifest: dict, where: str) -> None:
    local_dir = Path(local_dir)
    for name, info in manifest["files"].items():
        p = local_dir / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {where}: {name} is missing")
        size = p.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"checkpoint {where}: {name} has {size} bytes, the manifest says {info['size']}")
        digest = sha256_file(p)
        if digest != info["sha256"]:
            raise CheckpointError(f"checkpoint {where}: {name} sha256 {digest[:12]}… does not match the manifest")


def verify(store: Store, rel: str) -> dict:
    """Check a committed checkpoint in place (downloads files from S3 to hash them)."""
    manifest = read_manifest(store, rel)
    if store.protocol == "file":
        verify_local(store.path(rel), manifest, store.url(rel))
    else:
        fetch(store, rel)
    return manifest


def identity(manifest: dict) -> str:
    """A checkpoint's identity: the sha256 of its file list (names, sizes, hashes). Two
    checkpoints with the same weights have the same identity wherever they are stored."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("SELFREWARD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "selfreward")))


def fetch(store: Store, rel: str, cache: Optional[Path] = None) -> Path:
    """A verified local directory holding the checkpoint at store/rel.

    Local stores are verified in place. S3 checkpoints are downloaded to a cache directory
    named by the manifest's hash, verified, then renamed into place, so a cached copy is
    always a verified one."""
    manifest = read_manifest(store, rel)
    if store.protocol == "file":
        verify_local(store.path(rel), manifest, store.url(rel))
        return Path(store.path(rel))
    key = identity(manifest)[:24]
    root = (cache or cache_root()) / "checkpoints"
    final = root / key
    if final.is_dir():
        return final
    tmp = root / f".{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in manifest["files"]:
        try:
            store.get_file(f"{rel}/{name}", tmp / name)
        except FileNotFoundError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint {store.url(rel)}: {name} is missing") from None
    try:
        verify_local(tmp, manifest, store.url(rel))
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    root.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race with the same verified content
        shutil.rmtree(tmp, ignore_errors=True)
    return final
