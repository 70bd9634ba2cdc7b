"""Generation backends behind one interface (see base.GenerationBackend).

``transformers`` runs everywhere (CPU and GPU); ``vllm`` needs a GPU image with vLLM
installed. On a GPU, ``SELFREWARD_CONTINUOUS_BATCHING=1`` (or the name
``transformers-cb``) selects transformers' continuous-batching generator.
"""
from __future__ import annotations

import os
from typing import Optional

from .base import BackendError, Completion, GenerationBackend, chat_format, derive_seed

NAMES = ("transformers", "transformers-cb", "vllm")


def make_backend(name: str, model_dir: str, dtype: str = "auto", batch_size: int = 16, *,
                 trust_remote_code: bool = False, vllm_settings=None,
                 gpus: Optional[int] = None) -> GenerationBackend:
    """Build the backend named ``name`` over the model in ``model_dir``. trust_remote_code
    (spec.model.trustRemoteCode) is off unless a caller passes it on. ``gpus`` (the
    pod's, resources.<phase>.gpus) is vLLM's tensor parallelism; ``vllm_settings`` a
    spec.VLLMSpec. The transformers backend spreads a model over every visible GPU."""
    from ..models import note_loaded

    note_loaded(model_dir)  # the summary records which model the phase used
    if name == "transformers":
        from .hf import TransformersBackend

        continuous = os.environ.get("SELFREWARD_CONTINUOUS_BATCHING", "").lower() in ("1", "true", "yes")
        return TransformersBackend(model_dir, dtype=dtype, batch_size=batch_size, continuous=continuous,
                                  trust_remote_code=trust_remote_code)
    if name == "transformers-cb":
        from .hf import TransformersBackend

        return TransformersBackend(model_dir, dtype=dtype, batch_size=batch_size, continuous=True,
                                  trust_remote_code=trust_remote_code)
    if name == "vllm":
        from .vllm import VLLMBackend

        return VLLMBackend(model_dir, dtype=dtype, batch_size=batch_size, trust_remote_code=trust_remote_code,
                           settings=vllm_settings, gpus=gpus)
    raise BackendError(f"unknown generation backend {name!r}; expected one of {', '.join(NAMES)}")


__all__ = ["BackendError", "Completion", "GenerationBackend", "NAMES", "chat_format", "derive_seed", "make_backend"]
