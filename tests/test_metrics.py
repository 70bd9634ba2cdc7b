"""The operator's metrics and the worker's live progress, scraped over real HTTP.

Every assertion reads the text exposition that a Prometheus server would read, parsed
by prometheus_client's own parser.
"""
from __future__ import annotations

import math
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from selfreward import metrics as metrics_mod
from selfreward.metrics import PHASE_BUCKETS, Metrics
from selfreward.spec import PHASES
from selfreward.status import RUN_PHASES, RunStatus
from selfreward.worker.progress import progress_from_env, start_progress_exporter


# --- helpers ----------------------------------------------------------------------

def scrape(url: str) -> dict:
    """GET url and return {family name: family} as Prometheus's text parser sees it."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families: dict, family: str, sample_name: str = None) -> dict:
    """{frozenset(labels.items()): value} of one family's samples (of one sample name)."""
    fam = families[family]
    name = sample_name or family
    return {frozenset(s.labels.items()): s.value for s in fam.samples if s.name == name}


def value(families: dict, family: str, sample_name: str = None, **labels) -> float:
    return samples(families, family, sample_name)[frozenset(labels.items())]


def run_series(families: dict, namespace: str, run: str) -> list:
    """Every sample, in any family, that carries this run's labels."""
    return [(f.name, s) for f in families.values() for s in f.samples
            if s.labels.get("namespace") == namespace and s.labels.get("run") == run]


def status_iter2_judge() -> dict:
    """A run in iteration 2, judging; iteration 1 completed with all its figures."""
    return {
        "observedGeneration": 3,
        "phase": "Running",
        "currentIteration": 2,
        "currentPhase": "judge",
        "progress": "1/3",
        "activeJob": "demo-it2-judge-a0",
        "completedStep": "iter-2/generate",
        "conditions": [{"type": "Ready", "status": "False", "reason": "Reconciling"}],
        "history": [
            {"iteration": 0, "startTime": "2026-11-23T10:00:00Z", "endTime": "2026-11-23T10:20:00Z",
             "checkpoint": "s3://b/demo/iter-0/sft"},
            {"iteration": 1, "startTime": "2026-11-23T10:20:00Z", "endTime": "2026-11-23T11:40:00Z",
             "checkpoint": "s3://b/demo/iter-1/train", "prompts": 512, "responses": 2048, "judged": 2048,
             "parseFailures": 17, "pairs": 401, "pairsDropped": 111, "meanScore": 3.25, "scoreStd": 0.875,
             "margin": 1.5, "dpoLoss": 0.6125, "rewardAccuracy": 0.71},
            # the iteration in progress: partial figures, no endTime
            {"iteration": 2, "startTime": "2026-11-23T11:40:00Z", "prompts": 600, "responses": 2400},
        ],
    }


@pytest.fixture
def served():
    m = Metrics()
    server = m.serve(0, "127.0.0.1")
    try:
        yield m, server
    finally:
        server.stop()


# --- operator metrics -----------------------------------------------------------------

def test_run_gauges_follow_status(served):
    m, server = served
    before = time.time()
    m.observe_status("research", "demo", status_iter2_judge())
    after = time.time()
    fams = scrape(server.url)

    ns = {"namespace": "research", "run": "demo"}
    assert value(fams, "selfreward_run_iteration", **ns) == 2
    assert value(fams, "selfreward_run_failed", **ns) == 0
    state = {dict(k)["phase"]: v for k, v in samples(fams, "selfreward_run_phase").items()
             if dict(k)["run"] == "demo"}
    assert state == {p: (1.0 if p == "judge" else 0.0) for p in PHASES}
    started = value(fams, "selfreward_run_phase_started_timestamp_seconds", **ns)
    assert before <= started <= after

    # figures of the last completed iteration (1), not of the one in progress (2)
    assert value(fams, "selfreward_iteration_number", **ns) == 1
    expected = {"prompts": 512, "responses": 2048, "judged_responses": 2048, "judge_parse_failures": 17,
                "pairs_kept": 401, "pairs_dropped": 111, "judge_score_mean": 3.25,
                "judge_score_stddev": 0.875, "pair_margin": 1.5, "dpo_loss": 0.6125,
                "dpo_reward_accuracy": 0.71}
    for name, v in expected.items():
        fam = f"selfreward_iteration_{name}"
        assert fams[fam].type == "gauge"
        assert value(fams, fam, **ns) == pytest.approx(v)

    # only namespace and run (plus the bounded phase) label the run's series
    for fam, s in run_series(fams, "research", "demo"):
        extra = set(s.labels) - {"namespace", "run"}
        assert extra <= {"phase"}, (fam, s.labels)
        if "phase" in extra:
            assert s.labels["phase"] in PHASES


