"""`selfreward run`: whole runs of the tiny model on this machine, each step a worker
subprocess, as the local runner runs them.

The tiny random model writes random tokens, digits among them; the judge's score
pattern here is one digit, so some verdicts score and others fail and pairs form
(the quickstart teaches the real "Score: N" format with EFT data instead; too slow
for a test).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfreward import checkpoint, layout
from selfreward.local import ITERATIONS_JSON, RUN_JSON, RunError, check_run_json, run_local, spec_differences
from selfreward.spec import parse_spec
from selfreward.storage import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import make_bucket, s3_env, s3_server  # noqa: E402

PROMPTS = [
    "What is two plus two?",
    "Name a colour of the rainbow.",
    "Write a sentence about rain.",
    "Why do cats purr?",
    "Give a tip for learning to cook.",
    "What is a verb?",
]


def write_prompts(path: Path, prompts=PROMPTS) -> str:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def make_spec(model: str, prompts: str, storage: str, **over):
    doc = {
        "model": {"uri": model},
        "prompts": {"uri": prompts},
        "iterations": 1,
        "storage": {"uri": storage},
        "generation": {"responsesPerPrompt": 4, "maxNewTokens": 10, "batchSize": 8},
        "judge": {"samplesPerResponse": 3, "maxNewTokens": 40, "batchSize": 16,
                  "scorePattern": r"([0-9])", "minScore": 0, "maxScore": 9},
        "training": {"maxSteps": 1, "batchSize": 2, "maxLength": 96},
        "seed": 3,
    }
    for k, v in over.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_spec(doc)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private checkpoint cache and HOME for the workers this test starts."""
    monkeypatch.setenv("SELFREWARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SELFREWARD_PROGRESS_PORT", raising=False)
    return tmp_path


def worker_logs(state: Path, pattern: str) -> list[Path]:
    return sorted((state / "logs").glob(pattern))


# --- run.json -----------------------------------------------------------------------

def test_run_json_written_then_refused_for_another_recipe(tmp_path):
    store_uri = f"file://{tmp_path}/store"
    spec = make_spec("/models/m", "/data/p.jsonl", store_uri)
    store = Store.for_spec(spec)
    assert check_run_json(store, spec) == "new"
    assert store.read_json(RUN_JSON)["spec"]["model"]["uri"] == "/models/m"
    assert check_run_json(store, spec) == "same"

    # mutable: more iterations, speed and Kubernetes settings; run.json follows
    grown = make_spec("/models/m", "/data/p.jsonl", store_uri, iterations=3, generation={"batchSize": 2},
                      retry={"maxRetries": 5})
    assert spec_differences(spec, grown) == []
    assert check_run_json(store, grown) == "updated"
    assert store.read_json(RUN_JSON)["spec"]["iterations"] == 3

    other = make_spec("/models/other", "/data/p.jsonl", store_uri, iterations=3, judge={"samplesPerResponse": 5},
                      generation={"batchSize": 2}, retry={"maxRetries": 5})
    with pytest.raises(RunError) as info:
        check_run_json(store, other)
    assert "model.uri" in str(info.value) and "judge.samplesPerResponse" in str(info.value)
    assert store.read_json(RUN_JSON)["spec"]["model"]["uri"] == "/models/m"  # untouched


def test_run_local_refuses_a_store_of_another_run(tmp_path, capsys):
    store_uri = f"file://{tmp_path}/store"
    first = make_spec("/models/m", "/data/p.jsonl", store_uri)
    check_run_json(Store.for_spec(first), first)
    second = make_spec("/models/m", "/data/p.jsonl", store_uri, seed=4)
    assert run_local(second, "x", quiet=True, state_dir=tmp_path / "state") == 1
    err = capsys.readouterr().err
    assert "different spec" in err and "seed" in err
    assert not (tmp_path / "state" / "logs").exists() or not list((tmp_path / "state" / "logs").iterdir())


# --- (a) a whole run against a real S3 server -----------------------------------------

