"""The cipher task: a synthetic task where verifying is easy and generating is not.

A secret map ``f`` (a permutation of the task's symbols, by default the first 8 of
:data:`SYMBOLS`, drawn from the task seed) codes a word. A prompt is five symbols
(``Encode: ka mo ...``); the ideal answer is the five symbols mapped by ``f``, in order. The additive 0-5 rubric has one criterion per
position: criterion i holds when answer word i equals f(prompt word i). The rule score
is the number of criteria met and the verifier (:func:`verify`) gives it on 0-1 (the
eval phase reports 0-100). Checking an answer is five look-ups; writing one needs all
of ``f``.

The data mirror what the paper starts from:

- IFT (instruction data) are demonstrations of mixed quality, as human ones are: each
  position is f(x) with probability ``right`` (default 0.4) and otherwise g(x), a second
  fixed map that never agrees with f. From the IFT data alone f and g cannot be told
  apart, so M_1 (the SFT model) samples the right word about 40% of the time.
- EFT (judge training) data teach which map is right: the judge prompt shows a prompt
  and an answer mixing f, g and random words (each word right with probability 1/2),
  and the target is one line per criterion (the question word, the answer word, the
  mark) and the sum, ``ka mo 1`` ... ``Score: 3``. Decomposing the count into five
  marks, each next to the two words it compares, makes judging easy for a tiny
  transformer; the "Score: N" line is what the default score pattern reads.

Self-rewarding training then has to move judging skill (from EFT) into generation
(through the judge's preference pairs and DPO), which is the paper's mechanism.

Everything here is deterministic from the seed; :func:`build` writes every file a run
reads (``examples/data/build_cipher.py`` and ``bench/reproduce.py`` call it).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..template import render_template

# Sixteen two-letter syllables: each (with its leading space) becomes one token of the
# tiny tokenizer trained on the task corpus (see check_tokenizer).
SYMBOLS: tuple[str, ...] = ("ka", "ko", "ku", "mi", "mo", "mu", "na", "ne",
                            "ni", "po", "pu", "ra", "re", "ri", "so", "su")
# How many of them a task uses by default: with 8 the tiny model of bench/reproduce.py
# learns to judge (pairwise accuracy about 0.95) within the SFT budget of a 2-core CPU;
# with all 16 it had not after 560 steps.
DEFAULT_SYMBOLS = 8
LENGTH = 5
PROMPT_PREFIX = "Encode:"

JUDGE_TEMPLATE = (
    "Mark each answer word 1 if right, else 0; sum.\n"
    "Question: {prompt}\n"
    "Answer: {response}"
)

FILES = {
    "prompts": "prompts.jsonl",      # training prompts (the run's prompts.uri)
    "ift": "ift.jsonl",              # SFT instruction data
    "eft": "eft.jsonl",              # SFT judge-training data
    "heldout": "heldout.jsonl",      # eval.prompts: held-out prompts with their ideal answer
    "judgeset": "judgeset.jsonl",    # eval.judgeSet: held-out prompts with rule-scored answers
    "corpus": "corpus.txt",          # text for the tiny model's tokenizer
}


@dataclass(frozen=True)
class Cipher:
    """The secret map f and the distractor g (g(x) != f(x) for every x) over ``symbols``."""

    f: dict[str, str]
    g: dict[str, str]

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(self.f)

    def encode(self, words: Sequence[str]) -> list[str]:
        return [self.f[w] for w in words]


def make_cipher(seed: int, symbols: int = DEFAULT_SYMBOLS) -> Cipher:
    """f and g over the first ``symbols`` of :data:`SYMBOLS` (fewer symbols: a smaller
    map to learn, for quick runs)."""
    if not 3 <= symbols <= len(SYMBOLS):
        raise ValueError(f"symbols={symbols}: 3..{len(SYMBOLS)}")
    alphabet = SYMBOLS[:symbols]
    rng = random.Random(f"cipher-{seed}-{symbols}")
    f_img = list(alphabet)
    rng.shuffle(f_img)
    f = dict(zip(alphabet, f_img))
    while True:  # a permutation that disagrees with f everywhere
        g_img = list(alphabet)
        rng.shuffle(g_img)
        if all(a != b for a, b in zip(f_img, g_img)):
            return Cipher(f, dict(zip(alphabet, g_img)))


def prompt_text(words: Sequence[str]) -> str:
    return f"{PROMPT_PREFIX} {' '.join(words)}"


def prompt_words(prompt: str) -> list[str]:
    """The symbols of a prompt (whatever precedes the prefix is ignored)."""
    _, _, rest = prompt.rpartition(PROMPT_PREFIX)
    return rest.split()


def criteria(answer: Sequence[str], response: str) -> list[bool]:
    """The five rubric criteria: response word i equals the ideal answer's word i.
    Missing words fail their criteria; words after the fifth are not looked at."""
    words = response.split()
    return [i < len(words) and words[i] == want for i, want in enumerate(answer)]


def rule_score(answer: Sequence[str], response: str) -> int:
    """The additive 0-5 score: the number of criteria met."""
    return sum(criteria(answer, response))


def verify(prompt: str, response: str, record: dict) -> float:
    """``spec.eval.verifier`` (``selfreward.tasks.cipher:verify``): the share (0-1) of the
    five criteria met; the held-out record carries the ideal answer in ``answer``."""
    answer = str(record["answer"]).split()
    return rule_score(answer, response) / len(answer)


def judge_target(question: Sequence[str], answer: Sequence[str], response: str) -> str:
    """The EFT target: one line per criterion, ``<question word> <response word> <mark>``
    (mark 1 when the response word is the code of the question word), then the sum as
    ``Score: N``. Restating the two words puts them next to the mark, so a tiny model
    decides each mark from the two tokens before it instead of searching the prompt."""
    words = response.split()
    marks = criteria(answer, response)
    lines = [f"{q} {words[i] if i < len(words) else '-'} {int(m)}" for i, (q, m) in enumerate(zip(question, marks))]
    return "\n".join(lines) + f"\nScore: {sum(marks)}"


def judge_prompt(prompt: str, response: str, template: str = JUDGE_TEMPLATE) -> str:
    """The judge's input as the judge phase renders it (selfreward.template)."""
    return render_template(template, prompt, response)


