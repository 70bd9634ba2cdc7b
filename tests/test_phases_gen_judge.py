"""The generation backend and the instruct / generate / judge / pairs phases, run
through the worker dispatcher on a file:// store with the tiny random model."""
import json
import os
import statistics

import pytest

from selfreward import layout
from selfreward.backends import BackendError, Completion, chat_format, make_backend
from selfreward.backends.hf import TransformersBackend
from selfreward.judging import parse_score
from selfreward.prompts import instruct_prompts_path, prompt_id
from selfreward.spec import parse_spec
from selfreward.worker import run_phase
from selfreward.worker.common import PhaseError
from selfreward.worker.judge import read_phase_records
from selfreward.worker.pairs import build_pairs, pairs_path

SEEDS = [
    "Explain why the sky looks blue during the day.",
    "Write a short poem about autumn leaves.",
    "How do I reverse a list in Python?",
    "Give three tips for a good night's sleep.",
    "What is the difference between weather and climate?",
    "Summarise the plot of a fairy tale in two sentences.",
    "Name a prime number larger than ten.",
]


def make_spec(tmp_path, model, **over):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in SEEDS))
    data = {
        "model": {"uri": model},
        "prompts": {"uri": str(seeds)},
        "iterations": 1,
        "storage": {"uri": f"file://{tmp_path}/artifacts"},
        "generation": {"responsesPerPrompt": 3, "maxNewTokens": 12, "batchSize": 4, "shards": 2},
        # the tiny model writes random tokens, digits among them: a one-digit pattern
        # lets some verdicts score and others fail, so both paths run
        "judge": {"samplesPerResponse": 2, "maxNewTokens": 16, "batchSize": 8, "shards": 2,
                  "scorePattern": r"([0-9])", "minScore": 0, "maxScore": 9},
        "seed": 3,
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_spec(data)


# --- the backend ---

def test_backend_samples_n_per_prompt_and_counts_tokens(tiny_model):
    with TransformersBackend(tiny_model, batch_size=2) as b:
        prompts = ["Say something.", "A longer prompt with many more words in it than the first.", "Hi"]
        out = b.generate(prompts, n=3, temperature=0.9, top_p=0.95, max_new_tokens=10, seed=5)
        assert len(out) == 3 and all(len(g) == 3 for g in out)
        assert all(isinstance(c, Completion) and 1 <= c.tokens <= 10 for g in out for c in g)
        assert b.generated_tokens == sum(c.tokens for g in out for c in g)
        again = b.generate(prompts, n=3, temperature=0.9, top_p=0.95, max_new_tokens=10, seed=5)
        assert again == out  # seeded
        # batching does not change the result count or order of groups
        single = b.generate(prompts[:1], n=3, temperature=0.9, top_p=0.95, max_new_tokens=10, seed=5)
        assert len(single) == 1 and len(single[0]) == 3
        greedy = b.generate(["Hi"], n=2, temperature=0.0, max_new_tokens=6, seed=0)
        assert greedy[0][0] == greedy[0][1]
        assert b.generate([], n=2) == []


def test_continuous_batching_keeps_the_interface(tiny_model, monkeypatch):
    # transformers' paged continuous-batching generator, behind the same interface (a GPU
    # fast path; on CPU it only has to give the same shape of answer)
    monkeypatch.setenv("SELFREWARD_CONTINUOUS_BATCHING", "1")
    with make_backend("transformers", tiny_model, batch_size=4) as b:
        assert b.name == "transformers-cb"
        out = b.generate(["Say something.", "Hi", "A third prompt"], n=2, temperature=0.9, top_p=0.95,
                         max_new_tokens=5, seed=1)
        assert len(out) == 3 and all(len(g) == 2 for g in out)
        assert all(1 <= c.tokens <= 5 for g in out for c in g)
        assert b.generated_tokens == sum(c.tokens for g in out for c in g)


def test_completion_stops_at_eos(tiny_model):
    b = TransformersBackend(tiny_model, batch_size=1)
    try:
        eos = b.eos_ids[0]
        word = b.tokenizer("hello world", add_special_tokens=False)["input_ids"]
        c = b._completion(word + [eos] + word)
        assert c.finished and c.tokens == len(word) + 1 and c.text == "hello world"
        open_ended = b._completion(word)
        assert not open_ended.finished and open_ended.tokens == len(word)
    finally:
        b.close()


def test_chat_template_and_plain_fallback(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text, templated = chat_format(tok, "What is 2+2?")
    assert templated and text == "<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    tok.chat_template = None  # a base model: the documented plain format, not the bare prompt
    assert chat_format(tok, "What is {2}+2?") == ("### Instruction:\nWhat is {2}+2?\n\n### Response:\n", False)


def test_one_prompt_format_for_generation_judging_and_training(tiny_model):
    """Without a chat template the hf backend, the vllm backend and SFT/DPO rows all use
    prompt_format's plain format (one function), never the bare prompt."""
    from transformers import AutoTokenizer

    from selfreward import prompt_format, training
    from selfreward.backends import hf, vllm

    assert hf.format_prompt is vllm.format_prompt is prompt_format.format_prompt
    b = TransformersBackend(tiny_model)
    try:
        b.tokenizer.chat_template = None
        (ids,) = b._encode(["What is 2+2?"], max_new_tokens=4)
        shown = b.tokenizer.decode(ids, skip_special_tokens=True)
        assert shown == prompt_format.plain_prompt("What is 2+2?") == "### Instruction:\nWhat is 2+2?\n\n### Response:\n"
        assert b.generate(["What is 2+2?"], n=2, max_new_tokens=3, seed=1)[0][0].tokens >= 1
    finally:
        b.close()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    assert training.chat_format(tok) is False
    pair = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}
    (row,) = training.preference_rows([pair], training.chat_format(tok), "pairs")
    assert row == {"prompt": shown, "chosen": "4.", "rejected": "5."}
    (row,) = training.completion_rows([{"prompt": "What is 2+2?", "response": "4."}], False, "ift")
    assert row == {"prompt": shown, "completion": "4."}


def test_backend_names():
    with pytest.raises(BackendError, match="unknown generation backend"):
        make_backend("nope", "/nowhere")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="needs the vllm package"):
            make_backend("vllm", "/nowhere")


