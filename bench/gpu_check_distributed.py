"""GPU check of distributed training: the sft/train launcher on real NCCL and FSDP2.

    python bench/gpu_check_distributed.py [--steps 8] [--out DIR]     (make gpu-check-distributed)

On a machine with CUDA GPUs it trains the tiny model's DPO step three ways on the same
pairs and prints the figures:

1. one process, ``training.distributed: none`` (the baseline), per-process batch 4;
2. with two or more GPUs: ``torchrun --nproc-per-node 2`` with ``fsdp``, batch 2 per
   process (the same global batch); with one GPU: ``torchrun --nproc-per-node 1`` with
   ``fsdp`` (FSDP2 over one GPU: the sharding, gathering and rank-0 save path on NCCL);
3. the same FSDP launch with LoRA (the gathered adapter state loaded into a fresh copy,
   merged, saved).

and checks: the FSDP runs report ``parallelism: fsdp2`` (accelerate really sharded),
their loss curves and final weights agree with the baseline (float32, tolerance 1e-3:
NCCL reductions and TF32 kernels differ from one process), exactly one checkpoint is
committed and verifies. Exits 1 if a check fails, 0 with a note (and nothing run)
without a GPU. Figures: wall seconds per run, samples/s, max loss and weight
differences, the ratio of the FSDP run's time to the baseline's.
"""
from __future__ import annotations

import sys

# Run as a script, bench/ comes first on sys.path, where bench/operator.py (the operator
# benchmark) would shadow the standard library's `operator` module: drop it first.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0].rstrip("/") + "/"):
    del sys.path[0]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

TOL = 1e-3


def _pairs(n: int = 32) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?" + " Please." * (i % 3), "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": "I cannot say, it is unclear to me." * (1 + i % 2), "chosenScore": 4.5, "rejectedScore": 1.0}
            for i in range(n)]


def _weights(store, rel: str) -> dict:
    from safetensors.torch import load_file

    from selfreward import checkpoint

    local = checkpoint.fetch(store, rel)
    out = {}
    for f in sorted(Path(local).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _run(out: Path, model: str, name: str, steps: int, nproc: int, **training) -> dict:
    """One train phase (iteration 1) in its own store; returns its summary and figures."""
    from selfreward import checkpoint, distributed, layout
    from selfreward.spec import parse_spec
    from selfreward.storage import Store

    doc = {"model": {"uri": model, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
           "prompts": {"uri": str(out / "unused.jsonl")}, "iterations": 1,
           "storage": {"uri": f"file://{out}/{name}"},
           "training": {"maxLength": 128, "learningRate": 1e-3, "seed": 7, "maxSteps": steps, "bf16": False,
                        **training}}
    spec = parse_spec(doc)
    store = Store.for_spec(spec)
    store.write_jsonl(f"{layout.phase_dir(1, 'pairs')}/pairs.jsonl", _pairs())
    spec_file = out / f"{name}.json"
    spec_file.write_text(json.dumps(doc))
    args = ["worker", "train", "--spec", str(spec_file), "--iteration", "1"]
    if distributed.launches(spec, "train"):
        cmd = distributed.local_launch(sys.executable, nproc, args)
    else:
        cmd = [sys.executable, "-m", "selfreward"] + args
    env = dict(os.environ, SELFREWARD_TERMINATION_LOG=str(out / f"{name}.term.json"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout
    (out / f"{name}.log").write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the launch failed (exit {proc.returncode}); log {out / f'{name}.log'}:\n{log[-3000:]}")
    rel = layout.checkpoint_dir(1, "train")
    checkpoint.verify(store, rel)
    summary = store.read_json(layout.summary_path(1, "train"))
    commits = [ln for ln in log.splitlines() if "iter-1/train: committed" in ln]
    return {"summary": summary, "wall": wall, "commits": commits, "weights": _weights(store, rel)}


def _diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--cpu", action="store_true",
                    help="a dry run of this script on the CPU: 2 processes over gloo, where accelerate runs data "
                         "parallel (parallelism ddp is expected instead of fsdp2)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("gpu_check_distributed: no CUDA GPU here; nothing run (this check is for a GPU machine)")
        return 0
    gpus = torch.cuda.device_count() if not args.cpu else 2
    expected = "ddp" if args.cpu else "fsdp2"
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-dist-"))
    out.mkdir(parents=True, exist_ok=True)
    from selfreward.tiny import make_tiny_model

    model = str(make_tiny_model(out / "tiny", seed=0))
    nproc = 2 if gpus >= 2 else 1
    device = "CPU (dry run)" if args.cpu else torch.cuda.get_device_name(0)
    print(f"gpu_check_distributed: {gpus} GPU(s) ({device}), torch {torch.__version__}; "
          f"FSDP run with {nproc} process(es); work dir {out}")

    failures: list[str] = []
    base = _run(out, model, "single", args.steps, 1, batchSize=4)
    runs = {
        f"fsdp-{nproc}": _run(out, model, f"fsdp-{nproc}", args.steps, nproc, batchSize=4 // nproc, distributed="fsdp"),
        f"fsdp-{nproc}-lora": _run(out, model, f"fsdp-{nproc}-lora", args.steps, nproc, batchSize=4 // nproc,
                                   distributed="fsdp", mode="lora"),
    }
    lora_base = _run(out, model, "single-lora", args.steps, 1, batchSize=4, mode="lora")
    rows = [("single", base, None)] + [(n, r, lora_base if n.endswith("lora") else base) for n, r in runs.items()] \
        + [("single-lora", lora_base, None)]
    for name, r, ref in rows:
        s = r["summary"]
        line = (f"  {name:16s} wall {r['wall']:6.1f}s  train {s['trainSeconds']:6.2f}s  {s['samplesPerSecond']:8.1f} "
                f"samples/s  processes {s['processes']}  parallelism {s['parallelism']}")
        if ref is not None:
            dl = max(abs(a - b) for a, b in zip(s["lossCurve"], ref["summary"]["lossCurve"]))
            dw = _diff(r["weights"], ref["weights"])
            line += f"  max|dloss| {dl:.2e}  max|dweight| {dw:.2e}  time ratio {r['wall'] / ref['wall']:.2f}"
            if s["parallelism"] != expected:
                failures.append(f"{name}: parallelism {s['parallelism']}, not {expected}")
            if len(s["lossCurve"]) != len(ref["summary"]["lossCurve"]) or dl > TOL:
                failures.append(f"{name}: loss curve differs from one process by {dl:.2e} (> {TOL})")
            if dw > TOL:
                failures.append(f"{name}: final weights differ from one process by {dw:.2e} (> {TOL})")
            if len(r["commits"]) != 1 or "(rank 0 of" not in r["commits"][0]:
                failures.append(f"{name}: expected one commit by rank 0, saw {r['commits']}")
        print(line)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("gpu_check_distributed: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