def test_runs_by_phase_has_every_phase_and_recounts(served):
    m, server = served
    fams = scrape(server.url)
    assert {dict(k)["phase"]: v for k, v in samples(fams, "selfreward_runs").items()} == \
        {p: 0.0 for p in RUN_PHASES}

    m.observe_status("a", "r1", status_iter2_judge())
    m.observe_status("a", "r2", {"phase": "Succeeded", "currentIteration": 3, "completionTime": "x"})
    m.observe_status("b", "r1", {"phase": "Failed", "currentIteration": 1, "currentPhase": "train",
                                 "message": "OOMKilled"})
    m.observe_status("b", "r3", {})  # just created: no status yet counts as Pending
    fams = scrape(server.url)
    by_phase = {dict(k)["phase"]: v for k, v in samples(fams, "selfreward_runs").items()}
    assert by_phase == {"Pending": 1, "Running": 1, "Suspended": 0, "Succeeded": 1, "Failed": 1, "Terminating": 0}

    # a finished run is in no worker phase and has no phase start time
    assert value(fams, "selfreward_run_failed", namespace="b", run="r1") == 1
    assert all(v == 0 for k, v in samples(fams, "selfreward_run_phase").items()
               if dict(k)["namespace"] == "b" and dict(k)["run"] == "r1")
    started = samples(fams, "selfreward_run_phase_started_timestamp_seconds")
    assert set(started) == {frozenset({"namespace": "a", "run": "r1"}.items())}
    # no status yet: no iteration series and no figures, but the state set is there
    assert frozenset({"namespace": "b", "run": "r3"}.items()) not in samples(fams, "selfreward_run_iteration")
    assert not any(s.labels.get("run") == "r3" for f in fams if f.startswith("selfreward_iteration_")
                   for s in fams[f].samples)

    # a run moves on: the counts follow
    m.observe_status("a", "r1", {**status_iter2_judge(), "phase": "Suspended"})
    fams = scrape(server.url)
    by_phase = {dict(k)["phase"]: v for k, v in samples(fams, "selfreward_runs").items()}
    assert by_phase["Running"] == 0 and by_phase["Suspended"] == 1


def test_phase_start_time_changes_only_with_the_phase(served):
    m, server = served
    st = status_iter2_judge()
    m.observe_status("ns", "run", st, now=1000.0)
    m.observe_status("ns", "run", {**st, "message": "still judging"}, now=1050.0)
    key = {"namespace": "ns", "run": "run"}
    assert value(scrape(server.url), "selfreward_run_phase_started_timestamp_seconds", **key) == 1000.0
    m.observe_status("ns", "run", {**st, "currentPhase": "pairs"}, now=1100.0)
    assert value(scrape(server.url), "selfreward_run_phase_started_timestamp_seconds", **key) == 1100.0
    # the same phase of the next iteration is a new start
    m.observe_status("ns", "run", {**st, "currentIteration": 3, "currentPhase": "pairs"}, now=1200.0)
    assert value(scrape(server.url), "selfreward_run_phase_started_timestamp_seconds", **key) == 1200.0