# --- data builders -------------------------------------------------------------------

def distinct_prompts(rng: random.Random, alphabet: Sequence[str], n: int, taken: set[str]) -> list[list[str]]:
    """n prompts (as symbol lists) not in ``taken``; adds them to it."""
    if len(taken) + n > len(alphabet) ** LENGTH:
        raise ValueError(f"{n} more prompts than the {len(alphabet) ** LENGTH} of {len(alphabet)} symbols")
    out: list[list[str]] = []
    while len(out) < n:
        words = [rng.choice(alphabet) for _ in range(LENGTH)]
        key = " ".join(words)
        if key not in taken:
            taken.add(key)
            out.append(words)
    return out


def demo_response(c: Cipher, words: Sequence[str], rng: random.Random, right: float) -> str:
    """An IFT demonstration: f(x) with probability ``right`` per position, else g(x)."""
    return " ".join(c.f[w] if rng.random() < right else c.g[w] for w in words)


def graded_response(c: Cipher, words: Sequence[str], rng: random.Random, score: int) -> str:
    """An answer with exactly ``score`` right words; each wrong one is g(x) or a random
    other symbol (both kinds, so the judge learns that only f counts)."""
    right = set(rng.sample(range(len(words)), score))
    out = []
    for i, w in enumerate(words):
        if i in right:
            out.append(c.f[w])
        elif rng.random() < 0.5:
            out.append(c.g[w])
        else:
            out.append(rng.choice([s for s in c.symbols if s != c.f[w]]))
    return " ".join(out)


