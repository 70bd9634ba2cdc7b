"""Runs a team can reproduce: run.json (spec, seeds, image, versions, revision) written by
the first worker or by `selfreward run`, the runtime block of every phase summary, the
image digest the operator reads from pod status, and `selfreward describe` reading a
run's history from the store alone."""
from __future__ import annotations

import json
from importlib.metadata import version

import pytest

from selfreward import jobs as J
from selfreward import layout, provenance
from selfreward.cli import main
from selfreward.describe import DescribeError, history, render
from selfreward.layout import Step
from selfreward.local import RUN_JSON, check_run_json
from selfreward.reconcile import reconcile
from selfreward.spec import parse_spec
from selfreward.storage import Store
from selfreward.worker import run_phase


def _spec(tmp_path, **over):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Only one prompt."}) + "\n")
    data = {"model": {"uri": "/models/never-loaded"}, "prompts": {"uri": str(prompts)}, "iterations": 2,
            "storage": {"uri": f"file://{tmp_path}/store"}, "seed": 11, "training": {"seed": 5},
            "generation": {"shards": 2}}
    data.update(over)
    return parse_spec(data)


def test_the_first_worker_writes_run_json_and_every_summary_its_runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFREWARD_IMAGE", "registry.example/selfreward-worker:1.2.3")
    monkeypatch.setenv("SELFREWARD_GIT_REVISION", "0123456789abcdef0123456789abcdef01234567")
    spec = _spec(tmp_path)
    store = Store.for_spec(spec)
    # shard 1 of 2 gets no prompt (the only one is shard 0's): the worker runs without a model
    shard = run_phase(spec, "generate", 1, shard=1, num_shards=2, store=store)
    doc = store.read_json(RUN_JSON)
    assert doc["runJsonVersion"] == 1 and doc["createdBy"] == "worker"
    assert parse_spec(doc["spec"]) == spec  # the spec as applied, losslessly
    assert doc["seeds"] == {"run": 11, "training": 5}
    rt = doc["runtime"]
    assert rt["image"] == "registry.example/selfreward-worker:1.2.3"
    assert rt["project"] == {"version": "0.1.0", "gitRevision": "0123456789abcdef0123456789abcdef01234567"}
    for lib in ("torch", "transformers", "trl", "peft", "accelerate", "selfreward"):
        assert rt["versions"][lib] == version(lib)
    assert shard["runtime"] == rt
    assert store.read_json(layout.shard_summary_path(1, "generate", 1, 2))["runtime"]["image"] == rt["image"]

    # a later worker with another image does not rewrite run.json, but its own summary says what it ran
    monkeypatch.setenv("SELFREWARD_IMAGE", "registry.example/selfreward-worker:1.2.4")
    before = store.read_text(RUN_JSON)
    assert provenance.ensure_run_json(store, spec) is False
    assert store.read_text(RUN_JSON) == before
    assert provenance.runtime()["image"] == "registry.example/selfreward-worker:1.2.4"


def test_local_runs_read_the_old_bare_spec_run_json_and_upgrade_it(tmp_path):
    spec = _spec(tmp_path)
    store = Store.for_spec(spec)
    store.write_json(RUN_JSON, spec.model_dump(mode="json", exclude_none=True))  # a store from before
    assert check_run_json(store, spec) == "same"
    grown = _spec(tmp_path, iterations=4)
    assert check_run_json(store, grown) == "updated"
    doc = store.read_json(RUN_JSON)
    assert doc["runJsonVersion"] == 1 and doc["spec"]["iterations"] == 4 and doc["updatedAt"]
    assert check_run_json(store, grown) == "same"


def test_git_revision_from_a_checkout(monkeypatch):
    monkeypatch.delenv("SELFREWARD_GIT_REVISION", raising=False)
    provenance._checkout_revision.cache_clear()
    try:
        rev = provenance.git_revision()
    finally:
        provenance._checkout_revision.cache_clear()
    # the tests run from the project's git checkout (CI clones it)
    assert rev is not None and len(rev.split("-")[0]) == 40


