"""The instruct phase: few-shot self-instruction of new prompts.

The writer model (``selfInstruct.modelUri``, or M_t) is shown ``fewShot`` seed prompts
at a time and asked for a new one. Candidates go through the filters of
prompts.PromptFilter; rounds of requests continue until ``count`` prompts are kept or
``maxAttempts`` rounds are spent. Writes ``iter-<t>/instruct/prompts.jsonl``.
"""
from __future__ import annotations

import random
import time

from .. import models
from ..backends import derive_seed, make_backend
from ..prompts import (DROP_REASONS, PromptFilter, extract_prompt, few_shot_request, instruct_prompts_path,
                       load_seed_prompts, prompt_id)
from .common import PhaseContext, PhaseError, log


def run(ctx: PhaseContext) -> dict:
    spec = ctx.spec
    si = spec.prompts.selfInstruct
    if si is None or not si.enabled:
        raise PhaseError("the instruct phase runs only when prompts.selfInstruct is enabled")
    seeds = load_seed_prompts(spec.prompts.uri, spec.storage.endpoint)
    model_dir = (models.resolve_uri(si.modelUri, spec.storage.endpoint) if si.modelUri
                 else models.policy_model(spec, ctx.store, ctx.iteration))
    flt = PromptFilter(seeds, si)
    rng = random.Random(derive_seed(spec.seed, ctx.iteration, "instruct"))
    shots = min(si.fewShot, len(seeds))
    requests = rounds = 0
    batch = max(1, spec.generation.batchSize)
    log(f"iter-{ctx.iteration}/instruct: writing {si.count} prompts with {model_dir}")
    t0 = time.perf_counter()
    with make_backend(spec.generation.backend, model_dir, spec.model.dtype, batch,
                      trust_remote_code=spec.model.trustRemoteCode, vllm_settings=spec.generation.vllm,
                      gpus=spec.resources.for_phase("instruct").gpus) as backend:
        while len(flt.kept) < si.count and rounds < si.maxAttempts:
            wanted = si.count - len(flt.kept)
            asks = [few_shot_request(rng.sample(seeds, shots)) for _ in range(wanted)]
            for start in range(0, len(asks), batch):
                groups = backend.generate(
                    asks[start:start + batch], n=1, temperature=si.temperature, top_p=si.topP,
                    max_new_tokens=si.maxNewTokens,
                    seed=derive_seed(spec.seed, ctx.iteration, "instruct", rounds, start),
                )
                for group in groups:
                    if len(flt.kept) < si.count:
                        flt.offer(extract_prompt(group[0].text))
                requests += len(groups)
                elapsed = max(time.perf_counter() - t0, 1e-9)
                ctx.report(done=len(flt.kept), total=si.count,
                           tokensPerSecond=round(backend.generated_tokens / elapsed, 2))
            rounds += 1
        generated_tokens = backend.generated_tokens
        backend_name = backend.name
    seconds = max(time.perf_counter() - t0, 1e-9)
    ctx.store.write_jsonl(instruct_prompts_path(ctx.iteration),
                          [{"promptId": prompt_id(p), "prompt": p, "source": "instruct"} for p in flt.kept])
    if len(flt.kept) < si.count:
        log(f"iter-{ctx.iteration}/instruct: kept {len(flt.kept)} of {si.count} wanted prompts after {rounds} rounds")
    summary = {
        "wanted": si.count,
        "generated": requests,
        "kept": len(flt.kept),
        "dropped": sum(flt.dropped.values()),
        "rounds": rounds,
        "generatedTokens": generated_tokens,
        "tokensPerSecond": round(generated_tokens / seconds, 2),
        "backend": backend_name,
    }
    for reason in DROP_REASONS:
        summary["dropped" + reason[0].upper() + reason[1:]] = flt.dropped[reason]
    return summary
