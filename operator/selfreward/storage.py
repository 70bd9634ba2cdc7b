"""One storage abstraction over artifact URIs: local paths, file:// and s3://.

Everything goes through fsspec (s3fs for S3). Credentials are never passed in code:
s3fs/botocore read AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or any other botocore
source) from the environment. The endpoint comes from the spec or from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.

Writes of small objects are atomic: on a local filesystem via a temporary file and a
rename, on S3 because a PUT is.

Checkpoint-sized transfers (``put_files``, ``get_files``) run concurrently on a pool of
threads with a botocore client (same endpoint, region and credentials as s3fs): files
side by side, each split into parts sized to the file (``part_size``), multipart uploads
and ranged GETs, ``TRANSFER_CONCURRENCY`` requests in flight; each file is hashed while it
streams (sha256, and md5 parts where an ETag is to be checked), so a verified fetch costs
no second pass over the bytes.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import posixpath
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import fsspec

MULTIPART_CHUNK = 64 * 1024 * 1024
MiB = 1024 * 1024
# Requests in flight per transfer; SELFREWARD_S3_CONCURRENCY overrides it. 8 matches the
# default of boto3's transfer manager, the baseline bench/bench_transfer.py measures against.
TRANSFER_CONCURRENCY = max(1, int(os.environ.get("SELFREWARD_S3_CONCURRENCY", "8") or 8))
FILES_AT_ONCE = 4  # files transferred side by side (small tokenizer files must not wait behind shards)
MIN_PART = 8 * MiB  # S3 parts are at least 5 MiB; below 2 parts a file is one request
MAX_PART = 32 * MiB  # bounds memory: at most TRANSFER_CONCURRENCY parts per file are held (1 GiB in all)
MAX_PARTS = 10_000  # the S3 limit of parts per multipart upload


def part_size(size: int, concurrency: int = TRANSFER_CONCURRENCY) -> int:
    """A part size for a file of ``size`` bytes: enough parts to keep ``concurrency``
    requests busy, parts of MIN_PART..MAX_PART (whole MiB), never more than MAX_PARTS."""
    want = math.ceil(size / max(1, concurrency) / MiB) * MiB
    return max(MIN_PART, min(MAX_PART, want), math.ceil(size / MAX_PARTS / MiB) * MiB)


class Digests(dict):
    """What a transfer measured of one file: size, sha256, and (when asked) md5 and the
    md5s of parts of a given size, to compare with an S3 ETag."""


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


def s3_settings(endpoint: Optional[str] = None, region: Optional[str] = None) -> tuple[Optional[str], Optional[str], bool]:
    """(endpoint, region, anonymous) for S3 clients: the spec's values, else the standard
    environment; anonymous when no credential source is in the environment and an endpoint
    is given (a local test server)."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    anon = not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
                or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") or os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"))
    return endpoint, region, anon and bool(endpoint)


