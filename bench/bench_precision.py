"""Weights moved per iteration, and where an iteration's time goes, for a bf16 base model:
checkpoints in float32 (what every checkpoint was before the stored dtype was kept)
against checkpoints in the stored bf16, measured side by side in one run; then what
TRL's precomputed reference log-probs save in peak memory during DPO.

    .venv/bin/python -P bench/bench_precision.py                      # 0.5b shape, S3 on loopback
    .venv/bin/python -P bench/bench_precision.py --shape tiny --store file
    .venv/bin/python -P bench/bench_precision.py --skip iteration --ref-shape 0.5b

Part 1 plays iteration 2 of a run whose M_2 is committed in the run's store (on a loopback
SeaweedFS S3 server when the `weed` binary is installed, else file://): generate, judge
and train each start in a fresh model cache, as each phase's pod does, and fetch M_2
(verified), load it, compute, and train commits M_3. Per phase it prints the bytes
fetched, fetch and load seconds, compute seconds and the busy share (compute / phase
wall time: the "GPU busy share" on a GPU), then the bytes per iteration and the ratios
bf16/fp32. Train uses LoRA by default (the merged checkpoint is full size; the memory of
full fine-tuning of a 0.5B model does not fit beside other work on a small machine).

Part 2 runs the same full-parameter DPO twice in child processes (peak resident memory
is the child's own): with the reference model TRL builds (a float32 copy of the policy)
and with training.precomputeRefLogProbs. It prints both peaks, the difference and what
a copy of the weights in float32 weighs, and the same arithmetic for a 7B model.
Prints figures; asserts nothing.
"""
from __future__ import annotations

import sys

# Run as a script, bench/ comes first on sys.path, where bench/operator.py (the operator
# benchmark) would shadow the standard library's `operator` module: drop it first.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0].rstrip("/") + "/"):
    del sys.path[0]

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from selfreward.prompts import packaged_prompts

QUESTIONS = packaged_prompts()  # the workload's prompts, cycled

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {
    "tiny": dict(hidden_size=64, layers=2, heads=4, kv_heads=4, intermediate_size=128),
    "0.1b": dict(hidden_size=768, layers=12, heads=12, kv_heads=4, intermediate_size=2048),
    "0.5b": dict(hidden_size=1024, layers=24, heads=16, kv_heads=4, intermediate_size=5504),
}


def pairs(n: int) -> list[dict]:
    return [{"promptId": f"p{i}", "prompt": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})",
             "chosen": f"A short, careful answer number {i}.", "rejected": "No idea.",
             "chosenScore": 4.0, "rejectedScore": 1.0} for i in range(n)]


def build(shape: str, out: Path) -> tuple[Path, int]:
    from selfreward.tiny import make_tiny_model

    model = make_tiny_model(out, seed=0, dtype="bfloat16", **SHAPES[shape])
    from selfreward.precision import safetensors_dtypes

    params = sum(sum(safetensors_dtypes(f).values()) for f in model.glob("*.safetensors"))
    return model, params


