"""The eval phase and the run around it, end to end on tiny models in this process.

Every other end-to-end test replaces the judge's score pattern with one digit, because
a random tiny model never writes "Score: N". Here the model is made to: a tiny Llama
whose layers are switched off and whose embeddings and output head form a bigram
table (after the prompt it writes "Score", then ":", then a uniformly drawn point 0-5,
then end-of-sequence). So the run judges with the DEFAULT rubric and the DEFAULT
score pattern, and pairs form from real parsed verdicts. A second such model is the
fixed evaluator and writes "Winner: A" or "Winner: B".

The same run checks that every phase at iteration t loads M_t (the checkpoint
identities recorded in the summaries), the eval figures against the records they
come from, and the gate.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from selfreward import checkpoint, layout
from selfreward.spec import DEFAULT_SCORE_PATTERN, DEFAULT_JUDGE_TEMPLATE, parse_spec
from selfreward.storage import Store
from selfreward.worker import run_phase
from selfreward.worker.judge import read_phase_records

PROMPTS = ["What is two plus two?", "Name a colour of the rainbow.", "Write a sentence about rain.",
           "Why do cats purr?"]
HELD_OUT = [{"prompt": "Pick a number.", "atLeast": 3}, {"prompt": "Say a point.", "atLeast": 1},
            {"prompt": "Grade yourself.", "atLeast": 5}]
JUDGE_SET = [
    {"prompt": "What is 1+1?", "responses": [{"response": "2", "score": 5}, {"response": "3", "score": 1},
                                             {"response": "two", "score": 4}]},
    {"prompt": "Name a fruit.", "responses": [{"response": "apple", "score": 5}, {"response": "car", "score": 0}]},
]
VERIFIER = '''
import re

def check(prompt, response, record):
    """1 when the answer states a point of at least the record's `atLeast`."""
    m = re.search(r"([0-9])", response)
    return 1.0 if m and int(m.group(1)) >= record["atLeast"] else 0.0
