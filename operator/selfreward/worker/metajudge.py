"""The metajudge phase (``spec.metaJudge``): M_t judges its own judgments.

Input: the judge phase's records, whose responses keep every verdict and its score
(``verdicts``, ``verdictScores``). For the responses whose verdicts disagree most, every
pair of their verdicts is shown to M_t with the meta-judge template in both orders, with
the verdicts' score lines removed; the outcomes rate the verdicts (Bradley-Terry, Elo
scale) and the best against the worst verdict is a judge-preference candidate
(``selfreward.metajudging`` has the rules). Output, in iter-<t>/metajudge/::

    judgments.jsonl   per meta-judged response: its verdicts, the verdicts as shown
                      (score lines removed), every meta-judgment (both orders), the
                      winners read from them and the ratings
    candidates.jsonl  the judge-preference pairs before the caps (the pairs phase caps
                      them and adds them to the DPO data)

Finished batches of meta-judgments are kept as part files while the phase runs
(``worker/parts.py``), so a re-created pod meta-judges only what it had not finished.
"""
from __future__ import annotations

import time

from .. import layout, models
from .. import metajudging as M
from ..backends import derive_seed, make_backend
from ..judging import parse_winner, render_judge_prompt
from .common import PhaseContext, log
from .parts import BatchParts

JUDGMENTS_FILE = "judgments.jsonl"
CANDIDATES_FILE = "candidates.jsonl"


def candidates_path(iteration: int) -> str:
    return f"{layout.phase_dir(iteration, 'metajudge')}/{CANDIDATES_FILE}"


def judgments_path(iteration: int) -> str:
    return f"{layout.phase_dir(iteration, 'metajudge')}/{JUDGMENTS_FILE}"


def run(ctx: PhaseContext) -> dict:
    from .judge import read_phase_records

    spec, store, t = ctx.spec, ctx.store, ctx.iteration
    mj, judge = spec.metaJudge, spec.judge
    records = read_phase_records(store, t, "judge")
    items = M.select_responses(records, mj.responses, mj.minVariance, mj.maxVerdicts)
    asks: list[tuple[int, int, int]] = []  # (item, verdict shown as A, verdict shown as B)
    for n, item in enumerate(items):
        asks += [(n, a, b) for a, b in M.comparisons(len(item["verdicts"]))]
    stripped = [[M.strip_score_lines(v["text"], judge.scorePattern) for v in item["verdicts"]] for item in items]
    texts: dict[tuple[int, int, int], str] = {}
    t0 = time.perf_counter()
    backend_name, generated = mj.backend, 0
    batches = [asks[start:start + mj.batchSize] for start in range(0, len(asks), mj.batchSize)]
    # finished batches survive a killed pod (worker/parts.py), keyed by what they compared
    keys = [[[items[n]["promptId"], items[n]["responseIndex"], a, c] for n, a, c in batch] for batch in batches]
    parts = BatchParts(store, judgments_path(t), f"iter-{t}/metajudge")
    done = parts.load(keys) if batches else {}
    for b, part in done.items():
        texts.update(zip(batches[b], part["items"]))
        generated += part["generatedTokens"]
    if len(done) < len(batches):
        model_dir = models.policy_model(spec, store, t)
        log(f"iter-{t}/metajudge: {len(items)} responses, {len(asks)} meta-judgments with {model_dir} ({mj.backend})")
        with make_backend(mj.backend, model_dir, spec.model.dtype, mj.batchSize,
                          trust_remote_code=spec.model.trustRemoteCode, vllm_settings=mj.vllm,
                          gpus=spec.resources.for_phase("metajudge").gpus) as backend:
            backend_name = backend.name
            t0 = time.perf_counter()  # sampling only; durationSeconds (the dispatcher's) includes loading
            for b, batch in enumerate(batches):
                if b in done:
                    continue
                before = backend.generated_tokens
                prompts = [M.render_meta_prompt(mj.prompt_template, items[n]["prompt"], items[n]["response"],
                                                stripped[n][a], stripped[n][c]) for n, a, c in batch]
                groups = backend.generate(prompts, n=1, temperature=mj.temperature, top_p=mj.topP,
                                          max_new_tokens=mj.maxNewTokens,
                                          seed=derive_seed(spec.seed, t, "metajudge", 0, 1, b))
                for key, group in zip(batch, groups):
                    texts[key] = group[0].text
                parts.write(b, keys[b], [texts[key] for key in batch],
                            generatedTokens=backend.generated_tokens - before)
                ctx.report(done=len(texts), total=len(asks))
            generated += backend.generated_tokens

    judgments, candidates = [], []
    compared = agreed = unparsed = 0
    for n, item in enumerate(items):
        k = len(item["verdicts"])
        games: list[tuple[int, int, float]] = []
        rows = []
        for a in range(k):
            for c in range(a + 1, k):
                ab, ba = texts[(n, a, c)], texts[(n, c, a)]
                winners = [parse_winner(ab, mj.winnerPattern), parse_winner(ba, mj.winnerPattern)]
                results, agree = M.outcome(*winners)
                games += [(a, c, r) for r in results]
                unparsed += sum(w is None for w in winners)
                if agree is not None:
                    compared += 1
                    agreed += agree
                rows.append({"a": a, "b": c, "judgments": [ab, ba], "winners": winners, "agree": agree})
        rating = M.ratings(k, games)
        judgments.append({**{key: item[key] for key in ("promptId", "responseIndex", "variance", "verdicts")},
                          "shown": stripped[n],  # the verdicts as the meta-judge read them
                          "comparisons": rows, "ratings": [round(r, 3) for r in rating]})
        pair = M.meta_pair(item, rating, render_judge_prompt(judge, item["prompt"], item["response"]))
        if pair is not None:
            candidates.append(pair)
    store.write_jsonl(judgments_path(t), judgments)
    store.write_jsonl(candidates_path(t), candidates)
    parts.clear()
    classes: dict[str, int] = {}
    for c in candidates:
        classes[str(c["scoreClass"])] = classes.get(str(c["scoreClass"]), 0) + 1
    seconds = max(time.perf_counter() - t0, 1e-9)
    return {
        "metaJudgedResponses": len(items),
        "metaJudgments": len(asks),
        "winnerParseFailures": unparsed,
        "orderAgreement": agreed / compared if compared else None,  # of the comparisons both orders parsed
        "comparisonsBothOrdersParsed": compared,
        "candidatePairs": len(candidates),
        "candidateScoreClasses": dict(sorted(classes.items())),
        "generatedTokens": generated,
        "batchesResumed": len(done),  # batches an earlier attempt had finished
        "generationSeconds": round(seconds, 3),
        "backend": backend_name,
    }
