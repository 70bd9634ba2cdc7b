"""The prompts of an iteration, and the helpers of few-shot self-instruction.

Iteration t uses a seeded sample (seed ``spec.seed + t``) of ``perIteration`` seed
prompts (all of them, in file order, when unset), followed by the prompts the instruct
phase wrote for that iteration when self-instruction is enabled. Every prompt carries a
stable ``promptId`` (a short sha1 of its text), so records of later phases join on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random
import re
from typing import Optional

from . import layout
from .spec import RunSpec, SelfInstructSpec
from .storage import Store

INSTRUCT_PROMPTS = "prompts.jsonl"


class PromptError(ValueError):
    """A prompt file that cannot be used; the message names the file and line."""


def prompt_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def instruct_prompts_path(iteration: int) -> str:
    return f"{layout.phase_dir(iteration, 'instruct')}/{INSTRUCT_PROMPTS}"


def _open_uri(uri: str, endpoint: Optional[str]) -> tuple[Store, str]:
    if uri.startswith("s3://") or uri.startswith("file://"):
        parent, name = posixpath.split(uri.rstrip("/"))
    else:
        parent, name = os.path.split(os.path.abspath(uri))
    return Store(parent, endpoint), name


def parse_prompt_lines(text: str, where: str) -> list[str]:
    """Prompt texts from JSONL text: one object with a non-empty string "prompt" per line
    (blank lines are skipped). A bad line is an error naming it."""
    out = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{where} line {n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise PromptError(f"{where} line {n}: expected an object with a \"prompt\" field, got {type(obj).__name__}")
        p = obj.get("prompt")
        if not isinstance(p, str):
            what = "missing" if p is None else f"a {type(p).__name__}, not a string"
            raise PromptError(f"{where} line {n}: the \"prompt\" field is {what}")
        if not p.strip():
            raise PromptError(f"{where} line {n}: the \"prompt\" field is empty")
        out.append(p)
    return out


def packaged_prompts() -> list[str]:
    """The generic questions shipped in the package (selfreward/data/seed_prompts.jsonl): the
    tiny model's default tokenizer corpus and the benchmarks' workload."""
    from importlib import resources

    return parse_prompt_lines((resources.files("selfreward") / "data" / "seed_prompts.jsonl").read_text(),
                              "selfreward/data/seed_prompts.jsonl")


def load_seed_prompts(uri: str, endpoint: Optional[str] = None) -> list[str]:
    store, name = _open_uri(uri, endpoint)
    try:
        text = store.read_text(name)
    except FileNotFoundError:
        raise PromptError(f"seed prompts {uri} do not exist") from None
    prompts = parse_prompt_lines(text, uri)
    if not prompts:
        raise PromptError(f"seed prompts {uri} hold no prompt")
    return prompts


def _records(texts: list[str], source: str, seen: set[str]) -> list[dict]:
    out = []
    for t in texts:
        pid = prompt_id(t)
        if pid in seen:  # the same text twice would be the same prompt twice
            continue
        seen.add(pid)
        out.append({"promptId": pid, "prompt": t, "source": source})
    return out


def sample_seed_prompts(seeds: list[str], per_iteration: Optional[int], seed: int, iteration: int) -> list[str]:
    """perIteration seed prompts drawn with Random(seed + iteration); all when unset or
    when there are not more seeds than that."""
    if per_iteration is None or per_iteration >= len(seeds):
        return list(seeds)
    return random.Random(seed + iteration).sample(seeds, per_iteration)


def iteration_prompts(spec: RunSpec, store: Store, iteration: int) -> list[dict]:
    """[{promptId, prompt, source}] of iteration t, seeds first, then self-instructed."""
    seeds = load_seed_prompts(spec.prompts.uri, spec.storage.endpoint)
    seen: set[str] = set()
    out = _records(sample_seed_prompts(seeds, spec.prompts.perIteration, spec.seed, iteration), "seed", seen)
    if spec.instruct_enabled:
        rel = instruct_prompts_path(iteration)
        if not store.exists(rel):
            raise PromptError(f"{store.url(rel)} does not exist: the instruct phase of iteration {iteration} must run first")
        out += _records(parse_prompt_lines(store.read_text(rel), store.url(rel)), "instruct", seen)
    return out


# --- self-instruction ---

FEW_SHOT_HEADER = (
    "Below are some tasks that users have given to an AI assistant. Write one new task "
    "of your own that is different from all of them. Answer with the new task only.\n\n"
)


def few_shot_request(examples: list[str]) -> str:
    """A few-shot request: numbered example tasks, ending where the new one goes."""
    body = "".join(f"Task {i}: {ex.strip()}\n" for i, ex in enumerate(examples, 1))
    return f"{FEW_SHOT_HEADER}{body}Task {len(examples) + 1}:"


_LABEL = re.compile(r"^\s*(?:(?:new\s+)?task(?:\s*\d+)?|instruction|prompt)\s*[:.)-]\s*", re.IGNORECASE)
_NEXT_TASK = re.compile(r"^\s*(?:task\s*\d+|instruction)\s*:", re.IGNORECASE)


def extract_prompt(completion: str) -> Optional[str]:
    """The new task in a completion: a leading label ("Task 9:") or a one-line preamble
    ending in a colon is dropped, and the text ends at the next "Task N:" line or blank
    line. None when nothing is left."""
    text = _LABEL.sub("", completion.lstrip(), count=1)
    first, _, rest = text.partition("\n")
    if first.rstrip().endswith(":") and rest.strip() and not _NEXT_TASK.match(first):
        # a chat model's preamble ("Here is a new task:") before the task itself
        text = _LABEL.sub("", rest.lstrip(), count=1)
    lines: list[str] = []
    for line in text.splitlines():
        if _NEXT_TASK.match(line) or (not line.strip() and lines):
            break
        if line.strip():
            lines.append(line.rstrip())
    out = "\n".join(lines).strip().strip('"').strip()
    return out or None


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: the key of near-duplicates."""
    return " ".join(re.findall(r"\w+", text.lower()))


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two word lists: 2*LCS / (len(a) + len(b))."""
    if not a or not b:
        return 0.0
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return 2.0 * prev[-1] / (len(a) + len(b))


# the filters, in the order they are applied; these names are the summary's counters
DROP_REASONS = ("empty", "tooShort", "tooLong", "duplicate", "similar")


class PromptFilter:
    """Decides which self-instructed prompts to keep, counting the drops per reason.

    A candidate is dropped when it is empty, shorter than minChars or longer than
    maxChars, an exact or normalised duplicate of a seed or kept prompt, or when its
    ROUGE-L similarity to any seed or kept prompt is above maxSimilarity.
    """

    def __init__(self, seeds: list[str], si: SelfInstructSpec) -> None:
        self.si = si
        self.kept: list[str] = []
        self.dropped = {r: 0 for r in DROP_REASONS}
        self._keys = {normalise(s) for s in seeds} | set(seeds)
        self._pool: list[list[str]] = [words(s) for s in seeds]

    def _similar(self, w: list[str]) -> bool:
        limit = self.si.maxSimilarity
        for other in self._pool:
            # 2*LCS/(la+lb) <= 2*min/(la+lb): skip pairs that cannot reach the limit
            if other and 2.0 * min(len(w), len(other)) / (len(w) + len(other)) <= limit:
                continue
            if rouge_l(w, other) > limit:
                return True
        return False

    def check(self, candidate: Optional[str]) -> Optional[str]:
        """The reason to drop candidate, or None to keep it (does not record it)."""
        if candidate is None or not candidate.strip():
            return "empty"
        text = candidate.strip()
        if len(text) < self.si.minChars:
            return "tooShort"
        if len(text) > self.si.maxChars:
            return "tooLong"
        if text in self._keys or normalise(text) in self._keys:
            return "duplicate"
        w = words(text)
        if w and self._similar(w):
            return "similar"
        return None

    def offer(self, candidate: Optional[str]) -> bool:
        """Keep candidate if it passes every filter; count the drop otherwise."""
        reason = self.check(candidate)
        if reason is not None:
            self.dropped[reason] += 1
            return False
        text = candidate.strip()
        self.kept.append(text)
        self._keys.add(text)
        self._keys.add(normalise(text))
        self._pool.append(words(text))
        return True
