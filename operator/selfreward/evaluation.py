"""The eval phase's figures and its gate, as pure functions (no model, no storage).

Judge calibration (a labelled judge set: per prompt, responses with human or rule
scores; the model's mean judge score per response):

- pairwise accuracy: over every pair of responses to one prompt whose labels differ,
  1 when the model's scores order the pair like the labels, 1/2 when the model scores
  them equal or cannot score one of them (no information is a coin flip), 0 otherwise;
- Spearman rho (Pearson correlation of average ranks) and Kendall tau-b, pooled over
  every scored response of the set;
- exact match: share of responses whose mean score, rounded half up, equals the label
  (an unscored response is a miss);
- best-response agreement: per prompt, the share of the model's top-scored responses
  that carry the highest label (0 when nothing is scored), averaged over prompts.

Head to head (an evaluator model compares two answers in both orders): a prompt's
outcome for the evaluated model is the mean over the orders whose verdict parsed of
1 (win), 1/2 (tie) and 0 (loss); the win rate is the mean outcome over prompts, with a
95% Wilson score interval over the prompts compared (n = prompts, the fractional
outcomes as the successes). The length-controlled figure is the win rate over the
prompts whose two answers' token counts are within 20% of each other.
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional, Sequence

Z95 = 1.959963984540054
LENGTH_MATCH_RATIO = 0.2


# --- ranks and correlations ---------------------------------------------------------

def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """None when there are fewer than two points or either side is constant."""
    if len(x) != len(y):
        raise ValueError("pearson: the two sides differ in length")
    if len(x) < 2:
        return None
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    return pearson(average_ranks(x), average_ranks(y))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """tau-b = (C - D) / sqrt((n0 - n1) (n0 - n2)), ties on either side counted apart."""
    if len(x) != len(y):
        raise ValueError("kendall: the two sides differ in length")
    concordant = discordant = tie_x = tie_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                tie_x += 1
                tie_y += 1
            elif dx == 0:
                tie_x += 1
            elif dy == 0:
                tie_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = n * (n - 1) // 2
    denom = math.sqrt((n0 - tie_x) * (n0 - tie_y))
    if denom == 0:
        return None
    return (concordant - discordant) / denom


# --- judge calibration ----------------------------------------------------------------

def pairwise_accuracy(groups: Iterable[tuple[Sequence[float], Sequence[Optional[float]]]]) -> tuple[float, int]:
    """(agreement points, pairs) over (labels, model scores) per prompt."""
    points, pairs = 0.0, 0
    for labels, scores in groups:
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                if labels[i] == labels[j]:
                    continue
                pairs += 1
                si, sj = scores[i], scores[j]
                if si is None or sj is None or si == sj:
                    points += 0.5
                elif (si > sj) == (labels[i] > labels[j]):
                    points += 1.0
    return points, pairs


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)


def calibration(groups: list[tuple[Sequence[float], Sequence[Optional[float]]]], verdicts: int,
                failures: int) -> dict:
    """The judge-calibration figures of a labelled set (see the module docstring)."""
    points, pairs = pairwise_accuracy(groups)
    xs = [s for labels, scores in groups for s, lab in zip(scores, labels) if s is not None]
    ys = [lab for labels, scores in groups for s, lab in zip(scores, labels) if s is not None]
    responses = sum(len(labels) for labels, _ in groups)
    exact = sum(1 for labels, scores in groups for s, lab in zip(scores, labels)
                if s is not None and _round_half_up(s) == _round_half_up(lab))
    best = []
    for labels, scores in groups:
        scored = [s for s in scores if s is not None]
        if not labels:
            continue
        if not scored:
            best.append(0.0)
            continue
        top = max(scored)
        tops = [i for i, s in enumerate(scores) if s == top]
        best.append(sum(labels[i] == max(labels) for i in tops) / len(tops))
    out = {
        "judgeSetPrompts": len(groups),
        "judgeSetResponses": responses,
        "judgeSetPairs": pairs,
        "judgePairwiseAccuracy": points / pairs if pairs else None,
        "judgeSpearman": spearman(xs, ys),
        "judgeKendall": kendall_tau_b(xs, ys),
        "judgeExactMatch": exact / responses if responses else None,
        "judgeBestAgreement": statistics.fmean(best) if best else None,
        "judgeParseFailureRate": failures / verdicts if verdicts else None,
    }
    return out


# --- head to head -----------------------------------------------------------------------

def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion p observed over n trials."""
    if n <= 0:
        raise ValueError("wilson: n must be positive")
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def outcome(first_is_new: Optional[str], second_is_new: Optional[str]) -> Optional[float]:
    """A prompt's outcome for the new model from the two orders' verdicts: the first
    shows (new, old) and the second (old, new); each verdict is "a", "b", "tie" or None
    (unparsed). None when neither order parsed."""
    scores = []
    if first_is_new is not None:
        scores.append({"a": 1.0, "tie": 0.5, "b": 0.0}[first_is_new])
    if second_is_new is not None:
        scores.append({"b": 1.0, "tie": 0.5, "a": 0.0}[second_is_new])
    return statistics.fmean(scores) if scores else None


