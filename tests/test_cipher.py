"""The cipher task (selfreward.tasks.cipher) and the spec.ablation knob: the verifier and
rule score, the data builders, and that swapPairs / randomJudge change exactly what they
say through the real pairs and judge phases (and a normal run changes neither)."""
import json
import random

import pytest

from selfreward import layout
from selfreward.judging import parse_verdict
from selfreward.spec import JudgeSpec, parse_spec
from selfreward.tasks import cipher
from selfreward.worker import run_phase
from selfreward.worker.judge import random_verdicts, read_phase_records
from selfreward.worker.pairs import pairs_path, swap_pairs


@pytest.fixture(scope="module")
def c():
    return cipher.make_cipher(7)


def test_maps_are_permutations_and_never_agree(c):
    assert c.symbols == cipher.SYMBOLS[:cipher.DEFAULT_SYMBOLS]
    assert sorted(c.f.values()) == sorted(c.symbols) == sorted(c.g.values())
    assert all(c.f[x] != c.g[x] for x in c.symbols)
    assert cipher.make_cipher(7) == c and cipher.make_cipher(8) != c
    wide = cipher.make_cipher(7, 16)
    assert sorted(wide.f) == sorted(cipher.SYMBOLS) and all(wide.f[x] != wide.g[x] for x in cipher.SYMBOLS)


def test_rule_score_counts_the_right_words_in_place(c):
    words = ["ka", "mo", "na", "ne", "ka"]
    answer = c.encode(words)
    assert cipher.rule_score(answer, " ".join(answer)) == 5
    assert cipher.rule_score(answer, " ".join(c.g[w] for w in words)) == 0
    mixed = [answer[0], c.g["mo"], answer[2], c.g["ne"], answer[4]]
    assert cipher.criteria(answer, " ".join(mixed)) == [True, False, True, False, True]
    # a right word in the wrong place does not count; missing words fail their criteria
    shifted = " ".join(answer[1:] + answer[:1])
    assert cipher.rule_score(answer, shifted) == sum(a == b for a, b in zip(answer, answer[1:] + answer[:1]))
    assert cipher.criteria(answer, " ".join(answer[:2])) == [True, True, False, False, False]
    assert cipher.rule_score(answer, "") == 0


def test_verify_is_the_rule_score_on_zero_to_one(c):
    words = ["ka", "ne", "mi", "mo", "ku"]
    answer = " ".join(c.encode(words))
    record = {"prompt": cipher.prompt_text(words), "answer": answer}
    assert cipher.verify(record["prompt"], answer, record) == 1.0
    wrong_two = answer.split()
    wrong_two[1], wrong_two[3] = c.g["ne"], c.g["mo"]
    assert cipher.verify(record["prompt"], " ".join(wrong_two), record) == pytest.approx(0.6)
    assert cipher.answer_of(7, record["prompt"]) == answer
    assert cipher.answer_of(7, "Encode: ka zz ka ka ka") is None
    assert cipher.answer_of(7, "Encode: ka su ka ka ka") is None  # su is not one of the 8 symbols


def test_judge_target_marks_each_criterion_and_parses_with_the_default_score_pattern(c):
    # the EFT target must be read by the project's default rubric parser, as the judge phase reads it
    judge = JudgeSpec()
    words = ["ka", "mo", "na", "ne", "ku"]
    answer = c.encode(words)
    for response in (" ".join(answer), " ".join(c.g[w] for w in words),
                     " ".join([answer[0], c.g["mo"], answer[2], answer[3], c.g["ku"]]), answer[0]):
        target = cipher.judge_target(words, answer, response)
        lines = target.splitlines()
        got = response.split()
        assert lines[:5] == [f"{q} {got[i] if i < len(got) else '-'} {int(m)}"
                             for i, (q, m) in enumerate(zip(words, cipher.criteria(answer, response)))]
        assert lines[5] == f"Score: {cipher.rule_score(answer, response)}"
        assert parse_verdict(target, judge).score == cipher.rule_score(answer, response)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_is_deterministic_and_the_sets_are_disjoint(tmp_path):
    a = cipher.build(tmp_path / "a", 3, train_prompts=50, ift=40, eft=60, heldout=20, judgeset=6)
    b = cipher.build(tmp_path / "b", 3, train_prompts=50, ift=40, eft=60, heldout=20, judgeset=6)
    other = cipher.build(tmp_path / "c", 4, train_prompts=50, ift=40, eft=60, heldout=20, judgeset=6)
    for name in cipher.FILES:
        assert a[name].read_text() == b[name].read_text(), name
    assert a["ift"].read_text() != other["ift"].read_text()
    prompts = {name: {r["prompt"] for r in _rows(a[name])} for name in ("prompts", "ift", "heldout", "judgeset")}
    eft_prompts = {cipher.prompt_text(cipher.prompt_words(r["prompt"].split("\n")[1])) for r in _rows(a["eft"])}
    sets = list(prompts.values()) + [eft_prompts]
    assert all(not (x & y) for i, x in enumerate(sets) for y in sets[i + 1:])
    assert [len(s) for s in sets] == [50, 40, 20, 6, 60]


