"""A run's store is proved the run's by its owner marker; the cleanup deletes only what
the run wrote, on a local store and on S3 (SeaweedFS on loopback), and refuses with a
reason, deleting nothing, when it cannot prove ownership or the store is a root."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from s3server import make_bucket, s3_env, s3_server
from selfreward import layout
from selfreward.ownership import MARKER_KIND, OwnershipError, claim, cleanup, owner_of
from selfreward.spec import parse_spec
from selfreward.storage import Store, storage_root_problem
from selfreward.worker import main_phase

ME = {"namespace": "ml", "name": "run-a", "uid": "uid-a"}
OTHER = {"namespace": "ml", "name": "run-b", "uid": "uid-b"}

RUN_FILES = ["run.json", "iterations.json", "iter-1/generate/shard-00000-of-00001.jsonl",
             "iter-1/generate/summary.json", "iter-1/train/checkpoint/model.safetensors",
             "iter-12/pairs/pairs.jsonl"]


def _fill(store: Store, files, text="x") -> None:
    for f in files:
        store.write_text(f, text)


def _all(store: Store) -> set[str]:
    return set(store.walk_files(""))


@pytest.mark.parametrize("uri, bad", [
    ("s3://bucket", True), ("s3://bucket/", True), ("s3:///x", True), ("s3://bucket//x", True),
    ("s3://bucket/a/../b", True), ("s3://bucket/./a", True), ("file:///", True), ("/", True),
    ("file:///data/../", True), ("/data//run", True), ("gs://bucket/x", True),
    ("s3://bucket/runs/a", False), ("s3://bucket/a/", False), ("file:///data/run", False), ("/tmp/x", False),
    ("relative/dir", False),
])
def test_storage_root_problem(uri, bad):
    assert (storage_root_problem(uri) is not None) == bad, uri


def test_claim_writes_the_marker_keeps_it_takes_over_a_recreated_run_and_refuses_another(tmp_path):
    store = Store(f"file://{tmp_path}/s")
    assert claim(store, ME) == "new"
    assert store.read_json(layout.OWNER) == {"kind": MARKER_KIND, **ME}
    assert claim(store, ME) == "same"
    recreated = dict(ME, uid="uid-a2")  # deleted and applied again under the same name
    assert claim(store, recreated) == "taken over"
    assert store.read_json(layout.OWNER)["uid"] == "uid-a2"
    theirs = Store(f"file://{tmp_path}/t")
    claim(theirs, OTHER)
    with pytest.raises(OwnershipError, match="spec.storage.uri: .* holds the artifacts of run ml/run-b"):
        claim(theirs, ME)
    other_ns = dict(ME, namespace="prod")
    with pytest.raises(OwnershipError):
        claim(store, other_ns)
    Store(f"file://{tmp_path}/u").write_text(layout.OWNER, "not json")
    with pytest.raises(OwnershipError, match="not a selfreward owner marker"):
        claim(Store(f"file://{tmp_path}/u"), ME)
    assert owner_of({"name": "x"}) is None and owner_of({"name": "x", "uid": "u"})["namespace"] == ""


def test_a_worker_refuses_a_store_of_another_run_before_writing(tmp_path):
    store = Store(f"file://{tmp_path}/s")
    claim(store, OTHER)
    spec = parse_spec({"model": {"uri": "/models/base"}, "prompts": {"uri": str(tmp_path / "p.jsonl")},
                       "iterations": 1, "storage": {"uri": f"file://{tmp_path}/s"}})
    log = tmp_path / "term"
    code = main_phase(spec, "generate", 1, None, None, str(log), owner=ME)
    assert code == 2  # fails the Job at once (podFailurePolicy FailJob), as an invalid spec
    assert json.loads(log.read_text())["error"].startswith("spec.storage.uri: ")
    assert _all(store) == {layout.OWNER}  # nothing written


def _scenario(root: Store, sibling: Store, nested: Store) -> None:
    """The run's own files, an unrelated object at the root of its prefix, a sibling run
    whose prefix shares the name's start, and another run's store nested in an iter dir."""
    claim(root, ME)
    _fill(root, RUN_FILES)
    _fill(root, ["notes/keep.txt", "iter-x/keep.txt", "README"])
    claim(sibling, OTHER)
    _fill(sibling, RUN_FILES)
    claim(nested, dict(OTHER, name="nested", uid="uid-n"))
    _fill(nested, ["iter-1/generate/summary.json"])


def _check_after(root: Store, sibling: Store, nested: Store, summary: dict) -> None:
    assert "refused" not in summary, summary
    left = _all(root)
    assert not (left & set(RUN_FILES)) and layout.OWNER not in left
    assert {"notes/keep.txt", "iter-x/keep.txt", "README"} <= left
    nested_rel = nested.uri[len(root.uri) + 1:]
    assert f"{nested_rel}/{layout.OWNER}" in left and f"{nested_rel}/iter-1/generate/summary.json" in left
    assert summary["deleted"] == len(RUN_FILES) + 1 and summary["kept"] == 5
    assert _all(sibling) == set(RUN_FILES) | {layout.OWNER}


def test_cleanup_on_a_local_store_deletes_only_the_runs_files(tmp_path):
    root = Store(f"file://{tmp_path}/runs/a")
    sibling = Store(f"file://{tmp_path}/runs/ab")
    nested = Store(f"file://{tmp_path}/runs/a/iter-3/sub")
    _scenario(root, sibling, nested)
    _check_after(root, sibling, nested, cleanup(root, ME))
    assert not (tmp_path / "runs" / "a" / "iter-1").exists()  # emptied directories go too
    # a store holding only what the run wrote disappears entirely
    alone = Store(f"file://{tmp_path}/alone")
    claim(alone, ME)
    _fill(alone, RUN_FILES)
    cleanup(alone, ME)
    assert not (tmp_path / "alone").exists()


def test_cleanup_refuses_without_proof_and_deletes_nothing(tmp_path):
    unmarked = Store(f"file://{tmp_path}/unmarked")
    _fill(unmarked, RUN_FILES)
    out = cleanup(unmarked, ME)
    assert "owner.json is missing" in out["refused"] and _all(unmarked) == set(RUN_FILES)
    theirs = Store(f"file://{tmp_path}/theirs")
    claim(theirs, OTHER)
    _fill(theirs, RUN_FILES)
    assert "belongs to run ml/run-b" in cleanup(theirs, ME)["refused"]
    assert "belongs to run" in cleanup(theirs, dict(OTHER, uid="uid-b-old"))["refused"]  # same name, older run
    assert "not told which run" in cleanup(theirs, None)["refused"]
    assert _all(theirs) == set(RUN_FILES) | {layout.OWNER}
    empty = Store(f"file://{tmp_path}/never-written")
    assert cleanup(empty, ME) == {"deleted": 0, "kept": 0, "uri": empty.uri}


def test_cleanup_never_deletes_at_a_filesystem_root(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Store, "delete", lambda self, *a, **k: calls.append(a))
    for uri in ("file:///", "/"):
        assert "filesystem root" in cleanup(Store(uri), {"namespace": "", "name": "x", "uid": "u"})["refused"]
    assert calls == []


def test_the_cleanup_command_reports_in_its_termination_message(tmp_path):
    root = Store(f"file://{tmp_path}/s")
    claim(root, ME)
    _fill(root, RUN_FILES + ["keep.txt"])
    manifest = {"apiVersion": "selfreward.dev/v1alpha1", "kind": "SelfRewardRun", "metadata": ME,
                "spec": {"model": {"uri": "/m"}, "prompts": {"uri": "/p.jsonl"}, "storage": {"uri": root.uri}}}
    spec_file = tmp_path / "run.json"
    spec_file.write_text(json.dumps(manifest))
    term = tmp_path / "term"
    env = dict(os.environ, SELFREWARD_TERMINATION_LOG=str(term))
    r = subprocess.run([sys.executable, "-m", "selfreward", "cleanup", "--spec", str(spec_file)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(term.read_text()) == {"deleted": len(RUN_FILES) + 1, "kept": 1, "uri": root.uri}
    assert _all(root) == {"keep.txt"}
    manifest["metadata"] = dict(ME, uid="someone-else")
    spec_file.write_text(json.dumps(manifest))
    claim(root, ME)
    r = subprocess.run([sys.executable, "-m", "selfreward", "cleanup", "--spec", str(spec_file)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "refused" in json.loads(term.read_text()) and "refused" in r.stderr
    assert _all(root) == {"keep.txt", layout.OWNER}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server() as endpoint:
        make_bucket(endpoint, "shared")
        yield endpoint


def test_cleanup_on_s3_keeps_other_runs_and_unrelated_objects(s3, monkeypatch):
    for k, v in s3_env(s3).items():
        monkeypatch.setenv(k, v)
    root = Store("s3://shared/runs/a", s3)
    sibling = Store("s3://shared/runs/ab", s3)  # shares "runs/a" as a key prefix
    nested = Store("s3://shared/runs/a/iter-3/sub", s3)
    _scenario(root, sibling, nested)
    elsewhere = Store("s3://shared", s3)
    elsewhere.write_text("top-level.txt", "keep")
    _check_after(root, sibling, nested, cleanup(root, ME))
    assert elsewhere.exists("top-level.txt")
    # the bucket root: refused even where a marker names the run
    claim(elsewhere, ME)
    _fill(elsewhere, RUN_FILES)
    out = cleanup(elsewhere, ME)
    assert "whole bucket" in out["refused"]
    assert set(RUN_FILES) <= _all(elsewhere) and elsewhere.exists("top-level.txt")
