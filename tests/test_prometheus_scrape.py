"""A real Prometheus server scrapes the operator's /metrics and a worker's progress
endpoint, and answers PromQL about them.

Prometheus is Debian's package (``apt-get install -y --no-install-recommends
prometheus``; CI installs it, see .ci/run and the Makefile). When the binary is absent
the fixture installs it if it runs as root with apt-get, and skips otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from selfreward.metrics import Metrics
from selfreward.worker.progress import start_progress_exporter

SCRAPE_JOB = "selfreward-operator"
WORKER_JOB = "selfreward-worker"


def _prometheus_binary() -> str | None:
    found = shutil.which("prometheus")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    return shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read().decode())


class Prom:
    def __init__(self, base: str, proc: subprocess.Popen, log_path: str):
        self.base, self.proc, self.log_path = base, proc, log_path

    def query(self, expr: str) -> list:
        data = _get_json(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert data["status"] == "success", data
        return data["data"]["result"]

    def wait_for(self, expr: str, want=lambda r: bool(r), timeout: float = 60.0) -> list:
        """Poll an instant query until `want(result)` holds; fail with the last result."""
        deadline = time.monotonic() + timeout
        result: list = []
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}: {self.log()}")
            result = self.query(expr)
            if want(result):
                return result
            time.sleep(0.25)
        pytest.fail(f"no wanted answer to {expr!r} within {timeout} s; last: {result}\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]


@pytest.fixture
def endpoints():
    """The operator's metrics and one worker's progress exporter, on loopback."""
    m = Metrics()
    server = m.serve(0, "127.0.0.1")
    worker = start_progress_exporter(0, "127.0.0.1")
    try:
        yield m, server, worker
    finally:
        worker.stop()
        server.stop()


@pytest.fixture
def prometheus(endpoints, tmp_path):
    binary = _prometheus_binary()
    if binary is None:
        pytest.skip("the prometheus binary is absent and cannot be installed here "
                    "(apt-get install -y --no-install-recommends prometheus, as root)")
    _m, server, worker = endpoints
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            # as the chart's ServiceMonitor: the target's own namespace label (the
            # operator's) must not overwrite the runs' namespace label (honorLabels)
            {"job_name": SCRAPE_JOB, "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{server.port}"],
                                 "labels": {"namespace": "selfreward-system"}}]},
            {"job_name": WORKER_JOB, "static_configs": [{"targets": [f"127.0.0.1:{worker.port}"]}]},
        ],
    }))
    port = _free_port()
    log_path = str(tmp_path / "prometheus.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
    prom = Prom(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}: {prom.log()}")
            try:
                with urllib.request.urlopen(f"{prom.base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready within 60 s: {prom.log()}")
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _by(result: list, label: str) -> dict:
    return {r["metric"].get(label): float(r["value"][1]) for r in result}


def test_prometheus_scrapes_and_answers_promql(endpoints, prometheus):
    m, _server, worker = endpoints
    m.observe_status("research", "x", {
        "phase": "Running", "currentIteration": 2, "currentPhase": "generate",
        "gpuSecondsByPhase": {"generate": 3600.0, "judge": 5400.0}, "costByPhase": {"generate": 2.5, "judge": 3.75},
        "history": [{"iteration": 0, "endTime": "t0"},
                    {"iteration": 1, "endTime": "t1", "prompts": 256, "pairs": 190, "meanScore": 3.4,
                     "dpoLoss": 0.58}],
    })
    m.observe_status("research", "y", {"phase": "Succeeded", "currentIteration": 3})
    m.observe_status("other", "z", {"phase": "Failed", "currentIteration": 1, "currentPhase": "train"})
    m.job_created("research", "x", "generate")
    m.job_failed("other", "z", "train")
    m.phase_finished("generate", 700.0)
    m.phase_finished("generate", 1300.0)
    worker({"iteration": 2, "phase": "generate", "shard": 1, "done": 48, "total": 64, "tokensPerSecond": 950.0})

    prometheus.wait_for(f'up{{job="{SCRAPE_JOB}"}} == 1')
    assert prometheus.wait_for('selfreward_run_iteration{run="x"} == 2')[0]["metric"]["namespace"] == "research"
    # series without a namespace of their own take the target's
    assert {r["metric"]["namespace"] for r in prometheus.query("selfreward_runs")} == {"selfreward-system"}

    by_phase = _by(prometheus.query("sum by (phase) (selfreward_runs)"), "phase")
    assert by_phase == {"Pending": 0, "Running": 1, "Suspended": 0, "Succeeded": 1, "Failed": 1, "Terminating": 0}

    current = prometheus.query('selfreward_run_phase{namespace="research", run="x"} == 1')
    assert [r["metric"]["phase"] for r in current] == ["generate"]
    failed = prometheus.query("selfreward_run_failed == 1")
    assert [(r["metric"]["namespace"], r["metric"]["run"]) for r in failed] == [("other", "z")]
    assert _by(prometheus.query('selfreward_iteration_pairs_kept{run="x"}'), "run") == {"x": 190}
    assert _by(prometheus.query("sum(selfreward_jobs_failed_total)"), "") == {None: 1}
    # GPU-hours and cost per run, as the dashboard's budget panels ask
    assert _by(prometheus.query("sum by (run) (selfreward_run_gpu_seconds_total) / 3600"), "run") == {"x": 2.5}
    assert _by(prometheus.query('sum by (run) (selfreward_run_cost_total{run="x"})'), "run") == {"x": 6.25}

    # the histogram as a dashboard reads it: median generate time between the buckets
    # holding 700 s and 1300 s
    p50 = _by(prometheus.query(
        'histogram_quantile(0.5, sum by (le) (selfreward_phase_duration_seconds_bucket{phase="generate"}))'), "")
    assert 600 <= p50[None] <= 1200

    # an alert-style expression on the phase start time: the phase has run for seconds, not hours
    running = _by(prometheus.query(
        "time() - selfreward_run_phase_started_timestamp_seconds"), "run")
    assert set(running) == {"x"} and 0 <= running["x"] < 600

    # the worker's live progress, scraped from its own endpoint
    ratio = prometheus.wait_for(f'selfreward_worker_progress_ratio{{job="{WORKER_JOB}"}}')
    assert ratio[0]["metric"]["phase"] == "generate" and ratio[0]["metric"]["shard"] == "1"
    assert float(ratio[0]["value"][1]) == 0.75

    # a deleted run: its series go stale in Prometheus after the next scrape
    m.forget_run("research", "x")
    prometheus.wait_for('count(selfreward_run_iteration{run="x"}) or vector(0)',
                        want=lambda r: bool(r) and float(r[0]["value"][1]) == 0, timeout=30)
    assert prometheus.query('{run="x", __name__=~"selfreward_.*"}') == []
    assert _by(prometheus.query("sum by (phase) (selfreward_runs)"), "phase")["Running"] == 0
