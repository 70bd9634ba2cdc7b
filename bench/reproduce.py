"""The paper's per-iteration table, in kind, on a CPU: the cipher task
(selfreward.tasks.cipher), a tiny model trained from scratch by the SFT phase, three
self-rewarding iterations, the eval phase after each, and two ablations.

    .venv/bin/python -P bench/reproduce.py                 # 3 seeds (0 1 2)
    .venv/bin/python -P bench/reproduce.py --seeds 0 --quick

Per seed: the task's data (selfreward.tasks.cipher.build), a random-initialised tiny
Llama with a tokenizer trained on the task corpus, then the run's steps (layout.steps:
SFT -> eval of M_1 -> 3 x (generate, judge, pairs, train, eval)) for the normal run and
for two ablations (``spec.ablation``): swapPairs (DPO on every pair with chosen and
rejected swapped) and randomJudge (random verdicts instead of the model's). The
ablations start from the same M_1: the normal run's committed iteration 0 (the SFT
checkpoint and M_1's eval) is copied into their stores, so they do not train it again.

The steps run in-process through ``selfreward.worker.run_phase``, the very function each
`selfreward worker` subprocess of ``selfreward run`` calls (one import of torch per
process instead of one per step, which on 2 cores would be most of the time). Seeds and
runs are spread over ``--jobs`` processes with one torch thread each: the tiny model is
too small for intra-op threads to pay.

Prints, per seed and run, a table per iteration (held-out verifier score at the run's
sampling temperature, judge pairwise accuracy and Spearman rho against the rule scores,
pairs, parse failures, mean lengths), a summary, and as the LAST line the whole table as
one JSON object (issue 8's shape). Asserts nothing; the figures are what it measures.
"""
from __future__ import annotations

import sys

# Run as a script, bench/ comes first on sys.path, where bench/operator.py would shadow
# the standard library's `operator` module: drop it first.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0].rstrip("/") + "/"):
    del sys.path[0]

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

VARIANTS = {"normal": "none", "swapped": "swapPairs", "randomJudge": "randomJudge"}

# The design (see docs/paper-table.md for why each setting is what it is).
DEFAULTS = dict(
    hidden=96, layers=2, heads=4,
    symbols=8, train_prompts=2000, ift=1000, eft=3000, heldout=200, judgeset=32, right=0.4,
    sft_lr=3e-3, sft_epochs=12, sft_batch=32,
    per_iteration=128, responses=4, temperature=1.0, samples=1, judge_temperature=0.3,
    dpo_lr=2e-4, dpo_epochs=2, dpo_batch=16, beta=0.1,
    iterations=3,
)
# --quick: 5 symbols and a smaller model, about a fifth of the SFT compute; --smoke (the
# CI-sized run of tests/test_reproduce.py) is --quick with 1 iteration.
QUICK = dict(symbols=5, train_prompts=200, ift=200, eft=700, heldout=150, judgeset=12, sft_epochs=16, sft_lr=5e-3,
             hidden=64, per_iteration=64, dpo_lr=5e-4)
SMOKE = dict(iterations=1)


def spec_doc(cfg: dict, data: dict[str, str], model_dir: str, store: str, seed: int, ablation: str) -> dict:
    from selfreward.tasks import cipher

    max_answer = cipher.LENGTH + 3  # five symbols and the end of sequence, with a little room
    return {
        "model": {"uri": model_dir},
        "prompts": {"uri": data["prompts"], "perIteration": cfg["per_iteration"]},
        "iterations": cfg["iterations"],
        "seed": seed,
        "ablation": ablation,
        "sft": {"instructionDataUri": data["ift"], "judgeDataUri": data["eft"], "learningRate": cfg["sft_lr"],
                "epochs": cfg["sft_epochs"], "batchSize": cfg["sft_batch"], "maxLength": 128,
                "checkpointing": {"enabled": False}},
        "generation": {"responsesPerPrompt": cfg["responses"], "temperature": cfg["temperature"], "topP": 1.0,
                       "maxNewTokens": max_answer, "batchSize": 64},
        "judge": {"template": cipher.JUDGE_TEMPLATE, "samplesPerResponse": cfg["samples"],
                  "temperature": cfg["judge_temperature"], "topP": 1.0, "maxNewTokens": 32, "batchSize": 64},
        "training": {"learningRate": cfg["dpo_lr"], "epochs": cfg["dpo_epochs"], "batchSize": cfg["dpo_batch"],
                     "beta": cfg["beta"], "maxLength": 128, "seed": seed, "checkpointing": {"enabled": False}},
        "eval": {"prompts": {"uri": data["heldout"]}, "verifier": "selfreward.tasks.cipher:verify",
                 "judgeSet": {"uri": data["judgeset"]},
                 "generation": {"temperature": cfg["temperature"], "topP": 1.0, "maxNewTokens": max_answer,
                                "batchSize": 100}},
        "storage": {"uri": store},
    }