def build(out_dir: str | Path, seed: int = 0, *, train_prompts: int = 2000, ift: int = 1000, eft: int = 3000,
          heldout: int = 200, judgeset: int = 32, responses_per_judged_prompt: int = 4, right: float = 0.4,
          symbols: int = DEFAULT_SYMBOLS, template: str = JUDGE_TEMPLATE) -> dict[str, Path]:
    """Write the task's files for ``seed`` into out_dir (see :data:`FILES`); return their
    paths. Training, IFT/EFT, held-out and judge-set prompts are disjoint."""
    if not 0.0 <= right <= 1.0:
        raise ValueError(f"right={right}: a probability in [0, 1]")
    if not 2 <= responses_per_judged_prompt <= LENGTH + 1:
        raise ValueError(f"responses_per_judged_prompt={responses_per_judged_prompt}: 2..{LENGTH + 1} (distinct scores)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = make_cipher(seed, symbols)
    rng = random.Random(f"cipher-data-{seed}-{symbols}")
    taken: set[str] = set()
    # held-out sets first, so that a larger training set never changes them
    held = distinct_prompts(rng, c.symbols, heldout, taken)
    judged = distinct_prompts(rng, c.symbols, judgeset, taken)
    train = distinct_prompts(rng, c.symbols, train_prompts, taken)
    ift_words = distinct_prompts(rng, c.symbols, ift, taken)
    eft_words = distinct_prompts(rng, c.symbols, eft, taken)

    rows: dict[str, list] = {
        "heldout": [{"prompt": prompt_text(w), "answer": " ".join(c.encode(w))} for w in held],
        "prompts": [{"prompt": prompt_text(w)} for w in train],
        "ift": [{"prompt": prompt_text(w), "response": demo_response(c, w, rng, right)} for w in ift_words],
    }
    eft_rows = []
    for w in eft_words:
        # each word right with probability 1/2, independently: with a uniform score instead,
        # the marks of one verdict agree more often than not, and a tiny model learns to
        # copy the previous mark rather than to check the word (seed 1 did)
        response = graded_response(c, w, rng, sum(rng.random() < 0.5 for _ in range(LENGTH)))
        eft_rows.append({"prompt": judge_prompt(prompt_text(w), response, template),
                         "response": judge_target(w, c.encode(w), response)})
    rows["eft"] = eft_rows
    judge_rows = []
    for w in judged:
        scores = rng.sample(range(LENGTH + 1), responses_per_judged_prompt)
        judge_rows.append({"prompt": prompt_text(w), "responses": [
            {"response": graded_response(c, w, rng, s), "score": s} for s in scores]})
    rows["judgeset"] = judge_rows

    paths = {name: out / FILES[name] for name in FILES}
    for name, data in rows.items():
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    # the template many times over, so that its words become tokens and judge prompts stay short
    corpus = [*([template] * 50), *(r["prompt"] + "\n" + r["response"] for r in rows["ift"]),
              *(r["response"] for r in eft_rows[:200]), *([" ".join(SYMBOLS)] * 50)]
    paths["corpus"].write_text("\n".join(corpus) + "\n")
    return paths


def check_tokenizer(tokenizer) -> list[str]:
    """What in the task would not be one token of ``tokenizer`` (empty: all fine): every
    symbol after a space, and every mark and score digit."""
    bad = []
    for text in [*SYMBOLS, *(str(i) for i in range(LENGTH + 1))]:
        ids = tokenizer(f"x {text}", add_special_tokens=False)["input_ids"]
        alone = tokenizer("x", add_special_tokens=False)["input_ids"]
        if len(ids) - len(alone) != 1:
            bad.append(text)
    return bad


def answer_of(seed: int, prompt: str, symbols: int = DEFAULT_SYMBOLS) -> Optional[str]:
    """The ideal answer to a prompt under the task seed's map (None if a word is not a symbol)."""
    c = make_cipher(seed, symbols)
    words = prompt_words(prompt)
    if len(words) != LENGTH or any(w not in c.f for w in words):
        return None
    return " ".join(c.encode(words))
