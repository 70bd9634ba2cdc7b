"""Generation across the GPUs of a pod and of a machine: vLLM's engine arguments (vLLM
cannot run here, so its construction is checked as a pure function and through the
phase that calls it), transformers' device_map, and the local runner's assignment of
GPUs to --parallel shards."""
from __future__ import annotations

import json

import pytest

from selfreward import local
from selfreward.backends import BackendError
from selfreward.backends.hf import device_map
from selfreward.backends.vllm import engine_args
from selfreward.spec import SpecError, parse_spec
from selfreward.storage import Store
from selfreward.worker import run_phase

BASE = {"model": {"uri": "/m"}, "prompts": {"uri": "/p.jsonl"}, "storage": {"uri": "/s"}}


def test_vllm_engine_spans_the_pods_gpus_with_the_spec_settings():
    spec = parse_spec({**BASE, "generation": {"backend": "vllm", "batchSize": 8,
                                              "vllm": {"gpuMemoryUtilization": 0.8, "maxModelLen": 4096,
                                                       "enforceEager": True}},
                       "resources": {"default": {"gpus": 1}, "generate": {"gpus": 4}}})
    args = engine_args(spec.generation.vllm, spec.resources.for_phase("generate").gpus, spec.generation.batchSize)
    assert args == {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.8, "max_model_len": 4096,
                    "enforce_eager": True, "enable_prefix_caching": True, "max_num_seqs": 128}
    judge = engine_args(spec.judge.vllm, spec.resources.for_phase("judge").gpus, spec.judge.batchSize)
    assert judge["tensor_parallel_size"] == 1 and "max_model_len" not in judge  # the model's own context
    assert judge["enable_prefix_caching"] is True and judge["enforce_eager"] is False
    assert judge["gpu_memory_utilization"] == 0.9
    assert engine_args(None, None)["tensor_parallel_size"] == 1


@pytest.mark.parametrize("path, value", [("generation.vllm.gpuMemoryUtilization", 0),
                                         ("generation.vllm.gpuMemoryUtilization", 1.5),
                                         ("judge.vllm.maxModelLen", 4), ("judge.vllm.tensorParallelSize", 2)])
def test_bad_vllm_settings_name_the_field(path, value):
    doc = json.loads(json.dumps(BASE))
    node = doc
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    with pytest.raises(SpecError) as info:
        parse_spec(doc)
    assert path in dict(info.value.errors)


def test_the_phases_pass_their_pods_gpus_to_the_backend(tmp_path, monkeypatch):
    """generate and judge build their backend with their own resources.<phase>.gpus and
    vllm settings (what becomes tensor_parallel_size); a colocated judge with the generate
    pods' GPUs, in which it runs."""
    import selfreward.backends

    seen = {}

    def fake(name, model_dir, dtype="auto", batch_size=16, *, trust_remote_code=False, vllm_settings=None, gpus=None):
        seen.update(name=name, gpus=gpus, settings=vllm_settings)
        raise BackendError("stop here (test)")

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello there?"}) + "\n")
    spec = parse_spec({"model": {"uri": str(tmp_path)}, "prompts": {"uri": str(prompts)},
                       "storage": {"uri": f"file://{tmp_path}/art"},
                       "generation": {"backend": "vllm", "vllm": {"maxModelLen": 2048}},
                       "resources": {"default": {"gpus": 2}, "generate": {"gpus": 8}, "train": {"gpus": 1}}})
    monkeypatch.setattr(selfreward.backends, "make_backend", fake)
    with pytest.raises(BackendError):
        run_phase(spec, "generate", 1, shard=0, num_shards=1)
    assert seen == {"name": "vllm", "gpus": 8, "settings": spec.generation.vllm}
    from selfreward import layout
    from selfreward.storage import Store

    store = Store.for_spec(spec)
    store.write_jsonl(layout.shard_data_path(1, "generate", 0, 1),
                      [{"promptId": "p0", "prompt": "Hello there?", "responses": ["Hi.", "Yo."],
                        "tokens": [[1], [1]], "truncated": [False, False]}])  # a generate record as written
    store.write_json(layout.shard_summary_path(1, "generate", 0, 1), {"prompts": 1})
    store.write_json(layout.summary_path(1, "generate"), {"prompts": 1})
    seen.clear()
    with pytest.raises(BackendError):
        run_phase(spec, "judge", 1, shard=0, num_shards=1, store=store)
    assert seen == {"name": "transformers", "gpus": 2, "settings": spec.judge.vllm}
    doc = spec.model_dump(mode="json")
    doc["judge"].update(colocate=True, backend="vllm", vllm=doc["generation"]["vllm"])
    colocated = parse_spec(doc)
    seen.clear()
    with pytest.raises(BackendError):
        run_phase(colocated, "judge", 1, shard=0, num_shards=1, store=store)
    assert seen == {"name": "vllm", "gpus": 8, "settings": colocated.generation.vllm}


def test_transformers_spreads_a_model_over_the_pods_gpus():
    assert device_map("cuda", 4) == "auto"
    assert device_map("cuda", 1) == "cuda"
    assert device_map("cpu", 0) == "cpu"
    assert device_map("cpu", 4) == "cpu"  # SELFREWARD_DEVICE=cpu stays on the CPU