def test_two_iterations_on_s3_then_the_final_checkpoint_generates(env, tiny_model, monkeypatch, capsys):
    tmp = env
    prompts = write_prompts(tmp / "prompts.jsonl", PROMPTS[:4])
    with s3_server() as endpoint:
        make_bucket(endpoint, "runs")
        for k, v in s3_env(endpoint).items():
            monkeypatch.setenv(k, v)
        spec = make_spec(tiny_model, prompts, "s3://runs/quick", iterations=2)
        state = tmp / "state"
        assert run_local(spec, "s3run", quiet=True, state_dir=state) == 0
        out = capsys.readouterr().out
        store = Store.for_spec(spec)

        # every step committed, each by exactly one worker
        for step in layout.steps(spec):
            assert store.exists(layout.summary_path(step.iteration, step.phase)), step
            assert len(worker_logs(state, f"iter-{step.iteration}-{step.phase}*.log")) == step.shards
        assert store.read_json(RUN_JSON)["spec"]["storage"]["uri"] == "s3://runs/quick"
        figures = store.read_json(ITERATIONS_JSON)
        its = {r["iteration"]: r for r in figures["iterations"]}
        assert set(its) == {1, 2}
        for t in (1, 2):
            assert its[t]["prompts"] == 4 and its[t]["responses"] == 16
            assert its[t]["pairs"] >= 1
            assert its[t]["checkpoint"] == store.url(layout.checkpoint_dir(t, "train"))
        assert "run s3run complete" in out and "mean score" in out  # the final table
        for t in (1, 2):
            assert checkpoint.is_committed(store, layout.checkpoint_dir(t, "train"))

        # a re-run finds everything done and starts no worker
        n_logs = len(list((state / "logs").iterdir()))
        assert run_local(spec, "s3run", quiet=True, state_dir=state) == 0
        assert len(list((state / "logs").iterdir())) == n_logs
        assert "iter-2/train: done" in capsys.readouterr().out

        # reproducible: run.json and every phase summary name the runtime; describe reads it back
        from importlib.metadata import version

        from selfreward.describe import history, render

        doc = store.read_json(RUN_JSON)
        assert doc["createdBy"] == "local" and doc["runtime"]["versions"]["trl"] == version("trl")
        h = history(store)
        assert [it["iteration"] for it in h["iterations"]] == [1, 2]
        for it in h["iterations"]:
            assert [(p["phase"], p["state"]) for p in it["phases"]] == [
                ("generate", "done"), ("judge", "done"), ("pairs", "done"), ("train", "done")]
            assert all(p["summary"]["runtime"]["versions"]["torch"] == version("torch") for p in it["phases"])
        assert f"steps={h['iterations'][1]['phases'][3]['summary']['steps']}" in render(h)

        # the final model out to another bucket (no --iteration: the final checkpoint), then back
        from selfreward.cli import main as cli

        make_bucket(endpoint, "exports")
        assert cli(["export", "s3://runs/quick", "s3://exports/m3"]) == 0
        exported = Store("s3://exports/m3")
        assert "# M3 of a Self-Rewarding run" in exported.read_text("README.md")
        final_manifest = checkpoint.read_manifest(store, layout.final_checkpoint(spec))
        for name, info in final_manifest["files"].items():
            assert exported.size(name) == info["size"]
        exported_dir = tmp / "exported"
        for name in exported.walk_files(""):
            exported.get_file(name, exported_dir / name)

        # M_3 is a verified checkpoint that transformers loads and generates with
        local = checkpoint.fetch(store, layout.final_checkpoint(spec), cache=tmp / "fetched")
        manifest = checkpoint.read_manifest(store, layout.final_checkpoint(spec))
    assert manifest["metadata"]["iteration"] == 2 and manifest["metadata"]["phase"] == "train"
    assert set(manifest["files"]) <= {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local)
    from_export = AutoModelForCausalLM.from_pretrained(exported_dir).state_dict()
    assert all((from_export[k] == v).all() for k, v in model.state_dict().items())
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


# --- (b) SIGKILL in the middle of a sharded phase, then resume -------------------------

def _workers_of(state: Path) -> list[int]:
    """pids of live processes whose command line names this run's spec file."""
    spec_file = str(state / "spec.json")
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if spec_file.encode() in cmd:
            pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_mid_phase_resumes_without_redoing_or_losing_shards(env, tiny_model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    spec = make_spec(tiny_model, prompts, f"file://{tmp_path}/store",
                     generation={"shards": 3, "maxNewTokens": 24})
    spec_yaml = tmp_path / "run.yaml"
    spec_yaml.write_text(json.dumps({"apiVersion": "selfreward.dev/v1alpha1", "kind": "SelfRewardRun",
                                     "metadata": {"name": "killme"}, "spec": spec.model_dump(mode="json",
                                                                                             exclude_none=True)}))
    store = Store.for_spec(spec)
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "selfreward", "run", str(spec_yaml), "--quiet", "--state-dir", str(state)]
    n = 3
    shard_summary = [layout.shard_summary_path(1, "generate", i, n) for i in range(n)]

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(store.exists(s) for s in shard_summary):
            assert proc.poll() is None, "the run ended before a shard committed"
            time.sleep(0.05)
        assert not store.exists(layout.summary_path(1, "generate")), "the whole phase committed before the kill"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    # the worker that was running dies with the runner (no orphan keeps writing)
    deadline = time.time() + 15
    while _workers_of(state) and time.time() < deadline:
        time.sleep(0.1)
    assert _workers_of(state) == []

    before = {s: store.read_bytes(s) for s in shard_summary if store.exists(s)}
    assert 1 <= len(before) < n
    logs_before = {i: len(worker_logs(state, f"iter-1-generate-shard-{i:05d}-*.log")) for i in range(n)}

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "already committed" in rerun.stdout

    # committed shards were not produced again: same bytes, no new worker for them
    for s, data in before.items():
        assert store.read_bytes(s) == data
    for i in range(n):
        logs = len(worker_logs(state, f"iter-1-generate-shard-{i:05d}-*.log"))
        if shard_summary[i] in before:
            assert logs == logs_before[i] == 1
        else:
            assert logs == logs_before[i] + 1
    # and none was lost: every prompt once, in exactly one shard
    ids = [r["promptId"] for i in range(n) for r in store.read_jsonl(layout.shard_data_path(1, "generate", i, n))]
    assert len(ids) == len(PROMPTS) == len(set(ids))
    summary = store.read_json(layout.summary_path(1, "generate"))
    assert summary["numShards"] == n and summary["prompts"] == len(PROMPTS)
    assert checkpoint.is_committed(store, layout.final_checkpoint(spec))


