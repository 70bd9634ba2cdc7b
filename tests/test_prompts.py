"""Prompts of an iteration (seeded sampling, ids, errors) and the self-instruct helpers."""
import json

import pytest

from selfreward.prompts import (PromptError, PromptFilter, extract_prompt, few_shot_request, instruct_prompts_path,
                                iteration_prompts, load_seed_prompts, normalise, prompt_id, rouge_l,
                                sample_seed_prompts, words)
from selfreward.spec import SelfInstructSpec, parse_spec
from selfreward.storage import Store

SEEDS = [f"Explain topic number {i} to a curious child." for i in range(20)]


def write_seeds(path, prompts=SEEDS):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def spec_for(tmp_path, **prompts):
    return parse_spec({
        "model": {"uri": "/models/none"},
        "prompts": {"uri": str(tmp_path / "seeds.jsonl"), **prompts},
        "iterations": 3,
        "storage": {"uri": f"file://{tmp_path}/artifacts"},
        "seed": 7,
    })


def test_sampling_is_seeded_per_iteration(tmp_path):
    write_seeds(tmp_path / "seeds.jsonl")
    spec = spec_for(tmp_path, perIteration=5)
    store = Store.for_spec(spec)
    one = iteration_prompts(spec, store, 1)
    assert len(one) == 5 and all(p["prompt"] in SEEDS for p in one)
    assert iteration_prompts(spec, store, 1) == one  # same seed, same sample
    two = iteration_prompts(spec, store, 2)
    assert [p["prompt"] for p in two] != [p["prompt"] for p in one]  # seed + t differs per iteration
    assert [p["prompt"] for p in one] == sample_seed_prompts(SEEDS, 5, 7, 1)
    for p in one:
        assert p["promptId"] == prompt_id(p["prompt"]) and p["source"] == "seed"
    # unset perIteration: every seed in file order
    all_ = iteration_prompts(spec_for(tmp_path), store, 1)
    assert [p["prompt"] for p in all_] == SEEDS
    assert sample_seed_prompts(SEEDS, 50, 7, 1) == SEEDS


def test_prompt_ids_are_stable_and_duplicates_collapse(tmp_path):
    assert prompt_id("hello") == prompt_id("hello") != prompt_id("hello ")
    assert len(prompt_id("x")) == 16
    write_seeds(tmp_path / "seeds.jsonl", ["same prompt", "other", "same prompt"])
    got = iteration_prompts(spec_for(tmp_path), Store(f"file://{tmp_path}/a"), 1)
    assert [p["prompt"] for p in got] == ["same prompt", "other"]


def test_bad_records_name_their_line(tmp_path):
    f = tmp_path / "seeds.jsonl"
    f.write_text('{"prompt": "fine"}\n\n{"prompt": 3}\n')
    with pytest.raises(PromptError, match=r"line 3: the \"prompt\" field is a int"):
        load_seed_prompts(str(f))
    f.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    with pytest.raises(PromptError, match="line 2: the \"prompt\" field is missing"):
        load_seed_prompts(str(f))
    f.write_text('{"prompt": "fine"}\n{oops\n')
    with pytest.raises(PromptError, match="line 2: not JSON"):
        load_seed_prompts(f"file://{f}")
    f.write_text('["a list"]\n')
    with pytest.raises(PromptError, match="line 1: expected an object"):
        load_seed_prompts(str(f))
    f.write_text('{"prompt": "   "}\n')
    with pytest.raises(PromptError, match="line 1: the \"prompt\" field is empty"):
        load_seed_prompts(str(f))
    f.write_text("\n")
    with pytest.raises(PromptError, match="no prompt"):
        load_seed_prompts(str(f))
    with pytest.raises(PromptError, match="do not exist"):
        load_seed_prompts(str(tmp_path / "missing.jsonl"))


def test_instructed_prompts_are_appended(tmp_path):
    write_seeds(tmp_path / "seeds.jsonl")
    spec = spec_for(tmp_path, perIteration=3, selfInstruct={"count": 2})
    store = Store.for_spec(spec)
    with pytest.raises(PromptError, match="instruct phase of iteration 1 must run first"):
        iteration_prompts(spec, store, 1)
    store.write_jsonl(instruct_prompts_path(1), [{"prompt": "A brand new task about volcanoes."},
                                                  {"prompt": SEEDS[0]}])
    got = iteration_prompts(spec, store, 1)
    assert [p["source"] for p in got][:3] == ["seed"] * 3
    assert got[3] == {"promptId": prompt_id("A brand new task about volcanoes."),
                      "prompt": "A brand new task about volcanoes.", "source": "instruct"}
    assert len({p["promptId"] for p in got}) == len(got)