def filesystem(protocol: str, endpoint: Optional[str] = None, region: Optional[str] = None):
    if protocol == "file":
        return fsspec.filesystem("file", auto_mkdir=True)
    endpoint, region, anon = s3_settings(endpoint, region)
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    # skip_instance_cache: each Store has its own client, so a changed environment
    # (credentials, endpoint) is honoured rather than a cached client reused.
    return fsspec.filesystem(
        "s3",
        anon=anon,
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

    def put_files(self, files: list[tuple[str | Path, str]]) -> dict[str, Digests]:
        """Upload (local, rel) pairs concurrently; returns each rel's size and sha256,
        hashed from the bytes that were sent."""
        if self.protocol == "file":
            return {rel: self._copy_in(Path(local), rel) for local, rel in files}
        return self._transfers([(rel, self._upload, (Path(local), rel)) for local, rel in files])

    def get_files(self, files: list[tuple[str, str | Path, int]], md5: Optional[dict[str, Optional[int]]] = None
                  ) -> dict[str, Digests]:
        """Download (rel, local, expected size) triples concurrently with ranged GETs;
        returns each rel's size and sha256 (and md5 when ``md5`` names it: None for the
        whole file, N for parts of N bytes). Refuses an object whose size is not the
        expected one."""
        md5 = md5 or {}
        if self.protocol == "file":
            return {rel: self._copy_out(rel, Path(local), size, rel in md5) for rel, local, size in files}
        return self._transfers([(rel, self._download, (rel, Path(local), size, rel in md5, md5.get(rel)))
                                for rel, local, size in files])

    def head(self, rel: str, part_number: Optional[int] = None) -> dict:
        """The object's HEAD response (S3 only): ETag, ContentLength, ServerSideEncryption,
        Metadata; with part_number, PartsCount and that part's ContentLength."""
        bucket, key = self._bucket_key(rel)
        kw = {"PartNumber": part_number} if part_number else {}
        with self._errors(rel):
            return self._client().head_object(Bucket=bucket, Key=key, **kw)

    # --- concurrent transfers (S3): a thread pool of part requests on a botocore client ---
    def _client(self):
        """A botocore client with the endpoint, region and credentials s3fs uses (botocore
        clients are thread-safe; sessions are not, so it is made here, before any pool)."""
        if getattr(self, "_boto", None) is None:
            import botocore.session
            from botocore import UNSIGNED
            from botocore.config import Config

            endpoint, region, anon = s3_settings(self.endpoint, self.region)
            cfg = Config(max_pool_connections=max(10, 2 * TRANSFER_CONCURRENCY),
                         retries={"max_attempts": 5, "mode": "standard"},
                         **({"signature_version": UNSIGNED} if anon else {}))
            self._boto = botocore.session.get_session().create_client(
                "s3", endpoint_url=endpoint, region_name=region, config=cfg)
        return self._boto

    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, _, key = self.path(rel).partition("/")
        return bucket, key

    @contextlib.contextmanager
    def _errors(self, rel: str):
        from botocore.exceptions import ClientError

        try:
            yield
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{self.url(rel)} does not exist") from None
            raise StorageError(f"{self.url(rel)}: {code or 'error'}: {e}") from None

    def _transfers(self, jobs: list[tuple[str, Any, tuple]]) -> dict[str, Digests]:
        """Run (name, method, args) file transfers, FILES_AT_ONCE files at a time, their
        part requests on one pool of TRANSFER_CONCURRENCY threads. File threads wait on
        part requests; part requests never wait on anything, so the pools cannot deadlock."""
        self._client()
        with ThreadPoolExecutor(TRANSFER_CONCURRENCY, thread_name_prefix="s3-part") as parts, \
                ThreadPoolExecutor(FILES_AT_ONCE, thread_name_prefix="s3-file") as files:
            futures = [(name, files.submit(method, parts, *args)) for name, method, args in jobs]
            try:
                return {name: f.result() for name, f in futures}
            except BaseException:
                for _, f in futures:
                    f.cancel()
                raise

    def _upload(self, parts: ThreadPoolExecutor, local: Path, rel: str) -> Digests:
        client = self._client()
        bucket, key = self._bucket_key(rel)
        size = local.stat().st_size
        part = part_size(size)
        sha = hashlib.sha256()
        if size < 2 * part:
            data = local.read_bytes()
            sha.update(data)
            with self._errors(rel):
                client.put_object(Bucket=bucket, Key=key, Body=data)
            return Digests(size=len(data), sha256=sha.hexdigest())
        with self._errors(rel):
            upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        pending: collections.deque = collections.deque()
        etags: list[str] = []
        sent = 0
        try:
            with open(local, "rb") as f, self._errors(rel):
                while data := f.read(part):
                    sent += len(data)
                    sha.update(data)  # hashlib lets go of the GIL: the part threads keep sending
                    pending.append(parts.submit(client.upload_part, Bucket=bucket, Key=key, UploadId=upload_id,
                                                PartNumber=len(etags) + len(pending) + 1, Body=data))
                    while len(pending) >= TRANSFER_CONCURRENCY:  # at most this many parts held
                        etags.append(pending.popleft().result()["ETag"])
                while pending:
                    etags.append(pending.popleft().result()["ETag"])
                client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]})
        except BaseException:
            for p in pending:
                p.cancel()
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:  # the upload's own error is the one to report
                pass
            raise
        return Digests(size=sent, sha256=sha.hexdigest())

    def _download(self, parts: ThreadPoolExecutor, rel: str, local: Path, size: int, want_md5: bool,
                  md5_part: Optional[int]) -> Digests:
        client = self._client()
        bucket, key = self._bucket_key(rel)
        part = md5_part or part_size(size)
        local.parent.mkdir(parents=True, exist_ok=True)
        sha, whole_md5, part_md5s = hashlib.sha256(), hashlib.md5(), []
        fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

        def fetch(start: int, end: int) -> bytes:
            with self._errors(rel):
                resp = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end}")
                data = resp["Body"].read()
            total = str(resp.get("ContentRange", "")).rpartition("/")[2]
            if total.isdigit() and int(total) != size:
                raise StorageError(f"{self.url(rel)} has {total} bytes, expected {size}")
            if len(data) != end - start + 1:
                raise StorageError(f"{self.url(rel)}: bytes {start}-{end} came back as {len(data)} bytes")
            os.pwrite(fd, data, start)
            return data

        pending: collections.deque = collections.deque()
        try:
            if size == 0:  # a ranged GET of nothing is an error: check the object is empty
                length = int(self.head(rel).get("ContentLength", 0))
                if length:
                    raise StorageError(f"{self.url(rel)} has {length} bytes, expected 0")
            for start in range(0, size, part):
                pending.append(parts.submit(fetch, start, min(start + part, size) - 1))
                while len(pending) >= TRANSFER_CONCURRENCY:
                    self._digest(pending.popleft().result(), sha, want_md5, md5_part, whole_md5, part_md5s)
            while pending:
                self._digest(pending.popleft().result(), sha, want_md5, md5_part, whole_md5, part_md5s)
        except BaseException:
            for p in pending:
                p.cancel()
            raise
        finally:
            for p in pending:  # no part thread may still write once the file is closed
                try:
                    p.result()
                except BaseException:
                    pass
            os.close(fd)
        out = Digests(size=size, sha256=sha.hexdigest())
        if want_md5:
            out["md5"] = (f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}" if md5_part
                          else whole_md5.hexdigest())
        return out

    @staticmethod
    def _digest(data: bytes, sha, want_md5: bool, md5_part: Optional[int], whole_md5, part_md5s: list) -> None:
        """Hash one part, in file order (the parts arrive in any order, the hashes need it)."""
        sha.update(data)
        if want_md5 and md5_part:
            part_md5s.append(hashlib.md5(data).digest())
        elif want_md5:
            whole_md5.update(data)

    # --- the same for local stores ---
    def _copy_in(self, local: Path, rel: str) -> Digests:
        path = self.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp-upload"
        sha, size = hashlib.sha256(), 0
        with open(local, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(4 * MiB):
                sha.update(chunk)
                dst.write(chunk)
                size += len(chunk)
        os.replace(tmp, path)
        return Digests(size=size, sha256=sha.hexdigest())

    def _copy_out(self, rel: str, local: Path, size: int, want_md5: bool) -> Digests:
        src_path = self.path(rel)
        if not os.path.isfile(src_path):
            raise FileNotFoundError(f"{self.url(rel)} does not exist")
        local.parent.mkdir(parents=True, exist_ok=True)
        sha, md5, n = hashlib.sha256(), hashlib.md5(), 0
        with open(src_path, "rb") as src, open(local, "wb") as dst:
            while chunk := src.read(4 * MiB):
                sha.update(chunk)
                if want_md5:
                    md5.update(chunk)
                dst.write(chunk)
                n += len(chunk)
        if n != size:
            raise StorageError(f"{self.url(rel)} has {n} bytes, expected {size}")
        out = Digests(size=n, sha256=sha.hexdigest())
        if want_md5:
            out["md5"] = md5.hexdigest()
        return out

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
