"""`selfreward make-tiny-model DIR`: a random-initialised small Llama with a byte-level
BPE tokenizer trained offline, for the quickstart, the tests and CPU benchmarks.

Nothing is downloaded: the tokenizer is trained with the `tokenizers` library on the
prompts shipped with the package (or a corpus given), and the weights are random. The
model writes nonsense, but every phase of a run works on it exactly as on a real one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}<|system|>\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|user|>", "<|assistant|>", "<|system|>"]


def _corpus_lines(corpus: Optional[str]) -> list[str]:
    lines: list[str] = []
    if corpus:
        for raw in Path(corpus).read_text().splitlines():
            raw = raw.strip()
            if not raw:
                continue
            try:
                obj = json.loads(raw)
                lines.extend(str(v) for v in obj.values() if isinstance(v, str)) if isinstance(obj, dict) else lines.append(raw)
            except json.JSONDecodeError:
                lines.append(raw)
    else:
        from .prompts import packaged_prompts

        lines.extend(packaged_prompts())
    from .spec import DEFAULT_JUDGE_TEMPLATE

    lines.append(DEFAULT_JUDGE_TEMPLATE)
    lines.extend(f"Score: {i}" for i in range(6))
    return lines


def make_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    corpus: Optional[str] = None,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 512,
    max_positions: int = 2048,
    dtype: str = "float32",
    intermediate_size: Optional[int] = None,
    kv_heads: Optional[int] = None,
    chat_template: bool = True,
    eos_boost: float = 0.7,
) -> Path:
    """Write a tiny Llama (safetensors) and its tokenizer to out_dir; return the path.

    ``dtype`` is the dtype the weights are stored in (``float32`` or ``bfloat16``, as
    real checkpoints are); config.json records it as ``dtype``. ``chat_template=False``
    writes a tokenizer without one, like a base (not instruction-tuned) model's.

    ``eos_boost``: random weights would pick the end-of-sequence token about once in
    ``vocab_size`` tokens, so almost every answer would run to maxNewTokens (and a
    truncated answer never becomes a pair's chosen response). One hidden feature is made
    constant across token embeddings and only the EOS row of the (untied) LM head reads
    it, so about 3% of tokens end the answer (a quarter of answers end within 10 tokens,
    most within 40) while the rest of the output stays random. 0 turns it off."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(corpus), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        model_max_length=max_positions,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=not eos_boost,
    )
    stored = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if stored is None:
        raise ValueError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
    model = LlamaForCausalLM(config)
    if eos_boost:
        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            model.lm_head.weight.copy_(emb)
            emb[:, 0] = 0.1  # a feature every position carries (about 4 after the final norm)
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[fast.eos_token_id, 0] = eos_boost
    model = model.to(stored)
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.bos_token_id = fast.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out
