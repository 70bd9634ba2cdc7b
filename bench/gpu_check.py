"""The GPU check: a random-initialised Llama-shaped model stored in bfloat16 goes through
generate, judge, DPO and a checkpoint commit on one device, with no downloads.

    make gpu-check                 # .venv/bin/python -P bench/gpu_check.py --device cuda  (1.2B shape)
    make gpu-check DEVICE=cpu      # the same script, a small shape, on the CPU (runs in CI)

What it does, in order (every phase is the worker's own code, `run_phase`, on a file://
store in a temporary directory):

1. builds the model with `selfreward.tiny.make_tiny_model(dtype="bfloat16")` (an offline
   tokenizer, random weights) and checks that its safetensors headers say BF16;
2. generate: transformers batched generation (the generate phase) against a per-prompt
   loop of the same backend on a subset, tokens/s of both and their ratio;
3. judge: the judge phase over the generated responses, verdicts/s;
4. DPO, three ways on the same pairs, one after the other: the train phase as a run configures it (float32 master weights, bf16 autocast
   on a GPU), the same with training.precomputeRefLogProbs, and TRL's DPOConfig defaults
   (DPOTrainer given the model path, nothing else set); samples/s and peak memory;
5. the checkpoint the train phase committed: its safetensors headers and config.json say
   bfloat16, its weight bytes are 2 per parameter, and most weights moved.

It prints one line per figure and exits 1 with a FAIL line for each failed check (a wrong
dtype, a checkpoint of the wrong size, no learning, a phase that failed).
"""
from __future__ import annotations

import sys

# Run as a script, bench/ comes first on sys.path, where bench/operator.py (the operator
# benchmark) would shadow the standard library's `operator` module: drop it first.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0].rstrip("/") + "/"):
    del sys.path[0]

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from selfreward.prompts import packaged_prompts

QUESTIONS = packaged_prompts()  # the workload's prompts, cycled

# make_tiny_model arguments per shape. 1.2b: a Llama-3.2-1B-like layout (GQA 32/8 heads)
# with the offline tokenizer's small vocabulary (so the embedding is a sliver of it).
SHAPES = {
    "cpu": dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128),
    "0.5b": dict(hidden_size=1024, layers=24, heads=16, kv_heads=4, intermediate_size=5504),
    "1.2b": dict(hidden_size=2048, layers=16, heads=32, kv_heads=8, intermediate_size=8192),
    "3b": dict(hidden_size=3072, layers=28, heads=24, kv_heads=8, intermediate_size=8192),
}
# (prompts, responses per prompt, max new tokens, judge tokens, loop prompts, pairs, DPO max length, DPO steps)
WORKLOAD = {
    "cpu": dict(prompts=8, n=2, new_tokens=16, judge_tokens=8, loop_prompts=4, pairs=16, max_length=128, steps=4),
    "cuda": dict(prompts=64, n=4, new_tokens=128, judge_tokens=64, loop_prompts=8, pairs=64, max_length=512, steps=8),
}
# DPO's learning-rate for the learning check: large enough that 4-8 steps of float32
# master weights move most bf16-stored weights by a bf16 step (pure bf16 moves ~30%).
CHECK_LR = 3e-5
MIN_CHANGED = 0.5


# --- checks (also used by tests/test_gpu_check.py) ---

def header_dtypes(model_dir: Path) -> dict[str, int]:
    """{safetensors dtype: element count} over the directory's weight files."""
    import struct

    out: dict[str, int] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            count = 1
            for d in v["shape"]:
                count *= d
            out[v["dtype"]] = out.get(v["dtype"], 0) + count
    return out


def check_checkpoint(model_dir: Path, want: str = "BF16", config_dtype: str = "bfloat16") -> list[str]:
    """Failures of a checkpoint that should be stored in `want`: every tensor in that
    dtype, config.json saying so, and 2 (bf16) / 4 (fp32) bytes per parameter."""
    failures = []
    dtypes = header_dtypes(model_dir)
    if set(dtypes) != {want}:
        failures.append(f"{model_dir.name}: safetensors dtypes {sorted(dtypes)}, expected only {want}")
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    got = cfg.get("dtype") or cfg.get("torch_dtype")
    if got != config_dtype:
        failures.append(f"{model_dir.name}: config.json dtype {got!r}, expected {config_dtype!r}")
    params = sum(dtypes.values())
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    per = {"BF16": 2, "F16": 2, "F32": 4}[want]
    if not params or not (per * params <= size <= per * params * 1.01 + 1_000_000):
        failures.append(f"{model_dir.name}: {size} weight bytes for {params} parameters, expected {per} per parameter")
    return failures


def changed_fraction(base: Path, trained: Path) -> float:
    """The fraction of stored weights (elements) that differ between two checkpoints."""
    from safetensors import safe_open

    changed = total = 0
    for f in sorted(Path(base).glob("*.safetensors")):
        with safe_open(str(f), "pt") as a, safe_open(str(Path(trained) / f.name), "pt") as b:
            for k in a.keys():
                x, y = a.get_tensor(k), b.get_tensor(k)
                changed += int((x != y).sum())
                total += x.numel()
    return changed / total if total else 0.0