# --- the phases ---

def test_generate_judge_pairs_end_to_end(tmp_path, tiny_model):
    spec = make_spec(tmp_path, tiny_model)
    from selfreward.storage import Store

    store = Store.for_spec(spec)
    reports = []

    # generate: two shards, the second call finalizes the phase
    s0 = run_phase(spec, "generate", 1, shard=0, progress=reports.append)
    assert s0["shard"] == 0 and s0["prompts"] == 4 and s0["responses"] == 12  # prompts 0,2,4,6
    assert not store.exists(layout.summary_path(1, "generate"))
    gen = run_phase(spec, "generate", 1, shard=1, progress=reports.append)
    assert gen["numShards"] == 2 and gen["prompts"] == 7 and gen["responses"] == 21
    assert gen["generatedTokens"] > 0 and gen["tokensPerSecond"] > 0 and gen["backend"] == "transformers"
    assert reports and reports[-1]["done"] == reports[-1]["total"] == 3 and reports[-1]["phase"] == "generate"
    shard0 = store.read_jsonl(layout.shard_data_path(1, "generate", 0, 2))
    assert [r["prompt"] for r in shard0] == SEEDS[0::2]
    for r in shard0:
        assert r["promptId"] == prompt_id(r["prompt"])
        assert len(r["responses"]) == len(r["tokens"]) == 3
        assert all(isinstance(t, str) for t in r["responses"]) and all(1 <= n <= 12 for n in r["tokens"])
        # cut at maxNewTokens without an end-of-sequence token: marked, and only then
        assert len(r["truncated"]) == 3 and all(isinstance(f, bool) for f in r["truncated"])
        assert all(n == 12 for n, cut in zip(r["tokens"], r["truncated"]) if cut)
    generated = read_phase_records(store, 1, "generate")
    assert any(f for r in generated for f in r["truncated"])  # random text rarely ends within 12 tokens
    assert gen["truncatedResponses"] == sum(f for r in generated for f in r["truncated"])
    assert gen["generatedTokens"] == sum(sum(r["tokens"]) for r in read_phase_records(store, 1, "generate"))

    # judge: two shards over all generate records
    run_phase(spec, "judge", 1, shard=0)
    judge = run_phase(spec, "judge", 1, shard=1)
    records = read_phase_records(store, 1, "judge")
    assert sorted(r["promptId"] for r in records) == sorted(prompt_id(p) for p in SEEDS)
    scores = []
    generated_by_id = {r["promptId"]: r for r in generated}
    for rec in records:
        assert len(rec["responses"]) == 3
        # the judge record carries each response's truncation mark over
        assert [resp["truncated"] for resp in rec["responses"]] == generated_by_id[rec["promptId"]]["truncated"]
        for resp in rec["responses"]:
            assert len(resp["verdicts"]) == 2  # raw verdicts kept
            # the stored scores are exactly what the parser reads from the raw verdicts
            parsed = [parse_score(v, r"([0-9])", 0, 9).score for v in resp["verdicts"]]
            assert resp["scores"] == [s for s in parsed if s is not None]
            assert resp["parseFailures"] == parsed.count(None)
            if resp["scores"]:
                assert resp["score"] == pytest.approx(statistics.fmean(resp["scores"]))
                scores.append(resp["score"])
            else:
                assert resp["score"] is None
    assert judge["numShards"] == 2 and judge["judgedResponses"] == 21 and judge["verdicts"] == 42
    assert judge["scoredResponses"] == len(scores) > 0
    assert judge["unscoredResponses"] == 21 - len(scores)
    # finalize recomputed the statistics over every record, not from shard figures
    assert judge["scoreMean"] == pytest.approx(statistics.fmean(scores))
    assert judge["scoreStd"] == pytest.approx(statistics.pstdev(scores))
    assert judge["scoreMin"] == min(scores) and judge["scoreMax"] == max(scores)
    assert judge["parseFailures"] == sum(r["parseFailures"] for rec in records for r in rec["responses"])

    pairs = run_phase(spec, "pairs", 1)
    written = store.read_jsonl(pairs_path(1))
    expected, figures = build_pairs(records, spec.pairs.minMargin)
    assert written == expected
    assert pairs["pairs"] == len(written) and pairs["prompts"] == 7
    assert pairs["pairs"] + pairs["pairsDropped"] == 7
    assert pairs["pairs"] == figures["pairs"] and pairs["droppedTies"] == figures["droppedTies"]
    by_id = {r["promptId"]: r for r in records}
    for p in written:
        assert p["chosenScore"] > p["rejectedScore"]
        texts = {r["text"]: r["score"] for r in by_id[p["promptId"]]["responses"]}
        assert texts[p["chosen"]] == p["chosenScore"] and texts[p["rejected"]] == p["rejectedScore"]
        assert not any(r["truncated"] for r in by_id[p["promptId"]]["responses"] if r["text"] == p["chosen"])


