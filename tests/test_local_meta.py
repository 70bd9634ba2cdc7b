"""`selfreward run` with Meta-Rewarding's fixes on: the metajudge phase between judge and
pairs, a rho per iteration, the saturation warning, and the figures in iterations.json
and the final table (the tiny model, each step a worker subprocess)."""
from __future__ import annotations

import sys
from pathlib import Path

from selfreward import layout
from selfreward.local import ITERATIONS_JSON, run_local
from selfreward.storage import Store
from selfreward.worker.metajudge import candidates_path
from selfreward.worker.pairs import pairs_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_local_run import PROMPTS, env, make_spec, write_prompts  # noqa: E402,F401 - env is a fixture


def test_a_run_with_the_meta_judge_and_length_control(env, tiny_model, capsys):
    prompts = write_prompts(env / "prompts.jsonl", PROMPTS[:4])
    spec = make_spec(tiny_model, prompts, f"file://{env}/store", iterations=2,
                     judge={"samplesPerResponse": 4, "saturation": {"minStd": 100.0}},  # always "saturated"
                     pairs={"lengthControl": [0.0, 0.4]},
                     metaJudge={"responses": 8, "maxVerdicts": 3, "maxNewTokens": 16, "temperature": 1.0,
                                "winnerPattern": r"(a|b)", "maxShare": 0.9, "maxClassShare": 0.5})
    state = env / "state"
    assert run_local(spec, "meta", quiet=True, state_dir=state) == 0
    out = capsys.readouterr().out
    store = Store.for_spec(spec)
    keys = [s.key for s in layout.steps(spec)]
    assert keys[:5] == ["iter-1/generate", "iter-1/judge", "iter-1/metajudge", "iter-1/pairs", "iter-1/train"]
    for step in layout.steps(spec):
        assert store.exists(layout.summary_path(step.iteration, step.phase)), step
    its = {r["iteration"]: r for r in store.read_json(ITERATIONS_JSON)["iterations"]}
    for t, rho in ((1, 0.0), (2, 0.4)):
        pairs = store.read_json(layout.summary_path(t, "pairs"))
        meta = store.read_json(layout.summary_path(t, "metajudge"))
        judge = store.read_json(layout.summary_path(t, "judge"))
        written = store.read_jsonl(pairs_path(t))
        assert its[t]["lengthControl"] == rho == pairs["lengthControl"]
        assert its[t]["metaPairs"] == pairs["metaPairs"] == sum(p.get("kind") == "judge" for p in written)
        assert its[t]["pairs"] == len(written) == pairs["responsePairs"] + pairs["metaPairs"]
        assert its[t]["metaJudged"] == meta["metaJudgedResponses"] > 0
        assert its[t]["metaCandidates"] == len(store.read_jsonl(candidates_path(t)))
        assert its[t]["chosenLength"] == round(pairs["chosenMeanLength"], 6)
        assert its[t]["judgeSaturated"] == 1 and judge["judgeSaturated"] is True
        assert sum(its[t].get(f"scoreClass{k}", 0) for k in range(6)) == sum(judge[f"scoreHist{k}"] for k in range(6))
        # the train phase trained on them all: response pairs and judge-preference pairs
        assert store.read_json(layout.summary_path(t, "train"))["pairs"] == len(written)
    assert any(p.get("kind") == "judge" for t in (1, 2) for p in store.read_jsonl(pairs_path(t)))
    assert out.count("warning: JudgeSaturated: iter-") == 2 and "judge.saturation.minStd 100" in out
    assert "meta pairs" in out and "chosen len" in out  # the final table's columns
