"""The pairs phase: preference pairs from the judged responses.

Per prompt, among the responses that have a score, with rho = ``pairs.lengthControl``
of the iteration:

rho = 0 (the rule of Yuan et al.): chosen = the highest-scored response that was not cut
off at ``generation.maxNewTokens`` (``truncated``: an unfinished answer is never taught
as the better one), rejected = the lowest-scored response whose text differs from the
chosen one (a truncated response may be rejected); among equal scores the first
response in the record wins.

rho > 0 (length control, Wu et al. 2024): with S_max the best score of a finished
response and S_min the lowest score, chosen = the *shortest* finished response scored in
[(1-rho)·S_max + rho·S_min, S_max]; rejected = the *longest* response with another text
scored in [S_min', (1-rho)·S_min' + rho·S_max] (S_min' the lowest score among those
other texts). Length is the response's generated tokens (characters for records that
have none). Equal lengths are broken by the lowest variance of the response's verdict
scores (the judge was surest), then by the earlier response.

A prompt gives no pair when fewer than two responses are scored, when every scored
response is truncated or every one has the same text (no pair teaches anything), when
the two scores are equal (a tie), when the chosen one scored below the rejected one
(rho >= 0.5 lets the bands overlap), or when minMargin > 0 and the margin is not above
it. ``build_pairs`` is pure, so it is tested without any storage.

With ``spec.metaJudge`` on, the meta-judge's judge-preference pairs (candidates from the
metajudge phase) join the DPO data here, within their caps
(``selfreward.metajudging.cap_meta_pairs``).
"""
from __future__ import annotations

import statistics
from typing import Optional

from .. import layout
from .common import PhaseContext, PhaseError, log

PAIRS_FILE = "pairs.jsonl"

TOO_FEW = "tooFewScored"
TRUNCATED = "truncated"
IDENTICAL = "identical"
TIE = "tie"
MARGIN = "margin"
INVERTED = "inverted"
REASONS = (TOO_FEW, TRUNCATED, IDENTICAL, TIE, MARGIN, INVERTED)


def pairs_path(iteration: int) -> str:
    return f"{layout.phase_dir(iteration, 'pairs')}/{PAIRS_FILE}"


def response_length(resp: dict) -> int:
    """Generated tokens of a judged response, or its characters when the record has none."""
    n = resp.get("tokens")
    return n if isinstance(n, int) and not isinstance(n, bool) else len(resp["text"])


def _variance(resp: dict) -> float:
    scores = [float(s) for s in resp.get("scores") or []]
    return statistics.pvariance(scores) if len(scores) > 1 else 0.0


def _extremes(scored: list[dict], finished: list[dict]) -> tuple[dict, list[dict]]:
    """rho = 0: the best finished response (first of equals), and the candidates for rejected."""
    chosen = max(finished, key=lambda r: r["score"])
    return chosen, [r for r in scored if r["text"].strip() != chosen["text"].strip()]


def _length_controlled(scored: list[dict], finished: list[dict], rho: float) -> tuple[dict, Optional[dict]]:
    s_max = max(float(r["score"]) for r in finished)
    s_min = min(float(r["score"]) for r in scored)
    floor = (1 - rho) * s_max + rho * s_min
    order = {id(r): i for i, r in enumerate(scored)}
    band = [r for r in finished if float(r["score"]) >= floor]
    chosen = min(band, key=lambda r: (response_length(r), _variance(r), order[id(r)]))
    others = [r for r in scored if r["text"].strip() != chosen["text"].strip()]
    if not others:
        return chosen, None
    low = min(float(r["score"]) for r in others)
    ceiling = low + rho * max(0.0, s_max - low)  # (1-rho)·S_min' + rho·S_max, never under S_min'
    band = [r for r in others if float(r["score"]) <= ceiling]
    rejected = min(band, key=lambda r: (-response_length(r), _variance(r), order[id(r)]))
    return chosen, rejected


def build_pair(record: dict, min_margin: float = 0.0, rho: float = 0.0) -> tuple[Optional[dict], Optional[str]]:
    """(pair, None) or (None, the reason the prompt gives no pair)."""
    pair, reason, _lengths = _pair(record, min_margin, rho)
    return pair, reason