# --- (c) a failing worker stops the run; fixed, the run continues ---------------------

def test_failing_worker_surfaces_its_error_then_the_fixed_run_continues(env, tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, PROMPTS[:4])
    spec = make_spec(tiny_model, str(prompts), f"file://{tmp_path}/store", iterations=2)
    store = Store.for_spec(spec)
    state = tmp_path / "state"

    # iteration 1 runs; then the prompt file breaks before iteration 2 reads it
    one = make_spec(tiny_model, str(prompts), f"file://{tmp_path}/store", iterations=1)
    assert run_local(one, "fails", quiet=True, state_dir=state) == 0
    capsys.readouterr()
    with prompts.open("a") as f:
        f.write("this line is not JSON\n")
    assert run_local(spec, "fails", quiet=True, state_dir=state) == 1  # iterations may grow
    captured = capsys.readouterr()
    assert "iter-2/generate shard 1/1 failed" in captured.err
    assert "line 5" in captured.err and "not JSON" in captured.err  # the worker's own error line
    assert "worker log:" in captured.err
    assert not store.exists(layout.summary_path(2, "generate"))
    assert store.read_json(RUN_JSON)["spec"]["iterations"] == 2

    # fixed: the re-run skips iteration 1 and finishes iteration 2
    write_prompts(prompts, PROMPTS[:4])
    assert run_local(spec, "fails", quiet=True, state_dir=state) == 0
    out = capsys.readouterr().out
    for phase in ("generate", "judge", "pairs", "train"):
        assert f"iter-1/{phase}: done" in out
        assert len(worker_logs(state, f"iter-1-{phase}*.log")) == 1
    assert len(worker_logs(state, "iter-2-generate*.log")) == 2  # the failed attempt and the fixed one
    assert checkpoint.is_committed(store, layout.final_checkpoint(spec))


