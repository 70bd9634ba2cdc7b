"""Writes the quickstart's data: the cipher task (selfreward.tasks.cipher) for seed 0.

    .venv/bin/python examples/data/build_cipher.py .quickstart/data   # what `make run` does

Into the directory given: prompts.jsonl (the run's prompts), ift.jsonl and eft.jsonl
(iteration 0's instruction and judge-training data), heldout.jsonl and judgeset.jsonl
(the eval phase's held-out prompts with their ideal answers, and rule-scored answers
for judge calibration), corpus.txt (what `selfreward make-tiny-model --corpus` trains the
tokenizer on). The same seed always writes the same files; bench/reproduce.py builds
the same data per seed with the same sizes.
"""
import argparse
import sys

from selfreward.tasks import cipher

# The quickstart's sizes: the defaults of selfreward.tasks.cipher.build (bench/reproduce.py's too).
SIZES = dict(symbols=8, train_prompts=2000, ift=1000, eft=3000, heldout=200, judgeset=32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="directory to write the files into")
    ap.add_argument("--seed", type=int, default=0, help="the task seed (the secret map and every data set)")
    args = ap.parse_args()
    paths = cipher.build(args.out, args.seed, **SIZES)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