def _pair(record: dict, min_margin: float, rho: float) -> tuple[Optional[dict], Optional[str], tuple[int, int]]:
    # an empty response cannot be a DPO completion (the train phase refuses it): not a candidate
    scored = [r for r in record.get("responses", [])
              if r.get("score") is not None and isinstance(r.get("text"), str) and r["text"].strip()]
    if len(scored) < 2:
        return None, TOO_FEW, (0, 0)
    finished = [r for r in scored if r.get("truncated") is not True]
    if not finished:
        return None, TRUNCATED, (0, 0)
    if rho == 0:
        # first of equals wins, so the result does not depend on sort stability
        chosen, others = _extremes(scored, finished)
        if not others:
            return None, IDENTICAL, (0, 0)
        rejected = min(others, key=lambda r: r["score"])
    else:
        chosen, rejected = _length_controlled(scored, finished, rho)
        if rejected is None:
            return None, IDENTICAL, (0, 0)
    hi, lo = float(chosen["score"]), float(rejected["score"])
    if hi < lo:
        # rho = 0: every response scored above the best finished one was truncated
        return None, TRUNCATED if rho == 0 else INVERTED, (0, 0)
    if hi == lo:
        return None, TIE, (0, 0)
    if min_margin > 0 and hi - lo <= min_margin:
        return None, MARGIN, (0, 0)
    pair = {
        "promptId": record["promptId"],
        "prompt": record["prompt"],
        "chosen": chosen["text"],
        "rejected": rejected["text"],
        "chosenScore": hi,
        "rejectedScore": lo,
    }
    lengths = (response_length(chosen), response_length(rejected))
    if rho:
        pair["chosenLength"], pair["rejectedLength"] = lengths
    return pair, None, lengths


def build_pairs(records: list[dict], min_margin: float = 0.0, rho: float = 0.0) -> tuple[list[dict], dict]:
    """All pairs of the judged records, and the summary figures."""
    pairs: list[dict] = []
    lengths: list[tuple[int, int]] = []
    dropped = dict.fromkeys(REASONS, 0)
    for rec in records:
        pair, reason, pair_lengths = _pair(rec, min_margin, rho)
        if pair is None:
            dropped[reason] += 1
            continue
        pairs.append(pair)
        lengths.append(pair_lengths)
    margins = [p["chosenScore"] - p["rejectedScore"] for p in pairs]
    summary = {
        "prompts": len(records),
        "pairs": len(pairs),
        "responsePairs": len(pairs),
        "lengthControl": rho,
        "pairsDropped": sum(dropped.values()),
        "droppedTies": dropped[TIE],
        "droppedTooFewScored": dropped[TOO_FEW],
        "droppedMargin": dropped[MARGIN],
        "droppedTruncated": dropped[TRUNCATED],
        "droppedIdentical": dropped[IDENTICAL],
        "droppedInverted": dropped[INVERTED],
        "meanMargin": statistics.fmean(margins) if margins else None,
        "chosenMeanScore": statistics.fmean(p["chosenScore"] for p in pairs) if pairs else None,
        "rejectedMeanScore": statistics.fmean(p["rejectedScore"] for p in pairs) if pairs else None,
        "chosenMeanLength": statistics.fmean(c for c, _r in lengths) if lengths else None,
        "rejectedMeanLength": statistics.fmean(r for _c, r in lengths) if lengths else None,
    }
    return pairs, summary


def swap_pairs(pairs: list[dict]) -> list[dict]:
    """The swapPairs ablation (spec.ablation): every pair with its chosen and rejected
    sides (texts and scores) exchanged, so DPO learns the judge's preference backwards."""
    return [{**p, "chosen": p["rejected"], "rejected": p["chosen"],
             "chosenScore": p["rejectedScore"], "rejectedScore": p["chosenScore"]} for p in pairs]


def run(ctx: PhaseContext) -> dict:
    from ..metajudging import cap_meta_pairs
    from .judge import read_phase_records
    from .metajudge import candidates_path

    spec, t = ctx.spec, ctx.iteration
    records = read_phase_records(ctx.store, t, "judge")
    pairs, summary = build_pairs(records, spec.pairs.minMargin, spec.pairs.rho(t))
    if not pairs:
        log(f"iter-{t}/pairs: no preference pair from {len(records)} prompts "
            f"({summary['droppedTooFewScored']} with fewer than 2 scored responses, {summary['droppedTies']} ties, "
            f"{summary['droppedMargin']} under the margin, {summary['droppedTruncated']} with every scored response "
            f"cut at maxNewTokens, {summary['droppedIdentical']} with one text only)")
    if spec.meta_judge_enabled:
        rel = candidates_path(t)
        if not ctx.store.exists(rel):
            raise PhaseError(f"iter-{t}/pairs: metaJudge is on but {ctx.store.url(rel)} is missing: run the "
                             "metajudge phase first")
        mj = spec.metaJudge
        meta, figures = cap_meta_pairs(ctx.store.read_jsonl(rel), len(pairs), mj.maxShare, mj.maxClassShare)
        summary.update(figures)
        pairs = pairs + meta
        summary["pairs"] = len(pairs)
    if spec.ablation == "swapPairs":  # every DPO pair, the meta-judge's too
        pairs = swap_pairs(pairs)
        summary["ablation"] = "swapPairs"
        log(f"iter-{t}/pairs: ablation swapPairs: chosen and rejected swapped in {len(pairs)} pairs")
    ctx.store.write_jsonl(pairs_path(t), pairs)
    ctx.report(done=len(records), total=len(records))
    return summary
