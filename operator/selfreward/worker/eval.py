"""The eval phase: how good is the model iteration t produced, as a policy and as a judge.

``iter-<t>/eval`` evaluates M_{t+1} (the checkpoint of ``iter-<t>/train``); ``iter-0/eval``
evaluates M_1 once as the baseline (the SFT checkpoint, or the base model). Configured
by ``spec.eval``; every part is optional:

- the model answers the held-out prompts (``eval.prompts``, greedy by default) and a
  verifier (``eval.verifier``, ``module:function``) scores each answer in [0, 1];
- the model judges a labelled set (``eval.judgeSet``) with the run's own judge prompt,
  score pattern and samples (the judge phase's scoring code, ``selfreward.judging``);
- a fixed evaluator model (``eval.evaluator``) compares the answers head to head with
  those of the model this iteration started from and with M_1's, in both orders;
- the lengths and the judge score histogram of iteration t's own generated responses
  and pairs;
- the gate (``eval.gate``): see ``selfreward.evaluation.gate_decision``.

Shard i of n takes held-out prompts i::n and judge-set lines i::n and writes one record
per item (``kind`` answer or judgeSet); the phase summary is computed from every
shard's records in ``finalize`` (a correlation of shard correlations would be wrong).
The figures are defined in ``selfreward.evaluation``.
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Optional

from .. import evaluation as E
from .. import layout, models
from ..backends import derive_seed, make_backend
from ..judging import judge_response, parse_winner, render_judge_prompt
from ..spec import GATE_METRICS, RunSpec
from ..template import render_values
from ..storage import Store, StorageError, read_uri_jsonl
from .common import PhaseContext, PhaseError, log
from .judge import read_phase_records



# --- inputs -----------------------------------------------------------------------------

def _read(uri: str, endpoint: Optional[str], what: str, limit: Optional[int]) -> list[dict]:
    try:
        rows = read_uri_jsonl(uri, endpoint)
    except FileNotFoundError:
        raise PhaseError(f"eval: the {what} {uri} does not exist") from None
    except StorageError as e:
        raise PhaseError(f"eval: the {what} is not valid JSONL: {e}") from None
    return rows[:limit] if limit else rows


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def held_out_prompts(spec: RunSpec) -> list[dict]:
    ev = spec.eval
    if ev.prompts is None:
        return []
    rows = _read(ev.prompts.uri, spec.storage.endpoint, "held-out prompts (eval.prompts)", ev.prompts.limit)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise PhaseError(f"eval.prompts {ev.prompts.uri} line {n}: needs a non-empty string \"prompt\"")
    return rows


def judge_set(spec: RunSpec) -> list[dict]:
    ev = spec.eval
    if ev.judgeSet is None:
        return []
    uri = ev.judgeSet.uri
    rows = _read(uri, spec.storage.endpoint, "judge set (eval.judgeSet)", ev.judgeSet.limit)
    for n, row in enumerate(rows, 1):
        where = f"eval.judgeSet {uri} line {n}"
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise PhaseError(f"{where}: needs a string \"prompt\"")
        responses = row.get("responses")
        if not isinstance(responses, list) or not responses:
            raise PhaseError(f"{where}: needs a non-empty list \"responses\"")
        for k, r in enumerate(responses):
            if not isinstance(r, dict) or not isinstance(r.get("response"), str) or not _number(r.get("score")):
                raise PhaseError(f"{where}: responses[{k}] needs a string \"response\" and a finite number \"score\"")
    return rows


def load_verifier(name: str) -> Callable[[str, str, dict], float]:
    module, _, func = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except Exception as e:  # an import error inside the user's module is reported as it is
        raise PhaseError(f"eval.verifier {name}: cannot import {module}: {type(e).__name__}: {e}") from None
    for part in func.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise PhaseError(f"eval.verifier {name}: {module} has no {func}")
    if not callable(obj):
        raise PhaseError(f"eval.verifier {name} is not callable")
    return obj


def verify(fn: Callable, name: str, row: dict, response: str, line: int) -> float:
    try:
        value = fn(row["prompt"], response, row)
    except Exception as e:
        raise PhaseError(f"eval.verifier {name} raised on held-out line {line}: {type(e).__name__}: {e}") from None
    if isinstance(value, bool):
        value = float(value)
    if not _number(value) or not 0.0 <= value <= 1.0:
        raise PhaseError(f"eval.verifier {name} returned {value!r} for held-out line {line}; expected a number in [0, 1]")
    return float(value)


# --- models -----------------------------------------------------------------------------

def evaluated_checkpoint(spec: RunSpec, iteration: int) -> str:
    """The store-relative checkpoint of the model eval at ``iteration`` evaluates ("" = the base model)."""
    rel = layout.policy_checkpoint(spec, 1) if iteration == 0 else layout.checkpoint_dir(iteration, "train")
    return rel or ""


def model_name(iteration: int) -> str:
    return f"M{iteration + 1}"


def previous_eval(spec: RunSpec, store: Store, iteration: int) -> Optional[int]:
    """The earlier eval iteration that evaluated the model iteration ``iteration``
    started from (M_t, or the best model after a rollback)."""
    if iteration < 1:
        return None
    start = models.policy_checkpoint(spec, store, iteration) or ""
    for k in range(iteration - 1, -1, -1):
        rel = layout.summary_path(k, "eval")
        if store.exists(rel) and store.read_json(rel).get("checkpoint") == start:
            return k
    return None


def render_pairwise(template: str, prompt: str, first: str, second: str) -> str:
    """The evaluator template through the one template renderer (only its three
    placeholders; {{ and }} are literal braces; braces in the texts stay)."""
    return render_values(template, {"prompt": prompt, "first": first, "second": second})


# --- the phase --------------------------------------------------------------------------

def run(ctx: PhaseContext) -> dict:
    spec, store, t = ctx.spec, ctx.store, ctx.iteration
    ev = spec.eval
    prompts = list(enumerate(held_out_prompts(spec)))[ctx.shard::ctx.num_shards]
    labelled = list(enumerate(judge_set(spec)))[ctx.shard::ctx.num_shards]
    verifier = load_verifier(ev.verifier) if ev.verifier else None
    rel = evaluated_checkpoint(spec, t)
    answers: list[dict] = []
    judged: list[dict] = []
    if prompts or labelled:
        model_dir = models.resolve(spec, store, rel or None)
        log(f"iter-{t}/eval shard {ctx.shard}/{ctx.num_shards}: {model_name(t)} ({model_dir}) answers "
            f"{len(prompts)} held-out prompts and judges {len(labelled)} labelled prompts")
        gen = ev.generation
        max_new = gen.maxNewTokens or spec.generation.maxNewTokens
        with make_backend(spec.generation.backend, model_dir, spec.model.dtype, gen.batchSize,
                          trust_remote_code=spec.model.trustRemoteCode, vllm_settings=spec.generation.vllm,
                          gpus=spec.resources.for_phase("eval").gpus) as backend:
            for b, start in enumerate(range(0, len(prompts), gen.batchSize)):
                batch = prompts[start:start + gen.batchSize]
                groups = backend.generate([row["prompt"] for _i, row in batch], n=1, temperature=gen.temperature,
                                          top_p=gen.topP, max_new_tokens=max_new,
                                          seed=derive_seed(spec.seed, t, "eval", ctx.shard, ctx.num_shards, b))
                for (i, row), (c,) in zip(batch, groups):
                    answers.append({"kind": "answer", "index": i, "prompt": row["prompt"], "response": c.text,
                                    "tokens": c.tokens, "truncated": not c.finished,
                                    "verifierScore": verify(verifier, ev.verifier, row, c.text, i + 1)
                                    if verifier else None})
                ctx.report(done=len(answers), total=len(prompts))
            judge = spec.judge
            items = [(j, k) for j, (_i, row) in enumerate(labelled) for k in range(len(row["responses"]))]
            verdicts: dict[tuple[int, int], list[str]] = {}
            for b, start in enumerate(range(0, len(items), judge.batchSize)):
                batch = items[start:start + judge.batchSize]
                asks = [render_judge_prompt(judge, labelled[j][1]["prompt"], labelled[j][1]["responses"][k]["response"])
                        for j, k in batch]
                groups = backend.generate(asks, n=judge.samplesPerResponse, temperature=judge.temperature,
                                          top_p=judge.topP, max_new_tokens=judge.maxNewTokens,
                                          seed=derive_seed(spec.seed, t, "eval-judge", ctx.shard, ctx.num_shards, b))
                for key, group in zip(batch, groups):
                    verdicts[key] = [c.text for c in group]
                ctx.report(done=len(verdicts), total=len(items))
            for j, (i, row) in enumerate(labelled):
                rs = [judge_response(r["response"], verdicts[(j, k)], judge) for k, r in enumerate(row["responses"])]
                judged.append({"kind": "judgeSet", "index": i, "prompt": row["prompt"],
                               "labels": [float(r["score"]) for r in row["responses"]],
                               "scores": [r["score"] for r in rs], "verdicts": [r["verdicts"] for r in rs],
                               "verdictCount": sum(len(r["verdicts"]) for r in rs),
                               "parseFailures": sum(r["parseFailures"] for r in rs)})

    if ev.evaluator is not None and answers and t >= 1:
        _head_to_head(ctx, answers)
    ctx.store.write_jsonl(ctx.shard_data, answers + judged)
    return {"heldOutPrompts": len(answers), "judgeSetPrompts": len(judged), "checkpoint": rel, "model": model_name(t)}


def _head_to_head(ctx: PhaseContext, answers: list[dict]) -> None:
    """Add, per answer, the evaluator's verdicts against the previous and the baseline
    model's answers to the same prompt (``vs``: {"<eval iteration>": {...}})."""
    spec, store, t = ctx.spec, ctx.store, ctx.iteration
    evaluator = spec.eval.evaluator
    # (an eval added to the spec mid-run has no baseline: then there is nothing to compare with)
    others = {k for k in (previous_eval(spec, store, t), 0)
              if k is not None and store.exists(layout.summary_path(k, "eval"))}
    theirs = {k: {r["index"]: r for r in read_phase_records(store, k, "eval") if r.get("kind") == "answer"}
              for k in others}
    asks: list[tuple[int, int, int]] = []  # (answer position, other eval iteration, order)
    texts: list[str] = []
    for pos, a in enumerate(answers):
        for k in sorted(others):
            other = theirs[k].get(a["index"])
            if other is None:
                continue
            for order, (first, second) in enumerate(((a["response"], other["response"]),
                                                     (other["response"], a["response"]))):
                asks.append((pos, k, order))
                texts.append(render_pairwise(evaluator.prompt_template, a["prompt"], first, second))
    if not asks:
        return
    evaluator_dir = models.resolve_uri(evaluator.modelUri, spec.storage.endpoint)
    log(f"iter-{t}/eval shard {ctx.shard}: evaluator {evaluator.modelUri} judges {len(asks)} comparisons "
        f"against eval iteration(s) {sorted(others)}")
    out: list[str] = []
    with make_backend(spec.judge.backend, evaluator_dir, spec.model.dtype, evaluator.batchSize,
                      trust_remote_code=spec.model.trustRemoteCode, vllm_settings=spec.judge.vllm,
                      gpus=spec.resources.for_phase("eval").gpus) as backend:
        for b, start in enumerate(range(0, len(texts), evaluator.batchSize)):
            groups = backend.generate(texts[start:start + evaluator.batchSize], n=1,
                                      temperature=evaluator.temperature, top_p=1.0,
                                      max_new_tokens=evaluator.maxNewTokens,
                                      seed=derive_seed(spec.seed, t, "eval-h2h", ctx.shard, ctx.num_shards, b))
            out.extend(g[0].text for g in groups)
            ctx.report(done=len(out), total=len(texts))
    for (pos, k, order), verdict in zip(asks, out):
        a = answers[pos]
        vs = a.setdefault("vs", {}).setdefault(str(k), {"verdicts": [None, None], "winners": [None, None],
                                                         "otherTokens": theirs[k][a["index"]]["tokens"]})
        vs["verdicts"][order] = verdict
        vs["winners"][order] = parse_winner(verdict, evaluator.pattern)
    for a in answers:
        for vs in a.get("vs", {}).values():
            vs["outcome"] = E.outcome(*vs["winners"])