def run_steps(spec, only_iteration: Optional[int] = None) -> None:
    """Every unfinished step of ``spec`` (or of one iteration) in this process, in the
    planner's order, each shard through the worker dispatcher as `selfreward run` does."""
    from selfreward import layout, local, worker
    from selfreward.storage import Store

    store = Store.for_spec(spec)
    local.check_run_json(store, spec)
    for step in layout.steps(spec):
        if only_iteration is not None and step.iteration != only_iteration:
            continue
        if store.exists(layout.summary_path(step.iteration, step.phase)):
            continue
        for shard in range(step.shards) if step.sharded else [None]:
            worker.run_phase(spec, step.phase, step.iteration, shard, step.shards if step.sharded else None,
                             store=store)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):  # a worker dies with the benchmark, even when that is killed
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def base_task(cfg: dict, root: str, seed: int) -> dict:
    """Data, tiny model and iteration 0 (SFT, eval of M_1) of one seed, in the normal run's store."""
    from transformers import AutoTokenizer

    from selfreward import layout
    from selfreward.spec import parse_spec
    from selfreward.storage import Store
    from selfreward.tasks import cipher
    from selfreward.tiny import make_tiny_model

    t0 = time.time()
    d = Path(root) / f"seed-{seed}"
    paths = cipher.build(d / "data", seed, train_prompts=cfg["train_prompts"], ift=cfg["ift"], eft=cfg["eft"],
                         heldout=cfg["heldout"], judgeset=cfg["judgeset"], right=cfg["right"],
                         symbols=cfg["symbols"])
    model_dir = d / "tiny-model"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, seed=seed, corpus=str(paths["corpus"]), hidden_size=cfg["hidden"],
                        layers=cfg["layers"], heads=cfg["heads"])
    bad = cipher.check_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    if bad:
        raise SystemExit(f"seed {seed}: not one token each: {bad}")
    data = {k: str(v) for k, v in paths.items()}
    spec = parse_spec(spec_doc(cfg, data, str(model_dir), str(d / "normal"), seed, "none"), "reproduce")
    run_steps(spec, only_iteration=0)
    m1 = Store.for_spec(spec).read_json(layout.summary_path(0, "eval"))
    return {"seed": seed, "data": data, "model": str(model_dir), "seconds": time.time() - t0, "m1": m1}


def variant_task(cfg: dict, root: str, base: dict, variant: str) -> dict:
    from selfreward import layout, local
    from selfreward.spec import parse_spec
    from selfreward.storage import Store

    t0 = time.time()
    seed = base["seed"]
    d = Path(root) / f"seed-{seed}"
    store_dir = d / variant
    if variant != "normal" and not (store_dir / "iter-0").exists():
        shutil.copytree(d / "normal" / "iter-0", store_dir / "iter-0")  # the same M_1, not trained again
    spec = parse_spec(spec_doc(cfg, base["data"], base["model"], str(store_dir), seed, VARIANTS[variant]),
                      f"reproduce-{variant}")
    run_steps(spec)
    store = Store.for_spec(spec)
    rows = []
    for rec in local.iteration_records(spec, store):
        t = rec.iteration
        ev = store.read_json(layout.summary_path(t, "eval"))
        row = {"model": f"M{t + 1}", "verifierScore": ev.get("verifierScore"),
               "judgePairwiseAccuracy": ev.get("judgePairwiseAccuracy"), "judgeSpearman": ev.get("judgeSpearman"),
               "judgeParseFailureRate": ev.get("judgeParseFailureRate"),
               "meanResponseTokens": ev.get("meanResponseTokens")}
        if t >= 1:
            judge = store.read_json(layout.summary_path(t, "judge"))
            pairs = store.read_json(layout.summary_path(t, "pairs"))
            row.update({"pairs": pairs.get("pairs"), "parseFailures": judge.get("parseFailures"),
                        "verdicts": judge.get("verdicts"), "meanJudgeScore": judge.get("scoreMean"),
                        "chosenMeanScore": pairs.get("chosenMeanScore"),
                        "rejectedMeanScore": pairs.get("rejectedMeanScore"),
                        "genMeanTokens": ev.get("genMeanTokens"), "chosenMeanTokens": ev.get("chosenMeanTokens"),
                        "rejectedMeanTokens": ev.get("rejectedMeanTokens"), "dpoLoss": rec.dpoLoss,
                        "rewardAccuracy": rec.rewardAccuracy})
        rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return {"seed": seed, "variant": variant, "iterations": rows, "seconds": time.time() - t0}


