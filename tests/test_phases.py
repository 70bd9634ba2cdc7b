"""The phase registry and everything that reads it: the plan, the dispatcher, the status
history fields, the metrics and the local table all agree with it."""
import importlib
import math

import pytest

from selfreward import layout, metrics, phases
from selfreward.reconcile import _pos, _progress
from selfreward.spec import PHASES, ResourcesSpec, parse_spec
from selfreward.status import IterationRecord
from selfreward.worker import SHARDED, default_shards, phase_module


def spec(**over):
    doc = {"model": {"uri": "/m"}, "prompts": {"uri": "/p.jsonl"}, "iterations": 2, "storage": {"uri": "/tmp/s"},
           "generation": {"shards": 3}, "judge": {"shards": 2}}
    doc.update(over)
    return parse_spec(doc)


EVAL = {"judgeSet": {"uri": "/j.jsonl"}, "shards": 4}


def test_the_registry_is_the_one_list_of_phases():
    assert PHASES == phases.NAMES == ("sft", "instruct", "generate", "judge", "metajudge", "pairs", "train", "eval")
    assert [p.order for p in phases.REGISTRY] == list(range(len(phases.REGISTRY)))
    assert SHARDED == ("generate", "judge", "eval")
    for p in phases.REGISTRY:
        mod = phase_module(p.name)
        assert callable(mod.run), p.name
        assert p.name in ResourcesSpec.model_fields, f"resources.{p.name}"
        assert p.model in ("none", "base", "policy", "next") and p.help
    with pytest.raises(KeyError, match="unknown phase 'nope'"):
        phases.get("nope")


def test_figures_are_declared_once_and_become_history_fields_and_metrics():
    names = [f.name for _p, f in phases.figures()]
    assert len(names) == len(set(names))
    metric_names = [f.metric for _p, f in phases.figures() if f.metric]
    assert len(metric_names) == len(set(metric_names))
    for _p, f in phases.figures():
        field = IterationRecord.model_fields[f.name]
        assert field.description == f.help and f.kind in (int, float)
        if f.metric:
            assert metrics.ITERATION_FIGURES[f.metric][0] == f.name
    assert set(metrics.ITERATION_FIGURES) == set(metric_names)
    # what the history always had is still there
    for old in ("prompts", "responses", "judged", "parseFailures", "pairs", "pairsDropped", "meanScore", "scoreStd",
                "margin", "dpoLoss", "rewardAccuracy"):
        assert old in IterationRecord.model_fields
    assert "sftLoss" in IterationRecord.model_fields  # issue 11: iteration 0's loss


def test_figure_read_types_and_refuses_non_numbers():
    f = phases.Figure("x", ("a", "b"), int, "h")
    assert f.read({"a": 3.0}) == 3 and isinstance(f.read({"a": 3.0}), int)
    assert f.read({"a": True, "b": 2}) == 2  # a bool is not a count
    assert f.read({"a": math.nan, "b": math.inf}) is None
    assert f.read({"a": "3"}) is None and f.read(None) is None
    g = phases.Figure("y", ("v",), float, "h")
    assert g.read({"v": 1}) == 1.0 and g.read({"v": 0.1234567891}) == 0.123457


def test_steps_shards_and_iteration_ends_come_from_the_registry():
    s = spec()
    assert [(st.iteration, st.phase, st.shards) for st in layout.steps(s)][:4] == [
        (1, "generate", 3), (1, "judge", 2), (1, "pairs", 1), (1, "train", 1)]
    assert layout.iteration_end(s, 1).phase == "train" and layout.iteration_end(s, 0) is None
    for st in layout.steps(s):
        assert st.sharded == phases.get(st.phase).sharded
        assert default_shards(s, st.phase) == st.shards
    e = spec(eval=EVAL, sft={"instructionDataUri": "/i.jsonl"})
    keys = [st.key for st in layout.steps(e)]
    assert keys[:3] == ["iter-0/sft", "iter-0/eval", "iter-1/generate"] and keys[-2:] == ["iter-2/train", "iter-2/eval"]
    assert [st.shards for st in layout.steps(e) if st.phase == "eval"] == [4, 4, 4]
    assert layout.iteration_end(e, 0).phase == "eval" and layout.iteration_end(e, 2).phase == "eval"
    # eval switched off: the plan of a run without it
    off = spec(eval={**EVAL, "enabled": False})
    assert [st.key for st in layout.steps(off)] == [st.key for st in layout.steps(s)]