def check_learning(base: Path, trained: Path, minimum: float = MIN_CHANGED) -> tuple[float, list[str]]:
    frac = changed_fraction(base, trained)
    if frac < minimum:
        return frac, [f"no learning: DPO changed {frac:.1%} of the stored weights (expected at least {minimum:.0%})"]
    return frac, []


# --- phases ---

class PeakMemory:
    """Peak memory of one block: GPU bytes allocated on CUDA (exact), the process's peak
    resident set on the CPU (VmHWM, reset through /proc/self/clear_refs; includes the
    allocator's reuse of memory freed earlier, so it is a rough figure)."""

    def __init__(self, device: str):
        self.device = device

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> "PeakMemory":
        import torch

        from selfreward.training import free_memory

        free_memory()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        import torch

        self.peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else self._status("VmHWM")
        self.above_start = self.peak - self.start


def spec_for(model_dir: Path, work: Path, wl: dict, **training) -> "object":
    from selfreward.spec import parse_spec

    seeds = work / "prompts.jsonl"
    if not seeds.exists():
        asks = [f"{q} (take {i // len(QUESTIONS)})" for i, q in
                enumerate((QUESTIONS * (wl["prompts"] // len(QUESTIONS) + 1))[:wl["prompts"]])]
        seeds.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in asks))
    return parse_spec({
        "model": {"uri": str(model_dir), "dtype": "bfloat16"},
        "prompts": {"uri": str(seeds)},
        "iterations": 1,
        "storage": {"uri": f"file://{work}/store"},
        "generation": {"responsesPerPrompt": wl["n"], "maxNewTokens": wl["new_tokens"], "batchSize": wl["prompts"]},
        "judge": {"samplesPerResponse": 1, "maxNewTokens": wl["judge_tokens"], "batchSize": wl["prompts"] * wl["n"],
                  "scorePattern": r"([0-5])"},
        "training": {"batchSize": 4, "maxLength": wl["max_length"], "maxSteps": wl["steps"],
                     "learningRate": CHECK_LR, **training},
    })


def synthetic_pairs(n: int) -> list[dict]:
    """Pairs with distinct chosen/rejected texts: a random model's verdicts rarely make
    pairs, and DPO's speed and memory do not depend on where pairs came from."""
    return [{"promptId": f"p{i}", "prompt": f"{QUESTIONS[i % len(QUESTIONS)]} (take {i})",
             "chosen": f"A careful answer to question {i}: " + "it depends on several factors. " * 6,
             "rejected": "I do not know. " * 4, "chosenScore": 4.0, "rejectedScore": 1.0} for i in range(n)]


def dpo(kind: str, device: str, model_dir: Path, work: Path, wl: dict) -> dict:
    """One DPO configuration on the same pairs: figures, and (ours) the checkpoint."""
    pairs = synthetic_pairs(wl["pairs"])
    with PeakMemory(device) as mem:
        if kind == "trl-defaults":
            from datasets import Dataset
            from transformers import AutoTokenizer
            from trl import DPOConfig, DPOTrainer

            # TRL's defaults; only what a CPU needs (use_cpu, and no bf16 on a CPU without it)
            config = DPOConfig(output_dir=str(work / "trl-out"), max_steps=wl["steps"], report_to="none",
                               save_strategy="no", use_cpu=device == "cpu", disable_tqdm=True)
            tok = AutoTokenizer.from_pretrained(model_dir)
            rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
            trainer = DPOTrainer(model=str(model_dir), args=config, train_dataset=Dataset.from_list(rows),
                                 processing_class=tok)
            t0 = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t0
            samples = trainer.state.global_step * config.per_device_train_batch_size * config.gradient_accumulation_steps
            out = {"samplesPerSecond": samples / seconds, "batch": config.per_device_train_batch_size,
                   "bf16": config.bf16, "gradientCheckpointing": config.gradient_checkpointing}
            del trainer
        else:
            from selfreward import checkpoint, layout
            from selfreward.storage import Store
            from selfreward.worker import run_phase
            from selfreward.worker.train import pairs_path

            training = {"precomputeRefLogProbs": True} if kind == "precompute" else {}
            spec = spec_for(model_dir, work, wl, **training)
            spec.storage.uri = f"file://{work}/store-{kind}"
            store = Store.for_spec(spec)
            store.write_jsonl(pairs_path(1), pairs)
            summary = run_phase(spec, "train", 1, store=store)
            out = {"samplesPerSecond": summary["samplesPerSecond"], "batch": summary["batchSize"],
                   "bf16": summary["bf16"], "checkpoint": checkpoint.fetch(store, layout.checkpoint_dir(1, "train")),
                   "checkpointBytes": summary["checkpointBytes"], "checkpointDtype": summary["checkpointDtype"],
                   "uploadMBps": summary.get("uploadMBps")}
    out["peakBytes"] = mem.above_start
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 1.2b on cuda, cpu on cpu")
    args = ap.parse_args()
    os.environ["SELFREWARD_DEVICE"] = args.device
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL no CUDA device is visible (use DEVICE=cpu for the CPU dry run)")
        return 1
    shape = args.shape or ("1.2b" if args.device == "cuda" else "cpu")
    wl = WORKLOAD[args.device]
    failures: list[str] = []
    started = time.perf_counter()
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory(prefix="selfreward-gpu-check-") as tmp:
        work = Path(tmp)
        from selfreward.tiny import make_tiny_model

        t0 = time.perf_counter()
        model_dir = make_tiny_model(work / "model", seed=0, dtype="bfloat16", **SHAPES[shape])
        dtypes = header_dtypes(model_dir)
        params = sum(dtypes.values())
        print(f"model      {shape}: {params / 1e9:.3f}B parameters stored as {sorted(dtypes)} "
              f"({time.perf_counter() - t0:.1f}s to build), device {where}, torch {torch.__version__}")
        failures += check_checkpoint(model_dir)

        from selfreward.backends.hf import TransformersBackend
        from selfreward.storage import Store
        from selfreward.worker import run_phase
        from selfreward.worker.judge import read_phase_records

        spec = spec_for(model_dir, work, wl)
        store = Store.for_spec(spec)
        gen = run_phase(spec, "generate", 1, store=store)
        print(f"generate   batched ({wl['prompts']} prompts x {wl['n']}, {wl['new_tokens']} new tokens): "
              f"{gen['tokensPerSecond']:.1f} tokens/s, {gen['truncatedResponses']}/{gen['responses']} truncated, "
              f"phase {gen['durationSeconds']:.1f}s with the model load")
        asks = [r["prompt"] for r in read_phase_records(store, 1, "generate")][:wl["loop_prompts"]]
        with TransformersBackend(str(model_dir), dtype="bfloat16", batch_size=1) as loop:
            loop.generate(asks[:1], n=1, max_new_tokens=2, seed=0)  # warm-up
            start_tokens = loop.generated_tokens
            t0 = time.perf_counter()
            for i, p in enumerate(asks):
                loop.generate([p], n=1, temperature=0.7, top_p=0.9, max_new_tokens=wl["new_tokens"], seed=i)
            loop_rate = (loop.generated_tokens - start_tokens) / (time.perf_counter() - t0)
        print(f"generate   per-prompt loop ({len(asks)} prompts x 1): {loop_rate:.1f} tokens/s; "
              f"batched/loop = {gen['tokensPerSecond'] / max(loop_rate, 1e-9):.1f}x")
        judge = run_phase(spec, "judge", 1, store=store)
        print(f"judge      {judge['verdicts']} verdicts: {judge['verdictsPerSecond']:.2f} verdicts/s, "
              f"{judge['tokensPerSecond']:.1f} tokens/s, parse failures {judge['parseFailures']}/{judge['verdicts']}")

        results = {}
        for kind in ("ours", "precompute", "trl-defaults"):
            try:
                results[kind] = dpo(kind, args.device, model_dir, work, wl)
            except Exception as e:  # a configuration that fails is a failed check, the others still run
                failures.append(f"DPO {kind}: {e}")
                continue
            r = results[kind]
            print(f"dpo        {kind:13s} {r['samplesPerSecond']:8.2f} samples/s, batch {r['batch']}, bf16 {r['bf16']}, "
                  f"peak {r['peakBytes'] / 2**30:.3f} GiB above the start "
                  f"({'GPU allocated' if args.device == 'cuda' else 'process RSS, rough'})")
        if "ours" in results and "trl-defaults" in results:
            a, b = results["ours"], results["trl-defaults"]
            print(f"dpo        ours/TRL defaults: samples/s {a['samplesPerSecond'] / b['samplesPerSecond']:.2f}x, "
                  f"peak memory {a['peakBytes'] / b['peakBytes']:.2f}x")
        if "ours" in results and "precompute" in results:
            a, b = results["ours"], results["precompute"]
            print(f"dpo        precomputed reference log-probs: peak memory {b['peakBytes'] / a['peakBytes']:.2f}x, "
                  f"{(a['peakBytes'] - b['peakBytes']) / 2**30:+.2f} GiB saved; samples/s "
                  f"{b['samplesPerSecond'] / a['samplesPerSecond']:.2f}x (the precompute pass is outside training)")
        if "ours" in results:
            ckpt = Path(results["ours"]["checkpoint"])
            failures += check_checkpoint(ckpt)
            frac, learn = check_learning(model_dir, ckpt)
            failures += learn
            print(f"checkpoint {results['ours']['checkpointBytes'] / 1e9:.3f} GB committed, dtype "
                  f"{results['ours']['checkpointDtype']} ({sorted(header_dtypes(ckpt))}), upload "
                  f"{results['ours']['uploadMBps']} MB/s; {frac:.1%} of stored weights changed by "
                  f"{wl['steps']} DPO steps at lr {CHECK_LR:g}")
    print(f"total      {time.perf_counter() - started:.1f}s")
    for f in failures:
        print(f"FAIL {f}")
    print("gpu-check: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
