"""Runs that survive preemption, on the tiny model and a file:// store.

- a `selfreward worker train` process SIGKILLed mid-epoch resumes from its last
  intermediate checkpoint in the store and ends with the weights of an uninterrupted
  run (tolerance: 1e-5 absolute, float32 on one CPU; seen: identical), in fewer steps;
- SIGTERM during DPO (LoRA) and SFT saves a checkpoint at the next step end and stops;
  the next attempt resumes from it, to the same weights;
- a generate shard SIGKILLed mid-way and a judge shard that crashed mid-way resume from
  their finished batches: every prompt's record exactly once, equal to an uninterrupted
  run's (the batch seeds are the same).
Heavy: about 60 s on an idle 2-core machine (two worker subprocesses, four short trainings)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from selfreward import checkpoint, layout, resume
from selfreward.spec import parse_spec
from selfreward.storage import Store
from selfreward.worker import run_phase
from selfreward.worker.judge import read_phase_records
from selfreward.worker.parts import BatchParts
from selfreward.worker.train import pairs_path

TOLERANCE = 1e-5  # max |w_resumed - w_uninterrupted| over all weights


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": "I cannot say, it is unclear to me.", "chosenScore": 4.5, "rejectedScore": 1.0}
            for i in range(n)]


def _train_spec(root: Path, tiny_model: str, **training) -> dict:
    return {
        "model": {"uri": tiny_model, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "prompts": {"uri": str(root / "prompts.jsonl")},
        "iterations": 1,
        "storage": {"uri": f"file://{root}/artifacts"},
        "training": {"batchSize": 2, "maxLength": 128, "learningRate": 1e-3, "seed": 7, **training},
    }


def _weights(store: Store, rel: str) -> dict:
    from safetensors.torch import load_file

    local = checkpoint.fetch(store, rel)  # verified against its manifest
    out = {}
    for f in sorted(Path(local).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _worker(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, SELFREWARD_TERMINATION_LOG=str(log.with_suffix(".term")))
    return subprocess.Popen([sys.executable, "-m", "selfreward", "worker", *args], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the worker ended (rc {proc.returncode}) before it could be killed:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the worker never reached the point to kill it at")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _resume_steps(store: Store, phase_dir: str) -> list[int]:
    rel = f"{phase_dir}/{resume.RESUME}"
    return [int(n.split("-")[1]) for n in store.list(rel)
            if n.startswith("checkpoint-") and checkpoint.is_committed(store, f"{rel}/{n}")]


# --- training ---

def test_sigkilled_train_worker_resumes_to_the_uninterrupted_weights(tmp_path, tiny_model):
    # 12 pairs, batch 2, 2 epochs: 12 steps, 6 per epoch; a checkpoint every 3 steps, so
    # the resumed run starts mid-epoch (step 3 or 9) or at an epoch boundary (step 6)
    data = _train_spec(tmp_path / "killed", tiny_model, epochs=2, checkpointing={"everySteps": 3})
    killed = parse_spec(data)
    ref = parse_spec(_train_spec(tmp_path / "ref", tiny_model, epochs=2, checkpointing={"everySteps": 3}))
    for spec in (killed, ref):
        Store.for_spec(spec).write_jsonl(pairs_path(1), _pairs(12))
    uninterrupted = run_phase(ref, "train", 1)
    assert uninterrupted["steps"] == 12 and uninterrupted["resumedFromStep"] == 0
    assert uninterrupted["resumeCheckpointsSaved"] == 3  # steps 3, 6, 9; none at the last step
    store = Store.for_spec(killed)
    assert not store.exists(f"{layout.phase_dir(1, 'train')}/{resume.RESUME}")  # cleared after the commit

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    log = tmp_path / "train.log"
    proc = _worker(["train", "--iteration", "1", "--spec", str(spec_file)], log)
    _kill_when(proc, lambda: bool(_resume_steps(store, "iter-1/train")), log)

    rel = layout.checkpoint_dir(1, "train")
    assert not checkpoint.is_committed(store, rel), "the worker finished before the kill: nothing was tested"
    survived = max(_resume_steps(store, "iter-1/train"))
    assert 3 <= survived < 12
    assert len(_resume_steps(store, "iter-1/train")) == 1  # older ones are deleted

    resumed = run_phase(killed, "train", 1)  # the re-created pod
    assert resumed["resumedFromStep"] == survived
    assert resumed["steps"] == 12
    assert resumed["stepsThisAttempt"] == 12 - survived < 12
    assert _max_diff(_weights(store, rel), _weights(Store.for_spec(ref), rel)) <= TOLERANCE
    checkpoint.verify(store, rel)  # the final commit is whole and verified
    assert not store.exists(f"iter-1/train/{resume.RESUME}")


def _sigterm_at(step: int):
    def report(figures: dict) -> None:
        if figures.get("step") == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return report


def test_sigterm_saves_then_the_next_attempt_resumes_dpo_lora(tmp_path, tiny_model):
    # every trigger but SIGTERM is off (no step or time trigger): the checkpoint is SIGTERM's
    data = lambda root: parse_spec(_train_spec(root, tiny_model, epochs=2, mode="lora",  # noqa: E731
                                               checkpointing={"everySteps": 0, "everyMinutes": 0}))
    spec, ref = data(tmp_path / "a"), data(tmp_path / "b")
    for s in (spec, ref):
        Store.for_spec(s).write_jsonl(pairs_path(1), _pairs(10))
    store = Store.for_spec(spec)
    with pytest.raises(resume.Preempted, match="SIGTERM at step 4"):
        run_phase(spec, "train", 1, store=store, progress=_sigterm_at(3))  # seen after step 3's end: saves at 4
    assert _resume_steps(store, "iter-1/train") == [4]
    assert not store.exists(layout.summary_path(1, "train"))
    assert signal.getsignal(signal.SIGTERM) is not resume._on_sigterm  # the handler is gone after the phase
    manifest = checkpoint.verify(store, "iter-1/train/resume/checkpoint-4")
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= set(manifest["files"])

    again = run_phase(spec, "train", 1, store=store)
    full = run_phase(ref, "train", 1)
    assert (again["resumedFromStep"], again["stepsThisAttempt"], again["steps"]) == (4, 6, 10)
    rel = layout.checkpoint_dir(1, "train")
    assert _max_diff(_weights(store, rel), _weights(Store.for_spec(ref), rel)) <= TOLERANCE
    assert not any("lora" in k for k in _weights(store, rel))  # still a merged, plain model


def test_sigterm_during_sft_saves_and_resumes(tmp_path, tiny_model):
    ift = tmp_path / "ift.jsonl"
    ift.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "response": " ".join(map(str, range(1, i + 2)))})
                           + "\n" for i in range(8)))

    def spec_at(root):
        d = _train_spec(root, tiny_model)
        d["sft"] = {"instructionDataUri": str(ift), "batchSize": 2, "epochs": 2, "learningRate": 1e-3,
                    "maxLength": 128, "checkpointing": {"everySteps": 100}}
        return parse_spec(d)

    spec, ref = spec_at(tmp_path / "a"), spec_at(tmp_path / "b")
    store = Store.for_spec(spec)
    with pytest.raises(resume.Preempted):
        run_phase(spec, "sft", 0, store=store, progress=_sigterm_at(5))  # step 6 of 8 (epoch 2, batch 2)
    assert _resume_steps(store, "iter-0/sft") == [6]
    again = run_phase(spec, "sft", 0, store=store)
    run_phase(ref, "sft", 0)
    assert (again["resumedFromStep"], again["stepsThisAttempt"]) == (6, 2)
    rel = layout.checkpoint_dir(0, "sft")
    assert _max_diff(_weights(store, rel), _weights(Store.for_spec(ref), rel)) <= TOLERANCE


def _commit_fake(store: Store, rel: str, local: Path, key: str, step: int) -> None:
    local.mkdir(parents=True, exist_ok=True)
    (local / "model.safetensors").write_bytes(b"x" * 16)
    (local / "trainer_state.json").write_text("{}")
    checkpoint.commit(local, store, rel, {"fingerprint": key, "step": step})


def test_resume_takes_the_newest_checkpoint_that_is_whole_and_ours(tmp_path):
    from selfreward.spec import CheckpointingSpec

    store = Store(f"file://{tmp_path}/store")
    mine = resume.fingerprint(rows=[1, 2], lr=1e-3)
    assert mine != resume.fingerprint(rows=[1, 2], lr=2e-3) and mine != resume.fingerprint(rows=[2, 1], lr=1e-3)
    r = resume.Resume(store, "iter-1/train", CheckpointingSpec(), mine, "iter-1/train")
    assert r.latest() is None
    _commit_fake(store, "iter-1/train/resume/checkpoint-4", tmp_path / "c4", mine, 4)
    _commit_fake(store, "iter-1/train/resume/checkpoint-8", tmp_path / "c8", "someone-else", 8)
    _commit_fake(store, "iter-1/train/resume/checkpoint-12", tmp_path / "c12", mine, 12)
    store.delete("iter-1/train/resume/checkpoint-12/MANIFEST.json")  # killed while uploading: half-written
    _commit_fake(store, "iter-1/train/resume/checkpoint-16", tmp_path / "c16", mine, 16)
    store.write_bytes("iter-1/train/resume/checkpoint-16/model.safetensors", b"y" * 16)  # corrupted
    step, local = r.latest()
    assert step == 4 and Path(local, "trainer_state.json").is_file()
    assert resume.Resume(store, "iter-1/train", CheckpointingSpec(enabled=False), mine, "w").latest() is None
    # an upload drops the older checkpoints; clear drops all
    _commit_fake(store, "unused", tmp_path / "c20", mine, 20)
    r.upload(str(tmp_path / "c20"), 20)
    assert store.list("iter-1/train/resume") == ["checkpoint-20"]
    r.clear()
    assert not store.exists("iter-1/train/resume")


# --- generate and judge shards ---

GEN_PROMPTS = [f"Tell me fact number {i} about the sea." for i in range(12)]


def _gen_spec(root: Path, tiny_model: str) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "seeds.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in GEN_PROMPTS))
    return {
        "model": {"uri": tiny_model},
        "prompts": {"uri": str(root / "seeds.jsonl")},
        "iterations": 1,
        "storage": {"uri": f"file://{root}/artifacts"},
        "generation": {"responsesPerPrompt": 2, "maxNewTokens": 16, "batchSize": 1, "shards": 1},
        "judge": {"samplesPerResponse": 2, "maxNewTokens": 4, "batchSize": 4, "shards": 1,
                  "scorePattern": r"([0-9])", "minScore": 0, "maxScore": 9},
        "seed": 5,
    }


def test_sigkilled_generate_shard_then_crashed_judge_shard_resume_exactly_once(tmp_path, tiny_model):
    data = _gen_spec(tmp_path / "killed", tiny_model)
    spec, ref = parse_spec(data), parse_spec(_gen_spec(tmp_path / "ref", tiny_model))
    store, ref_store = Store.for_spec(spec), Store.for_spec(ref)
    run_phase(ref, "generate", 1)
    run_phase(ref, "judge", 1)

    parts = BatchParts(store, layout.shard_data_path(1, "generate", 0, 1), "test")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    log = tmp_path / "generate.log"
    proc = _worker(["generate", "--iteration", "1", "--spec", str(spec_file)], log)
    done = lambda: len([n for n in store.list(parts.rel) if n.startswith("batch-")])  # noqa: E731
    _kill_when(proc, lambda: done() >= 2, log)
    finished = done()
    assert not store.exists(layout.shard_summary_path(1, "generate", 0, 1)), "finished before the kill"
    assert 2 <= finished < len(GEN_PROMPTS)

    summary = run_phase(spec, "generate", 1)  # the re-created shard
    assert summary["batchesResumed"] == finished
    records = read_phase_records(store, 1, "generate")
    expected = read_phase_records(ref_store, 1, "generate")
    assert sorted(r["promptId"] for r in records) == sorted({r["promptId"] for r in expected})  # each exactly once
    assert [r["prompt"] for r in records] == GEN_PROMPTS[:len(records)] and len(records) == len(GEN_PROMPTS)
    assert records == expected
    gen_ref = ref_store.read_json(layout.summary_path(1, "generate"))
    assert summary["generatedTokens"] == gen_ref["generatedTokens"]  # the earlier attempt's tokens count too
    assert not store.exists(parts.rel)

    # the judge shard crashes after its 3rd batch (an exception out of the progress report)
    class Crash(Exception):
        pass

    def crash_after_three(figures: dict) -> None:
        if figures.get("done") == 2 * 4:
            raise Crash()

    with pytest.raises(Crash):
        run_phase(spec, "judge", 1, progress=crash_after_three)
    judge_parts = BatchParts(store, layout.shard_data_path(1, "judge", 0, 1), "test")
    assert len(store.list(judge_parts.rel)) == 2
    judged = run_phase(spec, "judge", 1)
    assert judged["batchesResumed"] == 2
    out, want = read_phase_records(store, 1, "judge"), read_phase_records(ref_store, 1, "judge")
    assert [r["promptId"] for r in out] == [r["promptId"] for r in want]
    assert out == want
    assert judged["verdicts"] == len(GEN_PROMPTS) * 2 * 2


def test_parts_of_other_work_are_dropped_not_mixed_in(tmp_path, tiny_model):
    spec = parse_spec(_gen_spec(tmp_path, tiny_model))
    store = Store.for_spec(spec)
    parts = BatchParts(store, layout.shard_data_path(1, "generate", 0, 1), "test")
    keys = [["a", "b"], ["c", "d"]]
    parts.write(0, keys[0], [{"promptId": "a"}, {"promptId": "b"}])
    assert set(parts.load(keys)) == {0}
    assert parts.load([["a", "x"], ["c", "d"]]) == {}  # another batching: every part goes
    assert not store.exists(parts.rel)
    parts.write(5, ["q"], [{}])  # a batch index the plan does not have
    assert parts.load(keys) == {}
    store.write_text(f"{parts.rel}/batch-000000.json", '{"batch": 0, "keys": ')  # never written whole by us, but
    assert parts.load(keys) == {}  # a torn file is refused too


def test_checkpointing_settings_are_checked_by_name(tmp_path, tiny_model):
    from selfreward.spec import SpecError

    for bad, field in (({"everySteps": -1}, "training.checkpointing.everySteps"),
                       ({"everyMinutes": -0.5}, "training.checkpointing.everyMinutes"),
                       ({"terminationGraceSeconds": 0}, "training.checkpointing.terminationGraceSeconds"),
                       ({"every": 3}, "training.checkpointing.every")):
        with pytest.raises(SpecError, match=field.replace(".", r"\.")):
            parse_spec(_train_spec(tmp_path, tiny_model, checkpointing=bad))
    spec = parse_spec(_train_spec(tmp_path, tiny_model))
    assert (spec.training.checkpointing.everySteps, spec.training.checkpointing.everyMinutes) == (500, 30.0)
