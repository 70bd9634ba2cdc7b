"""The one interface every generation backend implements.

A backend turns user prompts (plain strings) into sampled completions. It formats each
prompt with ``prompt_format.format_prompt`` (the chat template, or the documented plain
format when the tokenizer has none),
samples ``n`` completions per prompt, and counts the tokens it generated so phases can
report tokens per second.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..prompt_format import format_prompt


@dataclass(frozen=True)
class Completion:
    """One sampled completion."""

    text: str
    tokens: int  # generated tokens, the end-of-sequence token included when there was one
    finished: bool = True  # False when the completion was cut at max_new_tokens


class BackendError(RuntimeError):
    """A backend that cannot be built or used (missing package, unknown name, ...)."""


class GenerationBackend(ABC):
    """Samples completions. Use as a context manager, or call close() when done."""

    name: str = "base"

    def __init__(self) -> None:
        self.generated_tokens = 0  # running total over every generate() call
        self.truncated_prompts = 0  # prompts cut to fit the model's context

    @abstractmethod
    def generate(
        self,
        prompts: list[str],
        n: int = 1,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int = 0,
    ) -> list[list[Completion]]:
        """For each prompt, ``n`` completions, in the order of ``prompts``."""

    def resize(self, batch_size: int) -> None:
        """Prompts per forward pass from now on (a backend reused by the next phase of a
        step takes that phase's batchSize). A backend that schedules its own batches
        (vLLM) keeps the bound it was built with."""

    def close(self) -> None:
        """Free the model (and accelerator memory)."""

    def __enter__(self) -> "GenerationBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The prompt format of every backend (chat template, or the documented plain format).
chat_format = format_prompt


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (run seed, iteration, phase, shard, batch): stable
    across processes and Python versions, unlike hash()."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
