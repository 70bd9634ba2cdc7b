"""The meta-judge (Meta-Rewarding, Wu et al. 2024), as pure functions: which responses
are meta-judged, what the meta-judge reads, how its pairwise outcomes become ratings of
the verdicts, and how the resulting judge-preference pairs are capped.

1. Selection (:func:`select_responses`): the responses whose parsable verdict scores
   have the highest variance (above ``metaJudge.minVariance``), at most
   ``metaJudge.responses``; of each, its first ``maxVerdicts`` parsable verdicts with
   distinct texts (at least two).
2. Comparisons (:func:`comparisons`): every pair of those verdicts, in both orders (A/B
   and B/A), so a meta-judge that prefers whatever is shown first cancels out. The
   verdicts reach the meta-judge with their score lines removed
   (:func:`strip_score_lines`): it compares the reasoning, not the numbers.
3. Outcomes (:func:`outcome`): per order, the winner read by ``metaJudge.winnerPattern``
   (RE2) is 1 (win), 0.5 (tie) or 0 (loss) for the verdict shown first in the A/B order;
   an unparsable meta-judgment counts as no game. The two orders *agree* when both parse
   to the same result.
4. Ratings (:func:`ratings`): the Bradley-Terry model, P(i beats j) = p_i / (p_i + p_j),
   fit by maximum likelihood with Hunter's (2004) MM iteration, a tie counting as half a
   win and half a loss. Every verdict also plays one tied game against a fixed reference
   of strength 1, a weak prior that keeps the fit finite when one verdict wins every
   game. Ratings are reported on the Elo scale, 1000 + 400·log10(p_i) (the reference at
   1000).
5. Pairs (:func:`meta_pair`): prompt = the judge prompt of the response, chosen = the
   highest-rated verdict, rejected = the lowest-rated one (the first among equals); no
   pair when every verdict has the same rating. The pair's *score class* is the chosen
   verdict's score rounded half up.
6. Caps (:func:`cap_meta_pairs`, in the pairs phase): judge-preference pairs at most
   ``maxShare`` of all DPO pairs, and no score class more than ``maxClassShare`` of them,
   keeping the pairs with the widest rating gap first.
"""
from __future__ import annotations

import math
import re
import statistics
import unicodedata
from typing import Optional

from .judging import _MARKDOWN
from .spec import compile_score_pattern
from .template import render_values

# A score statement the score pattern might miss ("Score: 4-5", "Final score = four"):
# removed as well, so no number-bearing score line reaches the meta-judge.
_SCORE_LINE = re.compile(r"^\W*(?:(?:final|total|overall)\s+)?score\b", re.IGNORECASE)

# Bradley-Terry fit: MM iterations and the change in log-strength that ends them.
_MAX_ITERATIONS = 500
_TOLERANCE = 1e-10


def strip_score_lines(verdict: str, score_pattern: str) -> str:
    """The verdict without the lines that state its score: each line on which the judge's
    score pattern matches (with or without Markdown emphasis) or that starts with the word
    score. Lines are compared in their NFKC form, as the score parser reads them."""
    regex = compile_score_pattern(score_pattern)
    kept = []
    for line in verdict.splitlines():
        norm = unicodedata.normalize("NFKC", line)
        plain = _MARKDOWN.sub("", norm)
        if _SCORE_LINE.match(plain) or regex.search(plain) or regex.search(norm):
            continue
        kept.append(line)
    return "\n".join(kept).strip()


def render_meta_prompt(template: str, prompt: str, response: str, first: str, second: str) -> str:
    """The meta-judge template through the one template renderer (its four placeholders)."""
    return render_values(template, {"prompt": prompt, "response": response, "first": first, "second": second})


def select_responses(records: list[dict], limit: int, min_variance: float, max_verdicts: int) -> list[dict]:
    """The responses to meta-judge, most disagreement first (ties: record order).

    Each item: promptId, prompt, response (its text), responseIndex, variance, and
    verdicts: [{index, text, score}] (parsable, distinct texts, at most max_verdicts).
    A record's ``verdictScores`` give each verdict's score; a record without them (judged
    before they were kept) has none to compare."""
    found = []
    for rec in records:
        for j, resp in enumerate(rec.get("responses", [])):
            texts, scores = resp.get("verdicts") or [], resp.get("verdictScores") or []
            valid = [(k, v, float(s)) for k, (v, s) in enumerate(zip(texts, scores))
                     if s is not None and isinstance(v, str) and v.strip()]
            if len(valid) < 2:
                continue
            variance = statistics.pvariance([s for _k, _v, s in valid])
            if variance <= min_variance:
                continue
            seen, verdicts = set(), []
            for k, v, s in valid:
                if v.strip() not in seen and len(verdicts) < max_verdicts:
                    seen.add(v.strip())
                    verdicts.append({"index": k, "text": v, "score": s})
            if len(verdicts) >= 2:
                found.append({"promptId": rec["promptId"], "prompt": rec["prompt"], "response": resp["text"],
                              "responseIndex": j, "variance": variance, "verdicts": verdicts})
    found.sort(key=lambda x: -x["variance"])  # stable: record order among equals
    return found[:limit]


