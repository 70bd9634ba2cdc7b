"""judge.colocate: a generate shard's pod (local task) judges that shard on the M_t it
loaded. The worker steps on the tiny model and a file:// store: what the fused step
writes against the two-step run, how often the model is loaded (counted twice: the
summaries' modelLoads and a spy on from_pretrained), a real SIGKILL mid-judge and the
resume after it, the local runner's tasks, and one vLLM engine for both phases."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfreward import layout, phases
from selfreward.spec import SpecError, parse_spec
from selfreward.storage import Store
from selfreward.worker import run_step
from selfreward.worker.judge import read_phase_records
from selfreward.worker.parts import BatchParts

SEEDS = [f"Question {i}: what is {i} times {i + 1}, and why?" for i in range(7)]
# figures that measure time or this machine, not what was written
TIMING = {"durationSeconds", "generationSeconds", "tokensPerSecond", "verdictsPerSecond", "runtime", "modelLoads"}


def make_spec(tmp_path, model, name="a", shards=1, colocate=True, **over):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in SEEDS))
    data = {
        "model": {"uri": model},
        "prompts": {"uri": str(seeds)},
        "iterations": 1,
        "storage": {"uri": f"file://{tmp_path}/{name}"},
        "generation": {"responsesPerPrompt": 3, "maxNewTokens": 10, "batchSize": 4, "shards": shards},
        # batch sizes differ on purpose: the judge must sample with its own from the shared backend
        "judge": {"samplesPerResponse": 2, "maxNewTokens": 12, "batchSize": 3, "shards": shards, "colocate": colocate,
                  "scorePattern": r"([0-9])", "minScore": 0, "maxScore": 9},
        "seed": 5,
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_spec(data)


@pytest.fixture
def loads(monkeypatch):
    """Counts the model loads from disk: a spy around transformers' from_pretrained."""
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained.__func__
    count = {"n": 0}

    def spy(cls, *a, **kw):
        count["n"] += 1
        return real(cls, *a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return count


def shard_files(store, phase, shards):
    return [store.read_bytes(layout.shard_data_path(1, phase, i, shards)) for i in range(shards)]


def summary(store, phase):
    return {k: v for k, v in store.read_json(layout.summary_path(1, phase)).items() if k not in TIMING}


def test_the_registry_plans_the_judge_into_the_generate_step(tmp_path, tiny_model):
    fused, plain = make_spec(tmp_path, tiny_model), make_spec(tmp_path, tiny_model, colocate=False)
    assert [g.name for g in phases.guests(fused, "generate")] == ["judge"] and phases.guests(plain, "generate") == []
    assert phases.pod_phase(fused, "judge") == "generate" and phases.pod_phase(plain, "judge") == "judge"
    steps = {s.phase: s for s in layout.steps(fused) if s.iteration == 1}
    # the judge is still a step of its own (its summary, its place in the order) run by generate's Job
    assert list(steps) == ["generate", "judge", "pairs", "train"]
    assert steps["judge"].host == "generate" and steps["judge"].job_phase == "generate"
    assert steps["generate"].host is None and steps["pairs"].job_phase == "pairs"
    assert all(s.host is None for s in layout.steps(plain))
    # every host the registry can name is an earlier sharded phase with the same model and iterations
    for entry in phases.REGISTRY:
        host = entry.host_of(fused)
        if host is not None:
            h = phases.get(host)
            assert h.order < entry.order and h.sharded and entry.sharded
            assert (h.model, h.iterations) == (entry.model, entry.iterations)


def test_fused_step_writes_what_the_two_steps_write_with_one_load(tmp_path, tiny_model, loads):
    """One shard: the fused step's records and summaries equal the unfused run's, byte for
    byte, and pairs built from them are the same; M_t is loaded once instead of twice."""
    plain = make_spec(tmp_path, tiny_model, "plain", colocate=False)
    fused = make_spec(tmp_path, tiny_model, "fused")
    out = run_step(plain, "generate", 1)
    assert list(out) == ["generate"] and loads["n"] == 1
    assert list(run_step(plain, "judge", 1)) == ["judge"] and loads["n"] == 2
    out = run_step(fused, "generate", 1)
    assert list(out) == ["generate", "judge"] and loads["n"] == 3  # one load for both phases
    a, b = Store.for_spec(plain), Store.for_spec(fused)
    for phase in ("generate", "judge"):
        assert shard_files(a, phase, 1) == shard_files(b, phase, 1), phase
        assert summary(a, phase) == summary(b, phase), phase
    assert a.read_json(layout.summary_path(1, "generate"))["modelLoads"] == 1
    assert a.read_json(layout.summary_path(1, "judge"))["modelLoads"] == 1
    assert b.read_json(layout.summary_path(1, "generate"))["modelLoads"] == 1
    assert b.read_json(layout.summary_path(1, "judge"))["modelLoads"] == 0  # sampled from generate's backend
    assert b.read_json(layout.summary_path(1, "judge"))["loadedModels"] == [tiny_model]  # still M_t
    judged = read_phase_records(b, 1, "judge")
    assert sum(len(r["responses"]) for r in judged) == 21 and any(resp["scores"] for r in judged for resp in r["responses"])
    # the pairs phase sees no difference
    run_step(plain, "pairs", 1)
    run_step(fused, "pairs", 1)
    assert a.read_bytes("iter-1/pairs/pairs.jsonl") == b.read_bytes("iter-1/pairs/pairs.jsonl")


def test_two_fused_shards_judge_their_own_generate_shard(tmp_path, tiny_model, loads):
    """Shard i judges exactly generate shard i's prompts, each response once, one load per
    pod. (The two-step run's judge shard i takes every 2nd record across both generate
    shards, and verdict seeds are per judge shard and batch, so its verdicts differ from
    these when there is more than one shard; with one shard they are the same, above.)"""
    spec = make_spec(tmp_path, tiny_model, shards=2)
    store = Store.for_spec(spec)
    first = run_step(spec, "generate", 1, shard=0)
    assert first["generate"]["shard"] == 0 and first["judge"]["shard"] == 0 and loads["n"] == 1
    assert not store.exists(layout.summary_path(1, "judge"))  # shard 1 still to come
    last = run_step(spec, "generate", 1, shard=1)
    assert loads["n"] == 2 and last["judge"]["numShards"] == 2  # the last shard wrote both phase summaries
    for i in range(2):
        gen = store.read_jsonl(layout.shard_data_path(1, "generate", i, 2))
        judged = store.read_jsonl(layout.shard_data_path(1, "judge", i, 2))
        assert [r["promptId"] for r in judged] == [r["promptId"] for r in gen]
        assert [[x["text"] for x in r["responses"]] for r in judged] == [r["responses"] for r in gen]
    s = store.read_json(layout.summary_path(1, "judge"))
    assert s["judgedResponses"] == 21 and s["modelLoads"] == 0 and s["numShards"] == 2
    assert store.read_json(layout.summary_path(1, "generate"))["modelLoads"] == 2


def test_a_colocated_judge_shard_needs_its_generate_shard(tmp_path, tiny_model):
    from selfreward.worker.common import PhaseError

    spec = make_spec(tmp_path, tiny_model, shards=2)
    run_step(make_spec(tmp_path, tiny_model, shards=2, colocate=False), "generate", 1, shard=0)  # shard 0 only
    with pytest.raises(PhaseError, match="generate shard 1 of 2 has not committed"):
        run_step(spec, "judge", 1, shard=1)


def _worker(spec_file: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "selfreward", "worker", "generate", "--spec", str(spec_file),
                             "--iteration", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def test_a_kill_mid_judge_resumes_the_judge_without_redoing_generate(tmp_path, tiny_model, loads):
    spec = make_spec(tmp_path, tiny_model, "killed", judge={"batchSize": 1, "maxNewTokens": 48})
    store = Store.for_spec(spec)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec.model_dump(mode="json")))
    parts = BatchParts(store, layout.shard_data_path(1, "judge", 0, 1), "test").rel
    env = dict(os.environ, SELFREWARD_TERMINATION_LOG=str(tmp_path / "term.json"))
    # Only whole parts count: a kill can leave the half-written temporary file of the next one.
    finished = lambda: len([n for n in store.list(parts) if n.startswith("batch-")])  # noqa: E731
    proc = _worker(spec_file, env)
    try:
        deadline = time.time() + 120
        while finished() < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the judge never wrote a batch"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the pod dies mid-judge
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    gen_summary = layout.shard_summary_path(1, "generate", 0, 1)
    assert store.exists(gen_summary) and not store.exists(layout.shard_summary_path(1, "judge", 0, 1))
    generated, gen_time = store.read_bytes(layout.shard_data_path(1, "generate", 0, 1)), os.stat(store.path(gen_summary)).st_mtime_ns
    done_before = finished()

    out = run_step(spec, "generate", 1)  # the re-created pod runs the same command
    assert out["generate"]["skipped"] is True and loads["n"] == 1  # the judge's one load; no generation
    assert store.read_bytes(layout.shard_data_path(1, "generate", 0, 1)) == generated
    assert os.stat(store.path(gen_summary)).st_mtime_ns == gen_time
    judge = store.read_json(layout.shard_summary_path(1, "judge", 0, 1))
    assert judge["batchesResumed"] >= done_before >= 2 and judge["modelLoads"] == 1
    assert not store.exists(parts)
    # the same verdicts as a run that was never killed
    whole = make_spec(tmp_path, tiny_model, "whole", judge={"batchSize": 1, "maxNewTokens": 48})
    run_step(whole, "generate", 1)
    assert shard_files(store, "judge", 1) == shard_files(Store.for_spec(whole), "judge", 1)


