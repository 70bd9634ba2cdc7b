"""A CI-sized run of bench/reproduce.py: the cipher task, a tiny model trained from
scratch by the SFT phase, one self-rewarding iteration through the real phases for the
normal run and the swapPairs ablation. It checks direction, never a number: the model
judges better than chance, and the normal run's M_2 beats the swapped ablation's."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("reproduce_bench", ROOT / "bench" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_iteration_normal_beats_swapped(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--seeds", "0", "--smoke", "--jobs", "2", "--variants", "normal", "swapped",
                       "--workdir", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
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
