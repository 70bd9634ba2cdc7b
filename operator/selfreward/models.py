"""Which model a phase uses, as a local directory (or a hub id) transformers can load.

- a checkpoint of this run (relative path in the store) is fetched and verified;
- the base model URI: a local path or file:// is used in place; s3://bucket/prefix is a
  checkpoint in another store (manifest required); anything else is a Hugging Face id,
  resolved by transformers with whatever hub or mirror the worker's environment has.
"""
from __future__ import annotations

import json
import os
import posixpath
from typing import Optional

from . import checkpoint, layout
from .spec import RunSpec
from .storage import Store


def resolve_uri(uri: str, endpoint: Optional[str] = None) -> str:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if uri.startswith("s3://"):
        parent, name = posixpath.split(uri.rstrip("/"))
        return str(checkpoint.fetch(Store(parent, endpoint), name))
    return uri  # a local path or a hub id


def base_model(spec: RunSpec) -> str:
    return resolve_uri(spec.model.uri, spec.storage.endpoint)


def resolve(spec: RunSpec, store: Store, rel: Optional[str]) -> str:
    """rel: a checkpoint directory of this run, or None for the base model."""
    if rel is None:
        return base_model(spec)
    local = str(checkpoint.fetch(store, rel))
    _identities[local] = checkpoint.identity(checkpoint.read_manifest(store, rel))
    return local


def policy_checkpoint(spec: RunSpec, store: Store, iteration: int) -> Optional[str]:
    """The checkpoint M_t of iteration t (None = the base model): the previous
    iteration's model, unless the previous eval's gate rolled back, in which case its
    summary names the best model so far as ``nextPolicy`` ("" = the base model)."""
    if spec.eval_enabled and iteration >= 2:
        rel = layout.summary_path(iteration - 1, "eval")
        if store.exists(rel):
            nxt = store.read_json(rel).get("nextPolicy")
            if isinstance(nxt, str):
                return nxt or None
    return layout.policy_checkpoint(spec, iteration)


def policy_model(spec: RunSpec, store: Store, iteration: int) -> str:
    """M_t for iteration t."""
    return resolve(spec, store, policy_checkpoint(spec, store, iteration))


def reference_model(spec: RunSpec, store: Store, iteration: int) -> str:
    if spec.training.reference == "current":
        return policy_model(spec, store, iteration)
    return resolve(spec, store, layout.reference_checkpoint(spec, iteration))


def model_identity(model_dir: str) -> str:
    """What a model directory is: ``checkpoint.identity`` of its manifest (a checkpoint
    fetched by this process, or a directory that holds its manifest), else the
    directory or hub id as given."""
    if str(model_dir) in _identities:
        return _identities[str(model_dir)]
    manifest = os.path.join(str(model_dir), layout.MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                return checkpoint.identity(json.load(f))
        except (OSError, ValueError, KeyError):
            pass
    return str(model_dir)


# local directory -> identity of the checkpoint fetched into it (the S3 cache keeps no manifest)
_identities: dict[str, str] = {}

# Identities of the models this process loaded (generation backends, trainers), in
# order. The worker dispatcher writes them into the phase summary as ``loadedModels``,
# so a test (or an auditor) can check which model a phase really used.
_loaded: list[str] = []


def note_loaded(model_dir: str) -> None:
    ident = model_identity(model_dir)
    if ident not in _loaded:
        _loaded.append(ident)


def take_loaded() -> list[str]:
    out = list(_loaded)
    _loaded.clear()
    return out


def device() -> str:
    import torch

    if os.environ.get("SELFREWARD_DEVICE"):
        return os.environ["SELFREWARD_DEVICE"]
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device() == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