def as_dtype(src: Path, dst: Path, dtype: str) -> Path:
    """A copy of the model with its weights in `dtype` (the checkpoint an old run wrote)."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
    model.save_pretrained(dst)
    return dst


@contextlib.contextmanager
def store_root(kind: str, work: Path):
    if kind == "s3":
        try:
            from s3server import make_bucket, s3_env, s3_server
        except ImportError:
            kind = "file"
        else:
            with s3_server("weed") as endpoint:
                make_bucket(endpoint, "bench")
                saved = {k: os.environ.get(k) for k in s3_env(endpoint)}
                os.environ.update(s3_env(endpoint))
                try:
                    yield "s3://bench/runs", endpoint
                finally:
                    for k, v in saved.items():
                        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
            return
    yield f"file://{work}/store", None


def iteration(variant: str, model_dir: Path, root: str, endpoint, work: Path, args) -> dict:
    """Iteration 2 with M_2 = model_dir committed in the store; per-phase figures."""
    from selfreward import checkpoint, layout, models
    from selfreward.spec import parse_spec
    from selfreward.storage import Store
    from selfreward.worker import run_phase
    from selfreward.worker.train import pairs_path

    seeds = work / "prompts.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": f"{q} ({i})"}) + "\n"
                             for i, q in enumerate(QUESTIONS * (args.prompts // len(QUESTIONS) + 1)) if i < args.prompts))
    spec = parse_spec({
        "model": {"uri": str(model_dir), "dtype": "bfloat16"},
        "prompts": {"uri": str(seeds)},
        "iterations": 2,
        "storage": {"uri": f"{root}/{variant}-{time.time_ns()}", "endpoint": endpoint},
        "generation": {"responsesPerPrompt": 2, "maxNewTokens": args.new_tokens, "batchSize": args.prompts},
        "judge": {"samplesPerResponse": 1, "maxNewTokens": args.new_tokens, "batchSize": 2 * args.prompts,
                  "scorePattern": r"([0-5])"},
        "training": {"mode": args.mode, "maxSteps": 2, "batchSize": 2, "maxLength": 64, "learningRate": 1e-5,
                     "checkpointDtype": "stored"},
    })
    store = Store.for_spec(spec)
    checkpoint.commit(model_dir, store, layout.checkpoint_dir(1, "train"))  # M_2
    store.write_jsonl(pairs_path(2), pairs(8))  # DPO's cost does not depend on where pairs came from
    store.write_json(layout.summary_path(2, "pairs"), {"pairs": 8})
    out = {}
    for phase in ("generate", "judge", "train"):
        os.environ["SELFREWARD_CACHE"] = str(work / f"cache-{variant}-{phase}")  # a fresh pod
        t0 = time.perf_counter()
        local = models.policy_model(spec, store, 2)  # fetch + verify (a no-op on file://: verified in place)
        fetch = time.perf_counter() - t0
        fetched = sum(f.stat().st_size for f in Path(local).rglob("*") if f.is_file())
        t0 = time.perf_counter()
        summary = run_phase(spec, phase, 2, store=store)
        wall = time.perf_counter() - t0
        compute = summary.get("generationSeconds") if phase != "train" else summary.get("trainSeconds")
        upload = summary.get("uploadSeconds", 0.0) if phase == "train" else 0.0
        out[phase] = {"fetchedBytes": fetched, "fetchSeconds": fetch, "computeSeconds": float(compute),
                      "uploadSeconds": upload, "uploadedBytes": summary.get("checkpointBytes", 0) if phase == "train" else 0,
                      "otherSeconds": wall - float(compute) - upload, "wallSeconds": fetch + wall}
    return out


def part_iteration(args, work: Path) -> None:
    base, params = build(args.shape, work / "model-bf16")
    fp32 = as_dtype(base, work / "model-fp32", "float32")
    print(f"model      {args.shape}: {params / 1e6:.1f}M parameters, bf16 base; train mode {args.mode}")
    results = {}
    with store_root(args.store, work) as (root, endpoint):
        print(f"store      {root.split('/runs')[0] if root.startswith('s3') else 'file://'}"
              f"{' (SeaweedFS on loopback)' if endpoint else ''}")
        for variant, model_dir in (("fp32", fp32), ("bf16", base)):
            results[variant] = iteration(variant, model_dir, root, endpoint, work, args)
    for variant, phases in results.items():
        moved = 0
        for phase, f in phases.items():
            moved += f["fetchedBytes"] + f["uploadedBytes"]
            busy = f["computeSeconds"] / f["wallSeconds"]
            print(f"{variant} {phase:9s} fetched {f['fetchedBytes'] / 1e6:8.1f} MB in {f['fetchSeconds']:6.2f}s, "
                  f"load+other {f['otherSeconds']:6.2f}s, compute {f['computeSeconds']:6.2f}s"
                  + (f", upload {f['uploadedBytes'] / 1e6:.1f} MB in {f['uploadSeconds']:.2f}s" if f["uploadedBytes"] else "")
                  + f"; busy share {busy:.1%}")
        phases["moved"] = moved
        wall = sum(f["wallSeconds"] for k, f in phases.items() if k != "moved")
        compute = sum(f["computeSeconds"] for k, f in phases.items() if k != "moved")
        phases["busy"] = compute / wall
        phases["notBusy"] = wall - compute
        print(f"{variant} iteration moves {moved / 1e6:.1f} MB of weights (3 fetches of M_t, 1 commit of M_t+1); "
              f"busy share {phases['busy']:.1%}")
    a, b = results["fp32"], results["bf16"]
    print(f"ratio      bf16/fp32 checkpoints: bytes moved {b['moved'] / a['moved']:.2f}x, time not computing "
          f"{b['notBusy'] / a['notBusy']:.2f}x, busy share {b['busy'] / a['busy']:.2f}x")


def dpo_child(args) -> int:
    """One full-parameter DPO in this process; prints its peak RSS."""
    from selfreward.spec import parse_spec
    from selfreward.storage import Store
    from selfreward.worker import run_phase
    from selfreward.worker.train import pairs_path

    work = Path(args.work)
    spec = parse_spec({
        "model": {"uri": args.model}, "prompts": {"uri": str(work / "unused.jsonl")}, "iterations": 1,
        "storage": {"uri": f"file://{work}/dpo-{args.child}"},
        "training": {"mode": "full", "maxSteps": 2, "batchSize": 2, "maxLength": 64, "bf16": False,
                     "precomputeRefLogProbs": args.child == "precompute", "checkpointDtype": "bfloat16"},
    })
    store = Store.for_spec(spec)
    store.write_jsonl(pairs_path(1), pairs(4))
    summary = run_phase(spec, "train", 1, store=store)
    print("RESULT " + json.dumps({"peakRSS": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                  "samplesPerSecond": summary["samplesPerSecond"]}), flush=True)
    return 0


def part_precompute(args, work: Path) -> None:
    model, params = build(args.ref_shape, work / f"ref-{args.ref_shape}")
    peaks = {}
    for kind in ("reference-model", "precompute"):
        proc = subprocess.run([sys.executable, "-P", __file__, "--child", kind, "--model", str(model),
                               "--work", str(work)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"dpo        {kind}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            return
        peaks[kind] = json.loads(line[len("RESULT "):])
        print(f"dpo        {args.ref_shape} full, {kind:15s} peak RSS {peaks[kind]['peakRSS'] / 2**30:6.2f} GiB, "
              f"{peaks[kind]['samplesPerSecond']:.2f} samples/s")
    saved = peaks["reference-model"]["peakRSS"] - peaks["precompute"]["peakRSS"]
    print(f"dpo        precomputeRefLogProbs: peak {peaks['precompute']['peakRSS'] / peaks['reference-model']['peakRSS']:.2f}x, "
          f"{saved / 2**30:.2f} GiB saved; one float32 copy of {params / 1e6:.0f}M parameters is "
          f"{4 * params / 2**30:.2f} GiB")
    p = 7e9
    full = 4 * p + 4 * p + 8 * p  # fp32 master weights + fp32 gradients + AdamW's two fp32 moments
    print(f"arithmetic 7B full DPO, fp32 master weights: weights {4 * p / 1e9:.0f} GB + grads {4 * p / 1e9:.0f} GB + "
          f"AdamW {8 * p / 1e9:.0f} GB = {full / 1e9:.0f} GB, + reference copy {4 * p / 1e9:.0f} GB = "
          f"{(full + 4 * p) / 1e9:.0f} GB; precomputed: {full / 1e9:.0f} GB ({4 * p / (full + 4 * p):.0%} less), "
          f"before activations")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b", help="part 1's model shape")
    ap.add_argument("--ref-shape", choices=sorted(SHAPES), default="0.1b", help="part 2's model shape")
    ap.add_argument("--store", choices=["s3", "file"], default="s3")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora", help="part 1's training mode")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--skip", action="append", default=[], choices=["iteration", "precompute"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        return dpo_child(args)
    with tempfile.TemporaryDirectory(prefix="selfreward-bench-precision-") as tmp:
        work = Path(tmp)
        if "iteration" not in args.skip:
            part_iteration(args, work)
        if "precompute" not in args.skip:
            part_precompute(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
