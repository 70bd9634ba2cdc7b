"""The metajudge phase on the tiny random model, through the worker dispatcher on a
file:// store: generate -> judge -> metajudge -> pairs, with length control on."""
import pytest

from selfreward import layout, phases
from selfreward import metajudging as M
from selfreward.judging import parse_winner, render_judge_prompt, saturation
from selfreward.storage import Store
from selfreward.worker import run_phase
from selfreward.worker.common import PhaseError
from selfreward.worker.judge import read_phase_records
from selfreward.worker.metajudge import candidates_path, judgments_path
from selfreward.worker.pairs import build_pairs, pairs_path
from test_phases_gen_judge import make_spec

# The random model's text holds letters: one letter a or b is a winner (the last counts),
# so games are won and lost at random and every path runs (sampled: greedy, it ends at once).
META = {"responses": 6, "maxVerdicts": 3, "maxNewTokens": 16, "temperature": 1.0, "batchSize": 16, "winnerPattern": r"(a|b)",
        "maxShare": 0.9, "maxClassShare": 0.5}


def test_meta_judge_rates_verdicts_and_its_pairs_join_the_dpo_data(tmp_path, tiny_model):
    spec = make_spec(tmp_path, tiny_model, generation={"shards": 1}, metaJudge=META,
                     judge={"shards": 1, "samplesPerResponse": 4}, pairs={"lengthControl": 0.3})
    assert [p.name for p in phases.active(spec, 1)] == ["generate", "judge", "metajudge", "pairs", "train"]
    store = Store.for_spec(spec)
    with pytest.raises(PhaseError, match="iter-1/judge is not complete"):
        run_phase(spec, "metajudge", 1)
    run_phase(spec, "generate", 1)
    judge = run_phase(spec, "judge", 1)
    records = read_phase_records(store, 1, "judge")
    generated = {r["promptId"]: r for r in read_phase_records(store, 1, "generate")}
    for rec in records:
        for j, resp in enumerate(rec["responses"]):
            # every verdict keeps its own score, aligned with the verdicts, and the tokens carry over
            assert len(resp["verdictScores"]) == len(resp["verdicts"]) == 4
            assert [s for s in resp["verdictScores"] if s is not None] == resp["scores"]
            assert resp["tokens"] == generated[rec["promptId"]]["tokens"][j]
    assert sum(judge[f"scoreHist{k}"] for k in range(6)) == sum(len(r["scores"]) for rec in records
                                                                 for r in rec["responses"])
    scores = [r["score"] for rec in records for r in rec["responses"] if r["score"] is not None]
    assert judge["topScoreShare"] == pytest.approx(sum(s == 9 for s in scores) / len(scores))  # maxScore 9
    assert judge["judgeSaturated"] is (saturation(judge, spec.judge.saturation) is not None)
    assert judge["judgeSaturatedFlag"] == int(judge["judgeSaturated"])

    reports = []
    meta = run_phase(spec, "metajudge", 1, progress=reports.append)
    expected = M.select_responses(records, 6, 0.0, 3)
    assert expected and meta["metaJudgedResponses"] == len(expected)
    judgments = store.read_jsonl(judgments_path(1))
    assert [(j["promptId"], j["responseIndex"]) for j in judgments] == [(e["promptId"], e["responseIndex"])
                                                                        for e in expected]
    n_asks = sum(len(e["verdicts"]) * (len(e["verdicts"]) - 1) for e in expected)
    assert meta["metaJudgments"] == n_asks and reports[-1]["done"] == reports[-1]["total"] == n_asks
    games_both = agreed = 0
    for j, e in zip(judgments, expected):
        # the meta-judge read the verdicts without the lines the score pattern matches
        assert j["shown"] == [M.strip_score_lines(v["text"], spec.judge.scorePattern) for v in e["verdicts"]]
        assert not any(ch.isdigit() for text in j["shown"] for ch in text)
        k = len(e["verdicts"])
        assert len(j["comparisons"]) == k * (k - 1) // 2
        games = []
        for c in j["comparisons"]:
            assert c["winners"] == [parse_winner(t, META["winnerPattern"]) for t in c["judgments"]]
            results, agree = M.outcome(*c["winners"])
            games += [(c["a"], c["b"], r) for r in results]
            assert c["agree"] == agree
            if agree is not None:
                games_both += 1
                agreed += agree
        assert j["ratings"] == [round(r, 3) for r in M.ratings(k, games)]
    assert meta["orderAgreement"] == (pytest.approx(agreed / games_both) if games_both else None)

    candidates = store.read_jsonl(candidates_path(1))
    assert candidates and meta["candidatePairs"] == len(candidates)
    assert games_both > 0 and meta["winnerParseFailures"] < 2 * games_both
    by_key = {(j["promptId"], j["responseIndex"]): j for j in judgments}
    for c in candidates:
        j = by_key[(c["promptId"], c["responseIndex"])]
        best = max(range(len(j["ratings"])), key=lambda k: (j["ratings"][k], -k))
        assert c["chosen"] == j["verdicts"][best]["text"] and c["chosenScore"] == j["verdicts"][best]["score"]
        rec = next(r for r in records if r["promptId"] == c["promptId"])
        assert c["prompt"] == render_judge_prompt(spec.judge, rec["prompt"], rec["responses"][c["responseIndex"]]["text"])

    summary = run_phase(spec, "pairs", 1)
    written = store.read_jsonl(pairs_path(1))
    response_pairs, figures = build_pairs(records, spec.pairs.minMargin, 0.3)
    kept, caps = M.cap_meta_pairs(candidates, len(response_pairs), 0.9, 0.5)
    assert response_pairs and kept and written == response_pairs + kept
    assert summary["pairs"] == len(written) and summary["metaPairs"] == len(kept)
    assert summary["responsePairs"] == len(response_pairs) and summary["lengthControl"] == 0.3
    assert summary["chosenMeanLength"] == figures["chosenMeanLength"]
    assert len(kept) <= 0.9 * len(written) and caps["metaPairsLargestClassShare"] <= 0.5
    assert all(p["kind"] == "judge" for p in written[len(response_pairs):])


