"""The storage abstraction on a local store, the layout's step plan, and the worker
dispatcher's idempotence, with a phase that needs no model."""
import json
import os

import pytest

from selfreward import layout
from selfreward.spec import parse_spec
from selfreward.storage import Store, StorageError, read_uri_jsonl
from selfreward.worker.common import aggregate, compact, resolve_shard, write_termination_log, PhaseError


def _spec(tmp_path, **over):
    data = {
        "model": {"uri": "/models/base"},
        "prompts": {"uri": "/data/prompts.jsonl"},
        "iterations": 2,
        "storage": {"uri": f"file://{tmp_path}/artifacts"},
    }
    data.update(over)
    return parse_spec(data)


def test_store_roundtrip_and_atomic_writes(tmp_path):
    store = Store(f"file://{tmp_path}/root")
    assert not store.exists("a/b.json")
    store.write_json("a/b.json", {"x": 1})
    assert store.read_json("a/b.json") == {"x": 1}
    store.write_jsonl("a/c.jsonl", [{"i": 1}, {"i": 2}])
    assert store.read_jsonl("a/c.jsonl") == [{"i": 1}, {"i": 2}]
    assert store.list("a") == ["b.json", "c.jsonl"]
    assert store.list("missing") == []
    # no temporary files are left behind by atomic writes
    assert sorted(os.listdir(tmp_path / "root" / "a")) == ["b.json", "c.jsonl"]
    assert store.url("a/b.json") == f"file://{tmp_path}/root/a/b.json"
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(1024 * 1024))
    store.put_file(local, "ckpt/big.bin")
    assert store.size("ckpt/big.bin") == 1024 * 1024
    assert store.walk_files("") == ["a/b.json", "a/c.jsonl", "ckpt/big.bin"]
    store.delete("ckpt")
    assert not store.exists("ckpt/big.bin")


def test_store_errors_name_the_place(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        store.read_json("nothing.json")
    (tmp_path / "bad.jsonl").write_text('{"ok": 1}\nnot json\n')
    with pytest.raises(StorageError, match="line 2"):
        store.read_jsonl("bad.jsonl")
    with pytest.raises(StorageError, match="unsupported"):
        Store("http://example.invalid/x")
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    assert read_uri_jsonl(f"file://{tmp_path}/p.jsonl") == [{"prompt": "hi"}]


def test_steps_follow_the_spec(tmp_path):
    spec = _spec(tmp_path, generation={"shards": 3}, judge={"shards": 2})
    keys = [(s.iteration, s.phase, s.shards) for s in layout.steps(spec)]
    assert keys == [
        (1, "generate", 3), (1, "judge", 2), (1, "pairs", 1), (1, "train", 1),
        (2, "generate", 3), (2, "judge", 2), (2, "pairs", 1), (2, "train", 1),
    ]
    spec = _spec(tmp_path, sft={"instructionDataUri": "/d/ift.jsonl"},
                 prompts={"uri": "/p.jsonl", "selfInstruct": {"count": 4}})
    phases = [s.key for s in layout.steps(spec)]
    assert phases[:3] == ["iter-0/sft", "iter-1/instruct", "iter-1/generate"]
    # M_1 is the SFT checkpoint; M_2 the first DPO checkpoint
    assert layout.policy_checkpoint(spec, 1) == "iter-0/sft/checkpoint"
    assert layout.policy_checkpoint(spec, 2) == "iter-1/train/checkpoint"
    assert layout.reference_checkpoint(spec, 2) == "iter-1/train/checkpoint"
    spec.training.reference = "base"
    assert layout.reference_checkpoint(spec, 2) == "iter-0/sft/checkpoint"
    no_sft = _spec(tmp_path, training={"reference": "base"})
    assert layout.policy_checkpoint(no_sft, 1) is None
    assert layout.reference_checkpoint(no_sft, 2) is None


def test_shard_resolution_defaults_to_indexed_job_index(monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert resolve_shard(None, None, 4) == (2, 4)
    assert resolve_shard(1, 3, 4) == (1, 3)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    assert resolve_shard(None, None, 4) == (0, 4)
    with pytest.raises(PhaseError, match="outside"):
        resolve_shard(5, 4, 4)


def test_aggregate_and_compact_summary():
    agg = aggregate([
        {"shard": 0, "prompts": 3, "durationSeconds": 2.0, "backend": "transformers"},
        {"shard": 1, "prompts": 4, "durationSeconds": 5.0, "backend": "transformers"},
    ])
    assert agg == {"prompts": 7, "durationSeconds": 5.0, "backend": "transformers"}
    big = {"ok": 1, "text": "x" * 10000, "nested": {"a": 1}, "f": 0.123456789}
    text = compact(big)
    assert len(text.encode()) < 4096
    assert json.loads(text) == {"ok": 1, "f": 0.123457}


def test_termination_log_written_where_asked(tmp_path):
    target = tmp_path / "term"
    assert write_termination_log({"pairs": 3}, str(target))
    assert json.loads(target.read_text()) == {"pairs": 3}