def test_few_shot_request_and_extraction():
    req = few_shot_request(["Say hi.", "  Name a colour. "])
    assert req.endswith("Task 1: Say hi.\nTask 2: Name a colour.\nTask 3:")
    assert extract_prompt(" Describe how tides work.\nTask 4: something else") == "Describe how tides work."
    assert extract_prompt("Task 3: Write a haiku about rain.\n\nHere is another one") == "Write a haiku about rain."
    assert extract_prompt('Instruction: "List three prime numbers."') == "List three prime numbers."
    assert extract_prompt("\n\nFirst line\nsecond line\n\nrest") == "First line\nsecond line"
    assert extract_prompt("   \n  ") is None
    assert extract_prompt("Task 5:") is None
    assert extract_prompt("Sure! Here is a new task:\n\nTask 9: Plan a three-day trip to Rome.") == \
        "Plan a three-day trip to Rome."
    assert extract_prompt("Here is one:\nName two rivers in Africa.\nTask 10: more") == "Name two rivers in Africa."


def test_similarity_measures():
    assert normalise("  Hello,   WORLD! ") == "hello world"
    assert words("It's 3 o'clock") == ["it", "s", "3", "o", "clock"]
    a = words("write a poem about the sea")
    assert rouge_l(a, a) == 1.0
    assert rouge_l(a, []) == 0.0
    assert rouge_l(words("a b c d"), words("a x c y")) == pytest.approx(0.5)  # LCS a,c
    assert rouge_l(words("x y"), words("p q r")) == 0.0


def test_filters_count_each_reason():
    si = SelfInstructSpec(count=10, minChars=10, maxChars=60, maxSimilarity=0.7)
    flt = PromptFilter(["Write a poem about the sea at night."], si)
    offers = [
        None,                                                    # empty
        "   ",                                                   # empty
        "Too short",                                             # tooShort (9 chars)
        "x" * 61,                                                # tooLong
        "Write a poem about the sea at night.",                  # duplicate of a seed
        "write a POEM about the sea, at night!",                 # normalised duplicate
        "Write a poem about the sea at dawn.",                   # similar to the seed
        "Explain how a refrigerator keeps food cold.",           # kept
        "Explain how a refrigerator keeps food cold.",           # duplicate of a kept one
        "Explain how a refrigerator keeps drinks cold.",         # similar to a kept one
        "List three uses of copper in electronics.",             # kept
    ]
    kept = [flt.offer(o) for o in offers]
    assert kept == [False] * 7 + [True, False, False, True]
    assert flt.kept == ["Explain how a refrigerator keeps food cold.", "List three uses of copper in electronics."]
    assert flt.dropped == {"empty": 2, "tooShort": 1, "tooLong": 1, "duplicate": 3, "similar": 2}
    # a looser threshold keeps the near-copy
    loose = PromptFilter(["Write a poem about the sea at night."], SelfInstructSpec(maxSimilarity=1.0))
    assert loose.offer("Write a poem about the sea at dawn.")


def test_line_separators_inside_strings_survive_a_round_trip(tmp_path):
    # model output may hold U+2028 / U+0085, which JSON leaves raw and str.splitlines() splits at
    odd = "first\u2028second\x85third\u2029end"
    store = Store(f"file://{tmp_path}/s")
    store.write_jsonl("x.jsonl", [{"prompt": odd}, {"prompt": "next"}])
    assert store.read_jsonl("x.jsonl") == [{"prompt": odd}, {"prompt": "next"}]
    assert load_seed_prompts(store.url("x.jsonl")) == [odd, "next"]


from hypothesis import given, settings, strategies as st  # noqa: E402

_word = st.sampled_from(["write", "a", "poem", "about", "the", "sea", "explain", "how", "tides", "work", "list", "three"])


@settings(max_examples=150, deadline=None)
@given(cands=st.lists(st.lists(_word, min_size=1, max_size=8).map(" ".join), max_size=25),
       limit=st.sampled_from([0.3, 0.5, 0.7, 1.0]))
def test_filter_properties(cands, limit):
    seeds = ["write a poem about the sea"]
    si = SelfInstructSpec(minChars=1, maxChars=40, maxSimilarity=limit)
    flt = PromptFilter(seeds, si)
    for c in cands:
        flt.offer(c)
    assert len(flt.kept) + sum(flt.dropped.values()) == len(cands)
    pool = seeds + flt.kept
    assert len({normalise(p) for p in pool}) == len(pool)  # no normalised duplicates kept
    for i, a in enumerate(flt.kept):
        for b in pool[:len(seeds) + i]:  # everything that was there before a was kept
            assert rouge_l(words(a), words(b)) <= limit