def headline_metric(spec: RunSpec) -> str:
    """The figure that ranks the models: the gate's metric, else the verifier score,
    the win rate against M_1, or the judge's pairwise accuracy, whichever is measured."""
    ev = spec.eval
    if ev.gate is not None:
        return ev.gate.metric
    if ev.verifier:
        return "verifierScore"
    if ev.evaluator is not None:
        return "winRateVsBaseline"
    return "judgePairwiseAccuracy"


def _training_data_figures(store: Store, t: int) -> dict:
    """Lengths, truncation and the verdict score histogram of iteration t's own data."""
    from .pairs import pairs_path

    out: dict = {}
    gen = read_phase_records(store, t, "generate")
    tokens = {(r["promptId"], text): n for r in gen for text, n in zip(r["responses"], r.get("tokens") or [])}
    all_tokens = [n for r in gen for n in (r.get("tokens") or [])]
    out.update(E.length_figures("gen", all_tokens))
    flags = [bool(f) for r in gen for f in (r.get("truncated") or [])]
    responses = sum(len(r["responses"]) for r in gen)
    if flags:
        out["genTruncatedShare"] = sum(flags) / len(flags)
    else:  # generate records without per-response flags: the phase's count
        summary = store.read_json(layout.summary_path(t, "generate"))
        if _number(summary.get("truncatedResponses")) and responses:
            out["genTruncatedShare"] = summary["truncatedResponses"] / responses
    if store.exists(pairs_path(t)):
        pairs = store.read_jsonl(pairs_path(t))
        for side in ("chosen", "rejected"):
            n = [tokens[(p["promptId"], p[side])] for p in pairs if (p["promptId"], p[side]) in tokens]
            out.update(E.length_figures(side, n))
    judged = read_phase_records(store, t, "judge")
    out.update(E.score_histogram(s for r in judged for resp in r["responses"] for s in resp.get("scores", [])))
    return out


