"""The phase registry: every worker phase of a run, declared once.

An entry says where the phase sits in an iteration, in which iterations it runs,
whether it is enabled by the spec, whether it runs as an Indexed Job and with how many
shards, which model it loads, and which figures of its summary become
``status.history`` fields, Prometheus series and columns of the local runner's final
table. Everything that used to list the phases reads this table instead: the step
planner (``layout.steps``), the worker dispatcher, reconcile (positions, history,
progress), the local runner, ``status.IterationRecord`` and the metrics.

Adding a phase is one entry here, one worker module ``selfreward.worker.<name>`` with
``run(ctx) -> dict`` (and ``finalize`` when sharded), one spec section, and the
regenerated CRD. The idea follows Kubeflow Trainer's plugin registry
(pkg/runtime/framework): the framework iterates over registered plugins and never
names one.

A phase may name a ``host``: an earlier sharded phase whose pods (local tasks) run it
too, shard for shard, on the model they loaded, when the spec asks for it
(``judge.colocate``: judge in generate's pods). It stays a step of its own (its
summary, history figures, place in the order); ``layout.Step.host`` says who runs it,
the dispatcher's ``run_step`` runs a phase and the ones it hosts, and reconcile
records a hosted step from its host's Job.

An iteration ends with its last enabled step (train, or eval when ``spec.eval`` is
set; sft, or the baseline eval, in iteration 0): ``layout.iteration_end`` derives it
from this table, so no phase is special-cased as "the last one".

This module imports nothing of the package at run time, so spec, status and metrics
can all import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .spec import RunSpec

# Which iterations a phase runs in: iteration 0 only (before M_1 exists), the
# self-rewarding iterations 1..N, or both.
Iterations = Literal["zero", "each", "zero-and-each"]
# Which model the phase loads: none; the base model M_0; M_t, the policy of iteration t;
# M_{t+1}, the model iteration t produced (M_1 in iteration 0).
ModelRole = Literal["none", "base", "policy", "next"]


@dataclass(frozen=True)
class Figure:
    """One summary figure that becomes a status.history field (and maybe a metric and a
    column of the local table)."""

    name: str  # the IterationRecord field, camelCase
    keys: tuple[str, ...]  # summary keys carrying it, the first present wins
    kind: type  # int or float
    help: str  # the field's description (CRD, docs) and the metric's HELP text
    metric: Optional[str] = None  # selfreward_iteration_<metric>; None: not exported
    column: Optional[str] = None  # column label in `selfreward run`'s final table
    digits: int = 3  # decimals shown in the table

    def read(self, summary: Optional[dict]) -> Any:
        """The figure's value in a summary, typed and rounded, or None."""
        for key in self.keys:
            v = (summary or {}).get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                continue
            return int(v) if self.kind is int else round(float(v), 6)
        return None


@dataclass(frozen=True)
class Phase:
    name: str
    iterations: Iterations
    model: ModelRole
    enabled: Callable[["RunSpec"], bool]
    shards: Optional[Callable[["RunSpec"], int]] = None  # set for sharded phases (Indexed Jobs)
    checkpoint: bool = False  # commits a model at iter-<t>/<name>/checkpoint
    figures: tuple[Figure, ...] = ()
    help: str = ""
    # The earlier phase whose pods (local tasks) also run this one, shard for shard, on
    # the model they loaded, when the spec says so; None: the phase has its own Job.
    host: Optional[Callable[["RunSpec"], Optional[str]]] = None

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    @property
    def order(self) -> int:
        return NAMES.index(self.name)

    def num_shards(self, spec: "RunSpec") -> int:
        return self.shards(spec) if self.shards is not None else 1

    def host_of(self, spec: "RunSpec") -> Optional[str]:
        """The phase whose pods run this one under ``spec``, or None."""
        return self.host(spec) if self.host is not None else None

    def runs_in(self, iteration: int) -> bool:
        if iteration == 0:
            return self.iterations in ("zero", "zero-and-each")
        return self.iterations in ("each", "zero-and-each")