def test_progress_counts_an_iteration_at_its_last_step():
    e = spec(eval=EVAL)
    assert _progress(e, _pos(1, "train")) == "0/2"
    assert _progress(e, _pos(1, "eval")) == "1/2"
    assert _progress(e, _pos(0, "eval")) == "0/2"
    s = spec()
    assert _progress(s, _pos(1, "train")) == "1/2" and _progress(s, _pos(2, "pairs")) == "1/2"


def test_dispatcher_checks_the_iterations_a_phase_runs_in():
    from selfreward.worker import run_phase
    from selfreward.worker.common import PhaseError

    e = spec(eval=EVAL)
    with pytest.raises(PhaseError, match="the sft phase belongs to iteration 0"):
        run_phase(e, "sft", 1)
    with pytest.raises(PhaseError, match=r"iteration 0 is outside 1\.\.2"):
        run_phase(e, "generate", 0)
    with pytest.raises(PhaseError, match=r"iteration 3 is outside 0\.\.2"):
        run_phase(e, "eval", 3)


def test_spec_eval_refuses_what_cannot_work():
    from selfreward.spec import SpecError

    cases = [
        ({"verifier": "no_colon"}, "eval.verifier"),
        ({"verifier": "m:f"}, "eval.prompts"),  # a verifier needs held-out prompts
        ({"judgeSet": {"uri": "/j"}, "gate": {"metric": "verifierScore"}}, "needs eval.verifier"),
        ({"judgeSet": {"uri": "/j"}, "gate": {"metric": "bogus"}}, "eval.gate.metric"),
        ({"judgeSet": {"uri": "/j"}, "gate": {"action": "explode"}}, "eval.gate.action"),
        ({"prompts": {"uri": "/h"}, "evaluator": {"modelUri": "/e", "pattern": "no group"}}, "eval.evaluator.pattern"),
        ({"prompts": {"uri": "/h"}, "evaluator": {"modelUri": "/e", "template": "{prompt} {first}"}},
         "eval.evaluator.template"),
        ({"shards": 0}, "eval.shards"),
        ({"typo": 1}, "eval.typo"),
    ]
    for ev, where in cases:
        with pytest.raises(SpecError, match=where.replace(".", r"\.")):
            spec(eval=ev)


def test_the_meta_judge_sits_between_judge_and_pairs_with_its_own_resources():
    from selfreward import jobs as J

    s = spec(metaJudge={"backend": "vllm"}, resources={"metajudge": {"gpus": 2, "memory": "40Gi"}})
    keys = [st.key for st in layout.steps(s)]
    assert keys[:5] == ["iter-1/generate", "iter-1/judge", "iter-1/metajudge", "iter-1/pairs", "iter-1/train"]
    meta = next(st for st in layout.steps(s) if st.phase == "metajudge")
    assert not meta.sharded and meta.shards == 1 and phases.get("metajudge").model == "policy"
    job = J.build_job({"name": "demo", "namespace": "ml", "uid": "u", "generation": 1}, s, meta, 1)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["metadata"]["name"] == "demo-i1-metajudge"
    assert container["resources"]["limits"] == {"memory": "40Gi", "nvidia.com/gpu": "2"}
    assert container["command"][:5] == ["selfreward", "worker", "metajudge", "--iteration", "1"]
    # off (absent, or enabled false): the plan of a run without it
    assert [st.key for st in layout.steps(spec(metaJudge={"enabled": False}))] == [st.key for st in layout.steps(spec())]
    assert _progress(s, _pos(1, "metajudge")) == "0/2"
