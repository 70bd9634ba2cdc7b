"""The judge phase: M_t grades every generated response with the LLM-as-a-judge prompt.

Shard i of n takes the prompts with index i::n across all of the generate phase's shard
files (with ``judge.colocate``: the prompts of generate shard i, judged in that shard's
pod on the model it loaded) and samples ``samplesPerResponse`` verdicts per response.
Each record keeps the raw verdicts (the audit trail) next to the scores read from them::

    {promptId, prompt, responses: [{text, verdicts: [raw...], scores: [valid...],
                                    score: mean|median|null, parseFailures: k,
                                    verdictScores: [score|null per verdict],
                                    failureReasons: [...], truncated: bool, tokens: n}]}

``truncated`` (the response stopped at ``generation.maxNewTokens``: the pairs phase never
makes such a response the chosen one) and ``tokens`` (its generated tokens, the length
``pairs.lengthControl`` measures) are carried over from the generate record;
``verdictScores`` holds each verdict's own score (None where it failed), which the
metajudge phase reads. The phase summary adds ``topScoreShare``, the verdict score
histogram ``scoreHist0..5`` and the saturation guard's verdict (``judgeSaturated``,
``saturationMessage``; judge.saturation).

Finished batches of verdicts are kept as part files while the shard runs
(``worker/parts.py``), so a re-created shard judges only what it had not finished.
"""
from __future__ import annotations

import math
import random
import re
import time

from .. import layout
from ..backends import derive_seed
from ..evaluation import score_histogram
from ..judging import judge_response, render_judge_prompt, saturation, score_stats
from ..storage import Store
from .common import PhaseContext, PhaseError, aggregate, log
from .parts import BatchParts

_SHARD_FILE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.jsonl$")


def phase_num_shards(store: Store, iteration: int, phase: str) -> int:
    """How many shards a committed sharded phase had: from its summary.json, or, while
    that is missing, from its shard files (every one of which must have committed)."""
    rel = layout.summary_path(iteration, phase)
    if store.exists(rel):
        n = store.read_json(rel).get("numShards")
        if isinstance(n, int) and n >= 1:
            return n
    totals = {int(m.group(2)) for name in store.list(layout.phase_dir(iteration, phase))
              if (m := _SHARD_FILE.match(name))}
    if len(totals) != 1:
        found = "no shard files" if not totals else f"shard files of {sorted(totals)} shards"
        raise PhaseError(f"iter-{iteration}/{phase} is not complete ({found}): run it before the phase that reads it")
    n = totals.pop()
    missing = [i for i in range(n) if not store.exists(layout.shard_summary_path(iteration, phase, i, n))]
    if missing:
        raise PhaseError(f"iter-{iteration}/{phase} is not complete: shards {missing} of {n} have not committed")
    return n


def read_phase_records(store: Store, iteration: int, phase: str, num_shards: int | None = None) -> list[dict]:
    """Every record of a sharded phase, shard 0 first."""
    n = num_shards or phase_num_shards(store, iteration, phase)
    out: list[dict] = []
    for i in range(n):
        rel = layout.shard_data_path(iteration, phase, i, n)
        if not store.exists(rel):
            raise PhaseError(f"{store.url(rel)} is missing")
        out.extend(store.read_jsonl(rel))
    return out


def was_truncated(record: dict, j: int) -> bool:
    """Whether response j of a generate record was cut at maxNewTokens (records written
    before the field existed count as not truncated)."""
    flags = record.get("truncated")
    return isinstance(flags, list) and j < len(flags) and flags[j] is True


def generated_tokens_of(record: dict, j: int) -> dict:
    """{"tokens": n} for response j of a generate record that counted its tokens (the
    pairs phase's length control measures in them), else {}."""
    tokens = record.get("tokens")
    n = tokens[j] if isinstance(tokens, list) and j < len(tokens) else None
    return {"tokens": n} if isinstance(n, int) and not isinstance(n, bool) else {}


def shard_records(ctx: PhaseContext) -> list[dict]:
    """The generate records this judge shard judges: with judge.colocate, those of the
    generate shard of the same index (the one its pod has just written, on the model
    still loaded), else every ``num_shards``-th record across all generate shards."""
    if not ctx.spec.judge.colocate:
        return read_phase_records(ctx.store, ctx.iteration, "generate")[ctx.shard::ctx.num_shards]
    if not ctx.store.exists(layout.shard_summary_path(ctx.iteration, "generate", ctx.shard, ctx.num_shards)):
        raise PhaseError(f"iter-{ctx.iteration}/generate shard {ctx.shard} of {ctx.num_shards} has not committed: "
                         "with judge.colocate the judge shard judges that generate shard, so run it first")
    return ctx.store.read_jsonl(layout.shard_data_path(ctx.iteration, "generate", ctx.shard, ctx.num_shards))


def random_verdicts(spec, iteration: int, keys: list[tuple]) -> list[list[str]]:
    """The randomJudge ablation (spec.ablation): per (promptId, response index),
    ``samplesPerResponse`` verdicts "Score: k" with k drawn uniformly from the whole
    numbers in minScore..maxScore, seeded by the run seed, the iteration and the key, so
    they go through the same parser and aggregation as a model's verdicts."""
    judge = spec.judge
    lo, hi = math.ceil(judge.minScore), math.floor(judge.maxScore)
    out = []
    for key in keys:
        rng = random.Random(derive_seed(spec.seed, iteration, "random-judge", *key))
        out.append([f"Score: {rng.randint(lo, hi)}" for _ in range(judge.samplesPerResponse)])
    return out