def schedule(cfg: dict, root: str, seeds: list[int], variants: list[str], jobs: int) -> dict:
    """Every seed's base task, then its runs as soon as the base is done, over ``jobs`` processes."""
    results: dict = {s: {} for s in seeds}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        pending = {pool.submit(base_task, cfg, root, s): ("base", s) for s in seeds}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                kind, s = pending.pop(fut)
                res = fut.result()
                if kind == "base":
                    results[s]["base"] = res
                    print(f"seed {s}: data, model and iteration 0 in {res['seconds']:.0f}s (M1: verifier "
                          f"{_fmt(res['m1'].get('verifierScore'), 1)}, judge accuracy "
                          f"{_fmt(res['m1'].get('judgePairwiseAccuracy'))})", flush=True)
                    for v in variants:
                        pending[pool.submit(variant_task, cfg, root, res, v)] = ("run", s)
                else:
                    results[s][res["variant"]] = res
                    print(f"seed {s} {res['variant']}: {res['seconds']:.0f}s, verifier "
                          + " -> ".join(f"{r['verifierScore']:.1f}" for r in res["iterations"]), flush=True)
    return results


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def report(results: dict, seeds: list[int], cfg: dict, wall: float) -> dict:
    cols = (("model", "model", 0), ("verifierScore", "verifier", 1), ("judgePairwiseAccuracy", "judge acc", 3),
            ("judgeSpearman", "judge rho", 3), ("pairs", "pairs", 0), ("parseFailures", "parse fail", 0),
            ("chosenMeanScore", "chosen", 2), ("rejectedMeanScore", "rejected", 2),
            ("meanResponseTokens", "eval tok", 2), ("chosenMeanTokens", "chosen tok", 2),
            ("rejectedMeanTokens", "rej tok", 2))
    out_seeds = []
    for s in seeds:
        r = results[s]
        for variant in [v for v in VARIANTS if v in r]:
            print(f"\nseed {s}, {variant} (spec.ablation {VARIANTS[variant]}), sampling temperature "
                  f"{cfg['temperature']}")
            print("  ".join(f"{label:>10}" for _k, label, _d in cols))
            for row in r[variant]["iterations"]:
                print("  ".join(f"{_fmt(row.get(k), d):>10}" for k, _l, d in cols))
        entry = {"seed": s, "iterations": r["normal"]["iterations"] if "normal" in r else []}
        entry["ablations"] = {v: {"verifierScore": r[v]["iterations"][-1]["verifierScore"],
                                  "iterations": r[v]["iterations"]} for v in ("swapped", "randomJudge") if v in r}
        out_seeds.append(entry)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return round(statistics.fmean(xs), 3) if xs else None

    first = [e["iterations"][0]["verifierScore"] for e in out_seeds if e["iterations"]]
    last = [e["iterations"][-1]["verifierScore"] for e in out_seeds if e["iterations"]]
    summary = {
        "meanVerifierM1": mean(first), "meanVerifierFinal": mean(last),
        "meanGain": mean([b - a for a, b in zip(first, last)]),
        "risesOnEverySeed": all(b > a for a, b in zip(first, last)),
        "meanJudgePairwiseAccuracy": mean([i["judgePairwiseAccuracy"] for e in out_seeds for i in e["iterations"]]),
        "meanSwappedFinal": mean([e["ablations"].get("swapped", {}).get("verifierScore") for e in out_seeds]),
        "meanRandomJudgeFinal": mean([e["ablations"].get("randomJudge", {}).get("verifierScore") for e in out_seeds]),
        "temperature": cfg["temperature"], "wallSeconds": round(wall, 1),
        "cpus": os.cpu_count(), "loadAverage": [round(x, 2) for x in os.getloadavg()],
    }
    print("\nsummary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return {"seeds": out_seeds, "summary": summary, "config": cfg}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="5 symbols, a smaller model and data: a few minutes")
    ap.add_argument("--smoke", action="store_true", help="the CI-sized run of tests/test_reproduce.py: 1 iteration")
    ap.add_argument("--jobs", type=int, default=2, help="processes (one torch thread each)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workdir", help="keep everything here (default: a temporary directory)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=f"design settings: {sorted(DEFAULTS)}")
    args = ap.parse_args(argv)
    cfg = dict(DEFAULTS)
    if args.quick or args.smoke:
        cfg.update(QUICK)
    if args.smoke:
        cfg.update(SMOKE)
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in DEFAULTS:
            ap.error(f"--set {k}: expected one of {sorted(DEFAULTS)}")
        cfg[k] = type(DEFAULTS[k])(v)
    root = args.workdir or tempfile.mkdtemp(prefix="selfreward-reproduce-")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    results = schedule(cfg, root, args.seeds, args.variants, args.jobs)
    doc = report(results, args.seeds, cfg, time.time() - t0)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(doc, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
