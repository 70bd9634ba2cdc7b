"""Checkpoint commits and verified fetches, on a local store and on a real S3 server
(SeaweedFS on loopback): a committed checkpoint round-trips into a model that
generates; a half-written, truncated, corrupted, incomplete or garbage-manifest
checkpoint is refused with a CheckpointError that says what is wrong; and a fetch from
S3 verifies before anything lands in the cache."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from selfreward import checkpoint
from selfreward.checkpoint import CheckpointError
from selfreward.layout import MANIFEST
from selfreward.storage import Store

from s3server import make_bucket, s3_env, s3_server

WEIGHTS = "model.safetensors"


def _generate(model_dir: str | Path) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert len(new) >= 1
    return new


@pytest.fixture
def committed(tiny_model, tmp_path):
    """The tiny model committed to a local store; returns (store, rel)."""
    store = Store(f"file://{tmp_path}/store")
    figures = checkpoint.commit(tiny_model, store, "iter-1/train/checkpoint", {"iteration": 1})
    assert figures["checkpointBytes"] == sum(
        p.stat().st_size for p in Path(tiny_model).iterdir() if p.is_file() and not p.name.startswith("."))
    assert figures["checkpoint"] == store.url("iter-1/train/checkpoint")
    return store, "iter-1/train/checkpoint"


def test_local_commit_fetch_load_generate(tiny_model, committed):
    store, rel = committed
    manifest = checkpoint.read_manifest(store, rel)
    assert WEIGHTS in manifest["files"] and "tokenizer.json" in manifest["files"]
    assert manifest["metadata"] == {"iteration": 1}
    for name, info in manifest["files"].items():
        assert info["sha256"] == checkpoint.sha256_file(Path(tiny_model) / name)
    local = checkpoint.fetch(store, rel)
    assert local == Path(store.path(rel))  # local stores are verified in place
    # the committed copy generates exactly what the original does (greedy decoding)
    assert _generate(local) == _generate(tiny_model)


def test_manifest_is_written_last_and_recommit_replaces(tiny_model, tmp_path):
    store = Store(f"file://{tmp_path}/store")
    rel = "ckpt"
    checkpoint.commit(tiny_model, store, rel)
    first = checkpoint.read_manifest(store, rel)
    # a second commit of changed content: the old manifest must not vouch for new files
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model, changed)
    (changed / "extra.txt").write_text("more")
    checkpoint.commit(changed, store, rel)
    second = checkpoint.verify(store, rel)
    assert "extra.txt" in second["files"] and "extra.txt" not in first["files"]


def test_no_weights_is_not_a_checkpoint(tmp_path):
    d = tmp_path / "empty-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no .safetensors"):
        checkpoint.commit(d, Store(str(tmp_path / "store")), "x")


def test_missing_checkpoint(tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.fetch(store, "iter-3/train/checkpoint")


def test_half_written_checkpoint_is_refused(tiny_model, tmp_path):
    store = Store(str(tmp_path / "store"))
    # what a worker killed mid-upload leaves: some files, no manifest
    for name in ("config.json", WEIGHTS):
        store.put_file(Path(tiny_model) / name, f"ckpt/{name}")
    assert not checkpoint.is_committed(store, "ckpt")
    with pytest.raises(CheckpointError, match="no MANIFEST.json: it is half-written"):
        checkpoint.fetch(store, "ckpt")


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize("how,message", [
    ("truncate", r"model\.safetensors has \d+ bytes, the manifest says \d+"),
    ("flip", r"model\.safetensors sha256 [0-9a-f]{12}… does not match the manifest"),
    ("delete", r"model\.safetensors is missing"),
])
def test_damaged_local_checkpoint_is_refused(committed, how, message):
    store, rel = committed
    _corrupt(Path(store.path(f"{rel}/{WEIGHTS}")), how)
    with pytest.raises(CheckpointError, match=message) as err:
        checkpoint.fetch(store, rel)
    assert store.url(rel) in str(err.value)  # the message names the checkpoint


@pytest.mark.parametrize("content,message", [
    (b"{not json", "MANIFEST.json is not valid JSON"),
    (b"\xff\xfe\x00garbage", "MANIFEST.json is not valid JSON"),
    (b"[1, 2, 3]", "MANIFEST.json lists no files"),
    (b'{"version": 1, "files": {}}', "MANIFEST.json lists no files"),
])
def test_garbage_manifest_is_refused(committed, content, message):
    store, rel = committed
    Path(store.path(f"{rel}/{MANIFEST}")).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.fetch(store, rel)


def test_manifest_listing_a_file_never_uploaded(committed):
    store, rel = committed
    manifest = checkpoint.read_manifest(store, rel)
    manifest["files"]["model-00002-of-00002.safetensors"] = {"size": 10, "sha256": "0" * 64}
    store.write_json(f"{rel}/{MANIFEST}", manifest)
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is missing"):
        checkpoint.verify(store, rel)


# --- S3 ---

@pytest.fixture(scope="module")
def s3_endpoint():
    with s3_server() as endpoint:
        make_bucket(endpoint, "ckpt")
        yield endpoint


@pytest.fixture
def s3_store(s3_endpoint, monkeypatch, request):
    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    return Store(f"s3://ckpt/{request.node.name.replace('[', '-').rstrip(']')}", s3_endpoint)


def test_s3_commit_fetch_load_generate(tiny_model, s3_store, tmp_path):
    figures = checkpoint.commit(tiny_model, s3_store, "iter-1/train/checkpoint", {"iteration": 1})
    assert figures["checkpoint"].startswith("s3://ckpt/")
    assert figures["uploadMBps"] > 0
    cache = tmp_path / "cache"
    local = checkpoint.fetch(s3_store, "iter-1/train/checkpoint", cache=cache)
    assert local.parent == cache / "checkpoints"
    assert sorted(p.name for p in local.iterdir()) == sorted(checkpoint.read_manifest(s3_store, "iter-1/train/checkpoint")["files"])
    assert _generate(local) == _generate(tiny_model)
    # a second fetch reuses the verified copy
    assert checkpoint.fetch(s3_store, "iter-1/train/checkpoint", cache=cache) == local
    # the manifest-less case on S3 as well
    s3_store.put_file(Path(tiny_model) / WEIGHTS, "half/model.safetensors")
    with pytest.raises(CheckpointError, match="half-written"):
        checkpoint.fetch(s3_store, "half", cache=cache)


@pytest.mark.parametrize("how,message", [
    ("flip", "sha256 .* does not match the manifest"),
    ("truncate", "bytes, the manifest says"),
    ("delete", "is missing"),
])
def test_s3_fetch_verifies_before_caching(tiny_model, s3_store, tmp_path, how, message):
    rel = "ckpt"
    checkpoint.commit(tiny_model, s3_store, rel)
    # damage the object in the bucket, behind the store's back
    damaged = tmp_path / WEIGHTS
    s3_store.get_file(f"{rel}/{WEIGHTS}", damaged)
    _corrupt(damaged, how)
    if how == "delete":
        s3_store.delete(f"{rel}/{WEIGHTS}")
    else:
        s3_store.put_file(damaged, f"{rel}/{WEIGHTS}")
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=message):
        checkpoint.fetch(s3_store, rel, cache=cache)
    # nothing unverified is left in the cache, not even a partial download
    root = cache / "checkpoints"
    assert not root.exists() or os.listdir(root) == []


def test_s3_manifest_garbage(tiny_model, s3_store, tmp_path):
    checkpoint.commit(tiny_model, s3_store, "g")
    s3_store.write_bytes(f"g/{MANIFEST}", b"\x00\x01 not a manifest")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.fetch(s3_store, "g", cache=tmp_path / "cache")
    s3_store.write_json(f"g/{MANIFEST}", {"files": []})
    with pytest.raises(CheckpointError, match="lists no files"):
        checkpoint.fetch(s3_store, "g", cache=tmp_path / "cache")
    assert json.loads(s3_store.read_text(f"g/{MANIFEST}")) == {"files": []}
