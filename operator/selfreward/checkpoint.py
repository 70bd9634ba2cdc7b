"""Atomic checkpoint commits and verified reads.

A checkpoint is a directory in the artifact store. `commit` uploads every file first and
writes ``MANIFEST.json`` (each file's size and sha256, hashed from the bytes sent) last;
a checkpoint without a manifest is half-written and is never read. `fetch` downloads a
checkpoint to a local cache and accepts it only when every file's size and sha256 match
the manifest.

`fetch_plain` reads a plain Hugging Face directory on S3 (no manifest: a base model a
user uploaded): the listing stands in for the manifest, and each file is checked by
size, by its ETag where that is an MD5 the client can recompute, by a ``sha256`` object
metadata entry where there is one, and each safetensors file by its own header (which
names the byte length of its tensors); a sharded model must have every shard its index
names.

Both caches are directories named by a hash of the (manifest or listing) file table,
written under a unique temporary name and renamed into place once verified, so pods
that share a cache (resources.modelCache) never see a partial copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import struct
import time
import uuid
from pathlib import Path
from typing import Optional

from .layout import MANIFEST
from .storage import StorageError, Store

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
        if p.is_file() and p.name != MANIFEST
        # hidden files and folders (.cache/ of a hub download, .gitattributes) are not the model
        and not any(part.startswith(".") for part in p.relative_to(local_dir).parts)
    )


def commit(local_dir: str | Path, store: Store, rel: str, metadata: Optional[dict] = None) -> dict:
    """Upload local_dir to store/rel: files first (concurrently, hashed as they are sent),
    MANIFEST.json last. Returns figures."""
    local_dir = Path(local_dir)
    names = _local_files(local_dir)
    if not any(n.endswith(".safetensors") for n in names):
        raise CheckpointError(f"{local_dir} holds no .safetensors weights")
    if store.exists(f"{rel}/{MANIFEST}"):
        store.delete(f"{rel}/{MANIFEST}")  # an older commit is void while we rewrite it
    t0 = time.time()
    sent = store.put_files([(local_dir / name, f"{rel}/{name}") for name in names])
    seconds = max(time.time() - t0, 1e-9)
    files = {name: {"size": sent[f"{rel}/{name}"]["size"], "sha256": sent[f"{rel}/{name}"]["sha256"]}
             for name in names}
    for name, info in files.items():  # a file rewritten while it was uploaded is not committed
        if (local_dir / name).stat().st_size != info["size"]:
            raise CheckpointError(f"{local_dir / name} changed size while it was uploaded")
    manifest = {"version": MANIFEST_VERSION, "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files, "metadata": metadata or {}}
    store.write_json(f"{rel}/{MANIFEST}", manifest)
    total = sum(info["size"] for info in files.values())
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


def _table_key(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:24]


def _cached(final: Path, files: dict) -> bool:
    """A cache entry is used when it holds every file at its size (it was verified
    before it was renamed into place; the sizes catch one that was cut since)."""
    if not final.is_dir():
        return False
    return all((final / name).is_file() and (final / name).stat().st_size == info["size"]
               for name, info in files.items())


def _into_cache(root: Path, key: str, fill) -> Path:
    """Fill a unique temporary directory with ``fill(tmp)`` and rename it to root/key.
    Pods of one node share a pid namespace only by accident, so the temporary name
    carries the host name and a random part, not just the pid."""
    final = root / key
    tmp = root / f".{key}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True, exist_ok=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race with the same verified content
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def fetch(store: Store, rel: str, cache: Optional[Path] = None) -> Path:
    """A verified local directory holding the checkpoint at store/rel.

    Local stores are verified in place. S3 checkpoints are downloaded (concurrently,
    hashed while they stream) to a cache directory named by the manifest's hash, verified,
    then renamed into place, so a cached copy is always a verified one."""
    manifest = read_manifest(store, rel)
    if store.protocol == "file":
        verify_local(store.path(rel), manifest, store.url(rel))
        return Path(store.path(rel))
    files = manifest["files"]
    root = (cache or cache_root()) / "checkpoints"
    key = _table_key(files)
    if _cached(root / key, files):
        return root / key

    def fill(tmp: Path) -> None:
        try:
            got = store.get_files([(f"{rel}/{name}", tmp / name, int(info["size"])) for name, info in files.items()])
        except FileNotFoundError as e:
            raise CheckpointError(f"checkpoint {store.url(rel)}: a file is missing ({e})") from None
        except StorageError as e:
            raise CheckpointError(f"checkpoint {store.url(rel)}: {e}") from None
        for name, info in files.items():
            if got[f"{rel}/{name}"]["sha256"] != info["sha256"]:
                raise CheckpointError(f"checkpoint {store.url(rel)}: {name} sha256 "
                                      f"{got[f'{rel}/{name}']['sha256'][:12]}… does not match the manifest")

    return _into_cache(root, key, fill)


# --- plain Hugging Face directories on S3 ---

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-([0-9]+)$")


def safetensors_problem(path: Path) -> Optional[str]:
    """Why a .safetensors file is not whole, or None: its header gives each tensor's byte
    range, so a cut or padded file shows without loading it."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return f"its header claims {n} bytes in a file of {size}"
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        return f"it has no valid safetensors header ({e.__class__.__name__})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end != size:
        return f"its header says {8 + n + end} bytes, the file has {size}"
    return None


