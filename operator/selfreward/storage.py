"""One storage abstraction over artifact URIs: local paths, file:// and s3://.

Everything goes through fsspec (s3fs for S3). Credentials are never passed in code:
s3fs/botocore read AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or any other botocore
source) from the environment. The endpoint comes from the spec or from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.

Writes of small objects are atomic: on a local filesystem via a temporary file and a
rename, on S3 because a PUT is. Large files go up as multipart uploads (s3fs splits
them in ``MULTIPART_CHUNK`` parts).
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import fsspec

MULTIPART_CHUNK = 64 * 1024 * 1024


class StorageError(RuntimeError):
    pass


def _split(uri: str) -> tuple[str, str]:
    """Return (protocol, path) for a URI; bare paths are local."""
    if uri.startswith("s3://"):
        return "s3", uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        return "file", os.path.abspath(uri[len("file://"):]).rstrip("/") or "/"
    if "://" in uri:
        raise StorageError(f"unsupported storage URI {uri!r}: use file://, s3:// or a local path")
    return "file", os.path.abspath(uri).rstrip("/") or "/"


def storage_root_problem(uri: str) -> Optional[str]:
    """Why ``uri`` cannot be a run's own prefix, or None. A run's artifacts may be deleted
    with it, so its store must be a prefix below a bucket (or below the filesystem root),
    with no empty, ``.`` or ``..`` segment that would point somewhere else. The rule is
    the spec's own (spec.uri_problem), so what loads is what the cleanup accepts."""
    from .spec import STORAGE_URI_KINDS, uri_problem

    # a Store strips trailing slashes: its uri is "" when its root is "/"
    problem = uri_problem(uri or "/", STORAGE_URI_KINDS, prefix=True)
    return f"{uri!r} {problem}" if problem else None


def filesystem(protocol: str, endpoint: Optional[str] = None, region: Optional[str] = None):
    if protocol == "file":
        return fsspec.filesystem("file", auto_mkdir=True)
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        client_kwargs["region_name"] = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    anon = not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
                or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") or os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"))
    # skip_instance_cache: each Store has its own client, so a changed environment
    # (credentials, endpoint) is honoured rather than a cached client reused.
    return fsspec.filesystem(
        "s3",
        anon=anon and bool(endpoint),
        client_kwargs=client_kwargs,
        default_block_size=MULTIPART_CHUNK,
        skip_instance_cache=True,
        config_kwargs={"retries": {"max_attempts": 5, "mode": "standard"}},
    )


class Store:
    """An artifact store rooted at a URI. Paths given to methods are relative to the root,
    with '/' separators."""

    def __init__(self, uri: str, endpoint: Optional[str] = None, region: Optional[str] = None):
        self.uri = uri.rstrip("/")
        self.protocol, self.root = _split(uri)
        self.endpoint = endpoint
        self.region = region
        self.fs = filesystem(self.protocol, endpoint, region)

    @classmethod
    def for_spec(cls, spec) -> "Store":
        return cls(spec.storage.uri, spec.storage.endpoint, spec.storage.region)

    # --- paths ---
    def path(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        """A full URI for rel, as users see it (s3://bucket/key or file:///path)."""
        p = self.path(rel)
        return f"s3://{p}" if self.protocol == "s3" else f"file://{p}"

    def sub(self, rel: str) -> "Store":
        return Store(self.url(rel), self.endpoint, self.region)

    # --- queries ---
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under rel; empty if rel does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False, refresh=True) if self.protocol == "s3" else self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def walk_files(self, rel: str = "") -> list[str]:
        """All files under rel, relative to rel."""
        base = self.path(rel)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        out = []
        for f in found:
            f = f if self.protocol == "s3" else f
            out.append(posixpath.relpath(f, base))
        return sorted(out)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    # --- reads ---
    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(rel)} does not exist") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def read_jsonl(self, rel: str) -> list[dict]:
        out = []
        # split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 and the like,
        # which json.dumps(ensure_ascii=False) leaves unescaped inside strings
        for n, line in enumerate(self.read_text(rel).split("\n"), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise StorageError(f"{self.url(rel)} line {n}: not JSON ({e})") from None
        return out

    # --- writes ---
    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        if self.protocol == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            self.fs.pipe_file(path, data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_jsonl(self, rel: str, rows: Iterable[dict]) -> None:
        self.write_text(rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def put_file(self, local: str | Path, rel: str) -> None:
        """Upload one local file (multipart above MULTIPART_CHUNK on S3; atomic rename locally)."""
        path = self.path(rel)
        if self.protocol == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp-upload"
            shutil.copyfile(local, tmp)
            os.replace(tmp, path)
        else:
            self.fs.put_file(str(local), path, chunksize=MULTIPART_CHUNK)

    def get_file(self, rel: str, local: str | Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self.path(rel), str(local))

    def delete(self, rel: str = "", recursive: bool = True) -> None:
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)

    def prune_empty_dirs(self, rels: Iterable[str]) -> None:
        """Remove the directories under ``rels`` left empty, then the root if it is empty
        (local stores; S3 has no directories)."""
        if self.protocol != "file":
            return
        for rel in rels:
            for here, _dirs, _files in os.walk(self.path(rel), topdown=False):
                try:
                    os.rmdir(here)  # fails, and is left alone, when not empty
                except OSError:
                    pass
        try:
            os.rmdir(self.root)
        except OSError:
            pass


def read_uri_jsonl(uri: str, endpoint: Optional[str] = None) -> list[dict]:
    """Read a JSONL file given by a full URI (seed prompts, SFT data)."""
    protocol, path = _split(uri)
    parent, name = posixpath.split(path)
    prefix = "s3://" if protocol == "s3" else "file://"
    return Store(prefix + parent, endpoint).read_jsonl(name)


def iter_chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]