@pytest.mark.parametrize("visible, parallel, groups", [
    (["0", "1", "2", "3"], 2, [["0", "1"], ["2", "3"]]),
    (["0", "1", "2", "3"], 4, [["0"], ["1"], ["2"], ["3"]]),
    (["0", "1", "2", "3", "4"], 2, [["0", "1"], ["2", "3"]]),  # equal groups; the fifth GPU idles
    (["0", "1"], 3, [["0"], ["1"], ["0"]]),  # more shards than GPUs: they share, one GPU each
    (["3", "5"], 2, [["3"], ["5"]]),  # CUDA_VISIBLE_DEVICES ids as given
    ([], 4, []),  # no GPU: nothing to assign
])
def test_gpu_groups_are_disjoint_per_concurrent_shard(visible, parallel, groups):
    assert local.gpu_groups(visible, parallel) == groups


def test_visible_gpu_ids_read_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert local.visible_gpu_ids() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local.visible_gpu_ids() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(local.distributed, "visible_gpus", lambda: 3)
    assert local.visible_gpu_ids() == ["0", "1", "2"]


FAKE_WORKER = """#!/bin/sh
# stands in for `python -m selfreward worker generate ... --shard I --num-shards N`:
# records its GPUs and start/end times, and runs longer for some shards than others
shard=$(echo "$@" | sed 's/.*--shard \\([0-9]*\\).*/\\1/')
start=$(date +%s.%N)
sleep 0.$(( (shard * 7) % 5 + 1 ))
echo "{\\"gpus\\": \\"$CUDA_VISIBLE_DEVICES\\", \\"start\\": $start, \\"end\\": $(date +%s.%N)}" > "$SELFREWARD_TERMINATION_LOG"
"""


def test_parallel_shards_get_their_own_gpus(tmp_path, monkeypatch):
    """The runner gives each concurrently running shard its slot's GPUs, and a slot freed
    by a finished shard goes to the next one: never two running shards on one GPU."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_WORKER)
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    spec = parse_spec({**BASE, "storage": {"uri": f"file://{tmp_path}/art"}, "generation": {"shards": 6}})
    runner = local.Runner(spec, "r", True, str(fake), 2, tmp_path)
    runner.logs.mkdir(parents=True, exist_ok=True)
    step = next(s for s in local.layout.steps(spec) if s.phase == "generate")
    tasks = runner._tasks(step)
    runner._run_tasks(tasks)
    results = [t.result for t in tasks]
    assert all(r.get("gpus") in ("0,1", "2,3") for r in results), results
    for a in results:  # any two shards that ran at the same time had disjoint GPUs
        for b in results:
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["gpus"] != b["gpus"], results
    assert {r["gpus"] for r in results} == {"0,1", "2,3"}


def test_parallel_shards_are_charged_the_gpus_of_their_slot(tmp_path, monkeypatch):
    """GPU-seconds of `selfreward run`: each shard's wall time times the GPUs of its slot
    (two of the four here), not every visible GPU, summed per step in usage.json."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_WORKER)
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    spec = parse_spec({**BASE, "storage": {"uri": f"file://{tmp_path}/art"}, "generation": {"shards": 4},
                       "budget": {"pricePerGpuHour": 36.0}})
    runner = local.Runner(spec, "r", True, str(fake), 2, tmp_path)
    runner.logs.mkdir(parents=True, exist_ok=True)
    step = next(s for s in local.layout.steps(spec) if s.phase == "generate")
    tasks = runner._tasks(step)
    runner._run_tasks(tasks)
    assert [t.gpus for t in tasks] == [2, 2, 2, 2]
    row = Store.for_spec(spec).read_json(local.USAGE_JSON)["steps"]["iter-1/generate"]
    # the runner's clock spans each worker's whole life, a little more than the worker's own
    ran = sum(t.result["end"] - t.result["start"] for t in tasks)
    assert ran <= row["wallSeconds"] < ran + 4 * 1.0
    assert row["gpuSeconds"] == pytest.approx(2 * row["wallSeconds"], abs=0.01)
    assert row["cost"] == pytest.approx(row["gpuSeconds"] / 100, abs=1e-4)  # 36 per GPU-hour


def test_a_torchrun_step_is_charged_one_gpu_per_rank(tmp_path, monkeypatch):
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho '{}' > \"$SELFREWARD_TERMINATION_LOG\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    spec = parse_spec({**BASE, "storage": {"uri": f"file://{tmp_path}/art"}, "training": {"distributed": "fsdp"},
                       "resources": {"train": {"gpus": 2}}})
    for nproc, gpus in ((2, 2), (8, 3)):  # more ranks than GPUs share them: the GPUs are what is held
        runner = local.Runner(spec, "r", True, str(fake), 1, tmp_path, nproc_per_node=nproc)
        runner.logs.mkdir(parents=True, exist_ok=True)
        tasks = runner._tasks(next(s for s in local.layout.steps(spec) if s.phase == "train"))
        runner._run_tasks(tasks)
        assert tasks[0].gpus == gpus