def test_unparseable_verdicts_are_counted_and_the_run_goes_on(tmp_path, tiny_model):
    # the default "Score: <n>" pattern: the random model almost never writes it
    spec = make_spec(tmp_path, tiny_model, generation={"shards": 1, "responsesPerPrompt": 2},
                     judge={"shards": 1, "scorePattern": r"Score:\s*([0-9]+(?:\.[0-9]+)?)", "maxScore": 5})
    run_phase(spec, "generate", 1)
    judge = run_phase(spec, "judge", 1)
    assert judge["verdicts"] == 7 * 2 * 2
    assert judge["parseFailures"] > 0
    assert judge["parseFailures"] == judge["parseFailuresNoMatch"] + judge["parseFailuresOutOfRange"] + \
        judge["parseFailuresNotANumber"] + judge["parseFailuresNotFinite"]
    assert judge["scoredResponses"] + judge["unscoredResponses"] == 14
    pairs = run_phase(spec, "pairs", 1)
    assert pairs["pairs"] + pairs["pairsDropped"] == 7  # completes, whatever scored


def test_shards_are_idempotent_and_redo_only_what_is_missing(tmp_path, tiny_model):
    spec = make_spec(tmp_path, tiny_model)
    from selfreward.storage import Store

    store = Store.for_spec(spec)
    run_phase(spec, "generate", 1, shard=0)
    run_phase(spec, "generate", 1, shard=1)
    d0 = store.path(layout.shard_data_path(1, "generate", 0, 2))
    d1 = layout.shard_data_path(1, "generate", 1, 2)
    before0, before1 = os.stat(d0).st_mtime_ns, store.read_bytes(d1)

    again = run_phase(spec, "generate", 1, shard=0)  # the phase is committed: skipped
    assert again["skipped"] is True

    # lose shard 1 and the phase summary: shard 0 is skipped, shard 1 is redone
    store.delete(d1)
    store.delete(layout.shard_summary_path(1, "generate", 1, 2))
    store.delete(layout.summary_path(1, "generate"))
    assert run_phase(spec, "generate", 1, shard=0)["skipped"] is True
    assert not store.exists(layout.summary_path(1, "generate"))
    redone = run_phase(spec, "generate", 1, shard=1)
    assert "skipped" not in redone and redone["numShards"] == 2 and redone["prompts"] == 7
    assert os.stat(d0).st_mtime_ns == before0
    assert store.read_bytes(d1) == before1  # seeded: the same records again


def test_judge_refuses_an_incomplete_generate_phase(tmp_path, tiny_model):
    spec = make_spec(tmp_path, tiny_model)
    with pytest.raises(PhaseError, match="generate is not complete"):
        run_phase(spec, "judge", 1, shard=0)
    run_phase(spec, "generate", 1, shard=0)
    with pytest.raises(PhaseError, match=r"shards \[1\] of 2 have not committed"):
        run_phase(spec, "judge", 1, shard=0)