F = Figure
REGISTRY: tuple[Phase, ...] = (
    Phase("sft", "zero", "base", lambda s: s.sft_enabled, checkpoint=True,
          help="iteration 0: supervised fine-tuning of the base model into M_1",
          figures=(F("sftLoss", ("trainLoss", "finalTrainLoss"), float,
                     "Training loss of iteration 0's supervised fine-tuning.", "sft_loss", "sft loss", 4),)),
    Phase("instruct", "each", "policy", lambda s: s.instruct_enabled,
          help="self-instruction: new prompts written from the seed set"),
    Phase("generate", "each", "policy", lambda s: True, shards=lambda s: s.generation.shards,
          help="candidate responses per prompt, sampled from M_t",
          figures=(F("prompts", ("prompts", "numPrompts"), int, "Prompts generated for.", "prompts", "prompts"),
                   F("responses", ("responses", "numResponses"), int, "Candidate responses sampled.",
                     "responses", "responses"))),
    Phase("judge", "each", "policy", lambda s: True, shards=lambda s: s.judge.shards,
          host=lambda s: "generate" if s.judge.colocate else None,
          help="M_t grades every response with the LLM-as-a-judge prompt",
          figures=(F("judged", ("judgedResponses", "judged", "responses"), int, "Responses the model judged.",
                     "judged_responses"),
                   F("parseFailures", ("parseFailures",), int, "Judgements with no parsable score.",
                     "judge_parse_failures", "parse failures"),
                   F("meanScore", ("scoreMean", "meanScore"), float, "Mean judge score (0-5).",
                     "judge_score_mean", "mean score"),
                   F("scoreStd", ("scoreStd",), float, "Standard deviation of the judge scores.",
                     "judge_score_stddev"),
                   F("topScoreShare", ("topScoreShare",), float,
                     "Share (0-1) of scored responses whose score is judge.maxScore (the saturation guard).",
                     "judge_top_score_ratio", "top share"),
                   F("judgeSaturated", ("judgeSaturatedFlag",), int,
                     "1 when the judge's scores crossed a judge.saturation threshold (JudgeSaturated), else 0.",
                     "judge_saturated"),
                   *(F(f"scoreClass{k}", (f"scoreHist{k}",), int,
                       f"Judge verdicts whose score rounds to {k} (scores outside 0-5 count in the nearest end).",
                       f"judge_verdicts_score_{k}") for k in range(6)))),
    Phase("metajudge", "each", "policy", lambda s: s.meta_judge_enabled,
          help="meta-judge: M_t compares its own verdicts on the responses its judge disagreed on most",
          figures=(F("metaJudged", ("metaJudgedResponses",), int, "Responses whose verdicts the meta-judge compared.",
                     "meta_judged_responses"),
                   F("metaOrderAgreement", ("orderAgreement",), float,
                     "Share (0-1) of compared verdict pairs whose A/B and B/A meta-judgments agree.",
                     "meta_order_agreement", "meta agree"),
                   F("metaCandidates", ("candidatePairs",), int,
                     "Judge-preference pairs the meta-judge's ratings gave, before the caps.", "meta_candidate_pairs"))),
    Phase("pairs", "each", "none", lambda s: True,
          help="preference pairs: chosen against rejected response per prompt (pairs.lengthControl), plus the "
               "meta-judge's judge-preference pairs within their caps",
          figures=(F("pairs", ("pairs", "numPairs"), int, "Preference pairs kept for DPO.", "pairs_kept", "pairs"),
                   F("pairsDropped", ("pairsDropped", "dropped"), int,
                     "Prompts dropped when building pairs (ties, too few scores).", "pairs_dropped"),
                   F("margin", ("meanMargin", "margin"), float,
                     "Mean score margin between chosen and rejected responses.", "pair_margin"),
                   F("lengthControl", ("lengthControl",), float, "The iteration's rho of pairs.lengthControl.",
                     "pairs_length_control"),
                   F("chosenLength", ("chosenMeanLength",), float,
                     "Mean length of the chosen responses (tokens; characters where unknown).",
                     "pair_chosen_length_mean", "chosen len", 1),
                   F("rejectedLength", ("rejectedMeanLength",), float,
                     "Mean length of the rejected responses (tokens; characters where unknown).",
                     "pair_rejected_length_mean", "rejected len", 1),
                   F("metaPairs", ("metaPairs",), int, "Judge-preference pairs (meta-judge) in the DPO data.",
                     "pairs_meta", "meta pairs"),
                   F("metaPairsLargestClassShare", ("metaPairsLargestClassShare",), float,
                     "Share (0-1) of the judge-preference pairs in their largest score class.",
                     "pairs_meta_largest_class_ratio"))),
    Phase("train", "each", "policy", lambda s: True, checkpoint=True,
          help="DPO on the pairs: M_t into M_{t+1}",
          figures=(F("dpoLoss", ("dpoLoss", "loss", "trainLoss", "finalTrainLoss"), float,
                     "DPO loss at the end of the iteration's training.", "dpo_loss", "DPO loss", 4),
                   F("rewardAccuracy", ("rewardAccuracy",), float,
                     "DPO reward accuracy at the end of the iteration's training.", "dpo_reward_accuracy",
                     "reward acc"))),
    Phase("eval", "zero-and-each", "next", lambda s: s.eval_enabled, shards=lambda s: s.eval.shards,
          help="evaluation of M_{t+1} (M_1 in iteration 0): verifier, judge calibration, head to head, gate",
          figures=(
              F("verifierScore", ("verifierScore",), float,
                "Verifier score (0-100) of the iteration's model on the held-out prompts.",
                "eval_verifier_score", "verifier", 1),
              F("judgePairwiseAccuracy", ("judgePairwiseAccuracy",), float,
                "Share (0-1) of labelled response pairs the model as judge orders like the labels.",
                "eval_judge_pairwise_accuracy", "judge acc"),
              F("judgeSpearman", ("judgeSpearman",), float,
                "Spearman rho between the model's mean judge scores and the labels.",
                "eval_judge_spearman", "judge rho"),
              F("judgeKendall", ("judgeKendall",), float,
                "Kendall tau-b between the model's mean judge scores and the labels.", "eval_judge_kendall"),
              F("judgeExactMatch", ("judgeExactMatch",), float,
                "Share (0-1) of labelled responses whose rounded judge score equals the label.",
                "eval_judge_exact_match"),
              F("judgeBestAgreement", ("judgeBestAgreement",), float,
                "Share (0-1) of labelled prompts where the judge's best response is a best one by label.",
                "eval_judge_best_agreement"),
              F("judgeParseFailureRate", ("judgeParseFailureRate",), float,
                "Share (0-1) of calibration verdicts with no parsable score.", "eval_judge_parse_failure_rate"),
              F("winRateVsPrevious", ("winRateVsPrevious",), float,
                "Evaluator win rate (0-1) of the iteration's model against the model it started from.",
                "eval_win_rate_vs_previous", "win vs prev"),
              F("winRateVsPreviousLow", ("winRateVsPreviousLow",), float,
                "Lower end of the 95% Wilson interval of winRateVsPrevious.", "eval_win_rate_vs_previous_low"),
              F("winRateVsPreviousHigh", ("winRateVsPreviousHigh",), float,
                "Upper end of the 95% Wilson interval of winRateVsPrevious.", "eval_win_rate_vs_previous_high"),
              F("winRateVsBaseline", ("winRateVsBaseline",), float,
                "Evaluator win rate (0-1) of the iteration's model against M_1.",
                "eval_win_rate_vs_baseline", "win vs M1"),
              F("winRateVsBaselineLow", ("winRateVsBaselineLow",), float,
                "Lower end of the 95% Wilson interval of winRateVsBaseline.", "eval_win_rate_vs_baseline_low"),
              F("winRateVsBaselineHigh", ("winRateVsBaselineHigh",), float,
                "Upper end of the 95% Wilson interval of winRateVsBaseline.", "eval_win_rate_vs_baseline_high"),
              F("meanResponseTokens", ("meanResponseTokens",), float,
                "Mean tokens of the model's answers to the held-out prompts.", "eval_response_tokens_mean",
                "eval tokens", 1),
              F("chosenMeanTokens", ("chosenMeanTokens",), float,
                "Mean tokens of the iteration's chosen responses.", "eval_chosen_tokens_mean"),
              F("rejectedMeanTokens", ("rejectedMeanTokens",), float,
                "Mean tokens of the iteration's rejected responses.", "eval_rejected_tokens_mean"),
              F("genTruncatedShare", ("genTruncatedShare",), float,
                "Share (0-1) of the iteration's generated responses cut off at maxNewTokens.",
                "eval_generated_truncated_ratio"),
          )),
)
del F