def test_data_say_what_the_design_says(tmp_path):
    p = cipher.build(tmp_path, 5, train_prompts=10, ift=600, eft=600, heldout=30, judgeset=20, right=0.4)
    c = cipher.make_cipher(5)
    # IFT: every word is f(x) or g(x), f about 40% of the time
    right = total = 0
    for r in _rows(p["ift"]):
        words = cipher.prompt_words(r["prompt"])
        for x, y in zip(words, r["response"].split()):
            assert y in (c.f[x], c.g[x])
            right += y == c.f[x]
            total += 1
    assert 0.35 < right / total < 0.45
    # held-out answers are the ideal ones
    for r in _rows(p["heldout"]):
        assert r["answer"] == " ".join(c.encode(cipher.prompt_words(r["prompt"])))
    # EFT targets are the marks of the rendered answer, in the judge template
    scores = []
    for r in _rows(p["eft"]):
        q, a = r["prompt"].split("\n")[1:3]
        assert r["prompt"] == cipher.judge_prompt(q.removeprefix("Question: "), a.removeprefix("Answer: "))
        answer = c.encode(cipher.prompt_words(q))
        assert r["response"] == cipher.judge_target(cipher.prompt_words(q), answer, a.removeprefix("Answer: "))
        scores.append(cipher.rule_score(answer, a.removeprefix("Answer: ")))
    assert set(scores) == set(range(6))
    # each word right with probability 1/2 on its own: verdicts whose marks all agree are
    # rare (2/32), not a third of them as a uniform score would make them
    assert sum(x in (0, 5) for x in scores) / len(scores) < 0.12
    assert 0.45 < sum(scores) / (5 * len(scores)) < 0.55
    # judge set: distinct rule scores per prompt, labelled correctly
    for r in _rows(p["judgeset"]):
        answer = c.encode(cipher.prompt_words(r["prompt"]))
        labels = [x["score"] for x in r["responses"]]
        assert len(set(labels)) == len(labels) == 4
        assert labels == [cipher.rule_score(answer, x["response"]) for x in r["responses"]]


def test_the_task_words_are_single_tokens_of_the_tiny_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from selfreward.tiny import make_tiny_model

    p = cipher.build(tmp_path / "d", 0, train_prompts=10, ift=300, eft=100, heldout=5, judgeset=2)
    model = make_tiny_model(tmp_path / "m", corpus=str(p["corpus"]), hidden_size=16, layers=1, heads=2)
    assert cipher.check_tokenizer(AutoTokenizer.from_pretrained(model)) == []
    # and the check finds a tokenizer that splits them: the default one, trained without the corpus
    plain = make_tiny_model(tmp_path / "plain", hidden_size=16, layers=1, heads=2, vocab_size=300)
    assert cipher.check_tokenizer(AutoTokenizer.from_pretrained(plain))


# --- spec.ablation through the real phases --------------------------------------------

def _spec(tmp_path, ablation=None, samples=3):
    doc = {"model": {"uri": str(tmp_path / "no-model")}, "prompts": {"uri": str(tmp_path / "p.jsonl")},
           "iterations": 1, "seed": 11, "judge": {"samplesPerResponse": samples},
           "storage": {"uri": f"file://{tmp_path}/store"}}
    if ablation:
        doc["ablation"] = ablation
    return parse_spec(doc)