def test_vllm_builds_one_engine_for_both_phases(tmp_path, tiny_model, monkeypatch):
    """With a stand-in vllm module (vLLM needs a GPU): the fused step builds one LLM, with
    generation's settings, and sends both phases' requests to it."""
    import types

    from transformers import AutoTokenizer

    engines = []

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, model, dtype, **kw):
            engines.append(self)
            self.kw, self.requests, self.closed = kw, [], False

        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(tiny_model)

        def generate(self, prompts, params, use_tqdm=True):
            self.requests.append(params.kw["max_tokens"])
            out = types.SimpleNamespace
            return [out(outputs=[out(text=f"Score: {(i + j) % 6}", token_ids=[1, 2], finish_reason="stop")
                                 for j in range(params.kw["n"])]) for i in range(len(prompts))]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    vllm = {"enforceEager": True, "gpuMemoryUtilization": 0.5}
    spec = make_spec(tmp_path, tiny_model, generation={"backend": "vllm", "vllm": vllm},
                     judge={"backend": "vllm", "vllm": vllm}, resources={"generate": {"gpus": 2}})
    out = run_step(spec, "generate", 1)
    assert len(engines) == 1 and out["judge"]["backend"] == "vllm" and out["judge"]["modelLoads"] == 0
    engine = engines[0]
    assert engine.kw["enforce_eager"] is True and engine.kw["gpu_memory_utilization"] == 0.5
    assert engine.kw["tensor_parallel_size"] == 2  # the generate pods' GPUs, which the judge runs on too
    assert set(engine.requests) == {10, 12}  # generation's maxNewTokens, then the judge's
    assert out["judge"]["judgedResponses"] == 21 and out["judge"]["scoredResponses"] == 21


