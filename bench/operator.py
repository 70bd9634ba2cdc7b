"""Operator benchmark against the emulated API server (tests/kube/emulator.py).

For 1 and 200 concurrent runs (``--runs``), each of ``--iterations`` iterations, the real
``selfreward operator`` process serves a namespace while this script plays the Job
controller: every Job the operator creates is completed at once (a pod with a
termination-message summary, then the Job's Complete condition). Printed:

- the time from a Job's completion (its status write) to the creation of the run's
  next Job, median and p99, both taken in this process's clock;
- wall time until every run has Succeeded;
- the operator's resident memory (now and peak) from /proc;
- API requests the operator made (the emulator logs every HTTP request), in total and
  per run-iteration, by verb, plus the reconcile passes it reports on /metrics.

Usage: .venv/bin/python bench/operator.py [--runs 1,200] [--iterations 2]
"""
from __future__ import annotations

import sys

# Run as a script, this file's folder comes first on sys.path, and this file's name would
# shadow the standard library's `operator` module: drop the folder before other imports.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0].rstrip("/") + "/"):
    del sys.path[0]

import argparse  # noqa: E402
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "operator"))

from kube.emulator import Cluster, Emulator  # noqa: E402
from selfreward import jobs as J  # noqa: E402
from selfreward.crd import crd_manifest  # noqa: E402

NS = "bench"
RUNS = ("selfreward.dev/v1alpha1", "selfrewardruns")


