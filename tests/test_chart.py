"""The Helm chart, rendered by the real Helm SDK (helm-python-sdk embeds Helm's Go
library) and checked with kubernetes-validate against the Kubernetes schemas of
several versions; the alert rules are run by Prometheus' own promtool where it is
installed (Debian's prometheus package, which `make test` installs)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kv = pytest.importorskip("kubernetes_validate.utils")

from selfreward.cli import build_parser  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "selfreward"
CRD_FILE = ROOT / "crds" / "selfreward.dev_selfrewardruns.yaml"
RELEASE_NS = "selfreward-system"

# Kubernetes versions the rendered manifests must validate against: the oldest the
# chart supports well, a middle one, and the newest kubernetes-validate ships.
KUBE_VERSIONS = sorted({"1.30.0", "1.33.0", kv.major_minor(kv.latest_version()) + ".0"})

MODES = {
    "default": {},
    "namespaced-2": {"watch": {"mode": "namespaced", "namespaces": ["team-a", "team-b"]}},
    "cluster": {"watch": {"mode": "cluster"}, "workerServiceAccount": {"namespaces": ["ml"]}},
    "peering-2": {"replicaCount": 2, "peering": {"enabled": True},
                  "watch": {"namespaces": ["team-a", "team-b"]}},
    "cluster-peering-2": {"replicaCount": 2, "peering": {"enabled": True}, "watch": {"mode": "cluster"}},
    "monitoring": {"metrics": {"serviceMonitor": {"enabled": True}, "workerPodMonitor": {"enabled": True}},
                   "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}},
}

# Everything the operator may do, per (API group, resource): see the comment on
# selfreward.rbacRules in templates/_helpers.tpl for why each verb is there.
ALLOWED = {
    ("selfreward.dev", "selfrewardruns"): {"list", "watch", "patch"},
    ("selfreward.dev", "selfrewardruns/status"): {"patch"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"list", "watch"},
    ("", "events"): {"create"},
    ("", "services"): {"create"},
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}
# What it cannot work without.
REQUIRED = {
    ("selfreward.dev", "selfrewardruns"): {"list", "watch", "patch"},
    ("selfreward.dev", "selfrewardruns/status"): {"patch"},
    ("batch", "jobs"): {"list", "watch", "create", "delete", "patch"},
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
    ("", "services"): {"create"},
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(str(CHART)) as c:
        yield c


def render(chart, values=None) -> list[dict]:
    out = chart.render(values or {}, name="sr", namespace=RELEASE_NS, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__template"] = path
                docs.append(doc)
    return docs


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def clean(doc):
    return {k: v for k, v in doc.items() if k != "__template"}


def operator_container(docs):
    (dep,) = of_kind(docs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, c


def operator_args(docs):
    _, c = operator_container(docs)
    return build_parser().parse_args(["operator", *c["args"]])


# --- lint --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_lint_strict(mode):
    report = helm.lint(str(CHART), MODES[mode], strict=True, namespace=RELEASE_NS, kube_version="v1.30.0")
    assert report["errors"] == []
    # severity 2 = warning, 3 = error; 1 is Helm's "icon is recommended" info.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- the CRD: one source -----------------------------------------------------------


def test_chart_crd_is_the_generated_crd(chart, tmp_path):
    assert CRD_FILE.exists(), "crds/ holds the CRD generated from the spec model"
    link = CHART / "crds" / CRD_FILE.name
    # A symlink, so the chart cannot drift from crds/.
    assert link.is_symlink() and link.resolve() == CRD_FILE.resolve()
    crds = {Path(c["name"]).name: c["data"] for c in chart.crds}
    assert crds[CRD_FILE.name] == CRD_FILE.read_text()
    # A packaged chart carries the file's contents, not a dangling link.
    archive = helm.package(str(CHART), destination=str(tmp_path))
    with helm.Chart.load(archive) as packaged:
        packed = {Path(c["name"]).name: c["data"] for c in packaged.crds}
    assert packed[CRD_FILE.name] == CRD_FILE.read_text()
    crd = yaml.safe_load(CRD_FILE.read_text())
    assert crd["metadata"]["name"] == "selfrewardruns.selfreward.dev"
    peering = {d["metadata"]["name"] for d in yaml.safe_load_all(crds["kopf.dev_peerings.yaml"])}
    assert peering == {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}


# --- RBAC --------------------------------------------------------------------------


def rbac_grants(docs, kinds=("Role", "ClusterRole")):
    grants: dict[tuple[str, str], set[str]] = {}
    for role in (d for d in docs if d["kind"] in kinds):
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {role['metadata']['name']}: {rule}"
            for g in rule["apiGroups"]:
                for r in rule["resources"]:
                    grants.setdefault((g, r), set()).update(rule["verbs"])
    return grants


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rbac_least_privilege(chart, mode):
    docs = render(chart, MODES[mode])
    grants = rbac_grants(docs)
    for key, verbs in grants.items():
        assert key in ALLOWED, f"{mode}: grants {key}"
        assert verbs <= ALLOWED[key], f"{mode}: {key} has {verbs - ALLOWED[key]} beyond what the operator uses"
        assert key[1] not in ("secrets", "configmaps", "namespaces")
    for key, verbs in REQUIRED.items():
        assert verbs <= grants.get(key, set()), f"{mode}: {key} misses {verbs - grants.get(key, set())}"
    # Bindings name the operator's ServiceAccount, never the worker's.
    for b in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "sr-selfreward", "namespace": RELEASE_NS}]
        assert b["roleRef"]["name"] == "sr-selfreward"


def test_namespaced_mode_has_nothing_cluster_scoped(chart):
    docs = render(chart, MODES["namespaced-2"])
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    roles = {d["metadata"]["namespace"] for d in of_kind(docs, "Role")}
    bindings = {d["metadata"]["namespace"] for d in of_kind(docs, "RoleBinding")}
    assert roles == bindings == {"team-a", "team-b"}
    args = operator_args(docs)
    assert args.namespace == ["team-a", "team-b"] and not args.all_namespaces
    # The worker ServiceAccount exists where the Jobs run.
    workers = [d for d in of_kind(docs, "ServiceAccount") if d["metadata"]["name"] == "sr-selfreward-worker"]
    assert {d["metadata"]["namespace"] for d in workers} == {"team-a", "team-b"}
    assert all(d["automountServiceAccountToken"] is False for d in workers)


def test_default_serves_the_release_namespace(chart):
    docs = render(chart)
    assert operator_args(docs).namespace == [RELEASE_NS]
    assert {d["metadata"]["namespace"] for d in of_kind(docs, "Role")} == {RELEASE_NS}
    assert not of_kind(docs, "KopfPeering") and not of_kind(docs, "ClusterKopfPeering")


def test_cluster_mode(chart):
    docs = render(chart, MODES["cluster"])
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")
    (cr,) = of_kind(docs, "ClusterRole")
    assert len(of_kind(docs, "ClusterRoleBinding")) == 1
    grants = rbac_grants([cr])
    assert ("apiextensions.k8s.io", "customresourcedefinitions") in grants
    args = operator_args(docs)
    assert args.all_namespaces and args.namespace == []
    workers = [d for d in of_kind(docs, "ServiceAccount") if d["metadata"]["name"] == "sr-selfreward-worker"]
    assert [d["metadata"]["namespace"] for d in workers] == ["ml"]
    no_crd_watch = render(chart, {"watch": {"mode": "cluster"}, "rbac": {"watchCRDs": False}})
    assert ("apiextensions.k8s.io", "customresourcedefinitions") not in rbac_grants(no_crd_watch)


def test_no_rbac_when_disabled(chart):
    docs = render(chart, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}})
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
    dep, _ = operator_container(docs)
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


# --- the Deployment ----------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_security_contexts_restricted(chart, mode):
    dep, c = operator_container(render(chart, MODES[mode]))
    pod = dep["spec"]["template"]["spec"]
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["runAsNonRoot"] is True and csc["runAsUser"] > 0
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not csc.get("privileged")
    # The read-only root gets a writable /tmp.
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in vol
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_probes_on_the_health_port(chart):
    docs = render(chart, {"health": {"port": 9191}, "metrics": {"port": 9090}})
    _, c = operator_container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 9191, "http-metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    args = operator_args(docs)
    assert (args.health_port, args.metrics_port) == (9191, 9090)
    (svc,) = of_kind(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http-metrics"


def test_images_and_env(chart):
    docs = render(chart, {"image": {"tag": "1.2.3"}, "workerImage": {"digest": "sha256:" + "a" * 64},
                          "verbose": True})
    _, c = operator_container(docs)
    assert c["image"] == "ghcr.io/selfreward/operator:1.2.3"
    env = {e["name"]: e for e in c["env"]}
    assert env["SELFREWARD_WORKER_IMAGE"]["value"] == "ghcr.io/selfreward/worker@sha256:" + "a" * 64
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "SELFREWARD_PEERING" not in env
    assert operator_args(docs).verbose
    # The default tag is the chart's appVersion.
    _, c = operator_container(render(chart))
    assert c["image"].endswith(":" + yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])


def test_single_replica_recreates(chart):
    dep, c = operator_container(render(chart))
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert operator_args(render(chart)).peering is None


@pytest.mark.parametrize("mode,kind,namespaces", [
    ("peering-2", "KopfPeering", {"team-a", "team-b"}),
    ("cluster-peering-2", "ClusterKopfPeering", {None}),
])
def test_peering(chart, mode, kind, namespaces, monkeypatch):
    docs = render(chart, MODES[mode])
    dep, c = operator_container(docs)
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SELFREWARD_PEERING"] == "sr-selfreward"
    # the CLI reads the peering name from that variable
    monkeypatch.setenv("SELFREWARD_PEERING", env["SELFREWARD_PEERING"])
    assert build_parser().parse_args(["operator", *c["args"]]).peering == "sr-selfreward"
    peerings = of_kind(docs, kind)
    assert {p["metadata"].get("namespace") for p in peerings} == namespaces
    assert all(p["apiVersion"] == "kopf.dev/v1" and p["metadata"]["name"] == "sr-selfreward" for p in peerings)
    plural = kind.lower() + "s"
    assert rbac_grants(docs)[("kopf.dev", plural)] == {"get", "list", "watch", "patch"}


# --- values.schema.json ------------------------------------------------------------


@pytest.mark.parametrize("bad,where", [
    ({"replicaCount": 2}, "/peering/enabled"),
    ({"watch": {"mode": "everywhere"}}, "/watch/mode"),
    ({"watch": {"namespaces": ["Team_A"]}}, "/watch/namespaces/0"),
    ({"securityContext": {"runAsNonRoot": False}}, "/securityContext/runAsNonRoot"),
    ({"securityContext": {"allowPrivilegeEscalation": True}}, "/securityContext/allowPrivilegeEscalation"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"prometheusRule": {"jobsFailingWindow": "an hour"}}, "/prometheusRule/jobsFailingWindow"),
    ({"replicas": 2}, "replicas"),
])
def test_schema_rejects(chart, bad, where):
    with pytest.raises(helm.HelmValuesError) as e:
        chart.render(bad, name="sr", namespace=RELEASE_NS)
    assert where in str(e.value)
    report = helm.lint(str(CHART), bad, strict=True)
    assert report["errors"]


def test_schema_accepts_the_defaults_and_modes(chart):
    for values in MODES.values():
        chart.validate_schema(chart.merge_values(values))


# --- Kubernetes schemas ------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_validate_against_kubernetes(chart, version):
    objects = []
    for mode, values in MODES.items():
        objects += [(mode, clean(d)) for d in render(chart, values)]
    objects += [("crds", d) for c in chart.crds for d in yaml.safe_load_all(c["data"]) if d]
    custom = set()
    for mode, obj in objects:
        try:
            kv.validate(obj, version, strict=True)
        except kv.SchemaNotFoundError:
            # Custom resources (ServiceMonitor, PrometheusRule, KopfPeering, ...) have
            # no schema in kubernetes-validate: noted, not failed.
            custom.add(f"{obj['apiVersion']}/{obj['kind']}")
        except kv.ValidationError as e:
            pytest.fail(f"{mode}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {e.message} "
                        f"at {list(e.absolute_path)}")
    if custom:
        warnings.warn(f"not validated (custom resources): {sorted(custom)}")
    kinds = {o["kind"] for _, o in objects}
    assert {"Deployment", "Role", "ClusterRole", "CustomResourceDefinition"} <= kinds


# --- monitoring --------------------------------------------------------------------


def exposed_metric_names() -> tuple[set[str], set[str]]:
    """The series names the operator really exposes: a Metrics instance driven with a
    realistic run status, rendered in the Prometheus text format."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from selfreward import phases
    from selfreward.metrics import Metrics

    m = Metrics()
    m.observe_status("ml", "run-a", {
        "phase": "Running", "currentIteration": 2, "currentPhase": "judge", "lastEval": 41.5, "rollbacks": 0,
        "gpuSecondsByPhase": {"generate": 60.0, "judge": 120.0}, "costByPhase": {"generate": 0.05, "judge": 0.1},
        "history": [{"iteration": 1, "startTime": "2026-01-01T00:00:00Z", "endTime": "2026-01-01T01:00:00Z",
                     "gpuSeconds": 180.0, "cost": 0.15, "prompts": 8, "responses": 32, "judged": 32, "parseFailures": 1, "pairs": 6,
                     "pairsDropped": 2, "meanScore": 3.1, "scoreStd": 0.8, "margin": 1.5,
                     "dpoLoss": 0.6, "rewardAccuracy": 0.7,
                     # and every other figure the phase registry declares (sft, metajudge, eval)
                     **{f.name: 0.5 if f.kind is float else 1 for _p, f in phases.figures()
                        if f.name not in ("prompts", "responses", "judged", "parseFailures", "pairs",
                                          "pairsDropped")}}]})
    m.job_created("ml", "run-a", "judge")
    m.job_failed("ml", "run-a", "judge")
    m.job_retried("ml", "run-a", "judge")
    m.phase_finished("generate", 42.0)
    m.reconcile_observed(0.01, error=True)
    samples, families = set(), set()
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        if not fam.name.endswith("_created"):  # prometheus_client's creation timestamps
            families.add(fam.name)
        samples.update(s.name for s in fam.samples)
    return samples, families


