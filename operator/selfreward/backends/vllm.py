"""Generation with vLLM, for GPU images that install it (the ``vllm`` extra).

vLLM is imported only when a VLLMBackend is built, so the rest of the package never
needs it; without it the constructor raises a BackendError that says what to install.
"""
from __future__ import annotations

import gc
from typing import Any, Optional

from ..prompt_format import format_prompt
from .base import BackendError, Completion, GenerationBackend


def engine_args(settings: Any = None, gpus: Optional[int] = None, batch_size: int = 16) -> dict:
    """Keyword arguments of ``vllm.LLM`` from a spec.VLLMSpec and the pod's GPU count:
    one engine over every GPU of the pod (tensor parallelism = GPUs per pod; across pods
    the phase is sharded instead), the memory share, context length, eager mode and the
    prefix cache. vLLM schedules its own batches: batch_size only bounds the sequences
    in flight (max_num_seqs)."""
    from ..spec import VLLMSpec

    settings = settings or VLLMSpec()
    args = {
        "tensor_parallel_size": max(1, int(gpus or 1)),
        "gpu_memory_utilization": settings.gpuMemoryUtilization,
        "enforce_eager": settings.enforceEager,
        "enable_prefix_caching": settings.prefixCaching,
        "max_num_seqs": max(batch_size, 1) * 16,
    }
    if settings.maxModelLen is not None:
        args["max_model_len"] = settings.maxModelLen
    return args


class VLLMBackend(GenerationBackend):
    name = "vllm"

    def __init__(self, model_dir: str, dtype: str = "auto", batch_size: int = 16, *, trust_remote_code: bool = False,
                 settings: Any = None, gpus: Optional[int] = None, **llm_kwargs) -> None:
        super().__init__()
        try:
            import vllm
        except ImportError as e:
            raise BackendError(
                "the vllm backend needs the vllm package, which this image does not have "
                f"({e}); install selfreward[vllm] in a GPU image or set backend: transformers"
            ) from None
        self._vllm = vllm
        kwargs = {**engine_args(settings, gpus, batch_size), **llm_kwargs}
        self.llm = vllm.LLM(model=model_dir, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts, n=1, temperature=0.7, top_p=1.0, max_new_tokens=256, seed=0):
        if not prompts:
            return []
        token_prompts = []
        for p in prompts:
            text, templated = format_prompt(self.tokenizer, p)
            ids = self.tokenizer(text, add_special_tokens=not templated)["input_ids"]
            token_prompts.append({"prompt_token_ids": list(ids)})  # a vllm.inputs.TokensPrompt
        params = self._vllm.SamplingParams(
            n=n,
            temperature=float(temperature),
            top_p=float(top_p) if temperature > 0 else 1.0,
            max_tokens=max_new_tokens,
            seed=seed,
        )
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        result = []
        for out in outputs:
            group = []
            for o in out.outputs:
                finished = o.finish_reason == "stop"
                group.append(Completion(text=o.text, tokens=len(o.token_ids), finished=finished))
            self.generated_tokens += sum(c.tokens for c in group)
            result.append(group)
        return result

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