class TimedEmulator(Emulator):
    """Records when each Job is created and hands it to the player."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.created_at: dict[str, float] = {}
        self.new_jobs: "queue.Queue[tuple[str, str]]" = queue.Queue()

    def __bool__(self) -> bool:
        # kmock's emulator has a __len__ (requests served), so a fresh one is falsy and
        # `Cluster(emulator or Emulator())` would silently use another instance
        return True

    def api_create(self, res, namespace, body, *, dry_run=False):
        obj = super().api_create(res, namespace, body, dry_run=dry_run)
        if res.plural == "jobs" and not dry_run:
            self.created_at[obj["metadata"]["name"]] = time.monotonic()
            self.new_jobs.put((namespace, obj["metadata"]["name"]))
        return obj


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now() -> str:
    return J.format_time(datetime.now(timezone.utc))


class Player(threading.Thread):
    """Completes every Job as soon as it appears."""

    def __init__(self, c: Cluster, em: TimedEmulator):
        super().__init__(daemon=True)
        self.c, self.em = c, em
        self.completed_at: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                ns, name = self.em.new_jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            job = self.c.get("batch/v1", "jobs", name, ns)
            if job is None:
                continue
            tmpl = job["spec"]["template"]
            phase = job["metadata"]["labels"][J.LABEL_PHASE]
            for i in range(int(job["spec"].get("completions") or 1)):
                pod = f"{name}-{i}"
                self.c.create({"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": pod, "namespace": ns, "labels": dict(tmpl["metadata"]["labels"]),
                                            "annotations": dict(tmpl["metadata"].get("annotations") or {})},
                               "spec": tmpl["spec"]})
                msg = json.dumps({"phase": phase, "responses": 8, "pairs": 2, "durationSeconds": 0.1})
                self.c.patch("v1", "pods", pod, {"status": {"phase": "Succeeded", "containerStatuses": [
                    {"name": "worker", "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                                                "message": msg}}}]}}, ns, subresource="status")
            ts = now()
            self.c.patch("batch/v1", "jobs", name, {"status": {
                "startTime": ts, "completionTime": ts, "succeeded": 1,
                "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": ts}]}}, ns,
                subresource="status")
            self.completed_at[name] = time.monotonic()


def rss_kib(pid: int) -> tuple[int, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k] = v.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[k]


def bench(n_runs: int, iterations: int, timeout: float, profile: str = "") -> dict:
    em = TimedEmulator()
    c = Cluster(emulator=em)
    proc = None
    player = Player(c, em)
    try:
        c.create_namespace(NS)
        c.declare_crd(crd_manifest(), validate=True)
        metrics_port = free_port()
        env = dict(os.environ, KUBECONFIG=c.kubeconfig)
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        proc = subprocess.Popen([sys.executable, *prof, "-m", "selfreward", "operator", "-n", NS,
                                 "--metrics-port", str(metrics_port), "--health-port", "0"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until the operator watches runs
        deadline = time.monotonic() + 60
        while not any(p.endswith("/selfrewardruns") and "watch=" in q for _, p, q in list(em.log)):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the operator did not start")
            time.sleep(0.1)
        time.sleep(0.5)
        rss_idle, _ = rss_kib(proc.pid)
        player.start()
        log_start = len(em.log)
        cpu0, own0 = cpu_seconds(proc.pid), time.process_time()
        t0 = time.monotonic()
        for i in range(n_runs):
            c.create({"apiVersion": "selfreward.dev/v1alpha1", "kind": "SelfRewardRun",
                      "metadata": {"name": f"run-{i:04d}", "namespace": NS},
                      "spec": {"model": {"uri": "/models/base"}, "prompts": {"uri": "/data/p.jsonl"},
                               "iterations": iterations, "storage": {"uri": f"s3://bench/run-{i:04d}"}}})
        while True:
            done = sum(1 for r in c.objects(*RUNS, NS) if (r.get("status") or {}).get("phase") == "Succeeded")
            if done == n_runs:
                break
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"only {done}/{n_runs} runs succeeded in {timeout} s")
            time.sleep(0.2)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        own_cpu = time.process_time() - own0
        requests = list(em.log)[log_start:]
        rss_now, rss_peak = rss_kib(proc.pid)
        reconciles = scrape(metrics_port, "selfreward_reconcile_duration_seconds_count")
        # latency: completion of step k -> creation of step k+1, per run
        order = []
        for t in range(1, iterations + 1):
            order += [(t, p) for p in ("generate", "judge", "pairs", "train")]
        lat = []
        for i in range(n_runs):
            names = [f"run-{i:04d}-i{t}-{p}" for t, p in order]
            for prev, nxt in zip(names, names[1:]):
                if prev in player.completed_at and nxt in em.created_at:
                    lat.append(em.created_at[nxt] - player.completed_at[prev])
        verbs = Counter(m for m, _, _ in requests)
        kinds = Counter()
        for m, path, q in requests:
            what = path.rstrip("/").split("/")
            tail = what[-1] if what[-1] in ("status",) else (what[-2] if len(what) > 1 and what[-2] in
                                                              ("jobs", "pods", "events", "selfrewardruns") else what[-1])
            kinds[f"{m} {tail}{' (watch)' if 'watch=' in q else ''}"] += 1
        return {
            "runs": n_runs, "iterations": iterations, "wall_s": wall,
            "latency_ms": {"n": len(lat), "median": statistics.median(lat) * 1000 if lat else float("nan"),
                           "p99": percentile(lat, 0.99) * 1000, "max": max(lat) * 1000 if lat else float("nan")},
            "rss_mib": {"idle": rss_idle / 1024, "end": rss_now / 1024, "peak": rss_peak / 1024},
            "requests": {"total": len(requests), "per_run_iteration": len(requests) / (n_runs * iterations),
                         "by_verb": dict(verbs), "top": kinds.most_common(8)},
            "reconciles": reconciles,
            "cpu_s": {"operator": cpu, "emulator_and_player": own_cpu},
        }
    finally:
        player.stop.set()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="1,200", help="comma-separated numbers of concurrent runs")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--profile", default="", help="write a cProfile of the operator process to this file")
    args = ap.parse_args()
    for n in [int(x) for x in args.runs.split(",")]:
        r = bench(n, args.iterations, args.timeout, args.profile)
        lat, rss, req = r["latency_ms"], r["rss_mib"], r["requests"]
        print(f"== {n} concurrent run(s) x {args.iterations} iterations: all Succeeded in {r['wall_s']:.1f} s")
        print(f"   Job complete -> next Job created: median {lat['median']:.1f} ms, p99 {lat['p99']:.1f} ms, "
              f"max {lat['max']:.1f} ms (n={lat['n']})")
        print(f"   operator RSS: idle {rss['idle']:.0f} MiB, end {rss['end']:.0f} MiB, peak {rss['peak']:.0f} MiB")
        print(f"   API requests: {req['total']} total, {req['per_run_iteration']:.1f} per run-iteration; "
              f"by verb {req['by_verb']}")
        print(f"   busiest: {req['top']}")
        print(f"   CPU: operator {r['cpu_s']['operator']:.1f} s "
              f"({1000 * r['cpu_s']['operator'] / (n * args.iterations * 4):.1f} ms per step), "
              f"emulator+player {r['cpu_s']['emulator_and_player']:.1f} s")
        if r["reconciles"] is not None:
            print(f"   reconcile passes: {r['reconciles']:.0f} "
                  f"({r['reconciles'] / (n * args.iterations):.1f} per run-iteration)")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