PROMQL_WORDS = {
    "sum", "max", "min", "by", "on", "and", "or", "unless", "time", "rate", "increase", "histogram_quantile",
    "le", "phase", "run", "namespace", "humanize", "humanizeDuration", "without", "ignoring",
}


def metric_names_in(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)        # label values
    expr = re.sub(r"\[[^\]]*\]", "", expr)       # range selectors
    expr = re.sub(r"\{[^}]*\}", "", expr)        # label matchers
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if w.startswith("selfreward_")}


def test_monitoring_objects(chart):
    docs = render(chart, MODES["monitoring"])
    (sm,) = of_kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "http-metrics"
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True  # keeps the run's namespace label
    (svc,) = of_kind(docs, "Service")
    dep, _ = operator_container(docs)
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (pm,) = of_kind(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "selfreward",
                                                     "app.kubernetes.io/component": "worker"}
    (rule,) = of_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"SelfRewardRunFailed", "SelfRewardRunStalled", "SelfRewardJobsFailing"} <= set(alerts)
    (cm,) = of_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["selfreward.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "selfreward.json").read_text())

    exposed, families = exposed_metric_names()
    used = set()
    for r in alerts.values():
        used |= metric_names_in(r["expr"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for e in exprs:
        used |= metric_names_in(e)
    assert used, "no metric names found"
    assert used - exposed == set(), f"names the operator does not expose: {sorted(used - exposed)}"
    # Every family the operator exposes has a panel (a dashboard that hides a figure is a bug).
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    assert families - shown <= {"selfreward_iteration_number"}, sorted(families - shown)
    panel_ids = [p["id"] for p in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_alerts_fire_under_promtool(chart, tmp_path):
    """The rendered PrometheusRule's groups, run by promtool over synthetic series with
    the operator's metric names: each alert fires when it should and not before."""
    values = {"prometheusRule": {"enabled": True, "stalledAfterSeconds": 3600, "jobsFailingThreshold": 2,
                                 "jobsFailingWindow": "1h", "runFailedFor": "1m"}}
    (rule,) = of_kind(render(chart, values), "PrometheusRule")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # The unit test compares labels; the annotations (templates checked just above) are
    # left out so that rewording a description does not break it.
    bare = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
            for g in rule["spec"]["groups"]]
    rules.write_text(yaml.safe_dump({"groups": bare}))

    ab = 'namespace="ml",run="{}"'
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # run "bad" fails at minute 10
                {"series": "selfreward_run_failed{%s}" % ab.format("bad"), "values": "0x9 1x60"},
                # run "slow" entered judge at t=0 and never left it
                {"series": "selfreward_run_failed{%s}" % ab.format("slow"), "values": "0x120"},
                {"series": 'selfreward_run_phase{%s,phase="judge"}' % ab.format("slow"), "values": "1x120"},
                {"series": "selfreward_run_phase_started_timestamp_seconds{%s}" % ab.format("slow"),
                 "values": "0x120"},
                # run "busy" moves to a new phase every 20 minutes: never stalled
                {"series": "selfreward_run_failed{%s}" % ab.format("busy"), "values": "0x120"},
                {"series": 'selfreward_run_phase{%s,phase="generate"}' % ab.format("busy"), "values": "1x120"},
                {"series": "selfreward_run_phase_started_timestamp_seconds{%s}" % ab.format("busy"),
                 "values": "0x19 1200x19 2400x19 3600x19 4800x19 6000x20"},
                # run "flaky": a Job fails every 10 minutes from minute 0
                {"series": "selfreward_jobs_failed_total{%s}" % ab.format("flaky"),
                 "values": "0+0.1x120"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "SelfRewardRunFailed", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "SelfRewardRunFailed", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "ml", "run": "bad"}}]},
                {"eval_time": "50m", "alertname": "SelfRewardRunStalled", "exp_alerts": []},
                {"eval_time": "80m", "alertname": "SelfRewardRunStalled", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "ml", "run": "slow"}}]},
                {"eval_time": "15m", "alertname": "SelfRewardJobsFailing", "exp_alerts": []},
                {"eval_time": "60m", "alertname": "SelfRewardJobsFailing", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "ml", "run": "flaky"}}]},
            ],
        }],
    }
    test_file = tmp_path / "tests.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    run = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_notes_tell_how_to_start(chart):
    out = chart.render(MODES["namespaced-2"], name="sr", namespace=RELEASE_NS, is_install=True)
    notes = next(v for k, v in out.items() if k.endswith("NOTES.txt"))
    assert "kubectl -n team-a apply -f" in notes
    assert "get srr -w" in notes
    assert "team-a, team-b" in notes
    assert "spec.storage.credentialsSecret: selfreward-s3" in notes
    assert "serviceAccountName" not in notes
    out = chart.render({"workerServiceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:x"}}},
                       name="sr", namespace=RELEASE_NS, is_install=True)
    notes = next(v for k, v in out.items() if k.endswith("NOTES.txt"))
    assert "spec.serviceAccountName: sr-selfreward-worker" in notes


