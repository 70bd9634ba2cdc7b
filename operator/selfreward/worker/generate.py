"""The generate phase: N candidate responses per prompt with M_t.

Shard i of n takes the iteration's prompts i::n and writes one JSONL record per prompt:
``{promptId, prompt, responses: [text...], tokens: [generated tokens...],
truncated: [bool...]}``; ``truncated[j]`` is true when response j stopped at
``generation.maxNewTokens`` without an end-of-sequence token (such a response is never
a pair's chosen one).
Finished batches are kept as part files while the shard runs (``worker/parts.py``), so
a re-created shard generates only the batches it had not finished.
"""
from __future__ import annotations

import time

from ..backends import derive_seed
from ..prompts import iteration_prompts
from .common import PhaseContext, log
from .parts import BatchParts


def run(ctx: PhaseContext) -> dict:
    spec, gen = ctx.spec, ctx.spec.generation
    prompts = iteration_prompts(spec, ctx.store, ctx.iteration)[ctx.shard::ctx.num_shards]
    records: list[dict] = []
    t0 = time.perf_counter()
    truncated_responses = earlier_tokens = earlier_truncated_prompts = 0
    backend_name = gen.backend
    done: dict[int, dict] = {}
    if prompts:
        model_dir = ctx.policy_model()
        log(f"iter-{ctx.iteration}/generate shard {ctx.shard}/{ctx.num_shards}: {len(prompts)} prompts x "
            f"{gen.responsesPerPrompt} responses with {model_dir} ({gen.backend})")
        batches = [prompts[start:start + gen.batchSize] for start in range(0, len(prompts), gen.batchSize)]
        parts = BatchParts(ctx.store, ctx.shard_data, f"iter-{ctx.iteration}/generate shard {ctx.shard}")
        done = parts.load([[p["promptId"] for p in batch] for batch in batches])
        with ctx.backend(gen.backend, model_dir, gen.batchSize, gen.vllm) as backend:
            backend_name = backend.name
            t0 = time.perf_counter()
            for b, batch in enumerate(batches):
                if b in done:  # finished by an earlier attempt of this shard
                    records.extend(done[b]["items"])
                    truncated_responses += done[b]["truncatedResponses"]
                    earlier_tokens += done[b]["generatedTokens"]
                    earlier_truncated_prompts += done[b]["truncatedPrompts"]
                    continue
                before = (backend.generated_tokens, backend.truncated_prompts, truncated_responses, len(records))
                groups = backend.generate(
                    [p["prompt"] for p in batch],
                    n=gen.responsesPerPrompt,
                    temperature=gen.temperature,
                    top_p=gen.topP,
                    max_new_tokens=gen.maxNewTokens,
                    seed=derive_seed(spec.seed, ctx.iteration, "generate", ctx.shard, ctx.num_shards, b),
                )
                for p, group in zip(batch, groups):
                    records.append({
                        "promptId": p["promptId"],
                        "prompt": p["prompt"],
                        "responses": [c.text for c in group],
                        "tokens": [c.tokens for c in group],
                        "truncated": [not c.finished for c in group],
                    })
                    truncated_responses += sum(not c.finished for c in group)
                parts.write(b, [p["promptId"] for p in batch], records[before[3]:],
                            generatedTokens=backend.generated_tokens - before[0],
                            truncatedPrompts=backend.truncated_prompts - before[1],
                            truncatedResponses=truncated_responses - before[2])
                elapsed = max(time.perf_counter() - t0, 1e-9)
                ctx.report(done=len(records), total=len(prompts),
                           tokensPerSecond=round(backend.generated_tokens / elapsed, 2))
            generated_tokens = backend.generated_tokens + earlier_tokens
            truncated_prompts = backend.truncated_prompts + earlier_truncated_prompts
        ctx.store.write_jsonl(ctx.shard_data, records)
        parts.clear()
    else:
        generated_tokens = truncated_prompts = 0
        ctx.store.write_jsonl(ctx.shard_data, records)
    seconds = max(time.perf_counter() - t0, 1e-9)
    return {
        "prompts": len(records),
        "responses": sum(len(r["responses"]) for r in records),
        "generatedTokens": generated_tokens,
        "tokensPerSecond": round((generated_tokens - earlier_tokens) / seconds, 2) if records else 0.0,  # this attempt
        "batchesResumed": len(done),  # batches an earlier attempt of this shard had finished
        "generationSeconds": round(seconds, 3),  # sampling only; durationSeconds (set by the dispatcher) includes loading
        "truncatedResponses": truncated_responses,
        "truncatedPrompts": truncated_prompts,
        "backend": backend_name,
    }
