"""Precision on the tiny model stored in float32 and in bfloat16 (as real models are).

- the stored dtype is read from the files before loading (loading rewrites config.dtype);
- SFT and DPO checkpoints are written in the dtype the start model was stored in:
  safetensors headers and config.json, a bf16 base gives bf16 checkpoints of about half
  the bytes, an fp32 base fp32 ones;
- ``model.dtype: bfloat16`` with bf16 training is mixed precision (float32 master
  weights): it changes most weights, measured against the fraction a float32 training
  changes on the same data, where pure-bf16 training (``training.pureBf16``) loses most
  of those updates.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from selfreward import checkpoint, layout, precision, training
from selfreward.spec import parse_spec
from selfreward.storage import Store
from selfreward.worker import run_phase
from selfreward.worker.train import pairs_path


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> str:
    from selfreward.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-bf16") / "model", seed=0, dtype="bfloat16"))


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": "I cannot say, it is unclear to me.", "chosenScore": 4.5, "rejectedScore": 1.0}
            for i in range(n)]


def _spec(tmp_path, model_uri: str, training_over=None, **over):
    data = {
        "model": {"uri": model_uri},
        "prompts": {"uri": str(tmp_path / "prompts.jsonl")},
        "iterations": 1,
        "storage": {"uri": f"file://{tmp_path}/artifacts"},
        "training": {"batchSize": 4, "maxLength": 128, "seed": 7, **(training_over or {})},
    }
    data.update(over)
    return parse_spec(data)


def _header_dtypes(model_dir: Path) -> set[str]:
    out = set()
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        out |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return out


def _weights_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def _changed_fraction(base: str, trained: Path) -> float:
    from safetensors.torch import load_file

    a = {}
    for f in Path(base).glob("*.safetensors"):
        a.update(load_file(str(f)))
    b = {}
    for f in Path(trained).glob("*.safetensors"):
        b.update(load_file(str(f)))
    assert set(a) == set(b)
    total = sum(v.numel() for v in a.values())
    return sum(int((a[k].float() != b[k].float()).sum()) for k in a) / total


def _train(tmp_path, model_uri: str, training_over: dict, **over) -> tuple[dict, Path]:
    spec = _spec(tmp_path, model_uri, training_over, **over)
    store = Store.for_spec(spec)
    store.write_jsonl(pairs_path(1), _pairs(8))
    summary = run_phase(spec, "train", 1, store=store)
    return summary, checkpoint.fetch(store, layout.checkpoint_dir(1, "train"))


def test_stored_dtype_is_read_from_the_files(tmp_path, tiny_model, bf16_model):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    assert _header_dtypes(Path(bf16_model)) == {"BF16"} and _header_dtypes(Path(tiny_model)) == {"F32"}
    assert precision.stored_dtype(bf16_model) is torch.bfloat16
    assert precision.stored_dtype(tiny_model) is torch.float32
    # what the old code read: the config of a model loaded in float32 claims float32
    loaded = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.float32)
    assert loaded.config.dtype == torch.float32
    assert training.stored_dtype(bf16_model) is torch.bfloat16
    # the headers win over a config that says otherwise; the dtype with most elements wins
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_file({"big": torch.zeros(64, 64, dtype=torch.bfloat16), "norm": torch.ones(64, dtype=torch.float32),
               "ids": torch.zeros(100_000, dtype=torch.int64)}, str(mixed / "model.safetensors"))
    (mixed / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert precision.stored_dtype_name(mixed) == "bfloat16"
    # no weights yet (e.g. only a config): config.json's dtype, then torch_dtype, else float32
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert precision.stored_dtype_name(only_config) == "float16"
    (only_config / "config.json").write_text(json.dumps({"text_config": {"dtype": "bfloat16"}}))
    assert precision.stored_dtype_name(only_config) == "bfloat16"
    (only_config / "config.json").write_text("{}")
    assert precision.stored_dtype_name(only_config) == "float32"
    # a truncated or absurd header is an error, not a guess
    (mixed / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="not a safetensors file"):
        precision.stored_dtype_name(mixed)
    (mixed / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(ValueError, match="over the format's limit"):
        precision.stored_dtype_name(mixed)


@pytest.mark.parametrize("base_dtype", ["bfloat16", "float32"])
def test_checkpoints_keep_the_base_models_dtype(tmp_path, tiny_model, bf16_model, base_dtype):
    """SFT (iteration 0) and DPO checkpoints: safetensors headers, config.json and the
    summary all say the base model's dtype, with bf16 autocast training on (the GPU
    default) and model.dtype bfloat16 (the documented GPU setting)."""
    base = bf16_model if base_dtype == "bfloat16" else tiny_model
    header = {"bfloat16": {"BF16"}, "float32": {"F32"}}[base_dtype]
    data = tmp_path / "ift.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": f"{i}."}) + "\n" for i in range(4)))
    spec = _spec(tmp_path, base, {"bf16": True, "maxSteps": 2}, sft={"instructionDataUri": str(data), "maxSteps": 2},
                 model={"uri": base, "dtype": "bfloat16"})
    store = Store.for_spec(spec)
    sft = run_phase(spec, "sft", 0, store=store)
    store.write_jsonl(pairs_path(1), _pairs(4))
    dpo = run_phase(spec, "train", 1, store=store)  # M_1 is the SFT checkpoint
    for phase, summary in (("sft", sft), ("train", dpo)):
        local = checkpoint.fetch(store, layout.checkpoint_dir(1 if phase == "train" else 0, phase))
        assert _header_dtypes(local) == header, phase
        assert json.loads((local / "config.json").read_text())["dtype"] == base_dtype, phase
        assert summary["checkpointDtype"] == base_dtype and summary["bf16"] is True
        # same tensors, same shapes: the bytes follow the dtype (bf16: half of fp32)
        assert _weights_bytes(local) == pytest.approx(_weights_bytes(Path(base)), rel=0.01), phase


def test_checkpoint_dtype_can_be_chosen(tmp_path, bf16_model):
    summary, local = _train(tmp_path, bf16_model, {"maxSteps": 1, "checkpointDtype": "float32"})
    assert summary["checkpointDtype"] == "float32" and _header_dtypes(local) == {"F32"}
    assert _weights_bytes(local) == pytest.approx(2 * _weights_bytes(Path(bf16_model)), rel=0.01)


def test_bf16_training_keeps_float32_master_weights(tmp_path, tiny_model, bf16_model):
    """Four DPO steps at a small learning rate on a bf16 base: bf16 mixed precision (the
    GPU default, model.dtype bfloat16) changes most stored weights, close to the fraction
    float32 training changes on the fp32 twin of the model; pure bf16 (updates rounded
    to bf16 at every step) loses most of them."""
    steps = {"maxSteps": 4, "learningRate": 3e-5}
    _, ref = _train(tmp_path / "fp32", tiny_model, {**steps, "bf16": False}, model={"uri": tiny_model, "dtype": "float32"})
    reference = _changed_fraction(tiny_model, ref)
    assert reference > 0.7  # embedding rows of tokens absent from the pairs get no gradient
    summary, mixed = _train(tmp_path / "mixed", bf16_model, {**steps, "bf16": True},
                            model={"uri": bf16_model, "dtype": "bfloat16"})
    assert summary["bf16"] is True and summary["pureBf16"] is False
    mixed_fraction = _changed_fraction(bf16_model, mixed)
    assert mixed_fraction > 0.6 * reference, (mixed_fraction, reference)
    _, pure = _train(tmp_path / "pure", bf16_model, {**steps, "bf16": True, "pureBf16": True})
    pure_fraction = _changed_fraction(bf16_model, pure)
    assert pure_fraction < 0.6 * mixed_fraction, (pure_fraction, mixed_fraction)


def test_precision_settings_and_load_dtype(tmp_path, tiny_model):
    import torch

    assert training.load_dtype(_spec(tmp_path, tiny_model, model={"uri": tiny_model, "dtype": "bfloat16"})) \
        is torch.float32
    assert training.load_dtype(_spec(tmp_path, tiny_model, model={"uri": tiny_model, "dtype": "float16"})) \
        is torch.float32
    assert training.load_dtype(_spec(tmp_path, tiny_model, {"pureBf16": True})) is torch.bfloat16
    with pytest.raises(Exception, match="checkpointDtype"):
        _spec(tmp_path, tiny_model, {"checkpointDtype": "int8"})