def test_instruct_then_generate_uses_the_new_prompts(tmp_path, tiny_model):
    spec = make_spec(
        tmp_path, tiny_model,
        prompts={"selfInstruct": {"count": 3, "fewShot": 3, "maxNewTokens": 16, "minChars": 2,
                                  "maxAttempts": 3, "maxSimilarity": 0.9}},
        generation={"shards": 1, "responsesPerPrompt": 2},
    )
    from selfreward.storage import Store

    store = Store.for_spec(spec)
    summary = run_phase(spec, "instruct", 1)
    kept = store.read_jsonl(instruct_prompts_path(1))
    assert summary["kept"] == len(kept) <= 3
    assert summary["generated"] == summary["kept"] + summary["dropped"]
    assert summary["dropped"] == sum(summary[k] for k in ("droppedEmpty", "droppedTooShort", "droppedTooLong",
                                                          "droppedDuplicate", "droppedSimilar"))
    assert 1 <= summary["rounds"] <= 3
    assert summary["kept"] == 3 or summary["rounds"] == 3  # stops when enough are kept or rounds run out
    for k in kept:
        assert k["promptId"] == prompt_id(k["prompt"]) and k["prompt"].strip() == k["prompt"]
        assert k["prompt"] not in SEEDS and len(k["prompt"]) >= 2
    gen = run_phase(spec, "generate", 1)
    assert gen["prompts"] == len(SEEDS) + len({k["prompt"] for k in kept})
    assert run_phase(spec, "instruct", 1)["skipped"] is True


def test_vllm_adapter_maps_requests_and_outputs(tiny_model, monkeypatch):
    """vLLM cannot run here (no GPU), so this checks our adapter against vLLM's documented
    offline interface (LLM, SamplingParams, RequestOutput.outputs[i].text/token_ids/
    finish_reason) with a stand-in module: what we send and how we read the answer."""
    import sys
    import types

    from transformers import AutoTokenizer

    calls = {}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, model, dtype, **kw):
            calls["init"] = dict(model=model, dtype=dtype, **kw)

        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(tiny_model)

        def generate(self, prompts, params, use_tqdm=True):
            calls["prompts"], calls["params"] = prompts, params.kw
            out = types.SimpleNamespace
            return [out(outputs=[out(text=f"p{i}-s{j}", token_ids=[1] * (j + 2),
                                     finish_reason="stop" if j == 0 else "length")
                                 for j in range(params.kw["n"])]) for i in range(len(prompts))]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    with make_backend("vllm", tiny_model, "bfloat16", 8) as b:
        out = b.generate(["first", "second"], n=3, temperature=0.6, top_p=0.8, max_new_tokens=7, seed=11)
    assert calls["init"]["model"] == tiny_model and calls["init"]["dtype"] == "bfloat16"
    assert calls["params"] == {"n": 3, "temperature": 0.6, "top_p": 0.8, "max_tokens": 7, "seed": 11}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.decode(calls["prompts"][0]["prompt_token_ids"]) == "<|user|>\nfirst\n<|assistant|>\n"
    assert [[c.text for c in g] for g in out] == [["p0-s0", "p0-s1", "p0-s2"], ["p1-s0", "p1-s1", "p1-s2"]]
    assert [c.tokens for c in out[0]] == [2, 3, 4] and [c.finished for c in out[0]] == [True, False, False]
    assert b.generated_tokens == 18


def test_long_prompts_are_cut_from_the_left_to_fit_the_context(tmp_path):
    from selfreward.tiny import make_tiny_model

    model = str(make_tiny_model(tmp_path / "short-context", max_positions=48))
    with TransformersBackend(model, batch_size=2) as b:
        long_prompt = "Please explain this in detail. " * 40
        out = b.generate([long_prompt, "Hi"], n=2, temperature=0.9, top_p=0.9, max_new_tokens=8, seed=0)
        assert len(out) == 2 and all(1 <= c.tokens <= 8 for g in out for c in g)
        assert b.truncated_prompts == 1
        assert all(len(ids) + 8 <= 48 for ids in b._encode([long_prompt], 8))


def test_answers_come_back_in_prompt_order(tiny_model):
    # prompts are batched by length inside the backend; each answer must still belong to
    # its own prompt: with greedy decoding, a prompt's answer is the same alone or in a batch
    prompts = ["A much longer prompt than the others, with plenty of words in it.", "Hi", "Medium sized prompt here"]
    with TransformersBackend(tiny_model, batch_size=2) as b:
        together = b.generate(prompts, n=1, temperature=0.0, max_new_tokens=6)
        alone = [b.generate([p], n=1, temperature=0.0, max_new_tokens=6)[0] for p in prompts]
    assert [g[0].text for g in together] == [g[0].text for g in alone]
