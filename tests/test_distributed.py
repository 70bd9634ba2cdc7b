"""Distributed training through torch's own launcher, on the CPU with gloo.

What must hold for N processes to train exactly like one: the same global batch
(per-process batch x processes x accumulation), the same data order (the trainer's
seeded sampler, split across ranks by accelerate), no randomness in the forward
(the tiny model has no dropout; LoRA dropout is not used: mode full). Then the loss
of every step (the mean over ranks) and the final weights agree with one process up
to float32 reduction order: measured max |diff| about 1e-7 for the losses, asserted
below 1e-5 (losses) and 2e-5 (weights).

On a CPU, accelerate 1.15 runs the processes as data parallel over gloo (it offers
FSDP only on accelerator devices); the launcher, the data split, the rank-0 commit and
the failure semantics are the same ones a GPU run uses. Heavy-ish: each launch takes
about 10 s here (two cores; the 4-process test oversubscribes them).
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

from selfreward import checkpoint, distributed, layout
from selfreward.spec import parse_spec
from selfreward.storage import Store
from selfreward.worker import run_phase
from selfreward.worker.train import pairs_path

LOSS_TOL = 1e-5
WEIGHT_TOL = 2e-5


def _spec(tmp_path: Path, tiny_model: str, name: str, **training) -> tuple[dict, Path]:
    doc = {
        "model": {"uri": tiny_model},
        "prompts": {"uri": str(tmp_path / "prompts.jsonl")},
        "iterations": 1,
        "storage": {"uri": f"file://{tmp_path}/{name}"},
        "training": {"maxLength": 128, "learningRate": 1e-3, "seed": 7, "mode": "full", **training},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return doc, path


def _pairs(n: int = 16) -> list[dict]:
    # distinct lengths: padding differs between a batch of 4 and two batches of 2
    return [{"prompt": f"What is {i} plus {i}?" + " Please." * (i % 3), "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": "I cannot say, it is unclear to me." * (1 + i % 2), "chosenScore": 4.5, "rejectedScore": 1.0}
            for i in range(n)]


def _store(doc: dict) -> Store:
    store = Store.for_spec(parse_spec(doc))
    store.write_jsonl(pairs_path(1), _pairs())
    return store


def _launch(spec_file: Path, nproc: int, tmp_path: Path, **popen) -> subprocess.Popen:
    cmd = distributed.local_launch(sys.executable, nproc, ["worker", "train", "--spec", str(spec_file),
                                                           "--iteration", "1"])
    env = dict(os.environ)
    env.update({"SELFREWARD_TERMINATION_LOG": str(tmp_path / f"{spec_file.stem}.term.json"),
                "SELFREWARD_PROGRESS_FILE": str(tmp_path / f"{spec_file.stem}.progress.json"),
                "PYTHONUNBUFFERED": "1"})
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def _weights(store: Store, rel: str) -> dict:
    from safetensors.torch import load_file

    local = checkpoint.fetch(store, rel)
    out = {}
    for f in sorted(Path(local).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _one_process_reference(tmp_path, tiny_model, batch: int) -> tuple[dict, dict]:
    doc, _ = _spec(tmp_path, tiny_model, "single", batchSize=batch, maxSteps=4)
    store = _store(doc)
    summary = run_phase(parse_spec(doc), "train", 1, store=store)
    rel = layout.checkpoint_dir(1, "train")
    return summary, _weights(store, rel)


@pytest.mark.slow  # one in-process and one torchrun training: about 15 s idle (2 procs), 25 s (4 procs)
@pytest.mark.parametrize("nproc", [2, pytest.param(4, id="4-oversubscribed")])
def test_n_processes_train_like_one_with_the_same_global_batch(tmp_path, tiny_model, nproc):
    single, single_weights = _one_process_reference(tmp_path, tiny_model, batch=4)
    assert single["processes"] == 1 and len(single["lossCurve"]) == 4

    doc, spec_file = _spec(tmp_path, tiny_model, "multi", batchSize=4 // nproc, maxSteps=4, distributed="fsdp")
    store = _store(doc)
    proc = _launch(spec_file, nproc, tmp_path)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]

    summary = store.read_json(layout.summary_path(1, "train"))
    assert summary["processes"] == nproc and summary["batchSize"] == 4 // nproc
    assert summary["parallelism"] == "ddp" and single["parallelism"] == "single"  # no FSDP on CPUs (accelerate)
    assert summary["samplesSeen"] == single["samplesSeen"] == 16
    curve, ref = summary["lossCurve"], single["lossCurve"]
    assert len(curve) == len(ref) == 4
    assert max(abs(a - b) for a, b in zip(curve, ref)) < LOSS_TOL, (curve, ref)
    assert curve[-1] < curve[0]  # it trained

    rel = layout.checkpoint_dir(1, "train")
    checkpoint.verify(store, rel)
    weights = _weights(store, rel)
    assert _max_diff(weights, single_weights) < WEIGHT_TOL
    # exactly one commit, by rank 0; one summary and one termination message, rank 0's
    commits = [ln for ln in out.splitlines() if "iter-1/train: committed" in ln]
    assert commits == [f"[selfreward] iter-1/train: committed {store.url(rel)} (rank 0 of {nproc})"], commits
    term = json.loads((tmp_path / "multi.term.json").read_text())
    assert term["processes"] == nproc and term["checkpoint"] == store.url(rel)


@pytest.mark.slow  # two short in-process trainings
def test_the_tolerance_tells_global_batches_apart(tmp_path, tiny_model):
    """The control: one process at half the batch (another global batch, as N processes
    that kept the one-process batch would have) is far outside the tolerance above, so
    the comparison can fail."""
    four, _ = _one_process_reference(tmp_path / "four", tiny_model, batch=4)
    two, _ = _one_process_reference(tmp_path / "two", tiny_model, batch=2)
    assert max(abs(a - b) for a, b in zip(four["lossCurve"], two["lossCurve"])) > 100 * LOSS_TOL


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def _rank_of(pid: int) -> str:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for item in env:
        if item.startswith(b"RANK="):
            return item[5:].decode()
    return ""


@pytest.mark.slow  # two torchrun launches
def test_a_killed_rank_fails_the_step_and_the_retry_succeeds(tmp_path, tiny_model):
    doc, spec_file = _spec(tmp_path, tiny_model, "kill", batchSize=2, maxSteps=400, distributed="fsdp")
    store = _store(doc)
    rel = layout.checkpoint_dir(1, "train")
    progress = tmp_path / "kill.progress.json"
    proc = _launch(spec_file, 2, tmp_path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if progress.exists():
                try:
                    if json.loads(progress.read_text()).get("step", 0) >= 2:
                        break
                except ValueError:
                    pass
            time.sleep(0.05)
        assert proc.poll() is None, "the launch ended before a rank could be killed"
        ranks = {_rank_of(c): c for c in _children(proc.pid)}
        assert set(ranks) == {"0", "1"}, ranks
        os.kill(ranks["1"], signal.SIGKILL)  # rank 1 dies mid-training
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out[-2000:]
    assert not checkpoint.is_committed(store, rel)
    assert not store.exists(layout.summary_path(1, "train"))

    # the retry: a fresh launch of every rank, shorter so the test stays quick
    doc2, spec2 = _spec(tmp_path, tiny_model, "kill", batchSize=2, maxSteps=4, distributed="fsdp")
    proc = _launch(spec2, 2, tmp_path)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    checkpoint.verify(store, rel)
    summary = store.read_json(layout.summary_path(1, "train"))
    assert summary["processes"] == 2 and summary["steps"] == 4


def test_fit_batch_counts_every_process():
    from selfreward.training import fit_batch

    assert fit_batch(16, 4, 1, processes=2) == (4, 1)
    assert fit_batch(6, 4, 2, processes=2) == (3, 1)  # 6 examples: 2 processes x 3
    assert fit_batch(3, 4, 1, processes=4) == (1, 1)  # fewer examples than processes: one each
    assert fit_batch(64, 4, 8, processes=4) == (4, 4)  # 64 = 4 x 4 x 4
    assert fit_batch(16, 4, 1) == (4, 1)


def test_launch_commands():
    spec = parse_spec({"model": {"uri": "/m"}, "prompts": {"uri": "/p"}, "storage": {"uri": "/s"},
                       "training": {"distributed": "fsdp"}, "resources": {"train": {"gpus": 8, "nodes": 4}}})
    cmd = distributed.torchrun_command(spec, "train", ["worker", "train", "--iteration", "2"])
    assert cmd[:5] == ["selfreward", "launch", "--nnodes=4", "--nproc-per-node=8", "--max-restarts=0"]
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in cmd and "--master-addr=$(SELFREWARD_MASTER_ADDR)" in cmd
    assert f"--master-port={distributed.RENDEZVOUS_PORT}" in cmd
    assert cmd[-6:] == ["-m", "selfreward", "worker", "train", "--iteration", "2"]
    one = parse_spec({"model": {"uri": "/m"}, "prompts": {"uri": "/p"}, "storage": {"uri": "/s"},
                      "training": {"distributed": "fsdp"}, "resources": {"train": {"gpus": 2}}})
    cmd = distributed.torchrun_command(one, "train", ["worker", "train"])
    assert "--standalone" in cmd and "--nproc-per-node=2" in cmd and not any("node-rank" in c for c in cmd)
    assert distributed.launches(one, "train") and distributed.launches(one, "sft")
    assert not distributed.launches(one, "generate")
    plain = parse_spec({"model": {"uri": "/m"}, "prompts": {"uri": "/p"}, "storage": {"uri": "/s"}})
    assert not distributed.launches(plain, "train")


def test_local_process_count(monkeypatch):
    monkeypatch.delenv(distributed.NPROC_ENV, raising=False)
    monkeypatch.setattr(distributed, "visible_gpus", lambda: 4)
    assert distributed.local_nproc() == 4  # every visible GPU
    assert distributed.local_nproc(2) == 2  # --nproc-per-node wins
    monkeypatch.setenv(distributed.NPROC_ENV, "3")
    assert distributed.local_nproc() == 3
    monkeypatch.setattr(distributed, "visible_gpus", lambda: 0)
    monkeypatch.delenv(distributed.NPROC_ENV)
    assert distributed.local_nproc() == 1  # a CPU: one process
    for bad in ("0", "two"):
        monkeypatch.setenv(distributed.NPROC_ENV, bad)
        with pytest.raises(ValueError, match=distributed.NPROC_ENV):
            distributed.local_nproc()


def test_local_runner_launches_training_through_torchrun(tmp_path, monkeypatch):
    """`selfreward run` starts the sft/train steps with torchrun (one process per visible
    GPU, or --nproc-per-node / $SELFREWARD_NPROC_PER_NODE), the other steps as before."""
    from selfreward import local

    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "json.dump({'argv': sys.argv[1:]}, open(os.environ['SELFREWARD_TERMINATION_LOG'], 'w'))\n")
    fake.chmod(0o755)
    spec = parse_spec({"model": {"uri": "/m"}, "prompts": {"uri": "/p"}, "storage": {"uri": f"file://{tmp_path}/a"},
                       "training": {"distributed": "fsdp"}, "resources": {"train": {"gpus": 4}}})

    def argv(phase, nproc=None):
        runner = local.Runner(spec, "r", True, str(fake), 1, tmp_path, nproc_per_node=nproc)
        runner.logs.mkdir(parents=True, exist_ok=True)
        tasks = runner._tasks(next(s for s in local.layout.steps(spec) if s.phase == phase))
        runner._run_tasks(tasks)
        return tasks[0].result["argv"]

    monkeypatch.setattr(distributed, "visible_gpus", lambda: 3)
    monkeypatch.delenv(distributed.NPROC_ENV, raising=False)
    train = argv("train")
    assert train[:3] == ["-m", "selfreward", "launch"] and "--nproc-per-node=3" in train  # every visible GPU
    assert train[train.index("-m", 3):][:4] == ["-m", "selfreward", "worker", "train"]
    assert "--nproc-per-node=2" in argv("train", nproc=2)
    monkeypatch.setenv(distributed.NPROC_ENV, "2")
    assert "--nproc-per-node=2" in argv("train")
    assert argv("generate")[:4] == ["-m", "selfreward", "worker", "generate"]


def test_nproc_flag_must_be_positive(capsys):
    from selfreward.cli import build_parser

    assert build_parser().parse_args(["run", "s.yaml", "--nproc-per-node", "4"]).nproc_per_node == 4
    for bad in ("0", "-2", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", "s.yaml", "--nproc-per-node", bad])
        assert "--nproc-per-node" in capsys.readouterr().err


@pytest.mark.parametrize("codes, expected", [((0, 2), 2), ((0, 3), 1), ((0, 0), 0)])
def test_launch_keeps_a_ranks_exit_code_2(tmp_path, codes, expected):
    """torchrun exits 1 for every failure; `selfreward launch` exits 2 when a rank refused
    the spec or the store (exit 2), so the Job's podFailurePolicy fails the Job at once."""
    script = tmp_path / "rank.py"
    script.write_text("import os, sys\nsys.exit(int(sys.argv[1 + int(os.environ['RANK'])]))\n")
    proc = subprocess.run([sys.executable, "-m", "selfreward", "launch", "--nnodes=1", "--nproc-per-node=2",
                           "--max-restarts=0", "--standalone", str(script), *map(str, codes)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == expected, proc.stderr[-2000:]