NAMES: tuple[str, ...] = tuple(p.name for p in REGISTRY)
BY_NAME: dict[str, Phase] = {p.name: p for p in REGISTRY}


def get(name: str) -> Phase:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown phase {name!r}; expected one of {', '.join(NAMES)}") from None


def figures() -> list[tuple[Phase, Figure]]:
    """Every (phase, figure) in registry order."""
    return [(p, f) for p in REGISTRY for f in p.figures]


def active(spec: "RunSpec", iteration: int) -> list[Phase]:
    """The phases that run in ``iteration`` under ``spec``, in order."""
    return [p for p in REGISTRY if p.runs_in(iteration) and p.enabled(spec)]


def guests(spec: "RunSpec", name: str) -> list[Phase]:
    """The phases that run in ``name``'s pods after it under ``spec`` (judge.colocate:
    judge in generate's), in order."""
    return [p for p in REGISTRY if p.enabled(spec) and p.host_of(spec) == name]


def step_phases(spec: "RunSpec", name: str) -> list[str]:
    """The phases the step of ``name`` runs, in order: the phase, then those it hosts
    (judge.colocate: generate, judge)."""
    return [name] + [g.name for g in guests(spec, name)]


def pod_phase(spec: "RunSpec", name: str) -> str:
    """The phase whose pods (resources.<phase>, GPUs) ``name`` runs in under ``spec``."""
    return get(name).host_of(spec) or name