def test_status_as_model_and_missing_figures(served):
    m, server = served
    st = RunStatus.model_validate({
        "phase": "Running", "currentIteration": 1, "currentPhase": "generate",
        "history": [{"iteration": 0, "endTime": "t0"},
                    {"iteration": 1, "prompts": 64}],
    })
    m.observe_status("ns", "fresh", st)
    fams = scrape(server.url)
    key = {"namespace": "ns", "run": "fresh"}
    assert value(fams, "selfreward_run_iteration", **key) == 1
    # the last completed iteration is the SFT one, which has no figures: no series, never NaN
    assert value(fams, "selfreward_iteration_number", **key) == 0
    for name in metrics_mod.ITERATION_FIGURES:
        assert frozenset(key.items()) not in samples(fams, f"selfreward_iteration_{name}")
    for f in fams.values():
        assert not any(math.isnan(s.value) for s in f.samples), f.name


def test_job_counters_end_in_total(served):
    m, server = served
    for _ in range(3):
        m.job_created("ns", "demo", "generate")
    m.job_failed("ns", "demo", "generate")
    m.job_retried("ns", "demo", "generate")
    m.job_created("ns", "other", "sft")
    fams = scrape(server.url)
    for event, n in (("created", 3), ("failed", 1), ("retried", 1)):
        fam = fams[f"selfreward_jobs_{event}"]  # the parser names the family without _total
        assert fam.type == "counter"
        names = {s.name for s in fam.samples}
        assert names == {f"selfreward_jobs_{event}_total"}
        assert value(fams, f"selfreward_jobs_{event}", f"selfreward_jobs_{event}_total",
                     namespace="ns", run="demo") == n
    assert value(fams, "selfreward_jobs_created", "selfreward_jobs_created_total", namespace="ns", run="other") == 1
    assert value(fams, "selfreward_jobs_failed", "selfreward_jobs_failed_total", namespace="ns", run="other") == 0
    # a run known only from its jobs counts as Pending
    assert value(fams, "selfreward_runs", phase="Pending") == 2


def test_phase_duration_histogram(served):
    m, server = served
    m.phase_finished("generate", 42.0)
    m.phase_finished("generate", 5400.0)    # 1.5 h
    m.phase_finished("train", 30000.0)     # over 8 h
    m.phase_finished("nonsense", 10.0)     # an unknown phase adds no label value
    m.phase_finished("train", -1)          # nor does a negative duration
    fams = scrape(server.url)
    fam = fams["selfreward_phase_duration_seconds"]
    assert fam.type == "histogram"
    assert {s.labels["phase"] for s in fam.samples} == set(PHASES)

    def buckets(phase):
        return {s.labels["le"]: s.value for s in fam.samples
                if s.name.endswith("_bucket") and s.labels["phase"] == phase}

    gen = buckets("generate")
    les = [float(le) for le in gen]
    assert les == sorted(les) and les[-1] == math.inf
    assert les[:-1] == [float(b) for b in PHASE_BUCKETS]
    assert min(les) <= 5 and max(les[:-1]) >= 86400  # seconds to days
    assert gen["30.0"] == 0 and gen["60.0"] == 1 and gen["3600.0"] == 1 and gen["7200.0"] == 2 and gen["+Inf"] == 2
    assert value(fams, "selfreward_phase_duration_seconds", "selfreward_phase_duration_seconds_count",
                 phase="generate") == 2
    assert value(fams, "selfreward_phase_duration_seconds", "selfreward_phase_duration_seconds_sum",
                 phase="generate") == pytest.approx(5442.0)
    tr = buckets("train")
    assert tr["28800.0"] == 0 and tr["57600.0"] == 1 and tr["+Inf"] == 1
    assert buckets("judge")["+Inf"] == 0


def test_reconcile_duration_and_errors(served):
    m, server = served
    with m.timed_reconcile():
        pass
    with pytest.raises(RuntimeError, match="boom"):
        with m.timed_reconcile():
            raise RuntimeError("boom")
    m.reconcile_observed(3.0, error=False)
    m.reconcile_observed(0.02, error=True)
    fams = scrape(server.url)
    fam = fams["selfreward_reconcile_errors"]
    assert fam.type == "counter"
    assert value(fams, "selfreward_reconcile_errors", "selfreward_reconcile_errors_total") == 2
    hist = fams["selfreward_reconcile_duration_seconds"]
    assert hist.type == "histogram"
    assert value(fams, "selfreward_reconcile_duration_seconds", "selfreward_reconcile_duration_seconds_count") == 4
    b = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert b["+Inf"] == 4 and b["2.5"] == 3 and b["5.0"] == 4 and b["0.025"] >= 1
    assert all(set(s.labels) <= {"le"} for s in hist.samples)