def test_jobs_carry_the_image_and_the_operator_records_its_digest():
    spec = parse_spec({"model": {"uri": "/m"}, "prompts": {"uri": "/p.jsonl"}, "iterations": 1,
                       "storage": {"uri": "s3://b/r"}, "image": "reg/worker:7",
                       "training": {"checkpointing": {"terminationGraceSeconds": 300}}})
    meta = {"name": "r", "namespace": "ns", "uid": "u", "generation": 1}
    train = J.build_job(meta, spec, Step(1, "train"), 1)
    gen = J.build_job(meta, spec, Step(1, "generate", 1), 1)
    for job in (train, gen):
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["SELFREWARD_IMAGE"] == "reg/worker:7"
    assert train["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    assert "terminationGracePeriodSeconds" not in gen["spec"]["template"]["spec"]  # generate resumes from parts

    digest = "reg/worker@sha256:" + "ab" * 32
    done = dict(gen, status={"conditions": [{"type": "Complete", "status": "True"}]},
                pods=[{"metadata": {"name": "p0"}, "status": {"containerStatuses": [
                    {"name": "worker", "imageID": digest,
                     "state": {"terminated": {"exitCode": 0, "message": json.dumps({"prompts": 1})}}}]}}])
    assert J.job_image_id(done) == digest
    assert J.job_image_id(dict(gen, pods=[])) is None
    run = {"metadata": dict(meta), "spec": spec.model_dump(mode="json", exclude_none=True)}
    from datetime import datetime, timezone

    res = reconcile(run, {}, [done], datetime(2026, 3, 1, tzinfo=timezone.utc), J.Settings(worker_image="x"))
    assert res.status["workerImageID"] == digest


def _write_run(store: Store, spec) -> None:
    store.write_json(RUN_JSON, provenance.run_record(spec, "local"))
    rt = {"image": "reg/worker:7", "versions": {"torch": "9.9", "trl": "1.0"}}
    store.write_json(layout.summary_path(1, "generate"), {"prompts": 8, "responses": 32, "durationSeconds": 3.5,
                                                            "tokensPerSecond": 12.25, "runtime": rt})
    store.write_json(layout.summary_path(1, "judge"), {"judged": 32, "meanScore": 3.125, "parseFailures": 2,
                                                         "runtime": rt})
    store.write_json(layout.summary_path(1, "train"), {"steps": 6, "dpoLoss": 0.5, "resumedFromStep": 3,
                                                         "runtime": {**rt, "image": "reg/worker:8"}})
    store.write_json(layout.summary_path(1, "zeta"), {"alpha": 1, "beta": 2.5, "name": "x"})
    store.write_text("iter-1/pairs/pairs.jsonl", "{}\n")  # started, no summary: incomplete
    store.write_json(layout.summary_path(2, "generate"), {"prompts": 8})


def test_describe_prints_each_iteration_from_the_store_alone(tmp_path, capsys):
    spec = _spec(tmp_path)
    store = Store.for_spec(spec)
    _write_run(store, spec)
    h = history(store)
    assert [it["iteration"] for it in h["iterations"]] == [1, 2]
    it1 = h["iterations"][0]["phases"]
    assert [(p["phase"], p["state"]) for p in it1] == [
        ("generate", "done"), ("judge", "done"), ("pairs", "incomplete"), ("train", "done"), ("zeta", "done")]
    assert h["run"]["seeds"] == {"run": 11, "training": 5} and h["iterationsPlanned"] == 2

    text = render(h)
    first = text[text.index("iteration 1"):text.index("iteration 2")]
    rows = {line.split()[0]: line for line in first.splitlines() if line.startswith("  ") and len(line.split()) > 2}
    assert "prompts=8 responses=32 tokensPerSecond=12.25" in rows["generate"] and "3.5s" in rows["generate"]
    assert "judged=32 meanScore=3.125 parseFailures=2" in rows["judge"]
    assert "steps=6 dpoLoss=0.5 resumedFromStep=3" in rows["train"] and "reg/worker:8" in rows["train"]
    assert "torch=9.9 trl=1.0" in rows["judge"]
    assert "alpha=1 beta=2.5" in rows["zeta"]  # a phase this version does not know still shows
    assert text.index("iteration 1") < text.index("iteration 2")

    assert main(["describe", store.url(""), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["iterations"][0]["phases"][3]["summary"]["dpoLoss"] == 0.5
    assert doc["spec"]["seed"] == 11


def test_describe_refuses_a_store_without_a_run(tmp_path, capsys):
    with pytest.raises(DescribeError, match="holds no run"):
        history(Store(f"file://{tmp_path}/empty"))
    assert main(["describe", str(tmp_path / "empty")]) == 1
    assert "holds no run" in capsys.readouterr().err
    Store(f"file://{tmp_path}/bad").write_text(RUN_JSON, "{not json")
    assert main(["describe", str(tmp_path / "bad")]) == 1
    assert "not JSON" in capsys.readouterr().err