@pytest.mark.parametrize("over, field", [
    ({"judge": {"shards": 2}}, "judge.shards"),
    ({"generation": {"shards": 3}, "judge": {"shards": 2}}, "judge.shards"),
    ({"judge": {"backend": "vllm"}, "resources": {"default": {"gpus": 1}}}, "judge.backend"),
    ({"judge": {"vllm": {"maxModelLen": 4096}}}, "judge.vllm"),
    ({"resources": {"judge": {"cpu": "2"}}}, "resources.judge"),
])
def test_a_colocated_judge_that_cannot_share_the_pod_is_refused_with_the_field(tmp_path, tiny_model, over, field):
    with pytest.raises(SpecError) as e:
        make_spec(tmp_path, tiny_model, **over)
    assert [loc for loc, _ in e.value.errors] == [field]
    make_spec(tmp_path, tiny_model, colocate=False, **over)  # the same spec, not colocated, is fine


def test_colocated_vllm_needs_gpus_where_generate_runs_only(tmp_path, tiny_model):
    both = {"generation": {"backend": "vllm"}, "judge": {"backend": "vllm"}}
    make_spec(tmp_path, tiny_model, resources={"generate": {"gpus": 1}}, **both)  # the judge runs there too
    with pytest.raises(SpecError, match="resources.judge"):  # its own GPUs would be another pod's
        make_spec(tmp_path, tiny_model, colocate=False, resources={"generate": {"gpus": 1}}, **both)
    with pytest.raises(SpecError, match="generation.backend"):
        make_spec(tmp_path, tiny_model, **both)


