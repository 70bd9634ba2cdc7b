"""LLM-as-a-judge: the judge prompt, the strict score parser, and aggregation.

Where a verdict's score is (docs/judging.md): the pattern (``judge.scorePattern``, RE2)
is matched against the verdict's *statement* text (:func:`verdict_text`): the verdict
normalised with NFKC (full-width digits and colons become ASCII), with reasoning blocks
(``<think>...</think>``, ``<thinking>``, ``<reasoning>``) and block-quoted lines
(``> ...``) removed, then with Markdown emphasis removed; the first group of the *last*
match is the score. The default pattern only matches a score statement that starts a
line or a sentence, so "a response would need examples to earn Score: 5" after the real
score is not read.

The parser is strict on purpose. A verdict whose score cannot be read (no match, not a
number, NaN or infinite, outside minScore..maxScore) is a *parse failure*: it yields no
score and a reason, never a stand-in value such as 0 or -1 that would quietly rank a
response. A response whose verdicts all fail has no score and is left out of the pairs.
RE2 matches in time linear in the verdict, and a verdict longer than
:data:`MAX_VERDICT_CHARS` is read from its last lines only, so no verdict and no
accepted pattern can stall a judge worker.
"""
from __future__ import annotations

import math
import re
import statistics
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Optional

from .spec import JudgeSpec, SaturationSpec, compile_score_pattern, compile_winner_pattern
from .template import render_template

# Why a verdict gave no score (counted in the judge summary).
NO_MATCH = "noMatch"
NOT_A_NUMBER = "notANumber"
NOT_FINITE = "notFinite"
OUT_OF_RANGE = "outOfRange"
REASONS = (NO_MATCH, NOT_A_NUMBER, NOT_FINITE, OUT_OF_RANGE)

# Markdown emphasis a judge may wrap around the score line: "**Score:** 4", "`Score: 4`".
# (Fixed patterns of our own, without nested quantifiers: Python's re is linear on them.)
_MARKDOWN = re.compile(r"\*\*|__|`|(?<!\w)\*(?!\s)|(?<!\s)\*(?!\w)")
# Reasoning blocks a chat model writes before its answer: a draft, not the verdict.
_REASONING_TAG = re.compile(r"<(/?)(think|thinking|reasoning)\s*>", re.IGNORECASE)
_QUOTED_LINE = re.compile(r"^[ \t]*>.*$", re.MULTILINE)
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
# A verdict is read from at most its last this many characters (at a line start).
MAX_VERDICT_CHARS = 200_000


@dataclass(frozen=True)
class Verdict:
    """One parsed judge output: score is None exactly when reason is set."""

    score: Optional[float]
    reason: Optional[str] = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.score is not None


def render_judge_prompt(judge: JudgeSpec, prompt: str, response: str) -> str:
    """The judge's input for one (prompt, response), by selfreward.template: only the
    template's {prompt} and {response} are placeholders ({{ and }} are literal braces);
    braces inside the prompt or response are copied as they are."""
    return render_template(judge.prompt_template, prompt, response)


def _without_reasoning(text: str) -> str:
    """The text outside reasoning blocks. An opening tag that is never closed hides the
    rest (an unfinished draft); a closing tag without an opening one hides what comes
    before it (the chat template opened the block in the prompt)."""
    out: list[str] = []
    depth = last = 0
    for m in _REASONING_TAG.finditer(text):
        if depth == 0:
            out.append(text[last:m.start()])
        if m.group(1):  # a closing tag
            if depth == 0:
                out = []  # everything so far was the model's reasoning
            else:
                depth -= 1
        else:
            depth += 1
        last = m.end()
    if depth == 0:
        out.append(text[last:])
    return "".join(out)


def verdict_text(text: str) -> str:
    """The part of a verdict a score may be read from (see the module docstring)."""
    # lone surrogates (possible in JSON text) cannot reach RE2, which matches UTF-8
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE).replace("\r\n", "\n").replace("\r", "\n")
    text = _without_reasoning(text)
    if len(text) > MAX_VERDICT_CHARS:
        tail = text[-MAX_VERDICT_CHARS:]
        text = tail[tail.find("\n") + 1:] if "\n" in tail else tail
    return _QUOTED_LINE.sub("", text)


def _last_match(regex, text: str):
    last = None
    for m in regex.finditer(text):
        last = m
    return last


