"""Checkpoint transfers against a real S3 server (SeaweedFS on loopback, tests/s3server.py):
the store's commit (upload, hashed while sent) and fetch-and-verify (download, hashed
while received), side by side with boto3's transfer manager at 8 threads on the same
files and endpoint (upload_file / download_file, then a sha256 pass, which is what a
verified fetch needs), and with the store's previous one-stream-per-file transfers
(s3fs put_file / get_file in 64 MiB blocks, then hashing). boto3-nohash is the transfer
manager moving the bytes with no hashing at all (a bound, not a verified fetch).

    .venv/bin/python bench/bench_transfer.py [--mib 256 --files 3 --repeat 3]

Prints one line per figure and the ratios (store / boto3, store / before); the best of
``--repeat`` runs counts for each. Nothing is asserted: speed belongs here, not in tests."""
from __future__ import annotations

import sys

if sys.path and sys.path[0] and __file__.startswith(sys.path[0].rstrip("/") + "/"):
    del sys.path[0]  # bench/operator.py would shadow the standard library's operator module

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_checkpoint(d: Path, mib: int, files: int) -> None:
    """A checkpoint-shaped directory: `files` safetensors shards of `mib` MiB (random
    bytes: nothing compresses), a config and a tokenizer of a few MiB."""
    d.mkdir(parents=True)
    for i in range(files):
        with open(d / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "tokenizer.json").write_bytes(os.urandom(7 << 20))


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256, help="MiB per weight shard")
    ap.add_argument("--files", type=int, default=3, help="weight shards")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import boto3
    from boto3.s3.transfer import TransferConfig
    from s3server import REGION, make_bucket, s3_env, s3_server

    from selfreward import checkpoint
    from selfreward.storage import MULTIPART_CHUNK, TRANSFER_CONCURRENCY, Store

    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    try:
        src = work / "ckpt"
        make_checkpoint(src, args.mib, args.files)
        names = sorted(p.name for p in src.iterdir())
        total = sum((src / n).stat().st_size for n in names)
        print(f"checkpoint: {len(names)} files, {total / 1e6:.0f} MB; store concurrency {TRANSFER_CONCURRENCY}")
        with s3_server(backend="weed") as endpoint:
            env = s3_env(endpoint)
            os.environ.update(env)
            make_bucket(endpoint, "bench")
            client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                  aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=REGION)
            tc = TransferConfig(max_concurrency=8, use_threads=True)
            store = Store(f"s3://bench/runs")
            n = [0]

            def fresh(prefix: str) -> str:
                n[0] += 1
                return f"{prefix}-{n[0]}"

            # warm the server (its first writes allocate volumes)
            checkpoint.commit(src, store, "warm")

            def store_commit():
                checkpoint.commit(src, store, fresh("store"))

            def boto_upload(hash_too: bool = True):
                rel = fresh("boto")
                for name in names:  # the commit hashes every file too
                    if hash_too:
                        sha256_file(src / name)
                    client.upload_file(str(src / name), "bench", f"runs/{rel}/{name}", Config=tc)

            def before_upload():
                rel = fresh("before")
                for name in names:
                    sha256_file(src / name)
                    store.fs.put_file(str(src / name), store.path(f"{rel}/{name}"), chunksize=MULTIPART_CHUNK)

            up = {"store": best(store_commit, args.repeat), "boto3": best(boto_upload, args.repeat),
                  "boto3-nohash": best(lambda: boto_upload(False), args.repeat),
                  "before": best(before_upload, args.repeat)}

            rel = "warm"
            cache = work / "cache"

            def store_fetch():
                shutil.rmtree(cache, ignore_errors=True)
                checkpoint.fetch(store, rel, cache=cache)

            def boto_download(hash_too: bool = True):
                out = work / "boto-out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                for name in names:
                    client.download_file("bench", f"runs/{rel}/{name}", str(out / name), Config=tc)
                    if hash_too:
                        sha256_file(out / name)

            def before_download():
                out = work / "before-out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                for name in names:
                    store.fs.get_file(store.path(f"{rel}/{name}"), str(out / name))
                    sha256_file(out / name)

            down = {"store": best(store_fetch, args.repeat), "boto3": best(boto_download, args.repeat),
                    "boto3-nohash": best(lambda: boto_download(False), args.repeat),
                    "before": best(before_download, args.repeat)}

        for what, figures in (("commit (upload + sha256)", up), ("fetch and verify (download + sha256)", down)):
            for who, secs in figures.items():
                print(f"{what:38s} {who:12s} {secs:7.2f} s  {total / secs / 1e6:8.1f} MB/s")
            print(f"{what:38s} speed ratios: store/boto3 {figures['boto3'] / figures['store']:.2f}x, "
                  f"store/boto3-nohash {figures['boto3-nohash'] / figures['store']:.2f}x, "
                  f"store/before {figures['before'] / figures['store']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
