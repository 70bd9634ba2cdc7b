"""Figures of the training phases on this machine: DPO samples/s (full and LoRA) on
random Llamas of two sizes, and checkpoint commit/fetch MB/s to a local store and to a
real S3 server (SeaweedFS on loopback, from tests/s3server.py).

    .venv/bin/python bench/bench_train.py [--pairs 64] [--ckpt-hidden 768 --ckpt-layers 6]

Prints one line per figure; nothing is asserted (speed belongs here, not in tests)."""
from __future__ import annotations

import sys

# Run as a script, bench/ comes first on sys.path, where bench/operator.py (the operator
# benchmark) would shadow the standard library's `operator` module: drop it first.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0].rstrip("/") + "/"):
    del sys.path[0]

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def dpo_figures(model_dir: str, work: Path, pairs: int, mode: str, batch: int, max_length: int) -> dict:
    from selfreward.spec import parse_spec
    from selfreward.storage import Store
    from selfreward.worker import run_phase
    from selfreward.worker.train import pairs_path

    spec = parse_spec({
        "model": {"uri": model_dir},
        "prompts": {"uri": str(work / "unused.jsonl")},
        "iterations": 1,
        "storage": {"uri": f"file://{work}/dpo-{mode}-{time.time_ns()}"},
        "training": {"mode": mode, "batchSize": batch, "maxLength": max_length, "epochs": 1, "learningRate": 1e-4},
    })
    store = Store.for_spec(spec)
    store.write_jsonl(pairs_path(1), [
        {"prompt": f"Explain, briefly, why the number {i} is interesting in arithmetic.",
         "chosen": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}, and {i} times two is {2 * i}.",
         "rejected": "I am not sure what you mean by that question at all.",
         "chosenScore": 4.0, "rejectedScore": 1.0} for i in range(pairs)])
    return run_phase(spec, "train", 1, store=store)


def commit_figures(model_dir: str, store, rel: str, cache: Path) -> tuple[dict, float]:
    from selfreward import checkpoint

    figures = checkpoint.commit(model_dir, store, rel)
    t0 = time.perf_counter()
    checkpoint.fetch(store, rel, cache=cache)
    return figures, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--ckpt-hidden", type=int, default=768)
    ap.add_argument("--ckpt-layers", type=int, default=6)
    args = ap.parse_args()

    import torch

    from selfreward.tiny import make_tiny_model

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}, "
          f"cpus {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="selfreward-bench-") as tmp:
        work = Path(tmp)
        sizes = {"tiny (h64 x2)": dict(hidden_size=64, layers=2), "small (h256 x4)": dict(hidden_size=256, layers=4)}
        for label, kw in sizes.items():
            model_dir = str(make_tiny_model(work / label.split()[0], **kw))
            for mode in ("full", "lora"):
                s = dpo_figures(model_dir, work, args.pairs, mode, args.batch, args.max_length)
                print(f"DPO {label:16s} {mode:4s}: {s['pairs']} pairs, {s['steps']} steps, "
                      f"{s['samplesPerSecond']:.1f} pairs/s, {s.get('tokensPerSecond', 0):.0f} tokens/s, "
                      f"train {s['trainSeconds']:.2f}s, checkpoint {s['checkpointBytes'] / 1e6:.1f} MB")

        big = str(make_tiny_model(work / "ckpt-model", hidden_size=args.ckpt_hidden, layers=args.ckpt_layers,
                                  heads=max(4, args.ckpt_hidden // 64)))
        size_mb = sum(p.stat().st_size for p in Path(big).iterdir()) / 1e6
        from selfreward.storage import Store

        local = Store(f"file://{work}/store")
        f, fetch_s = commit_figures(big, local, "ckpt", work / "cache-local")
        print(f"checkpoint {size_mb:.0f} MB -> local store: commit {f['uploadMBps']:.0f} MB/s, "
              f"verify-in-place {size_mb / fetch_s:.0f} MB/s")

        from s3server import make_bucket, s3_env, s3_server

        with s3_server() as endpoint:
            make_bucket(endpoint, "bench")
            os.environ.update(s3_env(endpoint))
            s3 = Store("s3://bench/run", endpoint)
            f, fetch_s = commit_figures(big, s3, "ckpt", work / "cache-s3")
            print(f"checkpoint {size_mb:.0f} MB -> S3 (weed, loopback): upload {f['uploadMBps']:.0f} MB/s, "
                  f"fetch+verify {size_mb / fetch_s:.0f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
