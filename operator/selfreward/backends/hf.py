"""Generation with transformers: runs on CPU and GPU.

The default path is plain batched ``model.generate``: prompts are chat-formatted,
left-padded into batches of ``batch_size`` prompts, and each prompt is sampled ``n``
times with ``num_return_sequences``. Completions stop at the model's end-of-sequence
token(s) or at ``max_new_tokens``.

``continuous=True`` uses transformers' own continuous-batching generator
(``generate_batch``: a paged KV cache and a scheduler that refills finished slots),
meant for GPUs. It is an option behind the same interface, not the default.
"""
from __future__ import annotations

import gc
import re
import time
from typing import Optional

from ..prompt_format import format_prompt
from .base import BackendError, Completion, GenerationBackend

_CB_KEY = re.compile(r"^req_(\d+)(?:__child#(\d+))?$")


def device_map(device: str, visible_gpus: int) -> str:
    """The from_pretrained device_map: "auto" (layers spread over the GPUs, placed by
    accelerate to fit) when the pod has several GPUs, else the one device. Inputs go to
    ``device`` ("cuda" = cuda:0, where "auto" puts the embeddings)."""
    if device == "cuda" and visible_gpus > 1:
        return "auto"
    return device


class TransformersBackend(GenerationBackend):
    name = "transformers"

    def __init__(
        self,
        model_dir: str,
        dtype: str = "auto",
        batch_size: int = 16,
        device: Optional[str] = None,
        continuous: bool = False,
        *,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .. import models

        self.torch = torch
        self.device = device or models.device()
        self.batch_size = max(1, int(batch_size))
        self.continuous = continuous
        if continuous:
            self.name = "transformers-cb"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        # device_map loads the weights straight onto the device (no full copy in host memory);
        # with several GPUs in the pod, "auto" spreads the layers over all of them
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=models.torch_dtype(dtype), trust_remote_code=trust_remote_code,
            device_map=device_map(self.device, torch.cuda.device_count() if torch.cuda.is_available() else 0))
        self.model.eval()

        gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise BackendError(f"{model_dir}: neither the model nor the tokenizer names an end-of-sequence token")
        self.eos_ids = eos_ids
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else eos_ids[0]
        self.pad_id = int(pad)
        self.context = getattr(self.model.config, "max_position_embeddings", None)

    def resize(self, batch_size: int) -> None:
        self.batch_size = max(1, int(batch_size))

    # --- helpers ---
    def _encode(self, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        """Token ids of each chat-formatted prompt, cut from the left to fit the context."""
        out = []
        for p in prompts:
            text, templated = format_prompt(self.tokenizer, p)
            ids = self.tokenizer(text, add_special_tokens=not templated)["input_ids"]
            if self.context and len(ids) + max_new_tokens > self.context:
                keep = max(1, self.context - max_new_tokens)
                ids = ids[-keep:]
                self.truncated_prompts += 1
            out.append(list(ids))
        return out

    def _completion(self, ids: list[int]) -> Completion:
        """Cut a generated sequence at its first end-of-sequence token."""
        cut = len(ids)
        finished = False
        for i, tok in enumerate(ids):
            if tok in self.eos_ids:
                cut, finished = i, True
                break
        text = self.tokenizer.decode(ids[:cut], skip_special_tokens=True)
        return Completion(text=text, tokens=cut + (1 if finished else 0), finished=finished)

    # --- the interface ---
    def generate(self, prompts, n=1, temperature=0.7, top_p=1.0, max_new_tokens=256, seed=0):
        if not prompts:
            return []
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        encoded = self._encode(prompts, max_new_tokens)
        if self.continuous:
            result = self._generate_continuous(encoded, n, temperature, top_p, max_new_tokens, seed)
        else:
            result = self._generate_batched(encoded, n, temperature, top_p, max_new_tokens, seed)
        return result

    def _sampling(self, n: int, temperature: float, top_p: float, max_new_tokens: int) -> dict:
        if temperature <= 0:  # greedy: every one of the n samples is the same sequence
            return dict(do_sample=False, num_return_sequences=1, max_new_tokens=max_new_tokens)
        # top_k=0: no top-k cut, so only temperature and top_p shape the distribution
        # (as with vLLM), whatever a checkpoint's generation_config says.
        return dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0,
                    num_return_sequences=n, max_new_tokens=max_new_tokens)

    def _generate_batched(self, encoded, n, temperature, top_p, max_new_tokens, seed):
        torch = self.torch
        torch.manual_seed(seed)
        sampling = self._sampling(n, temperature, top_p, max_new_tokens)
        per_prompt = sampling["num_return_sequences"]
        # batch prompts of similar length together (less padding), answer in input order
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out: list[Optional[list[Completion]]] = [None] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = [encoded[i] for i in rows]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):  # left padding: prompts end where generation starts
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
            with torch.inference_mode():
                seqs = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_ids,
                    **sampling,
                )
            generated = seqs[:, width:].tolist()
            for row, index in enumerate(rows):
                group = [self._completion(g) for g in generated[row * per_prompt:(row + 1) * per_prompt]]
                self.generated_tokens += sum(c.tokens for c in group)
                out[index] = group * n if per_prompt == 1 and n > 1 else group
        return out

    def _generate_continuous(self, encoded, n, temperature, top_p, max_new_tokens, seed):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        sampling = self._sampling(n, temperature, top_p, max_new_tokens)
        per_prompt = sampling["num_return_sequences"]
        cfg = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id, **sampling)
        self.torch.manual_seed(seed)
        cb = ContinuousBatchingConfig(seed=seed)
        if self.device == "cpu":
            # the cache is sized from free accelerator memory by default; on a CPU size it
            # to the workload instead (every sequence at full length, no sharing needed)
            page = cb.page_size
            longest = max(len(ids) for ids in encoded) + max_new_tokens
            cb.num_blocks = -(-longest // page) * len(encoded) * per_prompt + 1
            cb.max_batch_tokens = min(4096, max(page, longest * self.batch_size))
        results = self.model.generate_batch(
            inputs=encoded,
            generation_config=cfg,
            continuous_batching_config=cb,
            warmup=self.device != "cpu",
        )
        groups: list[list[Optional[Completion]]] = [[None] * per_prompt for _ in encoded]
        for key, res in results.items():
            m = _CB_KEY.match(key)
            if not m or res.error is not None:
                raise BackendError(f"continuous batching: request {key} failed: {res.error}")
            idx = int(m.group(1))
            slot = per_prompt - 1 if m.group(2) is None else int(m.group(2))
            groups[idx][slot] = self._completion(list(res.generated_tokens))
            self.generated_tokens += groups[idx][slot].tokens
        missing = sum(c is None for g in groups for c in g)
        if missing:
            raise BackendError(f"continuous batching returned {missing} of {len(encoded) * per_prompt} completions short")
        return [list(g) * (n if per_prompt == 1 and n > 1 else 1) for g in groups]

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is None:
            return
        if self.continuous and hasattr(model, "destroy_cached_continuous_batching_manager"):
            model.destroy_cached_continuous_batching_manager()
        self.model = None
        del model
        gc.collect()
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()


def timed_generate(backend: GenerationBackend, *args, **kwargs) -> tuple[list[list[Completion]], float]:
    """generate() and the wall-clock seconds it took."""
    t0 = time.perf_counter()
    out = backend.generate(*args, **kwargs)
    return out, time.perf_counter() - t0