def run(ctx: PhaseContext) -> dict:
    spec, judge = ctx.spec, ctx.spec.judge
    records = shard_records(ctx)
    # one judge request per (record, response)
    items = [(r, j) for r, rec in enumerate(records) for j in range(len(rec["responses"]))]
    verdicts: dict[tuple[int, int], list[str]] = {}
    t0 = time.perf_counter()
    generated_tokens = truncated_prompts = earlier_tokens = earlier_truncated_prompts = 0
    backend_name = judge.backend
    parts: BatchParts | None = None
    done: dict[int, dict] = {}
    if items and spec.ablation == "randomJudge":
        backend_name = "random"
        verdicts = dict(zip(items, random_verdicts(spec, ctx.iteration,
                                                   [(records[r]["promptId"], j) for r, j in items])))
        log(f"iter-{ctx.iteration}/judge shard {ctx.shard}: ablation randomJudge: {len(items)} responses x "
            f"{judge.samplesPerResponse} random verdicts, no model")
    elif items:
        model_dir = ctx.policy_model()
        log(f"iter-{ctx.iteration}/judge shard {ctx.shard}/{ctx.num_shards}: {len(items)} responses x "
            f"{judge.samplesPerResponse} verdicts with {model_dir} ({judge.backend})")
        batches = [items[start:start + judge.batchSize] for start in range(0, len(items), judge.batchSize)]
        parts = BatchParts(ctx.store, ctx.shard_data, f"iter-{ctx.iteration}/judge shard {ctx.shard}")
        done = parts.load([[[records[r]["promptId"], j] for r, j in batch] for batch in batches])
        with ctx.backend(judge.backend, model_dir, judge.batchSize, judge.vllm) as backend:
            backend_name = backend.name
            t0 = time.perf_counter()
            for b, batch in enumerate(batches):
                if b in done:  # finished by an earlier attempt of this shard
                    verdicts.update(zip(batch, done[b]["items"]))
                    earlier_tokens += done[b]["generatedTokens"]
                    earlier_truncated_prompts += done[b]["truncatedPrompts"]
                    continue
                before = (backend.generated_tokens, backend.truncated_prompts)
                asks = [render_judge_prompt(judge, records[r]["prompt"], records[r]["responses"][j]) for r, j in batch]
                groups = backend.generate(
                    asks, n=judge.samplesPerResponse, temperature=judge.temperature, top_p=judge.topP,
                    max_new_tokens=judge.maxNewTokens,
                    seed=derive_seed(spec.seed, ctx.iteration, "judge", ctx.shard, ctx.num_shards, b),
                )
                for key, group in zip(batch, groups):
                    verdicts[key] = [c.text for c in group]
                parts.write(b, [[records[r]["promptId"], j] for r, j in batch], [verdicts[key] for key in batch],
                            generatedTokens=backend.generated_tokens - before[0],
                            truncatedPrompts=backend.truncated_prompts - before[1])
                elapsed = max(time.perf_counter() - t0, 1e-9)
                ctx.report(done=len(verdicts), total=len(items),
                           tokensPerSecond=round(backend.generated_tokens / elapsed, 2),
                           verdictsPerSecond=round(len(verdicts) * judge.samplesPerResponse / elapsed, 2))
            generated_tokens = backend.generated_tokens + earlier_tokens
            truncated_prompts = backend.truncated_prompts + earlier_truncated_prompts
    seconds = max(time.perf_counter() - t0, 1e-9)
    out = []
    for r, rec in enumerate(records):
        out.append({
            "promptId": rec["promptId"],
            "prompt": rec["prompt"],
            "responses": [{**judge_response(text, verdicts[(r, j)], judge), "truncated": was_truncated(rec, j),
                           **generated_tokens_of(rec, j)}
                          for j, text in enumerate(rec["responses"])],
        })
    ctx.store.write_jsonl(ctx.shard_data, out)
    if parts is not None:
        parts.clear()
    stats = score_stats(out)
    if stats["verdicts"] and stats["parseFailures"] == stats["verdicts"]:
        log(f"iter-{ctx.iteration}/judge shard {ctx.shard}: no verdict matched the score pattern "
            f"{judge.scorePattern!r}; every response is unscored")
    return {
        "prompts": len(out),
        **stats,
        "generatedTokens": generated_tokens,
        "tokensPerSecond": round((generated_tokens - earlier_tokens) / seconds, 2) if items else 0.0,  # this attempt
        "verdictsPerSecond": round(stats["verdicts"] / seconds, 2) if items else 0.0,
        "batchesResumed": len(done),  # batches an earlier attempt of this shard had finished
        "truncatedPrompts": truncated_prompts,  # judge prompts cut from the left to fit the context
        "generationSeconds": round(seconds, 3),  # sampling only; durationSeconds (set by the dispatcher) includes loading
        "backend": backend_name,
        **({"ablation": spec.ablation} if spec.ablation == "randomJudge" else {}),
    }


def finalize(store: Store, spec, iteration: int, shard_summaries: list[dict]) -> dict:
    """The phase summary: counts and rates added over shards, score statistics
    recomputed over every judged record (a mean of shard means would be wrong)."""
    summary = aggregate(shard_summaries)
    records = read_phase_records(store, iteration, "judge", len(shard_summaries))
    summary.update(score_stats(records, spec.judge.maxScore))
    summary["prompts"] = len(records)
    summary.update(score_histogram(s for r in records for resp in r["responses"] for s in resp.get("scores", [])))
    why = saturation(summary, spec.judge.saturation)
    summary["judgeSaturated"] = why is not None  # reconcile and the local runner warn (JudgeSaturated)
    summary["judgeSaturatedFlag"] = int(why is not None)  # the same as a history figure and metric
    if why is not None:
        summary["saturationMessage"] = f"iter-{iteration}/judge: the judge looks saturated: {why}"
        log(summary["saturationMessage"])
    return summary
