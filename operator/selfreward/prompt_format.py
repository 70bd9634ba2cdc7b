"""How a user prompt is shown to the model: the one function every phase uses.

With a chat template (instruction-tuned models) the prompt is one user turn rendered by
the tokenizer's template with the assistant's turn opened. Without one (base models),
it is the plain format below, never the bare prompt, so the model sees where the
question ends and the answer starts::

    ### Instruction:
    <prompt>

    ### Response:
    <the model's answer, then the tokenizer's end-of-sequence token>

Generation and judging (the transformers and vLLM backends) format prompts with
``format_prompt``; SFT and DPO train on ``plain_prompt(prompt)`` + the response when
the tokenizer has no chat template (TRL appends the end-of-sequence token), so training
sees exactly the text generation produced the responses from.
"""
from __future__ import annotations

PLAIN_PROMPT_FORMAT = "### Instruction:\n{prompt}\n\n### Response:\n"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(prompt: str) -> str:
    """The prompt in the plain format for models without a chat template."""
    return PLAIN_PROMPT_FORMAT.replace("{prompt}", prompt)  # braces in the prompt stay as they are


def format_prompt(tokenizer, prompt: str) -> tuple[str, bool]:
    """(text, templated): the prompt as the model expects it. A templated text already
    carries the model's own special tokens, so it must be tokenized without adding them
    again; the plain format is tokenized with them (a BOS token, where the model has one)."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return text, True
    return plain_prompt(prompt), False