def test_pairs_refuse_to_run_without_the_meta_judge_output(tmp_path, tiny_model):
    spec = make_spec(tmp_path, tiny_model, generation={"shards": 1}, judge={"shards": 1}, metaJudge=META)
    run_phase(spec, "generate", 1)
    run_phase(spec, "judge", 1)
    with pytest.raises(PhaseError, match="metaJudge is on but .*candidates.jsonl is missing"):
        run_phase(spec, "pairs", 1)
    assert not Store.for_spec(spec).exists(layout.summary_path(1, "pairs"))


def test_a_recreated_meta_judge_resumes_from_its_finished_batches(tmp_path, tiny_model, monkeypatch):
    from selfreward.worker import metajudge, parts

    spec = make_spec(tmp_path, tiny_model, generation={"shards": 1}, judge={"shards": 1, "samplesPerResponse": 4},
                     metaJudge={**META, "batchSize": 4})
    store = Store.for_spec(spec)
    run_phase(spec, "generate", 1)
    run_phase(spec, "judge", 1)
    whole = run_phase(spec, "metajudge", 1)
    expected = (store.read_jsonl(judgments_path(1)), store.read_jsonl(candidates_path(1)))
    assert whole["batchesResumed"] == 0 and whole["metaJudgments"] > 8  # several batches of 4
    for rel in (layout.summary_path(1, "metajudge"), judgments_path(1), candidates_path(1)):
        store.delete(rel)

    # the pod is killed after its second batch: the parts of batches 0 and 1 are in the store
    real_write = parts.BatchParts.write

    def killed_after_two(self, batch, *a, **kw):
        out = real_write(self, batch, *a, **kw)
        if batch == 1:
            raise SystemExit("killed")
        return out

    monkeypatch.setattr(parts.BatchParts, "write", killed_after_two)
    with pytest.raises(SystemExit):
        run_phase(spec, "metajudge", 1)
    monkeypatch.setattr(parts.BatchParts, "write", real_write)
    assert not store.exists(judgments_path(1))
    asked = []
    real_generate = metajudge.make_backend

    def counting(*a, **kw):
        backend = real_generate(*a, **kw)
        inner = backend.generate
        backend.generate = lambda prompts, **k: asked.append(len(prompts)) or inner(prompts, **k)
        return backend

    monkeypatch.setattr(metajudge, "make_backend", counting)
    again = run_phase(spec, "metajudge", 1)
    # the same records as the uninterrupted run (the batches keep their seeds), batches 0
    # and 1 not asked again, and the parts gone after the commit
    assert (store.read_jsonl(judgments_path(1)), store.read_jsonl(candidates_path(1))) == expected
    assert again["batchesResumed"] == 2 and sum(asked) == whole["metaJudgments"] - 8
    assert again["generatedTokens"] == whole["generatedTokens"]
    assert store.list(judgments_path(1)[: -len(".jsonl")] + ".parts") == []
