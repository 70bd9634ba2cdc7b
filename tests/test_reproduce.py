"""A CI-sized run of bench/reproduce.py: the cipher task, a tiny model trained from
scratch by the SFT phase, one self-rewarding iteration through the real phases for the
normal run and the swapPairs ablation. It checks direction, never a number: the model
judges better than chance, and the normal run's M_2 beats the swapped ablation's."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_one_iteration_normal_beats_swapped(tmp_path):
    # as a user runs it (-P: bench/operator.py must not shadow the standard library's operator)
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "bench" / "reproduce.py"), "--seeds", "0", "--smoke",
                           "--jobs", "2", "--variants", "normal", "swapped", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    (seed,) = doc["seeds"]
    m1, m2 = seed["iterations"]
    assert [m1["model"], m2["model"]] == ["M1", "M2"]
    assert m1["judgePairwiseAccuracy"] > 0.6  # chance is 0.5
    assert m2["pairs"] > 0 and m2["parseFailures"] < m2["verdicts"]
    assert m2["chosenMeanScore"] > m2["rejectedMeanScore"]
    swapped = seed["ablations"]["swapped"]["verifierScore"]
    assert m2["verifierScore"] > swapped
    # the swapped run started from the same M_1 (iteration 0 copied, not trained again)
    assert seed["ablations"]["swapped"]["iterations"][0] == m1