def _plain_listing(store: Store) -> dict[str, dict]:
    """name -> {size, etag} of every file under the store's root (hidden ones left out)."""
    base = store.path("")
    try:
        found = store.fs.find(base, detail=True)
    except FileNotFoundError:
        found = {}
    files = {}
    for path, info in found.items():
        name = _rel_to(path, base)
        if info.get("type") == "directory" or not name or any(p.startswith(".") for p in name.split("/")):
            continue
        files[name] = {"size": int(info.get("size") or 0), "etag": str(info.get("ETag") or "").strip('"')}
    return files


def _rel_to(path: str, base: str) -> str:
    path, base = path.rstrip("/"), base.rstrip("/")
    return path[len(base) + 1:] if path.startswith(base + "/") else ""


def _checks(store: Store, name: str, info: dict) -> dict:
    """What can be checked of one object beyond its size: the md5 its ETag is (whole, or
    of parts whose size a HEAD of part 1 tells), a sha256 in its metadata. An ETag under
    SSE-KMS or SSE-C encryption is not an MD5 of the data and is not compared."""
    head = store.head(name)
    out: dict = {}
    sha = (head.get("Metadata") or {}).get("sha256")
    if sha:
        out["sha256"] = sha.lower()
    if head.get("ServerSideEncryption", "AES256") != "AES256" or head.get("SSECustomerAlgorithm"):
        return out
    etag = info["etag"]
    if _MD5_ETAG.match(etag):
        out["md5"], out["md5Part"] = etag, None
    elif (m := _MULTIPART_ETAG.match(etag)):
        try:
            part = int(store.head(name, part_number=1).get("ContentLength") or 0)
        except Exception:  # a store without part HEADs: the size is what can be checked
            part = 0
        if part and -(-info["size"] // part) == int(m.group(1)):
            out["md5"], out["md5Part"] = etag, part
    return out


def fetch_plain(store: Store, cache: Optional[Path] = None) -> tuple[Path, dict]:
    """A verified local copy of the plain Hugging Face directory at the store's root, and
    what was checked ({"files", "bytes", "etagVerified", "sha256Verified", "cached"})."""
    files = _plain_listing(store)
    where = store.url()
    if not files:
        raise CheckpointError(f"model {where} does not exist (no files under it)")
    if "config.json" not in files:
        raise CheckpointError(f"model {where} has no config.json: not a Hugging Face model directory "
                              f"(it holds {', '.join(sorted(files)[:5])}{'…' if len(files) > 5 else ''})")
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in files):
        raise CheckpointError(f"model {where} holds no weights (.safetensors or .bin files)")
    root = (cache or cache_root()) / "models"
    key = _table_key(files)
    report = {"files": len(files), "bytes": sum(i["size"] for i in files.values()),
              "etagVerified": 0, "sha256Verified": 0, "cached": _cached(root / key, files)}
    if report["cached"]:
        return root / key, report

    def fill(tmp: Path) -> None:
        checks = {name: _checks(store, name, info) for name, info in files.items()}
        md5 = {name: c["md5Part"] for name, c in checks.items() if "md5" in c}
        try:
            got = store.get_files([(name, tmp / name, info["size"]) for name, info in files.items()], md5=md5)
        except (FileNotFoundError, StorageError) as e:
            raise CheckpointError(f"model {where}: {e} (was it changed while it was read?)") from None
        for name, c in checks.items():
            if "md5" in c:
                if got[name]["md5"] != c["md5"]:
                    raise CheckpointError(f"model {where}: {name} does not match its ETag {c['md5']} "
                                          f"(got {got[name]['md5']}): corrupted in transit or in the store")
                report["etagVerified"] += 1
            if "sha256" in c:
                if got[name]["sha256"] != c["sha256"]:
                    raise CheckpointError(f"model {where}: {name} sha256 {got[name]['sha256'][:12]}… does not "
                                          f"match its sha256 metadata {c['sha256'][:12]}…")
                report["sha256Verified"] += 1
        verify_plain_dir(tmp, where)

    return _into_cache(root, key, fill), report


def verify_plain_dir(local_dir: Path, where: str) -> None:
    """Whole-file checks a plain model directory allows: each safetensors file matches
    its header, and a sharded model has every shard its index names."""
    for p in sorted(local_dir.rglob("*.safetensors")):
        problem = safetensors_problem(p)
        if problem:
            raise CheckpointError(f"model {where}: {p.relative_to(local_dir)} is damaged or cut short: {problem}")
    for index in sorted(local_dir.rglob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError):
            raise CheckpointError(f"model {where}: {index.name} is not a valid index") from None
        missing = sorted(s for s in shards if not (index.parent / s).is_file())
        if missing:
            raise CheckpointError(f"model {where}: {index.name} names shards that are missing: {', '.join(missing)}")