# --- the RBAC against the operator's real requests ---------------------------------

API_PATH = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))(?P<rest>/.*)?$")


def classify(method: str, path: str, query: str):
    """(group, resource[/sub], verb, namespace) of an API request, or None for discovery."""
    m = API_PATH.match(path)
    if not m:
        return None
    group = "" if m["core"] else m["group"]
    parts = [p for p in (m["rest"] or "").split("/") if p]
    if not parts:
        return None  # /api/v1, /apis/G/V: discovery
    namespace = None
    if parts[0] == "namespaces" and len(parts) >= 3:
        namespace, parts = parts[1], parts[2:]
    resource, name, sub = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else None)
    watch = re.search(r"(^|&)watch=(true|1)", query or "") is not None
    verb = {"POST": "create", "PATCH": "patch", "PUT": "update"}.get(method)
    if method == "GET":
        verb = "get" if name else ("watch" if watch else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    return group, resource + (f"/{sub}" if sub else ""), verb, namespace


def run_manifest(name, ns, **over):
    spec = {"model": {"uri": "/models/base"}, "prompts": {"uri": "/data/prompts.jsonl"}, "iterations": 1,
            "storage": {"uri": f"s3://bucket/{ns}/{name}"}, "retry": {"maxRetries": 1, "backoffSeconds": 0}}
    spec.update(over)
    return {"apiVersion": "selfreward.dev/v1alpha1", "kind": "SelfRewardRun",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


RBAC_MODES = {
    "namespaced": {"watch": {"mode": "namespaced", "namespaces": ["a", "b"]}},
    "cluster": {"watch": {"mode": "cluster"}},
    "namespaced-peering": {"watch": {"mode": "namespaced", "namespaces": ["a", "b"]},
                           "replicaCount": 2, "peering": {"enabled": True}},
    "cluster-peering": {"watch": {"mode": "cluster"}, "replicaCount": 2, "peering": {"enabled": True}},
}


@pytest.mark.parametrize("mode", sorted(RBAC_MODES))
def test_rbac_allows_every_request_the_operator_sends(chart, mode, tmp_path):
    """The real operator, started with the args and env of the rendered Deployment, drives
    runs through a retry, suspend, deletion and artifact cleanup against the API emulator;
    every request it sends must be one the rendered Role/ClusterRole allows."""
    import os
    import signal
    import sys

    from kube.emulator import cluster
    from kube.kubelet import Fail, JobRunner, Succeed
    from selfreward.crd import crd_manifest

    docs = render(chart, RBAC_MODES[mode])
    _, container = operator_container(docs)
    args = [a for a in container["args"] if not a.startswith(("--metrics-port", "--health-port"))]
    env = dict(os.environ)
    for e in container["env"]:
        env[e["name"]] = e.get("value") or {"metadata.name": "sr-selfreward-0", "metadata.namespace": RELEASE_NS}[
            e["valueFrom"]["fieldRef"]["fieldPath"]]
    env["HOME"] = str(tmp_path)
    ns = "a"
    if mode.startswith("cluster"):
        allowed_ns = None
        grants = rbac_grants(of_kind(docs, "ClusterRole"))
    else:
        allowed_ns = {"a", "b"}
        grants = rbac_grants(of_kind(docs, "Role"))
        # Every namespace has the same Role.
        assert all(rbac_grants([r]) == grants for r in of_kind(docs, "Role"))

    def policy(job):
        name = job["metadata"]["name"]
        if name == "held-i1-generate":
            return "skip"  # stays active: suspended, then deleted with its run
        if name == "r-i1-generate":
            return Fail(1, "selfreward: generate failed: CUDA error (test)")
        return Succeed(json.dumps({"durationSeconds": 0.1}))

    log = tmp_path / "operator.log"
    with cluster(namespaces=["a", "b"], crds=[crd_manifest()]) as kube:
        env["KUBECONFIG"] = kube.kubeconfig
        for peering in of_kind(docs, "KopfPeering") + of_kind(docs, "ClusterKopfPeering"):
            kube.create(clean(peering))
        proc = subprocess.Popen([sys.executable, "-m", "selfreward", "operator", *args,
                                 "--metrics-port", "0", "--health-port", "0"],
                                env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        try:
            with JobRunner(kube, policy=policy):
                # r trains on two nodes: its train step also creates the run's headless Service
                kube.create(run_manifest("r", ns, storage={"uri": "s3://bucket/a/r", "deleteOnRunDeletion": True},
                                         training={"distributed": "fsdp"}, resources={"train": {"nodes": 2}}))
                kube.create(run_manifest("held", ns, storage={"uri": "s3://bucket/a/held",
                                                              "deleteOnRunDeletion": True}))

                def phase(name):
                    return ((kube.get("selfreward.dev/v1alpha1", "selfrewardruns", name, ns) or {})
                            .get("status") or {}).get("phase")

                kube.wait_for(lambda: phase("r") == "Succeeded", timeout=60)
                kube.wait_for(lambda: kube.get("batch/v1", "jobs", "held-i1-generate", ns), timeout=30)
                kube.patch("selfreward.dev/v1alpha1", "selfrewardruns", "held", {"spec": {"suspend": True}}, ns)
                kube.wait_for(lambda: phase("held") == "Suspended", timeout=30)
                kube.wait_for(lambda: (kube.get("batch/v1", "jobs", "held-i1-generate", ns) or {})
                              .get("spec", {}).get("suspend") is True, timeout=30)
                for name in ("r", "held"):
                    kube.delete("selfreward.dev/v1alpha1", "selfrewardruns", name, ns)
                for name in ("r", "held"):
                    kube.wait_for(lambda: kube.get("selfreward.dev/v1alpha1", "selfrewardruns", name, ns) is None,
                                  timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        requests = list(kube.emulator.log)

    sent, denied = set(), []
    for method, path, query in requests:
        c = classify(method, path, query)
        if c is None:
            continue  # discovery (/api, /apis/...): open to every authenticated client
        group, resource, verb, namespace = c
        sent.add((group, resource, verb))
        ok = verb in grants.get((group, resource), set())
        if allowed_ns is not None:
            ok = ok and namespace in allowed_ns  # a Role grants nothing cluster-scoped
        if not ok:
            denied.append(f"{method} {path}?{query}")
    assert not denied, "requests the chart's RBAC would refuse:\n" + "\n".join(sorted(set(denied))) + \
        "\n--- operator log ---\n" + log.read_text()[-3000:]
    # The scenario exercised the operator's whole repertoire.
    if "peering" in mode:
        plural = "clusterkopfpeerings" if mode.startswith("cluster") else "kopfpeerings"
        assert ("kopf.dev", plural, "patch") in sent, "the operator never touched its peering object"
    for expected in [("selfreward.dev", "selfrewardruns", "watch"), ("selfreward.dev", "selfrewardruns/status", "patch"),
                     ("selfreward.dev", "selfrewardruns", "patch"), ("batch", "jobs", "create"),
                     ("batch", "jobs", "patch"), ("batch", "jobs", "delete"), ("batch", "jobs", "watch"),
                     ("", "pods", "watch"), ("", "events", "create"), ("", "services", "create")]:
        assert expected in sent, f"the scenario never sent {expected}; sent: {sorted(sent)}"
    # And nothing granted is unused by the operator, bar what only happens in edge
    # cases (a 409 on create, kopf's CRD watch in the cluster-wide mode).
    unused = {(g, r, v) for (g, r), verbs in grants.items() for v in verbs} - sent
    assert unused <= {("batch", "jobs", "get"), ("kopf.dev", "kopfpeerings", "list"),
                      ("kopf.dev", "clusterkopfpeerings", "list"), ("", "pods", "list"), ("batch", "jobs", "list"),
                      ("selfreward.dev", "selfrewardruns", "list"),
                      ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                      ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}, sorted(unused)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_dashboard_queries_parse_under_promtool(tmp_path):
    """Every PromQL query of the dashboard, with Grafana's variables filled in, is valid
    PromQL for Prometheus' own parser (promtool checks them as recording rules)."""
    dashboard = json.loads((CHART / "dashboards" / "selfreward.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [re.sub(r"^label_values\((.*), \w+\)$", r"\1", v["query"]["query"])
              for v in dashboard["templating"]["list"] if v["type"] == "query"]
    grafana = {"$__rate_interval": "5m", "$__range": "1h", "$namespace": ".*", "$run": ".*"}
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(rules)} rules found" in check.stdout