def _judged_store(spec, scores_by_prompt):
    """A committed judge phase whose responses carry the given scores."""
    from selfreward.storage import Store

    store = Store.for_spec(spec)
    records = [{"promptId": f"p{i}", "prompt": f"q{i}",
                "responses": [{"text": f"answer {i}-{j}", "score": s, "scores": [s], "verdicts": [f"Score: {s}"],
                               "parseFailures": 0, "failureReasons": []} for j, s in enumerate(scores)]}
               for i, scores in enumerate(scores_by_prompt)]
    store.write_jsonl(layout.shard_data_path(1, "judge", 0, 1), records)
    store.write_json(layout.shard_summary_path(1, "judge", 0, 1), {"prompts": len(records)})
    store.write_json(layout.summary_path(1, "judge"), {"numShards": 1})
    return store


def test_ablation_defaults_to_none_and_is_checked(tmp_path):
    assert _spec(tmp_path).ablation == "none"
    with pytest.raises(ValueError, match="ablation"):
        _spec(tmp_path, "shuffle")


@pytest.mark.parametrize("ablation", ["none", "randomJudge", "swapPairs"])
def test_pairs_phase_swaps_only_under_swap_pairs(tmp_path, ablation):
    spec = _spec(tmp_path, ablation)
    store = _judged_store(spec, [[1, 4, 2], [5, 0, 3]])
    summary = run_phase(spec, "pairs", 1, store=store)
    pairs = store.read_jsonl(pairs_path(1))
    want = [("answer 0-1", "answer 0-0", 4, 1), ("answer 1-0", "answer 1-1", 5, 0)]
    got = [(p["chosen"], p["rejected"], p["chosenScore"], p["rejectedScore"]) for p in pairs]
    if ablation == "swapPairs":
        assert got == [(r, c, lo, hi) for c, r, hi, lo in want]
        assert summary["ablation"] == "swapPairs"
    else:
        assert got == want and "ablation" not in summary
    assert swap_pairs(swap_pairs(pairs)) == pairs


def test_random_verdicts_parse_spread_and_are_seeded(tmp_path):
    spec = _spec(tmp_path, "randomJudge", samples=3)
    keys = [(f"p{i}", j) for i in range(200) for j in range(4)]
    verdicts = random_verdicts(spec, 1, keys)
    assert verdicts == random_verdicts(spec, 1, keys)
    assert verdicts != random_verdicts(spec, 2, keys)
    assert all(len(v) == 3 for v in verdicts)
    scores = [parse_verdict(v, spec.judge).score for vs in verdicts for v in vs]
    assert set(scores) == {0, 1, 2, 3, 4, 5}
    counts = [scores.count(s) for s in range(6)]
    assert max(counts) < 1.3 * min(counts)  # uniform over the rubric's range


def test_judge_phase_under_random_judge_loads_no_model_and_ignores_quality(tmp_path):
    # the spec's model does not exist: the random judge must not load it; a normal judge would
    spec = _spec(tmp_path, "randomJudge", samples=2)
    from selfreward.storage import Store

    store = Store.for_spec(spec)
    rng = random.Random(0)
    gen = [{"promptId": f"p{i}", "prompt": f"Encode: ka ka ka ka ka {i}",
            "responses": [" ".join(rng.choice(cipher.SYMBOLS) for _ in range(5)) for _ in range(4)],
            "tokens": [6] * 4, "truncated": [False] * 4} for i in range(30)]
    store.write_jsonl(layout.shard_data_path(1, "generate", 0, 1), gen)
    store.write_json(layout.shard_summary_path(1, "generate", 0, 1), {"prompts": len(gen)})
    store.write_json(layout.summary_path(1, "generate"), {"numShards": 1})
    summary = run_phase(spec, "judge", 1, store=store)
    assert summary["backend"] == "random" and summary["parseFailures"] == 0
    assert summary["ablation"] == "randomJudge"
    judged = read_phase_records(store, 1, "judge")
    scores = [r["score"] for rec in judged for r in rec["responses"]]
    assert len(scores) == 120 and len(set(scores)) > 5
    # the same phase without the ablation judges with the spec's model, which does not exist
    normal = _spec(tmp_path / "normal")
    other = Store.for_spec(normal)
    for rel in (layout.shard_data_path(1, "generate", 0, 1), layout.shard_summary_path(1, "generate", 0, 1),
                layout.summary_path(1, "generate")):
        other.write_bytes(rel, store.read_bytes(rel))
    with pytest.raises(Exception, match="no-model"):
        run_phase(normal, "judge", 1, store=other)