def parse_score(text: str, pattern: str, min_score: float, max_score: float) -> Verdict:
    """Read the score of one verdict: the first group of the *last* match of pattern
    (RE2) in :func:`verdict_text`.

    Markdown emphasis (``**``, ``__``, backticks, single ``*``) is removed before
    matching; the text with the markup is tried only when that finds nothing, so a
    pattern written with the markup in it still works.
    """
    if not isinstance(text, str):
        return Verdict(None, NO_MATCH, f"verdict is {type(text).__name__}, not text")
    regex = compile_score_pattern(pattern)
    body = verdict_text(text)
    m = _last_match(regex, _MARKDOWN.sub("", body)) or _last_match(regex, body)
    if m is None:
        return Verdict(None, NO_MATCH, "the score pattern does not match")
    raw = m.group(1)
    if raw is None or not raw.strip():
        return Verdict(None, NOT_A_NUMBER, "the score group captured nothing")
    try:
        value = float(raw.strip())
    except ValueError:
        return Verdict(None, NOT_A_NUMBER, f"{raw.strip()[:40]!r} is not a number")
    if not math.isfinite(value):
        return Verdict(None, NOT_FINITE, f"{raw.strip()[:40]!r} is not finite")
    if not (min_score <= value <= max_score):
        return Verdict(None, OUT_OF_RANGE, f"{value:g} is outside {min_score:g}..{max_score:g}")
    return Verdict(value)


def parse_verdict(text: str, judge: JudgeSpec) -> Verdict:
    return parse_score(text, judge.scorePattern, judge.minScore, judge.maxScore)


def aggregate(scores: Iterable[float], how: str = "mean") -> Optional[float]:
    """The response's score from its valid verdict scores; None when there are none."""
    values = [float(s) for s in scores]
    if not values:
        return None
    if how == "mean":
        return sum(values) / len(values)
    if how == "median":
        return float(statistics.median(values))
    raise ValueError(f"unknown aggregation {how!r}; expected mean or median")


def judge_response(text: str, verdicts: list[str], judge: JudgeSpec) -> dict:
    """The judged-response record: the raw verdicts (the audit trail), the valid scores,
    the aggregated score (None if no verdict parsed) and the failures with reasons."""
    parsed = [parse_verdict(v, judge) for v in verdicts]
    scores = [p.score for p in parsed if p.ok]
    return {
        "text": text,
        "verdicts": list(verdicts),
        "verdictScores": [p.score for p in parsed],  # one per verdict, None where it failed (the meta-judge's input)
        "scores": scores,
        "score": aggregate(scores, judge.aggregation),
        "parseFailures": sum(not p.ok for p in parsed),
        "failureReasons": [p.reason for p in parsed if not p.ok],
    }


def score_stats(records: Iterable[dict], top: Optional[float] = None) -> dict:
    """Statistics over judged-prompt records ({responses: [judged response...]});
    with ``top`` (judge.maxScore) also the share of scored responses at it."""
    verdicts = failures = judged = 0
    reasons = {r: 0 for r in REASONS}
    scores: list[float] = []
    for rec in records:
        for resp in rec.get("responses", []):
            judged += 1
            verdicts += len(resp.get("verdicts", []))
            failures += int(resp.get("parseFailures", 0))
            for r in resp.get("failureReasons", []):
                reasons[r] = reasons.get(r, 0) + 1
            if resp.get("score") is not None:
                scores.append(float(resp["score"]))
    out = {
        "judgedResponses": judged,
        "verdicts": verdicts,
        "parseFailures": failures,
        "parseFailureRate": round(failures / verdicts, 6) if verdicts else 0.0,
        "scoredResponses": len(scores),
        "unscoredResponses": judged - len(scores),
        "scoreMean": statistics.fmean(scores) if scores else None,
        "scoreStd": statistics.pstdev(scores) if scores else None,
        "scoreMin": min(scores) if scores else None,
        "scoreMax": max(scores) if scores else None,
    }
    if top is not None:
        out["topScoreShare"] = sum(s >= top for s in scores) / len(scores) if scores else None
    for r, k in reasons.items():
        out["parseFailures" + r[0].upper() + r[1:]] = k
    return out


def saturation(stats: dict, guard: SaturationSpec) -> Optional[str]:
    """Why the judge's scores look saturated (None when they do not): more than
    guard.maxTopShare of the scored responses at the top score, or a score spread under
    guard.minStd. ``stats`` is :func:`score_stats`' output with its top share."""
    why = []
    top, std = stats.get("topScoreShare"), stats.get("scoreStd")
    if top is not None and guard.maxTopShare < 1.0 and top > guard.maxTopShare:
        why.append(f"{top:.0%} of the scored responses got the top score (judge.saturation.maxTopShare "
                   f"{guard.maxTopShare:g})")
    if std is not None and stats.get("scoredResponses", 0) >= 2 and std < guard.minStd:
        why.append(f"the score spread (std {std:.3g}) is under judge.saturation.minStd {guard.minStd:g}")
    return "; ".join(why) or None


def parse_winner(text: str, pattern: str) -> Optional[str]:
    """"a", "b" or "tie" from a pairwise verdict (the evaluator's, the meta-judge's): the
    first group of the last match of ``pattern`` (RE2, case-insensitive), or None."""
    last = None
    for m in compile_winner_pattern(pattern).finditer(text or ""):
        last = m
    if last is None or last.group(1) is None:
        return None
    word = last.group(1).strip().lower()
    return word if word in ("a", "b", "tie") else None
