"""Getting the model out: `selfreward export` writes a standard Hugging Face directory
(merged weights byte-identical to the checkpoint, tokenizer, model card with the run's
figures; LoRA runs: the PEFT adapter on request) to a local path or an s3:// prefix,
choosing the checkpoint from --iteration, the run's status or the store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfreward import checkpoint, export, layout, provenance
from selfreward.cli import main
from selfreward.spec import parse_spec
from selfreward.storage import Store
from selfreward.worker import run_phase
from selfreward.worker.train import pairs_path


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": "I cannot say, it is unclear to me.", "chosenScore": 4.5, "rejectedScore": 1.0}
            for i in range(n)]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    """One LoRA DPO iteration of a 2-iteration run, committed to a file:// store."""
    root = tmp_path_factory.mktemp("export-run")
    spec = parse_spec({
        "model": {"uri": tiny_model, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "prompts": {"uri": str(root / "prompts.jsonl")}, "iterations": 2, "seed": 3,
        "storage": {"uri": f"file://{root}/store"},
        "training": {"batchSize": 4, "maxLength": 128, "learningRate": 1e-2, "mode": "lora", "seed": 9},
    })
    store = Store.for_spec(spec)
    provenance.ensure_run_json(store, spec, "local")
    store.write_jsonl(pairs_path(1), _pairs(8))
    summary = run_phase(spec, "train", 1, store=store)
    return spec, store, summary


def _weights(d) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_export_writes_a_loadable_hf_directory_with_card_and_adapter(lora_run, tmp_path, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, store, summary = lora_run
    dest = tmp_path / "out"
    assert main(["export", store.url(""), "--iteration", "1", str(dest), "--adapter"]) == 0

    rel = layout.checkpoint_dir(1, "train")
    ckpt = checkpoint.fetch(store, rel)
    model = AutoModelForCausalLM.from_pretrained(dest)
    AutoTokenizer.from_pretrained(dest)
    exported = {k: v for k, v in model.state_dict().items()}
    stored = _weights(ckpt)
    base = _weights(tiny_model)
    assert set(stored) <= set(exported)
    assert all(torch.equal(exported[k], stored[k]) for k in stored)  # the checkpoint's weights, exactly
    assert any(not torch.equal(stored[k], base[k]) for k in stored)  # and they are trained ones
    assert not (dest / layout.MANIFEST).exists()

    card = (dest / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# M2 of a Self-Rewarding run" in card and "iter-1/train/checkpoint" in card
    assert f"| 1 | {summary['steps']} | {summary['dpoLoss']:.4g} |" in card  # steps, DPO loss of iteration 1
    assert "mode lora" in card and '"training": 9' in card
    assert checkpoint.read_manifest(store, rel)["files"]["model.safetensors"]["sha256"] in card

    # the adapter applied to the start model (M_1 = the base model here) gives the exported weights
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(dest / "adapter"))
    merged = peft.merge_and_unload().state_dict()
    assert max(float((merged[k] - exported[k]).abs().max()) for k in stored) < 1e-6


def test_export_picks_best_then_final_and_refuses_what_it_cannot(lora_run, tmp_path):
    spec, store, _ = lora_run
    rel = layout.checkpoint_dir(1, "train")
    assert export.from_store(store, None) == rel  # the newest committed training checkpoint
    uri = store.url("")
    run = {"spec": {"storage": {"uri": uri}}, "status": {"finalCheckpoint": store.url(rel)}}
    assert export.from_run(run, None)[1] == rel
    best = dict(run, status={"bestCheckpoint": store.url("iter-0/sft/checkpoint"), "finalCheckpoint": store.url(rel)})
    assert export.from_run(best, None)[1] == "iter-0/sft/checkpoint"
    assert export.from_run(run, 2)[1] == layout.checkpoint_dir(2, "train")
    with pytest.raises(export.ExportError, match="base model"):
        export.from_run(dict(run, status={"bestCheckpoint": spec.model.uri}), None)
    with pytest.raises(export.ExportError, match="names no bestCheckpoint"):
        export.from_run(dict(run, status={}), None)

    with pytest.raises(export.ExportError, match="not a committed checkpoint"):
        export.export(store, layout.checkpoint_dir(2, "train"), str(tmp_path / "x"))
    with pytest.raises(export.ExportError, match="inside the run's store"):
        export.export(store, rel, store.url("exports/m2"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", uri, "--iteration", "1", str(tmp_path / "full")]) == 1
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"  # untouched
    assert main(["export", uri, "--iteration", "1", str(tmp_path / "full"), "--force"]) == 0
    assert (tmp_path / "full" / "model.safetensors").is_file()

    # a corrupted checkpoint is refused, not exported
    broken = Store(f"file://{tmp_path}/broken")
    for name in store.walk_files(rel):
        broken.put_file(store.path(f"{rel}/{name}"), f"{rel}/{name}")
    broken.write_bytes(f"{rel}/model.safetensors", b"not the weights")
    assert main(["export", broken.url(""), str(tmp_path / "y")]) == 1
    assert not (tmp_path / "y" / "README.md").exists()


def test_export_of_a_full_run_has_no_adapter_to_give(tmp_path, lora_run):
    _, store, _ = lora_run
    full = Store(f"file://{tmp_path}/fullrun")
    rel = layout.checkpoint_dir(1, "train")
    for name in store.walk_files(rel):
        full.put_file(store.path(f"{rel}/{name}"), f"{rel}/{name}")
    with pytest.raises(export.ExportError, match="no committed adapter"):
        export.export(full, rel, str(tmp_path / "z"), with_adapter=True)
    assert export.export(full, rel, str(tmp_path / "z"))["files"] >= 4
    assert "holds no run.json" in (tmp_path / "z" / "README.md").read_text()


def test_eval_best_checkpoint_is_preferred(tmp_path, lora_run):
    _, store, _ = lora_run
    s = Store(f"file://{tmp_path}/evalrun")
    rel = layout.checkpoint_dir(1, "train")
    for name in store.walk_files(rel):
        s.put_file(store.path(f"{rel}/{name}"), f"{rel}/{name}")
    s.write_json(layout.summary_path(2, "eval"), {"bestCheckpoint": "iter-0/sft/checkpoint", "verifierScore": 50.0})
    s.write_json(layout.summary_path(2, "train"), {"steps": 1})
    assert export.from_store(s, None) == "iter-0/sft/checkpoint"
    assert export.from_store(s, 1) == rel  # --iteration wins over the gate's choice