# --- Ctrl-C -----------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_the_worker_and_exits_130(env, tiny_model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    spec = make_spec(tiny_model, prompts, f"file://{tmp_path}/store")
    spec_yaml = tmp_path / "run.yaml"
    spec_yaml.write_text(json.dumps(spec.model_dump(mode="json", exclude_none=True)))
    state = tmp_path / "state"
    # As from a terminal: a shell starts background jobs with SIGINT ignored, and a pytest
    # started that way would pass the ignored SIGINT on to the runner.
    proc = subprocess.Popen([sys.executable, "-m", "selfreward", "run", str(spec_yaml), "--quiet",
                             "--state-dir", str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not _workers_of(state) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert _workers_of(state), "no worker started"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the runner
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "re-run the same command" in err
    assert _workers_of(state) == []  # the runner stopped its worker's process group before exiting
    assert not Store.for_spec(spec).exists(layout.summary_path(1, "generate"))
    from selfreward.local import USAGE_JSON

    # the stopped worker's time is counted all the same
    (row,) = Store.for_spec(spec).read_json(USAGE_JSON)["steps"].values()
    assert row["wallSeconds"] > 0 and row["gpuSeconds"] == pytest.approx(row["gpus"] * row["wallSeconds"], abs=0.01)


def test_progress_file_keeps_the_latest_report_and_passes_it_on(tmp_path):
    """The worker's side of the live-progress channel the runner reads."""
    from selfreward.worker.common import progress_file

    seen = []
    path = tmp_path / "p.json"
    report = progress_file(str(path), seen.append)
    report({"phase": "generate", "done": 1, "total": 4, "tokensPerSecond": 12.5})
    report({"phase": "generate", "done": 2, "total": 4, "tokensPerSecond": 13.0})
    latest = json.loads(path.read_text())
    assert latest["done"] == 2 and latest["tokensPerSecond"] == 13.0 and "time" in latest
    assert [r["done"] for r in seen] == [1, 2]
    assert progress_file("", seen.append) == seen.append  # no path: the inner callback alone
    report({"phase": "generate", "bad": object()})  # not JSON: dropped, never raised
    assert json.loads(path.read_text())["done"] == 2


def test_pairs_never_hand_the_train_phase_an_empty_response():
    """The contract between two phases: a tiny model sometimes answers with nothing at
    all; such a response scores but is no DPO completion, so pairs leave it out."""
    from selfreward.training import preference_rows
    from selfreward.worker.pairs import build_pairs

    records = [
        {"promptId": "a", "prompt": "Q1", "responses": [
            {"text": "", "score": 0.0}, {"text": "ok", "score": 3.0}, {"text": "better", "score": 4.0}]},
        {"promptId": "b", "prompt": "Q2", "responses": [
            {"text": "   ", "score": 5.0}, {"text": "only one", "score": 1.0}]},
    ]
    pairs, summary = build_pairs(records)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("better", "ok")]
    assert summary["droppedTooFewScored"] == 1
    assert len(preference_rows(pairs, conversational=True, where="pairs")) == 1


# --- GPU time and spec.budget ------------------------------------------------------------

def test_gpu_time_is_counted_per_step_and_the_budget_stops_before_a_step_that_would_cross_it(
        env, tiny_model, tmp_path, monkeypatch, capsys):
    from selfreward.local import USAGE_JSON

    # two visible GPUs (no CUDA here: the workers still run on the CPU): every worker runs
    # alone, so it is given both and charged twice its wall time
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:4])
    storage = f"file://{tmp_path}/store"
    spec = make_spec(tiny_model, prompts, storage, budget={"pricePerGpuHour": 3.6})
    state = tmp_path / "state"
    assert run_local(spec, "gpu", quiet=True, state_dir=state) == 0
    store = Store.for_spec(spec)
    usage = store.read_json(USAGE_JSON)
    assert set(usage["steps"]) == {s.key for s in layout.steps(spec)}
    for row in usage["steps"].values():
        assert row["gpus"] == 2 and row["wallSeconds"] > 0
        assert row["gpuSeconds"] == pytest.approx(2 * row["wallSeconds"], abs=0.01)
        assert row["cost"] == pytest.approx(row["gpuSeconds"] / 1000, abs=1e-5)  # 3.6 per 3600 s
    total = sum(r["gpuSeconds"] for r in usage["steps"].values())
    assert usage["gpuSeconds"] == pytest.approx(total, abs=0.01)
    figures = store.read_json(ITERATIONS_JSON)
    (it1,) = figures["iterations"]
    assert it1["gpuSecondsByPhase"] == {p: usage["steps"][f"iter-1/{p}"]["gpuSeconds"]
                                        for p in ("generate", "judge", "pairs", "train")}
    assert figures["gpuSeconds"] == usage["gpuSeconds"] and "budgetExhausted" not in figures
    assert "GPU-h" in capsys.readouterr().out  # the final table's column

    # a second iteration under a budget that iteration 2's generate, estimated at what
    # iteration 1's used, would cross: it is not started, and the result is M_2
    gen = usage["steps"]["iter-1/generate"]["gpuSeconds"]
    limit = (usage["gpuSeconds"] + gen / 2) / 3600
    more = make_spec(tiny_model, prompts, storage, iterations=2, budget={"maxGpuHours": limit, "pricePerGpuHour": 3.6})
    assert run_local(more, "gpu", quiet=True, state_dir=state) == 0
    out = capsys.readouterr().out
    assert "budget exhausted before iter-2/generate" in out and "(what iter-1/generate used)" in out
    assert not store.exists(layout.summary_path(2, "generate"))
    figures = store.read_json(ITERATIONS_JSON)
    assert figures["budgetExhausted"]["step"] == "iter-2/generate"
    assert figures["finalCheckpoint"] == store.url(layout.checkpoint_dir(1, "train"))
    assert store.read_json(USAGE_JSON)["gpuSeconds"] == usage["gpuSeconds"]  # nothing more ran


def test_a_budget_spent_before_anything_was_trained_fails_the_local_run(env, tiny_model, tmp_path, monkeypatch,
                                                                       capsys):
    from selfreward.local import USAGE_JSON

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:2])
    spec = make_spec(tiny_model, prompts, f"file://{tmp_path}/store", budget={"maxGpuHours": 1e-6})
    # generate has no estimate (no iteration before it) and starts; it spends the budget
    assert run_local(spec, "spent", quiet=True, state_dir=tmp_path / "state") == 1
    err = capsys.readouterr().err
    assert "budget exhausted before iter-1/judge" in err and "nothing was trained yet" in err
    store = Store.for_spec(spec)
    assert list(store.read_json(USAGE_JSON)["steps"]) == ["iter-1/generate"]
    assert not store.exists(layout.summary_path(1, "judge"))