def head_to_head(outcomes: Sequence[Optional[float]], new_tokens: Sequence[int], old_tokens: Sequence[int],
                 name: str, side: str) -> dict:
    """Win rate of the new model (``winRate<name>`` with Low/High), the length-matched
    win rate and the other side's mean length (``<side>MeanTokens``), over the prompts
    whose outcome is known."""
    known = [(o, a, b) for o, a, b in zip(outcomes, new_tokens, old_tokens) if o is not None]
    out: dict = {f"compared{name}": len(known)}
    if not known:
        return out
    rate = statistics.fmean(o for o, _a, _b in known)
    lo, hi = wilson(rate, len(known))
    matched = [o for o, a, b in known if abs(a - b) <= LENGTH_MATCH_RATIO * max(a, b, 1)]
    out.update({
        f"winRate{name}": rate,
        f"winRate{name}Low": lo,
        f"winRate{name}High": hi,
        f"winRate{name}LengthMatched": statistics.fmean(matched) if matched else None,
        f"lengthMatched{name}": len(matched),
        f"{side}MeanTokens": statistics.fmean(b for _o, _a, b in known),
    })
    return out


# --- lengths ----------------------------------------------------------------------------

def length_figures(prefix: str, tokens: Sequence[int]) -> dict:
    if not tokens:
        return {}
    return {f"{prefix}MeanTokens": statistics.fmean(tokens), f"{prefix}MedianTokens": float(statistics.median(tokens))}


def score_histogram(scores: Iterable[float]) -> dict:
    """Verdict scores per point 0..5 (rounded half up, clamped)."""
    hist = {f"scoreHist{k}": 0 for k in range(6)}
    for s in scores:
        k = min(5, max(0, _round_half_up(float(s))))
        hist[f"scoreHist{k}"] += 1
    return hist


# --- the gate ---------------------------------------------------------------------------

def gate_decision(metric: str, higher_is_better: bool, gate: Optional[dict], previous: list[dict],
                  current: dict, judge_saturated: bool = False) -> dict:
    """The gate fields of an eval summary.

    ``previous``: the eval summaries of the earlier iterations (0 first), each with
    ``model``, ``checkpoint``, ``iteration``, ``metric`` and the earlier gate fields;
    ``current``: this eval's figures plus ``model``, ``checkpoint`` and ``iteration``.
    ``gate``: {minChange, action, maxRollbacks}, or None (no gate: the best model is
    still tracked by ``metric``, nothing is ever stopped).

    The best model so far is the one with the best value of ``metric`` among the
    earlier evaluations (the earlier one wins a tie). The gate fails when this model's
    value minus the best earlier value (negated when lower is better) is below
    minChange, or when this model has no value. On failure: warn goes on, rollback makes
    the best model the next iteration's start (at most maxRollbacks times; a further
    failure acts as stop), stop ends the run with the best model.

    ``judge_saturated``: the iteration's judge phase crossed judge.saturation. With
    gate.onJudgeSaturated set, that fails the gate too, with that action (gateReason
    judgeSaturated); a failure on the metric keeps the gate's own action.
    """
    sign = 1.0 if higher_is_better else -1.0

    def val(s: dict) -> Optional[float]:
        v = s.get(metric)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    earlier = [s for s in previous if val(s) is not None]
    best = None
    for s in earlier:
        if best is None or sign * val(s) > sign * val(best):
            best = s
    rollbacks = int(previous[-1].get("rollbacks", 0)) if previous else 0
    value = val(current)
    out: dict = {"gateMetric": metric, "gateValue": value, "rollbacks": rollbacks}
    if best is None:  # the first evaluated model (or none had a value): nothing to compare with
        passed, change = True, None
    elif value is None:
        passed, change = False, None
    else:
        change = sign * (value - val(best))
        passed = gate is None or change >= float(gate.get("minChange", 0.0))
    out["gateChange"] = change
    action = "none"
    if not passed and gate is not None:
        action = gate.get("action", "warn")
        out["gateReason"] = "metric"
    elif judge_saturated and gate is not None and gate.get("onJudgeSaturated"):
        passed, action = False, gate["onJudgeSaturated"]
        out["gateReason"] = "judgeSaturated"
    out["gatePassed"] = passed
    if not passed and gate is not None:
        if action == "rollback" and rollbacks >= int(gate.get("maxRollbacks", 1)):
            action = "stop"
    out["gateAction"] = action
    new_best = current if best is None or (value is not None and sign * value > sign * val(best)) else best
    out.update({
        "bestModel": new_best.get("model"),
        "bestIteration": new_best.get("iteration"),
        "bestValue": val(new_best),
        "bestCheckpoint": new_best.get("checkpoint", ""),
    })
    if action == "rollback":
        out["rollbacks"] = rollbacks + 1
        # a saturated judge taught this model: start again from the best model before it
        back = best if out.get("gateReason") == "judgeSaturated" and best is not None else new_best
        out["nextPolicy"] = back.get("checkpoint", "")
    else:
        out["nextPolicy"] = current.get("checkpoint", "")
    return out