def finalize(store: Store, spec: RunSpec, iteration: int, shard_summaries: list[dict]) -> dict:
    t = iteration
    records = read_phase_records(store, t, "eval", len(shard_summaries))
    answers = sorted((r for r in records if r.get("kind") == "answer"), key=lambda r: r["index"])
    labelled = sorted((r for r in records if r.get("kind") == "judgeSet"), key=lambda r: r["index"])
    rel = evaluated_checkpoint(spec, t)
    summary: dict = {"model": model_name(t), "modelIndex": t + 1, "checkpoint": rel, "heldOutPrompts": len(answers),
                     "durationSeconds": max((s.get("durationSeconds", 0) for s in shard_summaries), default=0)}

    if answers:
        tokens = [a["tokens"] for a in answers]
        summary.update({"meanResponseTokens": sum(tokens) / len(tokens),
                        "medianResponseTokens": E.length_figures("x", tokens)["xMedianTokens"],
                        "truncatedShare": sum(bool(a["truncated"]) for a in answers) / len(answers)})
    scored = [a["verifierScore"] for a in answers if a.get("verifierScore") is not None]
    if scored:
        summary["verifierScore"] = 100.0 * sum(scored) / len(scored)
        summary["verifierPrompts"] = len(scored)
    if labelled:
        groups = [(r["labels"], r["scores"]) for r in labelled]
        summary.update(E.calibration(groups, sum(r["verdictCount"] for r in labelled),
                                     sum(r["parseFailures"] for r in labelled)))

    if spec.eval.evaluator is not None and t >= 1:
        prev = previous_eval(spec, store, t)
        for name, side, k in (("VsPrevious", "previous", prev), ("VsBaseline", "baseline", 0)):
            if k is None or not store.exists(layout.summary_path(k, "eval")):
                continue
            rows = [(r["outcome"], a["tokens"], r["otherTokens"]) for a in answers
                    for r in [a.get("vs", {}).get(str(k))] if r is not None]
            summary.update(E.head_to_head([o for o, _a, _b in rows], [a for _o, a, _b in rows],
                                          [b for _o, _a, b in rows], name, side))
        if prev is not None:
            summary["previousModel"] = model_name(prev)
        winners = [w for a in answers for r in a.get("vs", {}).values() for w in r["winners"]]
        if winners:
            summary["evaluatorParseFailureRate"] = sum(w is None for w in winners) / len(winners)

    if t >= 1:
        summary.update(_training_data_figures(store, t))

    metric = headline_metric(spec)
    # the earlier evaluations (all of them, unless eval was added to the spec mid-run)
    previous = [store.read_json(layout.summary_path(k, "eval")) for k in range(t)
                if store.exists(layout.summary_path(k, "eval"))]
    gate = spec.eval.gate.model_dump() if spec.eval.gate is not None else None
    judge_rel = layout.summary_path(t, "judge")
    saturated = t >= 1 and store.exists(judge_rel) and store.read_json(judge_rel).get("judgeSaturated") is True
    summary.update(E.gate_decision(metric, GATE_METRICS.get(metric, True), gate, previous,
                                   {**summary, "iteration": t}, judge_saturated=saturated))
    for k, v in list(summary.items()):
        if isinstance(v, float):
            summary[k] = round(v, 6)
    summary = {k: v for k, v in summary.items() if v is not None}
    if summary.get("gatePassed") is False:
        on = "the saturated judge" if summary.get("gateReason") == "judgeSaturated" else metric
        log(f"iter-{t}/eval: gate failed on {on}: {metric} {summary.get('gateValue')} against the best "
            f"{summary.get('bestModel')} at {summary.get('bestValue')}; action {summary['gateAction']}")
    return summary
