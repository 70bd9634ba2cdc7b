"""`make gpu-check DEVICE=cpu`: the GPU check script's CPU dry run passes, and its checks
fail on what they exist to catch (a wrong dtype, a checkpoint of the wrong size, no
learning). The dry run is the slowest test here (~30-50 s on 2 cores)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def test_cpu_dry_run_passes_and_prints_its_figures():
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "gpu-check: passed" in out and "FAIL" not in out
    for figure in ("stored as ['BF16']", "batched/loop =", "verdicts/s", "ours/TRL defaults: samples/s",
                   "precomputed reference log-probs: peak memory", "dtype bfloat16 (['BF16'])",
                   "of stored weights changed"):
        assert figure in out, figure


def test_checks_fail_on_a_wrong_dtype_size_or_no_learning(tmp_path, tiny_model):
    from selfreward.tiny import make_tiny_model

    fp32 = Path(tiny_model)
    failures = gpu_check.check_checkpoint(fp32)  # an fp32 checkpoint where bf16 is expected
    assert any("safetensors dtypes ['F32'], expected only BF16" in f for f in failures)
    assert any("config.json dtype 'float32'" in f for f in failures)
    assert gpu_check.check_checkpoint(fp32, want="F32", config_dtype="float32") == []
    bf16 = make_tiny_model(tmp_path / "bf16", dtype="bfloat16")
    assert gpu_check.check_checkpoint(bf16) == []
    # a config that lies about the weights is caught too
    cfg = json.loads((bf16 / "config.json").read_text())
    lying = tmp_path / "lying"
    shutil.copytree(bf16, lying)
    (lying / "config.json").write_text(json.dumps({**cfg, "dtype": "float32"}))
    assert gpu_check.check_checkpoint(lying) == ["lying: config.json dtype 'float32', expected 'bfloat16'"]
    # no learning: a "trained" checkpoint identical to the base
    frac, failures = gpu_check.check_learning(bf16, bf16)
    assert frac == 0.0 and failures and failures[0].startswith("no learning")
    other = make_tiny_model(tmp_path / "other", seed=1, dtype="bfloat16")
    frac, failures = gpu_check.check_learning(bf16, other)
    assert frac > 0.9 and failures == []


def test_makefile_runs_the_script_on_the_device_asked_for():
    make = (ROOT / "Makefile").read_text()
    assert "bench/gpu_check.py --device $(DEVICE)" in make and "DEVICE ?= cuda" in make
    if shutil.which("make"):
        dry = subprocess.run(["make", "-n", "gpu-check", "DEVICE=cpu"], capture_output=True,
                             text=True, cwd=ROOT)
        assert "bench/gpu_check.py --device cpu" in dry.stdout, dry.stdout + dry.stderr
    else:
        pytest.skip("no make binary")