def test_the_local_runner_runs_one_task_per_shard_for_both_phases(tmp_path, tiny_model):
    from selfreward.local import run_local

    spec = make_spec(tmp_path, tiny_model, "local", shards=2, training={"maxSteps": 1, "batchSize": 2, "maxLength": 64})
    state = tmp_path / "state"
    assert run_local(spec, "fused", quiet=True, state_dir=state) == 0
    logs = sorted(p.name.split(".")[0] for p in (state / "logs").iterdir())
    # two generate+judge tasks, no judge task of its own
    assert [n for n in logs if "generate" in n or "judge" in n] == [
        "iter-1-generate-shard-00000-of-00002", "iter-1-generate-shard-00001-of-00002"]
    store = Store.for_spec(spec)
    it = store.read_json("iterations.json")["iterations"][0]
    assert it["judged"] == 21 and it["responses"] == 21 and it.get("pairs") is not None
    assert store.read_json(layout.summary_path(1, "judge"))["modelLoads"] == 0


def test_a_failing_judge_in_the_generate_pod_is_named_and_generation_stays_committed(tmp_path, tiny_model,
                                                                                    monkeypatch):
    from selfreward.worker import main_phase
    from selfreward.worker import judge as judge_mod

    spec = make_spec(tmp_path, tiny_model)

    def broken(ctx):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(judge_mod, "run", broken)
    term = tmp_path / "term.json"
    assert main_phase(spec, "generate", 1, None, None, str(term)) == 1
    report = json.loads(term.read_text())
    assert report["error"] == "iter-1/judge (in the generate pod): RuntimeError: out of memory"
    store = Store.for_spec(spec)
    assert store.exists(layout.summary_path(1, "generate")) and not store.exists(layout.summary_path(1, "judge"))


def test_a_step_report_carries_every_phase_within_the_termination_limit():
    from selfreward import jobs as J
    from selfreward.worker import step_report
    from selfreward.worker.common import TERMINATION_LIMIT, compact

    big = {f"figure{i:03d}": i * 1.5 for i in range(400)}  # far over the limit on its own
    text = compact(step_report({"generate": {"shard": 0, "responses": 12, **big},
                                "judge": {"shard": 0, "judgedResponses": 12, "scoreMean": 2.5, **big}}))
    assert len(text.encode()) <= TERMINATION_LIMIT
    parsed = json.loads(text)["phases"]
    assert parsed["generate"]["responses"] == 12 and parsed["judge"]["scoreMean"] == 2.5
    assert compact(step_report({"pairs": {"pairs": 3}})) == '{"pairs":3}'  # one phase: as before
    # the operator reads each phase's figures from the pods' reports, adding up shards
    pods = [{"metadata": {"name": f"j-{i}"}, "status": {"containerStatuses": [{"name": "worker", "state": {
        "terminated": {"message": compact(step_report({"generate": {"shard": i, "responses": 6},
                                                        "judge": {"shard": i, "judgedResponses": 6}}))}}}]}}
            for i in range(2)]
    job = {"metadata": {"labels": {J.LABEL_PHASE: "generate"}}, "pods": pods}
    assert J.job_summary(job)["responses"] == 12 and J.job_summary(job, "judge")["judgedResponses"] == 12
    assert J.job_summary(job, "pairs") is None


def test_colocate_is_part_of_the_recipe(tmp_path, tiny_model):
    """The judge's records depend on it (which prompts a judge shard takes): a store made
    one way is not continued the other."""
    from selfreward.local import RunError, check_run_json

    plain = make_spec(tmp_path, tiny_model, "recipe", shards=2, colocate=False)
    assert check_run_json(Store.for_spec(plain), plain) == "new"
    with pytest.raises(RunError, match="judge.colocate"):
        check_run_json(Store.for_spec(plain), make_spec(tmp_path, tiny_model, "recipe", shards=2))