'''


def bigram_model(base: str, out: Path, texts: list[str]) -> str:
    """A copy of the tiny model that writes one of ``texts`` (uniformly at each branch)
    after any prompt: its decoder layers add nothing, so the next token depends on the
    current token alone, through the embedding and the output head."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    successors: dict[int, set[int]] = {}
    first: set[int] = set()
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        first.add(ids[0])
        for a, b in zip(ids, ids[1:]):
            successors.setdefault(a, set()).add(b)
    states = [frozenset(first)] + sorted({frozenset(s) for s in successors.values()}, key=sorted)
    hidden = model.config.hidden_size
    assert len(states) <= hidden
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.zeros_like(model.model.embed_tokens.weight)
        emb[:, 0] = 1.0  # every other token: the state "start an answer"
        for token, nxt in successors.items():
            emb[token] = 0.0
            emb[token, states.index(frozenset(nxt))] = 1.0
        head = torch.zeros(model.config.vocab_size, hidden)
        for d, state in enumerate(states):
            for token in state:
                head[token, d] = 3.0  # logit 24 after the final RMSNorm; everything else 0
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head = torch.nn.Linear(hidden, model.config.vocab_size, bias=False)
        model.lm_head.weight.copy_(head)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def models_dir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("bigram")
    judge = bigram_model(tiny_model, root / "judge", [f"Score: {k}" for k in range(6)])
    evaluator = bigram_model(tiny_model, root / "evaluator", ["Winner: A", "Winner: B"])
    return judge, evaluator


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def eval_spec(tmp: Path, judge_model: str, evaluator: str, iterations: int = 2, gate=None, **over) -> dict:
    (tmp / "evalverifier_points.py").write_text(VERIFIER)
    doc = {
        "model": {"uri": judge_model},
        "prompts": {"uri": write_jsonl(tmp / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])},
        "iterations": iterations,
        "storage": {"uri": f"file://{tmp}/store"},
        "generation": {"responsesPerPrompt": 4, "maxNewTokens": 6, "batchSize": 16, "temperature": 1.0},
        # the default template and the default score pattern: nothing replaced
        "judge": {"samplesPerResponse": 3, "maxNewTokens": 6, "batchSize": 48, "temperature": 1.0},
        "training": {"maxSteps": 1, "batchSize": 2, "maxLength": 64},
        "eval": {
            "prompts": {"uri": write_jsonl(tmp / "heldout.jsonl", HELD_OUT)},
            "verifier": "evalverifier_points:check",
            "judgeSet": {"uri": write_jsonl(tmp / "judgeset.jsonl", JUDGE_SET)},
            "evaluator": {"modelUri": evaluator, "maxNewTokens": 8},
            "generation": {"maxNewTokens": 6, "temperature": 1.0},
            **({"gate": gate} if gate else {}),
        },
        "seed": 5,
    }
    doc.update(over)
    return doc


@pytest.fixture(scope="module")
def run(models_dir, tmp_path_factory):
    """A whole 2-iteration run with eval, phase by phase in this process."""
    tmp = tmp_path_factory.mktemp("evalrun")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(tmp))
    mp.setenv("SELFREWARD_CACHE", str(tmp / "cache"))
    spec = parse_spec(eval_spec(tmp, *models_dir, gate={"metric": "verifierScore", "minChange": 1000, "action": "warn"}))
    store = Store.for_spec(spec)
    summaries = {}
    for step in layout.steps(spec):
        summaries[(step.iteration, step.phase)] = run_phase(spec, step.phase, step.iteration, store=store)
    yield spec, store, summaries
    mp.undo()


def test_the_plan_has_a_baseline_eval_and_one_per_iteration(run):
    spec, _store, _s = run
    assert [s.key for s in layout.steps(spec)] == [
        "iter-0/eval",
        "iter-1/generate", "iter-1/judge", "iter-1/pairs", "iter-1/train", "iter-1/eval",
        "iter-2/generate", "iter-2/judge", "iter-2/pairs", "iter-2/train", "iter-2/eval"]


def test_pairs_form_through_the_default_rubric_and_pattern(run):
    spec, store, s = run
    assert spec.judge.template is None and spec.judge.scorePattern == DEFAULT_SCORE_PATTERN
    for t in (1, 2):
        judge = s[(t, "judge")]
        assert judge["verdicts"] == 4 * 4 * 3 and judge["parseFailures"] == 0
        assert s[(t, "pairs")]["pairs"] >= 1
        for rec in read_phase_records(store, t, "judge"):
            for resp in rec["responses"]:
                assert all(v.startswith("Score: ") for v in resp["verdicts"])
                assert resp["scores"] == [float(v.split()[-1]) for v in resp["verdicts"]]
    # the judge saw the default rubric
    assert "additive five-point scale" in DEFAULT_JUDGE_TEMPLATE


def test_every_phase_at_iteration_t_loads_m_t(run):
    spec, store, s = run
    base = spec.model.uri
    m2 = checkpoint.identity(checkpoint.read_manifest(store, layout.checkpoint_dir(1, "train")))
    m3 = checkpoint.identity(checkpoint.read_manifest(store, layout.checkpoint_dir(2, "train")))
    assert len({base, m2, m3}) == 3
    for phase in ("generate", "judge", "train"):
        assert s[(1, phase)]["loadedModels"] == [base], phase  # M_1: the base model (no SFT here)
        assert s[(2, phase)]["loadedModels"] == [m2], phase  # M_2: iteration 1's checkpoint
    evaluator = spec.eval.evaluator.modelUri
    assert s[(0, "eval")]["loadedModels"] == [base]  # the baseline: M_1; no head to head yet
    assert s[(1, "eval")]["loadedModels"] == [m2, evaluator]  # M_2, then the fixed evaluator
    assert s[(2, "eval")]["loadedModels"] == [m3, evaluator]


def test_eval_figures_follow_from_the_records(run):
    spec, store, s = run
    for t in (0, 1, 2):
        ev = s[(t, "eval")]
        assert ev["model"] == f"M{t + 1}" and ev["heldOutPrompts"] == len(HELD_OUT)
        answers = [r for r in read_phase_records(store, t, "eval") if r["kind"] == "answer"]
        points = [int(a["response"].split()[-1]) for a in answers]
        expect = 100 * sum(p >= h["atLeast"] for p, h in zip(points, HELD_OUT)) / len(HELD_OUT)
        assert ev["verifierScore"] == pytest.approx(expect)
        assert ev["meanResponseTokens"] == pytest.approx(sum(a["tokens"] for a in answers) / len(answers))
        assert ev["truncatedShare"] == 0.0  # every answer ended with EOS within 6 tokens
        assert ev["judgeSetPrompts"] == 2 and ev["judgeSetResponses"] == 5 and ev["judgeSetPairs"] == 4
        assert 0 <= ev["judgePairwiseAccuracy"] <= 1 and ev["judgeParseFailureRate"] == 0.0
    assert "winRateVsPrevious" not in s[(0, "eval")]
    for t in (1, 2):
        ev = s[(t, "eval")]
        assert ev["evaluatorParseFailureRate"] == 0.0 and ev["comparedVsBaseline"] == len(HELD_OUT)
        for name in ("VsPrevious", "VsBaseline"):
            assert ev[f"winRate{name}Low"] <= ev[f"winRate{name}"] <= ev[f"winRate{name}High"]
        # the iteration's own data: lengths, the verdict histogram
        judged = read_phase_records(store, t, "judge")
        assert sum(ev[f"scoreHist{k}"] for k in range(6)) == s[(t, "judge")]["verdicts"]
        assert ev["genTruncatedShare"] == 0.0 and ev["chosenMeanTokens"] >= 3
        assert len(judged) == len(PROMPTS)
    assert s[(1, "eval")]["previousModel"] == "M1" and s[(2, "eval")]["previousModel"] == "M2"


def test_the_gate_warns_and_names_the_best(run):
    spec, store, s = run
    values = [s[(t, "eval")]["verifierScore"] for t in (0, 1, 2)]
    best = max(range(3), key=lambda t: (values[t], -t))  # the earlier model wins a tie
    last = s[(2, "eval")]
    assert last["bestModel"] == f"M{best + 1}" and last["bestValue"] == values[best]
    assert last["bestCheckpoint"] == ("" if best == 0 else layout.checkpoint_dir(best, "train"))
    for t in (1, 2):  # minChange 1000 cannot be met: warned, and the run goes on from M_{t+1}
        ev = s[(t, "eval")]
        assert ev["gatePassed"] is False and ev["gateAction"] == "warn"
        assert ev["nextPolicy"] == layout.checkpoint_dir(t, "train")


def test_rollback_restarts_from_the_best_model(models_dir, tmp_path, monkeypatch):
    """A gate that always fails with rollback: iteration 2 starts from the best model of
    iterations 0..1 rather than from M_2, and its phases load that model."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SELFREWARD_CACHE", str(tmp_path / "cache"))
    doc = eval_spec(tmp_path, *models_dir, gate={"metric": "verifierScore", "minChange": 1000, "action": "rollback",
                                                 "maxRollbacks": 1})
    doc["eval"].pop("evaluator")
    doc["eval"].pop("judgeSet")
    spec = parse_spec(doc)
    store = Store.for_spec(spec)
    out = {}
    for step in layout.steps(spec)[:7]:  # up to iter-2/generate
        out[step.key] = run_phase(spec, step.phase, step.iteration, store=store)
    ev = out["iter-1/eval"]
    assert ev["gateAction"] == "rollback" and ev["rollbacks"] == 1
    # the baseline (the base model) is best unless M_2 scored strictly higher
    expect = "" if ev["bestModel"] == "M1" else layout.checkpoint_dir(1, "train")
    assert ev["nextPolicy"] == expect == ev["bestCheckpoint"]
    loaded = out["iter-2/generate"]["loadedModels"]
    if expect:
        assert loaded == [checkpoint.identity(checkpoint.read_manifest(store, expect))]
    else:
        assert loaded == [spec.model.uri]


def test_bad_verifier_and_judge_set_name_the_line(models_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = eval_spec(tmp_path, *models_dir, iterations=1)
    (tmp_path / "evalverifier_bad.py").write_text("def check(prompt, response, record):\n    return 2.0\n")
    doc["eval"]["verifier"] = "evalverifier_bad:check"
    from selfreward.worker.common import PhaseError

    with pytest.raises(PhaseError, match=r"returned 2.0 for held-out line 1; expected a number in \[0, 1\]"):
        run_phase(parse_spec(doc), "eval", 0, store=Store.for_spec(parse_spec(doc)))
    shutil.rmtree(tmp_path / "store", ignore_errors=True)
    doc["eval"]["verifier"] = "evalverifier_missing:check"
    with pytest.raises(PhaseError, match="cannot import evalverifier_missing"):
        run_phase(parse_spec(doc), "eval", 0)
    doc["eval"]["verifier"] = "evalverifier_points:check"
    write_jsonl(tmp_path / "judgeset.jsonl", [JUDGE_SET[0], {"prompt": "x", "responses": [{"response": "y"}]}])
    with pytest.raises(PhaseError, match=r"judgeset.jsonl line 2: responses\[0\] needs"):
        run_phase(parse_spec(doc), "eval", 0)


def test_local_run_with_eval_stops_early_and_shows_the_eval_columns(models_dir, tmp_path, monkeypatch, capsys):
    """`selfreward run` (a worker subprocess per step) with an eval gate that stops:
    the run ends after iteration 1's eval with the best model, and the final table
    carries the eval columns."""
    from selfreward.local import ITERATIONS_JSON, run_local

    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("SELFREWARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SELFREWARD_PROGRESS_PORT", raising=False)
    doc = eval_spec(tmp_path, *models_dir, iterations=3,
                    gate={"metric": "verifierScore", "minChange": 1000, "action": "stop"})
    doc["eval"].pop("evaluator")  # the head to head is covered above; one model load less per eval
    spec = parse_spec(doc)
    assert run_local(spec, "evalrun", quiet=True, state_dir=tmp_path / "state") == 0
    out = capsys.readouterr().out
    store = Store.for_spec(spec)
    ev = store.read_json(layout.summary_path(1, "eval"))
    assert ev["gateAction"] == "stop" and ev["gatePassed"] is False
    assert not store.exists(layout.summary_path(2, "generate"))  # iteration 2 never ran
    figures = store.read_json(ITERATIONS_JSON)
    assert figures["earlyStopped"] is True
    best = ev["bestCheckpoint"]
    assert figures["finalCheckpoint"] == (store.url(best) if best else spec.model.uri)
    its = {r["iteration"]: r for r in figures["iterations"]}
    assert its[0]["verifierScore"] == store.read_json(layout.summary_path(0, "eval"))["verifierScore"]
    assert its[1]["verifierScore"] == ev["verifierScore"] and its[1]["judgePairwiseAccuracy"] == ev["judgePairwiseAccuracy"]
    assert "EarlyStopped" in out
    table = out[out.index("run evalrun: "):]
    for column in ("pairs", "DPO loss", "verifier", "judge acc", "judge rho", "eval tokens", "checkpoint"):
        assert column in table, (column, table)
    rows = [line for line in table.splitlines() if re.match(r"│\s*(0 \(M1\)|1)\s*│", line)]
    assert len(rows) == 2, table  # iterations 0 and 1 only: the gate stopped the run
    assert f"{ev['verifierScore']:.1f}" in rows[1]


def test_sharded_eval_gives_the_figures_of_one_pod(models_dir, tmp_path, monkeypatch):
    """Two shards (two pods of the Indexed Job) and one shard compute the same figures:
    finalize pools every shard's records rather than averaging shard figures."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SELFREWARD_CACHE", str(tmp_path / "cache"))
    out, loads = {}, {}
    for shards in (1, 2):
        doc = eval_spec(tmp_path, *models_dir, iterations=1, storage={"uri": f"file://{tmp_path}/s{shards}"})
        doc["eval"].update(shards=shards, generation={"temperature": 0.0, "maxNewTokens": 6})
        doc["eval"].pop("evaluator")
        doc["judge"]["temperature"] = 0.0  # greedy: the same verdicts whichever pod asks
        spec = parse_spec(doc)
        store = Store.for_spec(spec)
        first = run_phase(spec, "eval", 0, shard=0, num_shards=shards, store=store)
        if shards == 2:
            assert "shard" in first and not store.exists(layout.summary_path(0, "eval"))  # waits for shard 1
            run_phase(spec, "eval", 0, shard=1, num_shards=shards, store=store)
        summary = store.read_json(layout.summary_path(0, "eval"))
        assert summary["numShards"] == shards
        assert summary["runtime"]["versions"]["torch"]  # the phase summary says what it ran with, as every phase's
        loads[shards] = summary["modelLoads"]  # the pods' loads from disk: each shard loads its models
        out[shards] = {k: v for k, v in summary.items()
                       if k not in ("numShards", "durationSeconds", "loadedModels", "modelLoads")}
    assert out[1] == out[2] and loads[2] == 2 * loads[1] >= 2
    assert out[2]["judgeSetPairs"] == 4 and out[2]["heldOutPrompts"] == len(HELD_OUT)


def test_eval_added_mid_run_compares_only_with_what_exists(run, tmp_path, monkeypatch):
    """Without iter-0/eval (eval came into the spec after iteration 0), iteration 1's
    eval still runs: no baseline win rate, and a gate with nothing to compare passes."""
    spec, store, _s = run
    monkeypatch.setenv("SELFREWARD_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "store"
    shutil.copytree(store.path(""), copy)
    shutil.rmtree(copy / "iter-0" / "eval")
    shutil.rmtree(copy / "iter-1" / "eval")
    moved = spec.model_copy(deep=True)
    moved.storage.uri = f"file://{copy}"
    ev = run_phase(moved, "eval", 1, store=Store.for_spec(moved))
    assert ev["model"] == "M2" and "verifierScore" in ev
    assert "winRateVsBaseline" not in ev and "winRateVsPrevious" not in ev
    assert ev["gatePassed"] is True and ev["bestModel"] == "M2"
