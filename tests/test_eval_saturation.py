"""The eval worker reads the iteration's judge summary: with eval.gate.onJudgeSaturated a
saturated judge fails the gate (phase by phase in this process, the models of
test_eval_phase)."""
from selfreward import layout
from selfreward.local import gate_stop
from selfreward.spec import parse_spec
from selfreward.storage import Store
from selfreward.worker import run_phase
from test_eval_phase import eval_spec, models_dir  # noqa: F401 - models_dir is a fixture


def test_a_saturated_judge_stops_the_run_through_the_gate(models_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SELFREWARD_CACHE", str(tmp_path / "cache"))
    # the metric never fails the gate (minChange far below any change); the judge is
    # always saturated (no spread reaches minStd 100)
    doc = eval_spec(tmp_path, *models_dir, iterations=1,
                    gate={"metric": "verifierScore", "minChange": -1000, "action": "warn", "onJudgeSaturated": "stop"})
    doc["eval"].pop("evaluator")
    doc["eval"].pop("judgeSet")
    doc["judge"]["saturation"] = {"minStd": 100.0}
    spec = parse_spec(doc)
    store = Store.for_spec(spec)
    out = {}
    for step in layout.steps(spec):
        out[step.key] = run_phase(spec, step.phase, step.iteration, store=store)
    assert out["iter-1/judge"]["judgeSaturated"] is True
    base, ev = out["iter-0/eval"], out["iter-1/eval"]
    assert base["gatePassed"] is True and "gateReason" not in base  # iteration 0 has no judge phase
    assert (ev["gatePassed"], ev["gateAction"], ev["gateReason"]) == (False, "stop", "judgeSaturated")
    steps = {s.key: s for s in layout.steps(spec)}
    assert gate_stop(store, steps["iter-1/eval"]) is not None  # the local runner stops there

    # without onJudgeSaturated the same store's figures pass the gate
    calm = parse_spec({**doc, "eval": {**doc["eval"], "gate": {"metric": "verifierScore", "minChange": -1000}}})
    store.delete(layout.summary_path(1, "eval"))
    again = run_phase(calm, "eval", 1, store=store)
    assert again["gatePassed"] is True and "gateReason" not in again
