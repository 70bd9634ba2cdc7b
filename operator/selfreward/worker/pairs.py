"""The pairs phase: preference pairs from the judged responses.

Per prompt, among the responses that have a score: chosen = the highest-scored response
that was not cut off at ``generation.maxNewTokens`` (``truncated``: an unfinished answer
is never taught as the better one), rejected = the lowest-scored response whose text
differs from the chosen one (a truncated response may be rejected). A prompt gives no
pair when fewer than two responses are scored, when every scored response is truncated
or every one has the same text (no pair teaches anything), when the two scores are
equal (a tie), or when minMargin > 0 and the margin is not above it. ``build_pairs`` is
pure, so it is tested without any storage.
"""
from __future__ import annotations

import statistics
from typing import Optional

from .. import layout
from .common import PhaseContext, log

PAIRS_FILE = "pairs.jsonl"

TOO_FEW = "tooFewScored"
TRUNCATED = "truncated"
IDENTICAL = "identical"
TIE = "tie"
MARGIN = "margin"


def pairs_path(iteration: int) -> str:
    return f"{layout.phase_dir(iteration, 'pairs')}/{PAIRS_FILE}"


def build_pair(record: dict, min_margin: float = 0.0) -> tuple[Optional[dict], Optional[str]]:
    """(pair, None) or (None, the reason the prompt gives no pair)."""
    # an empty response cannot be a DPO completion (the train phase refuses it): not a candidate
    scored = [r for r in record.get("responses", [])
              if r.get("score") is not None and isinstance(r.get("text"), str) and r["text"].strip()]
    if len(scored) < 2:
        return None, TOO_FEW
    finished = [r for r in scored if r.get("truncated") is not True]
    if not finished:
        return None, TRUNCATED
    # first of equals wins, so the result does not depend on sort stability
    chosen = max(finished, key=lambda r: r["score"])
    others = [r for r in scored if r["text"].strip() != chosen["text"].strip()]
    if not others:
        return None, IDENTICAL
    rejected = min(others, key=lambda r: r["score"])
    hi, lo = float(chosen["score"]), float(rejected["score"])
    if hi < lo:  # every response scored above the best finished one was truncated
        return None, TRUNCATED
    if hi == lo:
        return None, TIE
    if min_margin > 0 and hi - lo <= min_margin:
        return None, MARGIN
    return {
        "promptId": record["promptId"],
        "prompt": record["prompt"],
        "chosen": chosen["text"],
        "rejected": rejected["text"],
        "chosenScore": hi,
        "rejectedScore": lo,
    }, None


def build_pairs(records: list[dict], min_margin: float = 0.0) -> tuple[list[dict], dict]:
    """All pairs of the judged records, and the summary figures."""
    pairs: list[dict] = []
    dropped = {TOO_FEW: 0, TRUNCATED: 0, IDENTICAL: 0, TIE: 0, MARGIN: 0}
    for rec in records:
        pair, reason = build_pair(rec, min_margin)
        if pair is None:
            dropped[reason] += 1
        else:
            pairs.append(pair)
    margins = [p["chosenScore"] - p["rejectedScore"] for p in pairs]
    summary = {
        "prompts": len(records),
        "pairs": len(pairs),
        "pairsDropped": sum(dropped.values()),
        "droppedTies": dropped[TIE],
        "droppedTooFewScored": dropped[TOO_FEW],
        "droppedMargin": dropped[MARGIN],
        "droppedTruncated": dropped[TRUNCATED],
        "droppedIdentical": dropped[IDENTICAL],
        "meanMargin": statistics.fmean(margins) if margins else None,
        "chosenMeanScore": statistics.fmean(p["chosenScore"] for p in pairs) if pairs else None,
        "rejectedMeanScore": statistics.fmean(p["rejectedScore"] for p in pairs) if pairs else None,
    }
    return pairs, summary


def swap_pairs(pairs: list[dict]) -> list[dict]:
    """The swapPairs ablation (spec.ablation): every pair with its chosen and rejected
    sides (texts and scores) exchanged, so DPO learns the judge's preference backwards."""
    return [{**p, "chosen": p["rejected"], "rejected": p["chosen"],
             "chosenScore": p["rejectedScore"], "rejectedScore": p["chosenScore"]} for p in pairs]


def run(ctx: PhaseContext) -> dict:
    from .judge import read_phase_records

    records = read_phase_records(ctx.store, ctx.iteration, "judge")
    pairs, summary = build_pairs(records, ctx.spec.pairs.minMargin)
    if ctx.spec.ablation == "swapPairs":
        pairs = swap_pairs(pairs)
        summary["ablation"] = "swapPairs"
        log(f"iter-{ctx.iteration}/pairs: ablation swapPairs: chosen and rejected swapped in {len(pairs)} pairs")
    ctx.store.write_jsonl(pairs_path(ctx.iteration), pairs)
    if not pairs:
        log(f"iter-{ctx.iteration}/pairs: no preference pair from {len(records)} prompts "
            f"({summary['droppedTooFewScored']} with fewer than 2 scored responses, {summary['droppedTies']} ties, "
            f"{summary['droppedMargin']} under the margin, {summary['droppedTruncated']} with every scored response "
            f"cut at maxNewTokens, {summary['droppedIdentical']} with one text only)")
    ctx.report(done=len(records), total=len(records))
    return summary