def test_forget_run_removes_every_series(served):
    m, server = served
    m.observe_status("ns", "gone", status_iter2_judge())
    m.job_created("ns", "gone", "judge")
    m.job_failed("ns", "gone", "judge")
    m.observe_status("ns", "kept", {"phase": "Running", "currentIteration": 0, "currentPhase": "sft"})
    fams = scrape(server.url)
    assert len(run_series(fams, "ns", "gone")) >= 20
    assert value(fams, "selfreward_runs", phase="Running") == 2

    m.forget_run("ns", "gone")
    m.forget_run("ns", "never-seen")  # harmless
    fams = scrape(server.url)
    assert run_series(fams, "ns", "gone") == []
    assert value(fams, "selfreward_run_phase", namespace="ns", run="kept", phase="sft") == 1
    assert value(fams, "selfreward_runs", phase="Running") == 1
    assert m.runs() == [("ns", "kept")]


def test_instances_do_not_collide():
    a, b = Metrics(), Metrics()
    a.observe_status("ns", "only-in-a", {"phase": "Running", "currentIteration": 1, "currentPhase": "train"})
    with a.serve(0, "127.0.0.1") as sa, b.serve(0, "127.0.0.1") as sb:
        assert sa.port != sb.port
        fa, fb = scrape(sa.url), scrape(sb.url)
    assert value(fa, "selfreward_runs", phase="Running") == 1
    assert value(fb, "selfreward_runs", phase="Running") == 0
    assert run_series(fb, "ns", "only-in-a") == []


def test_server_stops():
    m = Metrics()
    server = m.serve(0, "127.0.0.1")
    port = server.port
    scrape(server.url)
    server.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def test_module_level_default_instance():
    server = metrics_mod.serve(0, "127.0.0.1")
    try:
        metrics_mod.observe_status("mod", "run", {"phase": "Running", "currentIteration": 2,
                                                  "currentPhase": "pairs"})
        metrics_mod.job_created("mod", "run", "pairs")
        metrics_mod.job_retried("mod", "run", "pairs")
        metrics_mod.phase_finished("pairs", 12.5)
        metrics_mod.reconcile_observed(0.01, error=True)
        with metrics_mod.timed_reconcile():
            pass
        fams = scrape(server.url)
        key = {"namespace": "mod", "run": "run"}
        assert value(fams, "selfreward_run_phase", phase="pairs", **key) == 1
        assert value(fams, "selfreward_jobs_retried", "selfreward_jobs_retried_total", **key) == 1
        assert value(fams, "selfreward_phase_duration_seconds", "selfreward_phase_duration_seconds_count",
                     phase="pairs") >= 1
        assert value(fams, "selfreward_reconcile_errors", "selfreward_reconcile_errors_total") >= 1
        metrics_mod.forget_run("mod", "run")
        assert run_series(scrape(server.url), "mod", "run") == []
        assert metrics_mod.default() is metrics_mod.default()
    finally:
        metrics_mod.forget_run("mod", "run")
        server.stop()


# --- worker live progress ---------------------------------------------------------------

@pytest.fixture
def exporter():
    e = start_progress_exporter(0, "127.0.0.1")
    try:
        yield e
    finally:
        e.stop()


