"""Which model a phase uses, as a local directory (or a hub id) transformers can load.

- a checkpoint of this run (relative path in the store) is fetched and verified;
- the base model URI: a local path or file:// is used in place; s3://bucket/prefix is a
  checkpoint in another store (manifest required); anything else is a Hugging Face id,
  resolved by transformers with whatever hub or mirror the worker's environment has.
"""
from __future__ import annotations

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
    return str(checkpoint.fetch(store, rel))


def policy_model(spec: RunSpec, store: Store, iteration: int) -> str:
    """M_t for iteration t."""
    return resolve(spec, store, layout.policy_checkpoint(spec, iteration))


def reference_model(spec: RunSpec, store: Store, iteration: int) -> str:
    return resolve(spec, store, layout.reference_checkpoint(spec, iteration))


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
