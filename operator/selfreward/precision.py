"""Which dtype a model is stored in, read from its files before anything loads it.

transformers rewrites ``config.dtype`` to the dtype a model was loaded in, so a bf16
model loaded in float32 (as training loads it, for float32 master weights) claims to
be float32 afterwards. The stored dtype therefore comes from the files themselves:

1. the safetensors headers (what is on disk): the floating dtype that holds most of
   the parameters (a bf16 model that keeps a few small tensors in float32 is bf16);
2. else config.json's ``dtype`` (transformers 5) or ``torch_dtype`` (older);
3. else float32.

A hub id (no local directory) is read through ``AutoConfig`` (step 2), which only
parses config.json and does not rewrite it.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

# safetensors header dtype names -> torch dtype names
_SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_HEADER_LIMIT = 100 * 1024 * 1024  # the format caps the header at 100 MB


def safetensors_dtypes(path: str | Path) -> dict[str, int]:
    """{torch dtype name: element count} of the floating-point tensors in one
    .safetensors file, from its header alone (no tensor data is read)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > _HEADER_LIMIT:
            raise ValueError(f"{path}: safetensors header of {n} bytes is over the format's limit")
        header = json.loads(f.read(n))
    counts: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        dt = _SAFETENSORS_FLOATS.get(info.get("dtype"))
        if dt is None:
            continue
        elements = 1
        for d in info.get("shape", []):
            elements *= int(d)
        counts[dt] = counts.get(dt, 0) + elements
    return counts


def _config_dtype(config: dict) -> Optional[str]:
    for key in ("dtype", "torch_dtype"):
        v = config.get(key)
        if isinstance(v, str) and v in _SAFETENSORS_FLOATS.values():
            return v
    text = config.get("text_config")  # multimodal configs keep the language model's own
    return _config_dtype(text) if isinstance(text, dict) else None


def stored_dtype_name(model: str | Path, *, trust_remote_code: bool = False) -> str:
    """The stored dtype of a model directory (or hub id) as a torch dtype name.
    trust_remote_code (spec.model.trustRemoteCode) lets a hub id's own config class load."""
    d = Path(model)
    if d.is_dir():
        counts: dict[str, int] = {}
        for f in sorted(d.glob("*.safetensors")):
            for dt, n in safetensors_dtypes(f).items():
                counts[dt] = counts.get(dt, 0) + n
        if counts:
            return max(sorted(counts), key=lambda k: counts[k])
        cfg = d / "config.json"
        if cfg.is_file():
            return _config_dtype(json.loads(cfg.read_text())) or "float32"
        return "float32"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dt).removeprefix("torch.") if dt is not None else ""
    return name if name in _SAFETENSORS_FLOATS.values() else "float32"


def stored_dtype(model: str | Path, *, trust_remote_code: bool = False):
    """The stored dtype of a model directory (or hub id) as a torch.dtype."""
    import torch

    return getattr(torch, stored_dtype_name(model, trust_remote_code=trust_remote_code))