def comparisons(n: int) -> list[tuple[int, int]]:
    """Every ordered pair (a, b), a != b, of n verdicts: (i, j) and (j, i) are the two
    orders of one comparison."""
    return [(a, b) for a in range(n) for b in range(n) if a != b]


def outcome(winner_ab: Optional[str], winner_ba: Optional[str]) -> tuple[list[float], Optional[bool]]:
    """The games of verdict i against j from the meta-judgment with i shown as A
    (``winner_ab``) and the one with j shown as A (``winner_ba``): i's result in each
    parsed order (1 win, 0.5 tie, 0 loss), and whether the two orders agree (None when
    one did not parse)."""
    ab = {"a": 1.0, "b": 0.0, "tie": 0.5}.get(winner_ab) if winner_ab else None
    ba = {"a": 0.0, "b": 1.0, "tie": 0.5}.get(winner_ba) if winner_ba else None
    games = [r for r in (ab, ba) if r is not None]
    agree = None if ab is None or ba is None else ab == ba
    return games, agree


def ratings(n: int, games: list[tuple[int, int, float]]) -> list[float]:
    """Elo-scale Bradley-Terry ratings of n players from games (i, j, result of i) (see
    the module docstring: one tied game each against a reference of strength 1)."""
    wins = [0.5] * n  # the tied game against the reference
    played: dict[tuple[int, int], float] = {}
    for i, j, r in games:
        wins[i] += r
        wins[j] += 1.0 - r
        key = (min(i, j), max(i, j))
        played[key] = played.get(key, 0.0) + 1.0
    p = [1.0] * n
    for _ in range(_MAX_ITERATIONS):
        new = []
        for i in range(n):
            denom = 1.0 / (p[i] + 1.0)  # the reference game
            for (a, b), count in played.items():
                if i in (a, b):
                    other = b if i == a else a
                    denom += count / (p[i] + p[other])
            new.append(wins[i] / denom)
        change = max(abs(math.log(x) - math.log(y)) for x, y in zip(new, p)) if n else 0.0
        p = new
        if change < _TOLERANCE:
            break
    return [1000.0 + 400.0 * math.log10(x) for x in p]


def score_class(score: float) -> int:
    return math.floor(float(score) + 0.5)


def meta_pair(item: dict, rating: list[float], judge_prompt: str) -> Optional[dict]:
    """The judge-preference pair of one meta-judged response, or None when every verdict
    rated the same."""
    verdicts = item["verdicts"]
    best = max(range(len(verdicts)), key=lambda k: (rating[k], -k))
    worst = min(range(len(verdicts)), key=lambda k: (rating[k], k))
    gap = rating[best] - rating[worst]
    if gap <= 1e-9 or verdicts[best]["text"] == verdicts[worst]["text"]:
        return None
    return {
        "kind": "judge",
        "promptId": item["promptId"],
        "responseIndex": item["responseIndex"],
        "prompt": judge_prompt,
        "chosen": verdicts[best]["text"],
        "rejected": verdicts[worst]["text"],
        "chosenScore": verdicts[best]["score"],
        "rejectedScore": verdicts[worst]["score"],
        "ratingGap": round(gap, 6),
        "variance": round(item["variance"], 6),
        "scoreClass": score_class(verdicts[best]["score"]),
    }


def cap_meta_pairs(candidates: list[dict], response_pairs: int, max_share: float,
                   max_class_share: float) -> tuple[list[dict], dict]:
    """The judge-preference pairs that join ``response_pairs`` response pairs, and the
    figures. At most floor(max_share/(1-max_share)·response_pairs) pairs (so they are at
    most max_share of all pairs), and as many as possible such that no score class has
    more than floor(max_class_share·kept) of them; within that, the widest rating gap
    first (then the higher variance, then candidate order)."""
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i]["ratingGap"], -candidates[i]["variance"], i))
    limit = math.floor(max_share / (1.0 - max_share) * response_pairs + 1e-9)
    counts: dict[int, int] = {}
    for c in candidates:
        counts[c["scoreClass"]] = counts.get(c["scoreClass"], 0) + 1
    n = min(limit, len(candidates))
    while n > 0 and sum(min(k, math.floor(max_class_share * n + 1e-9)) for k in counts.values()) < n:
        n -= 1
    quota = math.floor(max_class_share * n + 1e-9)
    kept, taken = [], {}
    for i in order:
        if len(kept) == n:
            break
        c = candidates[i]
        if taken.get(c["scoreClass"], 0) < quota:
            taken[c["scoreClass"]] = taken.get(c["scoreClass"], 0) + 1
            kept.append(c)
    classes = {str(k): taken.get(k, 0) for k in sorted(counts)}
    figures = {
        "metaCandidatePairs": len(candidates),
        "metaPairs": len(kept),
        "metaPairsLimit": limit,  # what maxShare allows for this many response pairs
        "metaPairScoreClasses": classes,
        "metaPairsLargestClassShare": max(taken.values()) / len(kept) if kept else None,
        "metaCandidateScoreClasses": {str(k): counts[k] for k in sorted(counts)},
    }
    return kept, figures
