"""Throughput of the whole pipeline on this machine: generation tokens/s per backend,
judge verdicts/s, DPO samples/s, checkpoint upload MB/s (file:// and a local SeaweedFS
S3), the wall time of one iteration split by phase, and judge.colocate against a judge
Job of its own: weights moved and model loads per iteration, as a ratio from one run.

    .venv/bin/python -P bench/pipeline.py                 # the tiny model (CPU is fine)
    .venv/bin/python -P bench/pipeline.py --shape 0.5b    # a random Llama of ~0.5B params (GPU)
    .venv/bin/python -P bench/pipeline.py --skip backends --skip iteration --skip upload   # colocate only

The colocate part plays iteration 2 of a run whose M_2 is committed in its store (S3 on
loopback) pod by pod, each pod a worker process with a fresh model cache (a node without
resources.modelCache): `shards` generate pods, then `shards` judge pods or none
(colocated), then train (LoRA, 2 steps, fixed pairs: its cost is the same either way).

The iteration runs as `selfreward run` runs it: every phase a worker subprocess, so
the per-phase figures include each worker's start-up (imports, model load); the phase
summaries' own durationSeconds (the work itself) are printed next to them. Nothing is
downloaded: the 0.5b shape (hidden 1024, 24 layers, MLP 5504, vocab of the offline
tokenizer) is built with random weights (-P keeps bench/ itself off sys.path: a
script there named like a stdlib module would shadow it); its small vocabulary under-represents the
embedding/logits cost of a real 0.5B model. Prints figures; asserts nothing.
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
import sys
import tempfile
import time
from pathlib import Path

from selfreward.prompts import packaged_prompts

QUESTIONS = packaged_prompts()  # the workload's prompts, cycled

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "0.5b": dict(hidden_size=1024, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4),
}


def build_model(shape: str, out: Path) -> tuple[Path, int]:
    """The tiny model's tokenizer, with random weights of the shape asked for."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from selfreward.tiny import make_tiny_model

    make_tiny_model(out, seed=0)
    if shape == "tiny":
        model = LlamaForCausalLM.from_pretrained(out)
        return out, sum(p.numel() for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                         **SHAPES[shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    model.save_pretrained(out, safe_serialization=True)
    return out, sum(p.numel() for p in model.parameters())


def bench_backends(model_dir: Path, prompts: int, n: int, max_new_tokens: int, batch: int) -> None:
    from selfreward.backends import make_backend

    asks = (QUESTIONS * (prompts // len(QUESTIONS) + 1))[:prompts]
    for name in ("transformers", "transformers-cb", "vllm"):
        try:
            with make_backend(name, str(model_dir), "auto", batch) as backend:
                backend.generate(asks[:1], n=1, temperature=0.8, max_new_tokens=4, seed=0)  # warm-up
                start_tokens = backend.generated_tokens
                t0 = time.perf_counter()
                backend.generate(asks, n=n, temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens, seed=1)
                dt = time.perf_counter() - t0
                toks = backend.generated_tokens - start_tokens
            print(f"generation  {name:16s} {toks / dt:10.1f} tokens/s  ({prompts} prompts x {n}, "
                  f"{toks} tokens in {dt:.2f}s, batch {batch})")
        except Exception as e:  # a backend this machine cannot run
            print(f"generation  {name:16s}   unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}")


def bench_iteration(model_dir: Path, work: Path, prompts: int, max_new_tokens: int, judge_tokens: int) -> None:
    from selfreward import layout
    from selfreward.local import run_local
    from selfreward.spec import parse_spec
    from selfreward.storage import Store

    seeds = work / "prompts.jsonl"
    asks = [q if i < len(QUESTIONS) else f"{q} (variant {i // len(QUESTIONS)})"
            for i, q in enumerate((QUESTIONS * (prompts // len(QUESTIONS) + 1))[:prompts])]
    seeds.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in asks))
    spec = parse_spec({
        "model": {"uri": str(model_dir)},
        "prompts": {"uri": str(seeds)},
        "iterations": 1,
        "storage": {"uri": f"file://{work}/iteration"},
        "generation": {"responsesPerPrompt": 4, "maxNewTokens": max_new_tokens, "batchSize": 16},
        # the default rubric template; a random model writes digits now and then: a one-digit
        # pattern lets some verdicts score, so pairs (and DPO) exist
        "judge": {"samplesPerResponse": 3, "maxNewTokens": judge_tokens, "batchSize": 16,
                  "scorePattern": r"([0-5])"},
        "training": {"batchSize": 4, "maxLength": 1024, "learningRate": 1e-6},
    })
    t0 = time.perf_counter()
    with open(work / "runner.log", "w") as log, contextlib.redirect_stdout(log):
        rc = run_local(spec, "bench", quiet=True, state_dir=work / "state")
    wall = time.perf_counter() - t0
    store = Store.for_spec(spec)
    if rc != 0:
        print(f"iteration   failed (exit {rc}); see {work / 'state' / 'logs'}")
        return
    print(f"iteration   one iteration, {prompts} prompts x 4 responses x 3 verdicts: {wall:.1f}s wall")
    work_total = 0.0
    for step in layout.steps(spec):
        s = store.read_json(layout.summary_path(step.iteration, step.phase))
        extra = ""
        if step.phase == "generate":
            extra = f"{s.get('tokensPerSecond', 0):.1f} tokens/s, {s.get('generatedTokens')} tokens"
        elif step.phase == "judge":
            extra = (f"{s.get('verdictsPerSecond', 0):.2f} verdicts/s, {s.get('tokensPerSecond', 0):.1f} tokens/s, "
                     f"parse failures {s.get('parseFailures')}/{s.get('verdicts')}")
        elif step.phase == "pairs":
            extra = f"{s.get('pairs')} pairs"
        elif step.phase == "train":
            extra = f"DPO {s.get('samplesPerSecond', 0):.2f} samples/s, {s.get('steps')} steps, upload {s.get('uploadMBps')} MB/s"
        print(f"  phase {step.phase:9s} work {s.get('durationSeconds', 0):7.2f}s   {extra}")
        work_total += float(s.get("durationSeconds", 0))
    print(f"  phases' work {work_total:.1f}s; worker start-up, model loads and commits {wall - work_total:.1f}s")


def _pod(args: list[str], spec_file: Path, cache: Path, env: dict) -> float:
    """One Job pod: `selfreward worker ...` in a process of its own with a fresh model
    cache (a node without resources.modelCache); its wall seconds."""
    import os
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "selfreward", "worker", *args, "--spec", str(spec_file),
                           "--iteration", "2"], env={**os.environ, **env, "SELFREWARD_CACHE": str(cache)},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def _cache_bytes(cache: Path) -> int:
    return sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.exists() else 0


def colocate_iteration(variant: str, model_dir: Path, work: Path, root: str, endpoint: str, env: dict,
                       prompts: int, max_new_tokens: int, judge_tokens: int, shards: int) -> dict:
    """Iteration 2 of a run whose M_2 is committed in its store, pod by pod, as the
    operator runs it: generate (and, colocated, judge) shards, judge shards, train."""
    from selfreward import checkpoint, layout
    from selfreward.spec import parse_spec
    from selfreward.storage import Store
    from selfreward.worker.train import pairs_path

    seeds = work / "colocate-prompts.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": f"{q} ({i})"}) + "\n"
                             for i, q in enumerate((QUESTIONS * (prompts // len(QUESTIONS) + 1))[:prompts])))
    spec = parse_spec({
        "model": {"uri": str(model_dir)},
        "prompts": {"uri": str(seeds)},
        "iterations": 2,
        "storage": {"uri": f"{root}/{variant}-{time.time_ns()}", "endpoint": endpoint},
        "generation": {"responsesPerPrompt": 4, "maxNewTokens": max_new_tokens, "batchSize": 16, "shards": shards},
        "judge": {"samplesPerResponse": 3, "maxNewTokens": judge_tokens, "batchSize": 16, "shards": shards,
                  "colocate": variant == "colocated", "scorePattern": r"([0-5])"},
        "training": {"mode": "lora", "maxSteps": 2, "batchSize": 2, "maxLength": 64, "checkpointDtype": "stored"},
    })
    store = Store.for_spec(spec)
    checkpoint.commit(model_dir, store, layout.checkpoint_dir(1, "train"))  # M_2
    spec_file = work / f"colocate-{variant}.json"
    spec_file.write_text(json.dumps(spec.model_dump(mode="json")))
    pods = [(f"generate-{i}", ["generate", "--shard", str(i), "--num-shards", str(shards)]) for i in range(shards)]
    if variant == "separate":
        pods += [(f"judge-{i}", ["judge", "--shard", str(i), "--num-shards", str(shards)]) for i in range(shards)]
    pods.append(("train", ["train"]))
    out: dict = {"fetched": 0, "wall": 0.0, "genJudgeWall": 0.0, "pods": len(pods)}
    for name, args in pods:
        if name == "train":  # DPO's cost does not depend on which pairs: fixed ones, always some
            store.write_jsonl(pairs_path(2), [{"promptId": f"p{i}", "prompt": QUESTIONS[i], "chosen": "A careful answer.",
                                               "rejected": "No.", "chosenScore": 4.0, "rejectedScore": 1.0}
                                              for i in range(8)])
            store.write_json(layout.summary_path(2, "pairs"), {"pairs": 8})
        cache = work / f"cache-{variant}-{name}"
        wall = _pod(args, spec_file, cache, env)
        out["fetched"] += _cache_bytes(cache)
        out["wall"] += wall
        if name != "train":
            out["genJudgeWall"] += wall
    summaries = {phase: store.read_json(layout.summary_path(2, phase)) for phase in ("generate", "judge", "train")}
    out["loads"] = {phase: int(s.get("modelLoads", 0)) for phase, s in summaries.items()}
    out["uploaded"] = int(summaries["train"].get("checkpointBytes", 0))
    out["moved"] = out["fetched"] + out["uploaded"]
    return out


def bench_colocate(model_dir: Path, work: Path, prompts: int, max_new_tokens: int, judge_tokens: int,
                   shards: int) -> None:
    """judge.colocate against a judge Job of its own, side by side in one run, on S3 on
    loopback (SeaweedFS, else moto): weights fetched and committed per iteration, model
    loads (the summaries' modelLoads), and the wall time of the generate and judge pods."""
    import os

    from s3server import make_bucket, s3_env, s3_server

    with s3_server() as endpoint:
        make_bucket(endpoint, "bench")
        env = s3_env(endpoint)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the commit of M_2 from this process
        try:
            res = {v: colocate_iteration(v, model_dir, work, "s3://bench/colocate", endpoint, env, prompts,
                                         max_new_tokens, judge_tokens, shards) for v in ("separate", "colocated")}
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    for v, r in res.items():
        loads = sum(r["loads"].values())
        print(f"colocate    {v:9s} {r['pods']} pods ({shards} generate shards): weights moved {r['moved'] / 1e6:8.1f} MB "
              f"(fetched {r['fetched'] / 1e6:.1f}, committed {r['uploaded'] / 1e6:.1f}); model loads {loads} "
              f"(generate {r['loads']['generate']}, judge {r['loads']['judge']}, train {r['loads']['train']}); "
              f"generate+judge pods {r['genJudgeWall']:.1f}s, iteration {r['wall']:.1f}s")
    a, b = res["separate"], res["colocated"]
    print(f"colocate    M_t is {_cache_bytes(model_dir) / 1e6:.1f} MB; every pod fetches it once into its own cache")
    print(f"colocate    ratio colocated/separate: weights moved {b['moved'] / a['moved']:.2f}x, model loads "
          f"{sum(b['loads'].values()) / sum(a['loads'].values()):.2f}x, generate+judge wall "
          f"{b['genJudgeWall'] / a['genJudgeWall']:.2f}x, iteration wall {b['wall'] / a['wall']:.2f}x")


def upload_dir(model_dir: Path, work: Path, min_mb: int) -> Path:
    """The model directory, or, when its weights are under min_mb, a checkpoint-shaped
    directory with min_mb of random float16 weights (the tiny model is too small for
    a throughput figure)."""
    import torch
    from safetensors.torch import save_file

    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    if size >= min_mb * 1e6:
        return model_dir
    out = work / "upload-ckpt"
    out.mkdir()
    torch.manual_seed(0)
    save_file({"w": torch.randn(int(min_mb * 1e6) // 2, dtype=torch.float16)}, str(out / "model.safetensors"))
    (out / "config.json").write_text("{}")
    return out


def bench_upload(model_dir: Path, work: Path, repeats: int) -> None:
    from selfreward import checkpoint
    from selfreward.storage import Store

    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) / 1e6

    def best(store: Store) -> float:
        rates = []
        for i in range(repeats):
            t0 = time.perf_counter()
            checkpoint.commit(model_dir, store, f"ckpt-{i}")
            rates.append(size / (time.perf_counter() - t0))
        return max(rates)

    print(f"checkpoint  file://          {best(Store(f'file://{work}/ckpt')):10.1f} MB/s  ({size:.1f} MB, "
          f"best of {repeats}, sha256 + copy + manifest)")
    try:
        import os

        from s3server import make_bucket, s3_env, s3_server

        with s3_server("weed") as endpoint:
            make_bucket(endpoint, "bench")
            saved = {k: os.environ.get(k) for k in s3_env(endpoint)}
            os.environ.update(s3_env(endpoint))
            try:
                rate = best(Store("s3://bench/ckpt", endpoint))
            finally:
                for k, v in saved.items():
                    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        print(f"checkpoint  s3:// (weed)     {rate:10.1f} MB/s  ({size:.1f} MB, best of {repeats}, loopback SeaweedFS)")
    except Exception as e:
        print(f"checkpoint  s3:// (weed)       unavailable: {type(e).__name__}: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--prompts", type=int, default=32, help="prompts of the backend comparison and the iteration")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--judge-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--upload-mb", type=int, default=256, help="smallest checkpoint the upload figure uses")
    ap.add_argument("--shards", type=int, default=2, help="generate (and judge) shards of the colocate comparison")
    ap.add_argument("--skip", action="append", default=[], choices=["backends", "iteration", "upload", "colocate"])
    args = ap.parse_args()

    import torch

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory(prefix="selfreward-bench-") as tmp:
        work = Path(tmp)
        model_dir, params = build_model(args.shape, work / "model")
        print(f"model       {args.shape}: {params / 1e6:.1f}M parameters, device {device}, torch {torch.__version__}")
        if "backends" not in args.skip:
            bench_backends(model_dir, args.prompts, 4, args.max_new_tokens, args.batch)
        if "iteration" not in args.skip:
            bench_iteration(model_dir, work, args.prompts, args.max_new_tokens, args.judge_tokens)
        if "upload" not in args.skip:
            bench_upload(upload_dir(model_dir, work, args.upload_mb), work, 3)
        if "colocate" not in args.skip:
            bench_colocate(model_dir, work, args.prompts, args.max_new_tokens, args.judge_tokens, args.shards)


if __name__ == "__main__":
    main()