def test_progress_exporter_serves_reports(exporter):
    lv = {"phase": "generate", "iteration": "2", "shard": "1"}
    t0 = time.time()
    exporter({"iteration": 2, "phase": "generate", "shard": 1, "done": 10, "total": 40, "tokens": 1000})
    time.sleep(0.05)
    exporter({"iteration": 2, "phase": "generate", "shard": 1, "done": 30, "total": 40, "tokens": 3000,
              "meanLength": 41.5, "note": "text is ignored", "ok": True})
    t1 = time.time()
    fams = scrape(exporter.url)
    assert value(fams, "selfreward_worker_items_done", **lv) == 30
    assert value(fams, "selfreward_worker_items_total", **lv) == 40
    assert value(fams, "selfreward_worker_progress_ratio", **lv) == pytest.approx(0.75)
    # 2000 tokens between the two reports, which were at least 50 ms and at most t1 - t0 apart
    rate = value(fams, "selfreward_worker_tokens_per_second", **lv)
    assert 2000 / (t1 - t0) <= rate <= 2000 / 0.05
    assert t0 <= value(fams, "selfreward_worker_started_timestamp_seconds", **lv) \
        <= value(fams, "selfreward_worker_last_report_timestamp_seconds", **lv) <= t1
    figs = {dict(k)["figure"]: v for k, v in samples(fams, "selfreward_worker_figure").items()}
    assert figs == {"tokens": 3000, "meanLength": 41.5}
    for f in fams.values():
        for s in f.samples:
            assert set(s.labels) - {"figure"} == {"phase", "iteration", "shard"}


def test_progress_exporter_trainer_figures_and_next_phase(exporter):
    # what training.progress_callback reports through ctx.report
    exporter({"iteration": 1, "phase": "train", "shard": 0, "step": 5, "totalSteps": 20, "loss": 0.69,
              "rewardAccuracy": 0.5, "tokensPerSecond": 812.0})
    fams = scrape(exporter.url)
    lv = {"phase": "train", "iteration": "1", "shard": "0"}
    assert value(fams, "selfreward_worker_items_done", **lv) == 5
    assert value(fams, "selfreward_worker_progress_ratio", **lv) == 0.25
    assert value(fams, "selfreward_worker_tokens_per_second", **lv) == 812.0
    assert value(fams, "selfreward_worker_figure", figure="loss", **lv) == pytest.approx(0.69)

    # another phase in the same process: the previous series go, only the new ones remain
    exporter({"iteration": 2, "phase": "instruct", "shard": 0, "done": 1, "total": 8})
    fams = scrape(exporter.url)
    labelsets = {(s.labels["phase"], s.labels["iteration"]) for f in fams.values() for s in f.samples}
    assert labelsets == {("instruct", "2")}
    assert samples(fams, "selfreward_worker_tokens_per_second") == {}
    assert samples(fams, "selfreward_worker_figure") == {}


def test_progress_exporter_never_raises(exporter):
    exporter(None)  # a broken report is logged, not raised into the phase
    exporter({"iteration": 1, "phase": "judge", "shard": 0, "done": float("nan"), "total": 0})
    fams = scrape(exporter.url)
    assert samples(fams, "selfreward_worker_items_done") == {}
    assert samples(fams, "selfreward_worker_progress_ratio") == {}  # no division by a zero total
    assert value(fams, "selfreward_worker_items_total", phase="judge", iteration="1", shard="0") == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_progress_from_env():
    assert progress_from_env({}) is None
    assert progress_from_env({"SELFREWARD_PROGRESS_PORT": "0"}) is None
    assert progress_from_env({"SELFREWARD_PROGRESS_PORT": "not-a-port"}) is None
    assert progress_from_env({"SELFREWARD_PROGRESS_PORT": "70000"}) is None
    port = _free_port()
    e = progress_from_env({"SELFREWARD_PROGRESS_PORT": str(port), "SELFREWARD_PROGRESS_ADDR": "127.0.0.1"})
    assert e is not None and e.port == port
    try:
        # the port is taken now: a second exporter is refused quietly, the phase runs on
        assert progress_from_env({"SELFREWARD_PROGRESS_PORT": str(port),
                                  "SELFREWARD_PROGRESS_ADDR": "127.0.0.1"}) is None
        e({"iteration": 1, "phase": "pairs", "shard": 0, "done": 3, "total": 3})
        fams = scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(fams, "selfreward_worker_progress_ratio", phase="pairs", iteration="1", shard="0") == 1
    finally:
        e.stop()


