"""The training phases on the tiny model: DPO (full and LoRA, reference current and
base) and SFT on IFT + EFT data, each committing a checkpoint whose manifest verifies
and which loads and generates. Trainings are a few steps on a handful of examples."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from selfreward import checkpoint, layout, models, training
from selfreward.spec import DEFAULT_JUDGE_TEMPLATE, parse_spec
from selfreward.storage import Store
from selfreward.worker import run_phase
from selfreward.worker.common import PhaseError
from selfreward.worker.train import pairs_path


def _spec(tmp_path, tiny_model, training_over=None, **over):
    data = {
        "model": {"uri": tiny_model, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "prompts": {"uri": str(tmp_path / "prompts.jsonl")},
        "iterations": 2,
        "storage": {"uri": f"file://{tmp_path}/artifacts"},
        "training": {"batchSize": 4, "maxLength": 128, "epochs": 2, "learningRate": 1e-3, "seed": 7,
                     **(training_over or {})},
    }
    data.update(over)
    return parse_spec(data)


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": "I cannot say, it is unclear to me.", "chosenScore": 4.5, "rejectedScore": 1.0}
            for i in range(n)]


def _state_dict(model_dir) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _generates(model_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]


def _check_checkpoint(store: Store, rel: str, summary: dict) -> tuple[dict, Path]:
    manifest = checkpoint.verify(store, rel)
    assert summary["checkpoint"] == store.url(rel)
    assert summary["checkpointBytes"] == sum(f["size"] for f in manifest["files"].values())
    assert summary["uploadMBps"] > 0
    local = checkpoint.fetch(store, rel)
    names = set(manifest["files"])
    assert {"config.json", "tokenizer.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert not any("adapter" in n for n in names)  # a plain model, never a bare adapter
    _generates(local)
    return manifest, local


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_dpo_iteration_commits_a_trained_checkpoint(tmp_path, tiny_model, mode):
    spec = _spec(tmp_path, tiny_model, {"mode": mode})
    store = Store.for_spec(spec)
    store.write_jsonl(pairs_path(1), _pairs(10))
    progress: list[dict] = []

    summary = run_phase(spec, "train", 1, store=store, progress=progress.append)

    rel = layout.checkpoint_dir(1, "train")
    manifest, local = _check_checkpoint(store, rel, summary)
    assert manifest["metadata"]["iteration"] == 1
    assert manifest["metadata"]["reference"] == "current"
    assert manifest["metadata"]["mode"] == mode
    assert manifest["metadata"]["summary"]["pairs"] == 10
    # figures
    assert summary["pairs"] == 10 and summary["pairsTrained"] == 10
    assert summary["steps"] == 6  # ceil(10 / 4) batches x 2 epochs
    assert summary["samplesPerSecond"] > 0 and summary["trainSeconds"] > 0
    assert 0.0 <= summary["rewardAccuracy"] <= 1.0
    assert math.isclose(summary["rewardMargin"], summary["chosenReward"] - summary["rejectedReward"], abs_tol=1e-4)
    # it learned: the DPO loss starts at log(2) (policy == reference) and goes down
    losses = [p["loss"] for p in progress]
    assert len(losses) == summary["steps"]
    assert math.isclose(losses[0], math.log(2), abs_tol=1e-3)
    assert losses[-1] < losses[0]
    assert summary["rewardMargin"] > 0
    # the weights changed, and LoRA was merged into a plain model of the same shape
    base, trained = _state_dict(tiny_model), _state_dict(local)
    assert set(trained) == set(base)
    assert not any("lora" in k for k in trained)
    changed = {k for k in base if not (base[k] == trained[k]).all()}
    assert any("q_proj" in k for k in changed)
    if mode == "lora":  # only the adapted projections move
        assert all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    else:
        assert any("mlp" in k for k in changed)
    # the next iteration starts from this checkpoint
    assert models.policy_model(spec, store, 2) == str(local)


def _perturbed_checkpoint(tiny_model, tmp_path, store: Store, rel: str) -> None:
    """Commit a copy of the tiny model with noisy weights: an M_2 that differs from M_1."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "perturbed"
    shutil.copytree(tiny_model, out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    checkpoint.commit(out, store, rel)


@pytest.mark.parametrize("reference", ["current", "base"])
def test_dpo_reference_model_choice(tmp_path, tiny_model, reference):
    """Iteration 2 trains M_2 (here: a perturbed model). With reference=current the
    first step compares M_2 with itself (zero implicit rewards); with reference=base it
    compares M_2 with the base model (non-zero rewards from the first step)."""
    spec = _spec(tmp_path, tiny_model, {"reference": reference, "maxSteps": 2})
    store = Store.for_spec(spec)
    _perturbed_checkpoint(tiny_model, tmp_path, store, layout.checkpoint_dir(1, "train"))
    store.write_jsonl(pairs_path(2), _pairs(8))
    progress: list[dict] = []

    summary = run_phase(spec, "train", 2, store=store, progress=progress.append)

    assert summary["steps"] == 2 and summary["reference"] == reference
    first = progress[0]
    if reference == "current":
        assert math.isclose(first["loss"], math.log(2), abs_tol=1e-3)
        assert first["rewardMargin"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert abs(first["rewardMargin"]) > 1e-3
        assert not math.isclose(first["loss"], math.log(2), abs_tol=1e-3)
    manifest, _ = _check_checkpoint(store, layout.checkpoint_dir(2, "train"), summary)
    assert manifest["metadata"]["policy"] == layout.checkpoint_dir(1, "train")
    assert manifest["metadata"]["referenceModel"] == (
        layout.checkpoint_dir(1, "train") if reference == "current" else tiny_model)


@pytest.mark.parametrize("reference", ["current", "base"])
def test_precomputed_reference_log_probs_train_the_same_without_a_reference_copy(tmp_path, tiny_model, monkeypatch,
                                                                                 reference):
    """training.precomputeRefLogProbs: the same losses step by step as with a reference
    model in memory (so the log-probs come from the right model: M_2 for current, the
    base for base), and while training runs only the policy is alive."""
    import gc

    from transformers import LlamaForCausalLM

    live: list[int] = []
    kept = training.kept_examples

    def counting(trainer, *args):  # called after the trainer is built, before it trains
        gc.collect()
        live.append(sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects()))
        return kept(trainer, *args)

    monkeypatch.setattr(training, "kept_examples", counting)
    losses = {}
    for precompute in (False, True):
        spec = _spec(tmp_path / str(precompute), tiny_model,
                     {"reference": reference, "maxSteps": 3, "precomputeRefLogProbs": precompute})
        store = Store.for_spec(spec)
        _perturbed_checkpoint(tiny_model, tmp_path / str(precompute), store, layout.checkpoint_dir(1, "train"))
        store.write_jsonl(pairs_path(2), _pairs(8))
        progress: list[dict] = []
        summary = run_phase(spec, "train", 2, store=store, progress=progress.append)
        assert summary["precomputeRefLogProbs"] is precompute
        losses[precompute] = [p["loss"] for p in progress]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
    assert (abs(losses[True][0] - math.log(2)) < 1e-3) == (reference == "current")
    # without precomputing: the policy and a reference copy; with it: the policy only
    assert live == [2, 1]


def test_fewer_pairs_than_the_batch_still_train(tmp_path, tiny_model):
    spec = _spec(tmp_path, tiny_model, {"batchSize": 8, "gradientAccumulation": 4, "epochs": 1,
                                           "gradientCheckpointing": True})
    store = Store.for_spec(spec)
    store.write_jsonl(pairs_path(1), _pairs(3))
    summary = run_phase(spec, "train", 1, store=store)
    assert (summary["batchSize"], summary["gradientAccumulation"]) == (3, 1)
    assert summary["steps"] == 1 and summary["samplesSeen"] == 3
    checkpoint.verify(store, layout.checkpoint_dir(1, "train"))


def test_zero_pairs_is_a_clear_error(tmp_path, tiny_model):
    spec = _spec(tmp_path, tiny_model)
    store = Store.for_spec(spec)
    with pytest.raises(PhaseError, match="the pairs phase has not committed"):
        run_phase(spec, "train", 1, store=store)
    store.write_text(pairs_path(1), "")
    store.write_json(layout.summary_path(1, "pairs"), {"pairs": 0, "prompts": 5, "ties": 5, "iteration": 1,
                                                       "durationSeconds": 0.1, "phase": "pairs"})
    with pytest.raises(PhaseError, match=r"iteration 1 produced no preference pairs: .*pairs\.jsonl is empty "
                                         r"\(pairs summary: pairs=0, prompts=5, ties=5\)"):
        run_phase(spec, "train", 1, store=store)
    # nothing was committed and no summary written: the step is not done
    assert not checkpoint.is_committed(store, layout.checkpoint_dir(1, "train"))
    assert not store.exists(layout.summary_path(1, "train"))


def test_malformed_pair_names_the_record(tmp_path, tiny_model):
    spec = _spec(tmp_path, tiny_model)
    store = Store.for_spec(spec)
    rows = _pairs(3)
    del rows[1]["rejected"]
    store.write_jsonl(pairs_path(1), rows)
    with pytest.raises(PhaseError, match=r"record 2: field 'rejected' must be a non-empty string"):
        run_phase(spec, "train", 1, store=store)


def test_committed_checkpoint_is_not_trained_again(tmp_path, tiny_model):
    """A worker that died after the commit but before summary.json: the retry returns
    the committed figures without training or uploading again."""
    spec = _spec(tmp_path, tiny_model, {"maxSteps": 1})
    store = Store.for_spec(spec)
    store.write_jsonl(pairs_path(1), _pairs(4))
    first = run_phase(spec, "train", 1, store=store)
    rel = layout.checkpoint_dir(1, "train")
    manifest_before = store.read_text(f"{rel}/{layout.MANIFEST}")
    store.delete(layout.summary_path(1, "train"))

    again = run_phase(spec, "train", 1, store=store)
    assert again["resumedFromCheckpoint"] is True
    assert again["dpoLoss"] == first["dpoLoss"] and again["steps"] == first["steps"]
    assert store.read_text(f"{rel}/{layout.MANIFEST}") == manifest_before
    # a damaged commit is not trusted: it is trained and committed again
    store.delete(layout.summary_path(1, "train"))
    Path(store.path(f"{rel}/model.safetensors")).write_bytes(b"broken")
    redone = run_phase(spec, "train", 1, store=store)
    assert "resumedFromCheckpoint" not in redone
    checkpoint.verify(store, rel)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sft_on_ift_and_eft_data(tmp_path, tiny_model, mode):
    ift = [{"prompt": f"Name colour number {i}.", "response": f"Colour {i} is blue."} for i in range(10)]
    eft = [{"prompt": DEFAULT_JUDGE_TEMPLATE.format(prompt=f"Name colour {i}.", response=f"Colour {i} is blue."),
            "response": f"The answer is relevant and direct. Score: {3 + i % 3}"} for i in range(4)]
    _write_jsonl(tmp_path / "ift.jsonl", ift)
    _write_jsonl(tmp_path / "eft.jsonl", eft)
    spec = _spec(tmp_path, tiny_model, {"mode": mode}, sft={
        "instructionDataUri": str(tmp_path / "ift.jsonl"), "judgeDataUri": f"file://{tmp_path}/eft.jsonl",
        "batchSize": 4, "maxLength": 1024, "epochs": 1, "learningRate": 1e-3})
    store = Store.for_spec(spec)
    progress: list[dict] = []

    summary = run_phase(spec, "sft", 0, store=store, progress=progress.append)

    assert summary["examples"] == 10 and summary["eftExamples"] == 4
    assert summary["trainExamples"] == 14 and summary["examplesDropped"] == 0
    assert summary["steps"] == 4  # ceil(14 / 4)
    assert summary["samplesPerSecond"] > 0
    assert progress[-1]["loss"] < progress[0]["loss"]
    rel = layout.checkpoint_dir(0, "sft")
    manifest, local = _check_checkpoint(store, rel, summary)
    assert manifest["metadata"]["phase"] == "sft"
    assert manifest["metadata"]["judgeData"] == f"file://{tmp_path}/eft.jsonl"
    # M_1 is the SFT checkpoint: iteration 1 generates and trains from it
    assert models.policy_model(spec, store, 1) == str(local)
    assert store.exists(layout.summary_path(0, "sft"))


def test_sft_data_errors(tmp_path, tiny_model):
    _write_jsonl(tmp_path / "ift.jsonl", [{"prompt": "Hi", "response": "Hello."}, {"prompt": "Bye"}])
    spec = _spec(tmp_path, tiny_model, sft={"instructionDataUri": str(tmp_path / "ift.jsonl")})
    with pytest.raises(PhaseError, match=r"ift\.jsonl line 2: field 'response' must be a non-empty string"):
        run_phase(spec, "sft", 0)
    spec = _spec(tmp_path, tiny_model, sft={"instructionDataUri": str(tmp_path / "missing.jsonl")})
    with pytest.raises(PhaseError, match="instruction data .*missing.jsonl does not exist"):
        run_phase(spec, "sft", 0)


def test_batch_fitting_and_precision_choice():
    assert training.fit_batch(100, 4, 2) == (4, 2)
    assert training.fit_batch(3, 8, 4) == (3, 1)
    assert training.fit_batch(10, 4, 4) == (4, 2)  # two full batches fit
    with pytest.raises(training.TrainingError):
        training.fit_batch(0, 4, 1)
    assert training.use_bf16(True) is True and training.use_bf16(False) is False
    import torch

    assert training.use_bf16(None) == (torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                                       and models.device() == "cuda")


def test_every_spec_loss_type_trains(tmp_path, tiny_model):
    """Each lossType the spec accepts is one TRL's DPOTrainer runs."""
    from selfreward.spec import TrainingSpec

    loss_types = TrainingSpec.model_fields["lossType"].annotation.__args__
    for loss_type in loss_types:
        if loss_type == "sigmoid":
            continue  # the default, trained by every other test here
        spec = _spec(tmp_path / loss_type, tiny_model, {"lossType": loss_type, "maxSteps": 1, "batchSize": 2})
        store = Store.for_spec(spec)
        store.write_jsonl(pairs_path(1), _pairs(2))
        summary = run_phase(spec, "train", 1, store=store)
        assert summary["lossType"] == loss_type and summary["steps"] == 1
        assert math.isfinite(summary["dpoLoss"]), loss_type
        assert checkpoint.is_committed(store, layout.checkpoint_dir(1, "train"))


def test_tokenizer_without_chat_template_trains_on_plain_text(tmp_path, tiny_model):
    import shutil

    plain = tmp_path / "plain-model"
    shutil.copytree(tiny_model, plain)
    (plain / "chat_template.jinja").unlink()
    spec = _spec(tmp_path, str(plain), {"maxSteps": 2})
    store = Store.for_spec(spec)
    store.write_jsonl(pairs_path(1), _pairs(4))
    summary = run_phase(spec, "train", 1, store=store)
    assert summary["conversational"] is False and summary["steps"] == 2
    checkpoint.verify(store, layout.checkpoint_dir(1, "train"))


def test_dpo_against_an_s3_store(tmp_path, tiny_model, monkeypatch):
    """The train phase with its artifacts on S3 (SeaweedFS on loopback): pairs read from
    the bucket, the checkpoint committed there, then fetched (verified) into the cache
    as the next iteration's M_t."""
    from s3server import make_bucket, s3_env, s3_server

    monkeypatch.setenv("SELFREWARD_CACHE", str(tmp_path / "cache"))
    with s3_server() as endpoint:
        make_bucket(endpoint, "runs")
        for k, v in s3_env(endpoint).items():
            monkeypatch.setenv(k, v)
        spec = _spec(tmp_path, tiny_model, {"maxSteps": 2},
                     storage={"uri": "s3://runs/dpo-test", "endpoint": endpoint})
        store = Store.for_spec(spec)
        store.write_jsonl(pairs_path(1), _pairs(4))
        summary = run_phase(spec, "train", 1, store=store)
        assert summary["checkpoint"] == "s3://runs/dpo-test/iter-1/train/checkpoint"
        assert summary["uploadMBps"] > 0
        assert store.exists(layout.summary_path(1, "train"))
        local = models.policy_model(spec, store, 2)
        assert Path(local).is_relative_to(tmp_path / "cache")
        _generates(local)


def test_lora_targets_are_checked_against_the_model(tmp_path, tiny_model):
    spec = _spec(tmp_path / "bad", tiny_model, {"mode": "lora", "maxSteps": 1},
                 model={"uri": tiny_model, "lora": {"targetModules": ["c_attn"]}})
    store = Store.for_spec(spec)
    store.write_jsonl(pairs_path(1), _pairs(2))
    with pytest.raises(PhaseError, match=r"targetModules \['c_attn'\] match no layer of LlamaForCausalLM; "
                                         r"its linear layers are named: .*q_proj"):
        run_phase(spec, "train", 1, store=store)
    # peft's all-linear shorthand adapts every linear layer but the LM head
    spec = _spec(tmp_path / "all", tiny_model, {"mode": "lora", "maxSteps": 1},
                 model={"uri": tiny_model, "lora": {"targetModules": ["all-linear"]}})
    store = Store.for_spec(spec)
    store.write_jsonl(pairs_path(1), _pairs(2))
    run_phase(spec, "train", 1, store=store)
    local = checkpoint.fetch(store, layout.checkpoint_dir(1, "train"))
    base, trained = _state_dict(tiny_model), _state_dict(local)
    changed = {k for k in base if not (base[k] == trained[k]).all()}
    assert any("mlp" in k for k in changed) and any("self_attn" in k for k in changed)
