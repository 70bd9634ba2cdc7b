"""The eval figures as Prometheus series, scraped over real HTTP: the iteration figures
the phase registry declares for eval, and the run's eval score and rollbacks."""
from __future__ import annotations

import math

import pytest

from selfreward import phases
from selfreward.metrics import ITERATION_FIGURES, Metrics
from test_metrics import run_series, samples, scrape, value

EVAL_FIGURES = {f.metric: f.name for f in phases.get("eval").figures}


def status(**over):
    st = {
        "phase": "Running", "currentIteration": 2, "currentPhase": "generate", "evalMetric": "verifierScore",
        "lastEval": 47.5, "rollbacks": 1, "bestCheckpoint": "s3://b/r/iter-1/train/checkpoint",
        "history": [
            {"iteration": 0, "endTime": "t0", "sftLoss": 1.75, "verifierScore": 30.0},
            {"iteration": 1, "endTime": "t1", "pairs": 12, "verifierScore": 47.5, "judgePairwiseAccuracy": 0.8125,
             "judgeSpearman": 0.5, "judgeKendall": 0.375, "winRateVsPrevious": 0.625, "winRateVsPreviousLow": 0.5,
             "winRateVsPreviousHigh": 0.75, "meanResponseTokens": 12.5, "chosenMeanTokens": 20.0,
             "rejectedMeanTokens": 8.0, "genTruncatedShare": 0.25},
            {"iteration": 2, "prompts": 5},  # in progress
        ],
    }
    st.update(over)
    return st


@pytest.fixture
def served():
    m = Metrics()
    server = m.serve(0, "127.0.0.1")
    try:
        yield m, server
    finally:
        server.stop()


def test_eval_figures_of_the_last_completed_iteration(served):
    m, server = served
    m.observe_status("ns", "r", status())
    fams = scrape(server.url)
    key = {"namespace": "ns", "run": "r"}
    assert value(fams, "selfreward_iteration_number", **key) == 1
    expect = {"eval_verifier_score": 47.5, "eval_judge_pairwise_accuracy": 0.8125, "eval_judge_spearman": 0.5,
              "eval_judge_kendall": 0.375, "eval_win_rate_vs_previous": 0.625,
              "eval_win_rate_vs_previous_low": 0.5, "eval_win_rate_vs_previous_high": 0.75,
              "eval_response_tokens_mean": 12.5, "eval_chosen_tokens_mean": 20.0,
              "eval_rejected_tokens_mean": 8.0, "eval_generated_truncated_ratio": 0.25}
    for name, v in expect.items():
        fam = fams[f"selfreward_iteration_{name}"]
        assert fam.type == "gauge" and value(fams, f"selfreward_iteration_{name}", **key) == v, name
    # measured nowhere in the record: no series (never NaN); iteration 0's sft loss is not the last one's
    for name in ("eval_win_rate_vs_baseline", "eval_judge_exact_match", "sft_loss"):
        assert frozenset(key.items()) not in samples(fams, f"selfreward_iteration_{name}")
    assert value(fams, "selfreward_run_eval_score", **key) == 47.5
    assert value(fams, "selfreward_run_rollbacks", **key) == 1
    for f in fams.values():
        assert not any(math.isnan(s.value) for s in f.samples), f.name


def test_every_eval_figure_is_a_series_with_help(served):
    m, server = served
    assert set(EVAL_FIGURES) <= set(ITERATION_FIGURES)
    rec = {"iteration": 1, "endTime": "t", **{field: 0.5 for field in EVAL_FIGURES.values()}}
    m.observe_status("ns", "all", {"phase": "Running", "history": [rec]})
    fams = scrape(server.url)
    for metric in EVAL_FIGURES:
        fam = fams[f"selfreward_iteration_{metric}"]
        assert fam.documentation.endswith("(last completed iteration)")
        assert value(fams, f"selfreward_iteration_{metric}", namespace="ns", run="all") == 0.5


def test_sft_loss_while_iteration_0_is_the_last_completed(served):
    m, server = served
    m.observe_status("ns", "s", {"phase": "Running", "currentIteration": 1, "currentPhase": "generate",
                                 "history": [{"iteration": 0, "endTime": "t0", "sftLoss": 1.75}]})
    assert value(scrape(server.url), "selfreward_iteration_sft_loss", namespace="ns", run="s") == 1.75


def test_runs_without_eval_have_no_eval_series_and_forget_drops_them(served):
    m, server = served
    m.observe_status("ns", "plain", {"phase": "Running", "history": [{"iteration": 1, "endTime": "t", "pairs": 3}]})
    m.observe_status("ns", "r", status())
    fams = scrape(server.url)
    for fam in ("selfreward_run_eval_score", "selfreward_run_rollbacks"):
        assert frozenset({"namespace": "ns", "run": "plain"}.items()) not in samples(fams, fam)
    m.forget_run("ns", "r")
    assert run_series(scrape(server.url), "ns", "r") == []