def test_worker_phase_exports_its_progress(tiny_model, tmp_path, monkeypatch):
    """`selfreward worker generate` with SELFREWARD_PROGRESS_PORT set: the real phase on
    the tiny model feeds the exporter main_phase starts, and its last report is served."""
    import json

    from selfreward.spec import parse_spec
    from selfreward.worker import main_phase
    from selfreward.worker import progress as progress_mod

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                             ("Name a colour.", "Count to three.", "Say hello.", "What is two plus two?",
                              "Write a short greeting.")))
    spec = parse_spec({
        "model": {"uri": tiny_model, "dtype": "float32"},
        "prompts": {"uri": str(seeds)},
        "storage": {"uri": f"file://{tmp_path / 'store'}"},
        "sft": {"enabled": False, "instructionDataUri": str(seeds)},
        "iterations": 1,
        "generation": {"responsesPerPrompt": 2, "maxNewTokens": 8, "batchSize": 2},
    })
    port = _free_port()
    monkeypatch.setenv("SELFREWARD_PROGRESS_PORT", str(port))
    monkeypatch.setenv("SELFREWARD_PROGRESS_ADDR", "127.0.0.1")
    progress_mod.last_started = None
    rc = main_phase(spec, "generate", 1, None, None, termination_log=str(tmp_path / "termination"))
    exporter = progress_mod.last_started
    assert exporter is not None and exporter.port == port
    try:
        assert rc == 0
        fams = scrape(f"http://127.0.0.1:{port}/metrics")
        lv = {"phase": "generate", "iteration": "1", "shard": "0"}
        assert value(fams, "selfreward_worker_items_total", **lv) == 5
        assert value(fams, "selfreward_worker_items_done", **lv) == 5
        assert value(fams, "selfreward_worker_progress_ratio", **lv) == 1
        assert value(fams, "selfreward_worker_tokens_per_second", **lv) > 0
    finally:
        exporter.stop()


def test_gpu_seconds_and_cost_counters_come_from_the_status(served):
    m, server = served
    st = status_iter2_judge()
    st["history"][1].update(gpuSeconds=1700.0, cost=1.7, gpuSecondsByPhase={"generate": 100.0, "judge": 1200.0})
    st["history"][2].update(gpuSeconds=90.0)  # the iteration in progress is not the last completed one
    st.update(gpuSeconds=1790.0, gpuSecondsByPhase={"generate": 190.0, "judge": 1200.0, "train": 400.0, "bogus": 5},
              cost=1.79, costByPhase={"generate": 0.19, "judge": 1.2, "train": 0.4})
    m.observe_status("ns", "paid", st)
    m.observe_status("ns", "free", {"phase": "Running", "gpuSecondsByPhase": {"generate": 30.0}})
    fams = scrape(server.url)
    for fam in ("selfreward_run_gpu_seconds", "selfreward_run_cost"):
        assert fams[fam].type == "counter"
        assert {s.name for s in fams[fam].samples} == {f"{fam}_total"}
    gpu = {dict(k)["phase"]: v for k, v in samples(fams, "selfreward_run_gpu_seconds",
                                                   "selfreward_run_gpu_seconds_total").items()
           if dict(k)["run"] == "paid"}
    assert gpu == {"generate": 190.0, "judge": 1200.0, "train": 400.0}  # no series for a phase not in the registry
    assert sum(gpu.values()) == st["gpuSeconds"]
    assert value(fams, "selfreward_run_cost", "selfreward_run_cost_total", namespace="ns", run="paid",
                 phase="judge") == pytest.approx(1.2)
    assert value(fams, "selfreward_run_gpu_seconds", "selfreward_run_gpu_seconds_total", namespace="ns", run="free",
                 phase="generate") == 30.0
    assert not [s for s in fams["selfreward_run_cost"].samples if s.labels["run"] == "free"]  # no price: no cost
    assert value(fams, "selfreward_iteration_gpu_seconds", namespace="ns", run="paid") == 1700.0
    assert value(fams, "selfreward_iteration_cost", namespace="ns", run="paid") == pytest.approx(1.7)

    # a restarted operator (a fresh Metrics) reads the same status and goes on from the same count
    fresh = Metrics()
    fresh.observe_status("ns", "paid", st)
    with fresh.serve(0, "127.0.0.1") as again:
        assert value(scrape(again.url), "selfreward_run_gpu_seconds", "selfreward_run_gpu_seconds_total",
                     namespace="ns", run="paid", phase="judge") == 1200.0
