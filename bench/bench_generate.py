"""Figures of the generation side on this machine: tokens/s of the transformers backend
(plain batched generate at several batch sizes, and transformers' continuous batching),
judge verdicts/s through the judge phase, and the score parser's verdicts/s.

    .venv/bin/python bench/bench_generate.py [--hidden 64 --layers 2] [--prompts 32] [--tokens 32]

Uses a random Llama from `selfreward.tiny.make_tiny_model` (a larger one with --hidden /
--layers). Prints one line per figure; nothing is asserted. On a GPU the same script
measures the GPU (models.device() picks cuda when there is one).
"""
from __future__ import annotations

import sys

# Run as a script, bench/ comes first on sys.path, where bench/operator.py (the operator
# benchmark) would shadow the standard library's `operator` module: drop it first.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0].rstrip("/") + "/"):
    del sys.path[0]

import argparse
import json
import tempfile
import time
from pathlib import Path

SEEDS = [
    "Explain why the sky looks blue during the day.",
    "Write a short poem about autumn leaves.",
    "How do I reverse a list in Python?",
    "Give three tips for a good night's sleep.",
    "What is the difference between weather and climate?",
    "Summarise the plot of a fairy tale in two sentences.",
    "Name a prime number larger than ten and say why it is prime.",
    "Describe how a bicycle's gears make climbing easier.",
]


def backend_figures(model_dir: str, prompts: list[str], n: int, tokens: int, batch: int, continuous: bool) -> dict:
    from selfreward.backends.hf import TransformersBackend

    with TransformersBackend(model_dir, batch_size=batch, continuous=continuous) as b:
        b.generate(prompts[:2], n=n, temperature=0.8, top_p=0.9, max_new_tokens=4, seed=0)  # warm-up
        start_tokens = b.generated_tokens
        t0 = time.perf_counter()
        b.generate(prompts, n=n, temperature=0.8, top_p=0.9, max_new_tokens=tokens, seed=1)
        seconds = time.perf_counter() - t0
        made = b.generated_tokens - start_tokens
    return {"backend": b.name, "batch": batch, "sequences": len(prompts) * n, "tokens": made,
            "seconds": round(seconds, 3), "tokensPerSecond": round(made / seconds, 1), "device": b.device}


def judge_figures(model_dir: str, work: Path, prompts: list[str], tokens: int) -> dict:
    from selfreward.spec import parse_spec
    from selfreward.worker import run_phase

    seeds = work / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    spec = parse_spec({
        "model": {"uri": model_dir}, "prompts": {"uri": str(seeds)}, "iterations": 1,
        "storage": {"uri": f"file://{work}/judge-{time.time_ns()}"},
        "generation": {"responsesPerPrompt": 4, "maxNewTokens": tokens, "batchSize": 16},
        "judge": {"samplesPerResponse": 3, "maxNewTokens": tokens, "batchSize": 16},
    })
    gen = run_phase(spec, "generate", 1)
    judge = run_phase(spec, "judge", 1)
    return {"responses": gen["responses"], "generateTokensPerSecond": gen["tokensPerSecond"],
            "verdicts": judge["verdicts"], "verdictsPerSecond": judge["verdictsPerSecond"],
            "judgeTokensPerSecond": judge["tokensPerSecond"], "judgeSeconds": judge["durationSeconds"]}


def parser_figures(count: int = 20000) -> dict:
    from selfreward.judging import parse_score
    from selfreward.spec import DEFAULT_SCORE_PATTERN

    texts = [("The answer covers the question well but could be more concise. " * 4) + f"\n**Score:** {i % 6}"
             for i in range(count // 2)]
    texts += ["No score here, just a long explanation of the grading. " * 4 for _ in range(count // 2)]
    t0 = time.perf_counter()
    ok = sum(parse_score(t, DEFAULT_SCORE_PATTERN, 0, 5).ok for t in texts)
    seconds = time.perf_counter() - t0
    return {"verdicts": count, "parsed": ok, "verdictsPerSecond": round(count / seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--no-continuous", action="store_true", help="skip the continuous-batching figure")
    args = ap.parse_args()

    from selfreward.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(make_tiny_model(work / "model", hidden_size=args.hidden, layers=args.layers,
                                    heads=max(1, args.hidden // 16)))
        prompts = [SEEDS[i % len(SEEDS)] + ("" if i < len(SEEDS) else f" (variant {i})") for i in range(args.prompts)]
        print(f"model: random Llama hidden={args.hidden} layers={args.layers}; {args.prompts} prompts x n={args.n}, "
              f"max {args.tokens} new tokens")
        for batch in [int(b) for b in args.batches.split(",")]:
            print("generate", json.dumps(backend_figures(model, prompts, args.n, args.tokens, batch, False)))
        if not args.no_continuous:
            print("generate", json.dumps(backend_figures(model, prompts, args.n, args.tokens, 16, True)))
        print("phases", json.dumps(judge_figures(model, work, prompts[:16], args.tokens)))
        print("parser", json.dumps(parser_figures()))


if __name__ == "__main__":
    main()
