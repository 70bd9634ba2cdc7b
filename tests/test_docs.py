"""The user guide (docs/*.md, images/README.md) says what the code does: its links
resolve, its commands parse with the real parsers (selfreward's own, Helm's --set
parser and the chart's schema, the Makefile's targets), and the names it mentions
(spec and status fields, chart values, condition and Event reasons, metrics,
environment variables, printer columns) exist in the code. The `kind: SelfRewardRun`
manifests in the docs are admitted by the CRD in tests/test_crd.py."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from selfreward.cli import build_parser
from selfreward.spec import PHASES, RunSpec
from selfreward.status import IterationRecord, RunStatus

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "images" / "README.md", ROOT / "charts" / "selfreward" / "README.md"]
CHART = ROOT / "charts" / "selfreward"
CRD = yaml.safe_load((ROOT / "crds" / "selfreward.dev_selfrewardruns.yaml").read_text())
SOURCE = "\n".join(p.read_text() for p in sorted((ROOT / "operator" / "selfreward").rglob("*.py")))
CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Succeeded", "Failed", "Suspended")


def doc_id(p: Path) -> str:
    return str(p.relative_to(ROOT))


def without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def code_blocks(text: str, langs=("sh",)) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
            if m.group(1) in langs]


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the sh blocks, continuation lines joined, comments dropped."""
    out = []
    for block in code_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line, comments=True))
    return out


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", without_code(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", without_code(path.read_text()), flags=re.M)}


# --- links -------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_links_resolve(doc):
    links = re.findall(r"\]\(([^)\s]+)\)", without_code(doc.read_text()))
    assert links, f"{doc_id(doc)} links nothing"
    for link in links:
        if re.match(r"^[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc_id(doc)}: link {link} points at nothing"
        if anchor:
            assert path.suffix == ".md", f"{doc_id(doc)}: anchor on a non-Markdown link {link}"
            assert anchor in anchors(path), f"{doc_id(doc)}: no heading #{anchor} in {path.name}"


def test_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


# --- commands ----------------------------------------------------------------------


def all_commands() -> list[tuple[str, list[str]]]:
    return [(doc_id(d), argv) for d in DOCS for argv in shell_commands(d.read_text())]


def test_there_are_commands():
    programs = {argv[0].split("/")[-1] for _, argv in all_commands()}
    assert {"selfreward", "make", "helm", "kubectl", "docker"} <= programs


def test_selfreward_commands_parse():
    parser = build_parser()
    seen = 0
    for where, argv in all_commands():
        if argv[0].split("/")[-1] != "selfreward":
            continue
        args = parser.parse_args(argv[1:])
        seen += 1
        value = getattr(args, "spec", None)
        if value and value.startswith("examples/"):
            assert (ROOT / value).exists(), f"{where}: {' '.join(argv)}: {value} does not exist"
    assert seen >= 3


def test_make_targets_exist():
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    for where, argv in all_commands():
        if argv[0] == "make":
            for t in argv[1:]:
                if "=" in t:  # a variable assignment (make gpu-check DEVICE=cpu)
                    assert re.match(r"^[A-Z_]+=", t) and f"{t.split('=')[0]} ?=" in (ROOT / "Makefile").read_text(), t
                    continue
                assert t in targets, f"{where}: make {t}: no such target"


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_helm_commands_use_real_values():
    """Each `helm install/upgrade` of the docs: its --set/--set-string values, parsed by
    Helm's own parser, pass the chart's schema and render."""
    helm = pytest.importorskip("helm_python")
    seen = 0
    with helm.Chart.load(str(CHART)) as chart:
        for where, argv in all_commands():
            if argv[0] != "helm" or argv[1] not in ("install", "upgrade"):
                continue
            assert "charts/selfreward" in argv, where
            values: dict[str, Any] = {}
            for flag, expr in zip(argv, argv[1:]):
                if flag == "--set":
                    values = _deep_merge(values, helm.parse_set_string(expr))
                elif flag == "--set-string":
                    values = _deep_merge(values, helm.parse_set_string_values(expr))
            chart.validate_schema(chart.merge_values(values))
            chart.render(values, name="selfreward", namespace="selfreward-system", is_install=True)
            seen += 1
    assert seen >= 4


def test_kubectl_commands():
    names = CRD["spec"]["names"]
    run_names = {names["plural"], names["singular"], *names.get("shortNames", []), *names.get("categories", [])}
    seen = 0
    for where, argv in all_commands():
        if argv[0] != "kubectl":
            continue
        seen += 1
        for w in argv[1:]:
            base = w.split("/")[0]
            if base in {"srr", "selfrewardrun", "selfrewardruns", "selfreward"}:
                assert base in run_names, f"{where}: {w}"
        for flag, value in zip(argv, argv[1:]):
            if flag == "-f" and "/" in value:
                assert (ROOT / value).exists(), f"{where}: {value} does not exist"
            if flag == "-p":
                for key in json.loads(value)["spec"]:
                    assert key in RunSpec.model_fields, f"{where}: spec.{key} is not a spec field"
        for value in argv:
            if value.startswith("--for=condition="):
                assert value.split("=", 2)[2] in CONDITION_TYPES, f"{where}: {value}"
            for p in re.findall(r"\{\.status\.(\w+)", value):
                assert p in RunStatus.model_fields, f"{where}: status.{p}"
            for ctype in re.findall(r'@\.type=="(\w+)"', value):
                assert ctype in CONDITION_TYPES, f"{where}: condition {ctype}"
            for label in re.findall(r"(selfreward\.dev/\w+)=", value):
                assert f'"{label}"' in SOURCE, f"{where}: label {label} is not one the operator sets"
    assert seen >= 10


def test_docker_builds_name_real_dockerfiles():
    seen = 0
    for where, argv in all_commands():
        if argv[:2] == ["docker", "build"]:
            f = argv[argv.index("-f") + 1]
            assert (ROOT / f).exists(), f"{where}: {f}"
            assert argv[-1] == "."  # the repository root is the build context
            seen += 1
    assert seen >= 2


# --- names -------------------------------------------------------------------------


def _model_of(annotation):
    """The pydantic model inside Optional[...] / list[...], if any."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in get_args(annotation):
        m = _model_of(arg)
        if m is not None:
            return m
    return None


def resolve(model, parts: list[str]) -> bool:
    for i, part in enumerate(parts):
        if part == "<phase>":
            candidates = [p for p in PHASES if p in model.model_fields]
            return bool(candidates) and all(resolve(model, [c] + parts[i + 1:]) for c in candidates)
        if part not in model.model_fields:
            return False
        if i == len(parts) - 1:
            return True
        model = _model_of(model.model_fields[part].annotation)
        if model is None:
            return False
    return True


def field_references(text: str) -> list[str]:
    refs = []
    for token in backticked(text):
        m = re.fullmatch(r"((?:spec|status)\.)?([a-zA-Z]+(?:\.(?:[a-zA-Z]+|<phase>))+)(: \S+)?", token.strip())
        if m and not re.search(r"\.(json|jsonl|yaml|yml|md|py|txt|tpl)$", m.group(2)):
            refs.append((m.group(1) or "") + m.group(2))
    return refs


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_field_names_exist(doc):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    checked = 0
    for ref in field_references(doc.read_text()):
        if ref.startswith("status."):
            parts = ref.split(".")[1:]
            assert parts[0] in RunStatus.model_fields, f"{doc_id(doc)}: {ref} is not a status field"
            checked += 1
            continue
        parts = ref.removeprefix("spec.").split(".")
        if ref.startswith("spec.") or parts[0] in RunSpec.model_fields:
            assert resolve(RunSpec, parts), f"{doc_id(doc)}: {ref} is not a spec field"
            checked += 1
        elif parts[0] in values:
            node = values
            for part in parts:
                assert isinstance(node, dict) and part in node, f"{doc_id(doc)}: {ref} is not a chart value"
                node = node[part]
            checked += 1
    if doc.name in ("gpu-scheduling.md", "storage.md", "troubleshooting.md", "install.md", "progress.md"):
        assert checked >= 5, f"{doc_id(doc)}: expected field references, found {checked}"


def test_history_fields_exist():
    text = (ROOT / "docs" / "progress.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `history` |"))
    fields = re.findall(r"`(\w+)`", row.split("|")[2])
    assert len(fields) > 10
    for f in fields:
        assert f in IterationRecord.model_fields, f"history.{f}"
    status_rows = re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", text.split("## The status", 1)[1].split("## Conditions")[0],
                             flags=re.M)
    for pair in status_rows:
        for f in filter(None, pair):
            assert f in RunStatus.model_fields, f"status.{f}"


def _keys_ok(model, data) -> bool:
    for k, v in data.items():
        if k not in model.model_fields:
            return False
        sub = _model_of(model.model_fields[k].annotation)
        if sub is not None:
            for item in (v if isinstance(v, list) else [v]):
                if isinstance(item, dict) and not _keys_ok(sub, item):
                    return False
    return True


def test_spec_snippets_name_real_fields():
    """YAML snippets in the docs that are not whole manifests sit under spec: every key
    must be a spec field at that place."""
    seen = 0
    for doc in DOCS:
        for block in code_blocks(doc.read_text(), langs=("yaml",)):
            data = yaml.safe_load(block)
            if not isinstance(data, dict) or "kind" in data:
                continue
            assert _keys_ok(RunSpec, data), f"{doc_id(doc)}: snippet with unknown spec fields:\n{block}"
            seen += 1
    assert seen >= 3


def reasons_in_source() -> set[str]:
    return set(re.findall(r'"([A-Z][A-Za-z]+)"', SOURCE))


def test_troubleshooting_covers_the_failure_reasons():
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    # the sections named after reasons: "## OOMKilled", "## JobFailed, BackoffLimitExceeded"
    named = {w for h in headings if re.fullmatch(r"[A-Z][A-Za-z]+(, [A-Z][A-Za-z]+)*", h) for w in h.split(", ")}
    source = reasons_in_source()
    # BackoffLimitExceeded is the Job controller's reason, passed through as it is.
    for reason in named - {"BackoffLimitExceeded"}:
        assert reason in source, f"troubleshooting.md: {reason} is not a reason the operator sets"
    required = {"InvalidSpec", "OOMKilled", "ImagePullError", "Unschedulable", "DeadlineExceeded",
                "WorkerError", "JobFailed", "Suspended", "WaitingForAdmission"}
    assert required <= named, sorted(required - named)
    # and every reason the failure classifier can give is documented
    classifier = SOURCE.split("def job_failure", 1)[1].split("\ndef ", 1)[0]
    for reason in set(re.findall(r'Failure\("(\w+)"', classifier)) | {"ImagePullError", "Unschedulable"}:
        assert reason in named, f"troubleshooting.md has no section for {reason}"


def test_event_and_condition_reasons_exist():
    text = (ROOT / "docs" / "progress.md").read_text()
    source = reasons_in_source()
    table = text.split("## Events", 1)[1].split("## Metrics", 1)[0]
    events = set(re.findall(r"`([A-Z][A-Za-z]+)`", table)) - {"Normal", "Warning"}
    assert {"RunStarted", "JobCreated", "StepCompleted", "JobRetried", "JobFailed", "Succeeded"} <= events
    for reason in events:
        assert reason in source, f"progress.md: Event reason {reason} is not in the code"
    for reason in re.findall(r'p\.event\("(?:Normal|Warning)", "(\w+)"', SOURCE):
        assert reason in events, f"progress.md does not list the Event reason {reason}"
    conditions = text.split("## Conditions", 1)[1].split("## Events", 1)[0]
    for reason in re.findall(r"`([A-Z][A-Za-z]+)`", conditions):
        assert reason in source, f"progress.md: condition reason {reason}"


def test_printer_columns_match_the_crd():
    text = (ROOT / "docs" / "progress.md").read_text()
    printer = CRD["spec"]["versions"][0]["additionalPrinterColumns"]
    block = next(b for b in code_blocks(text, langs=("text",)) if b.startswith("NAME"))
    assert block.split("\n")[0].split() == ["NAME"] + [c["name"].upper() for c in printer]
    rows = re.findall(r"^\| ([A-Z]+) \| `(status\.\w+)`", text, flags=re.M)
    assert len(rows) == len([c for c in printer if c["jsonPath"].startswith(".status")])
    for col, path in rows:
        (c,) = [c for c in printer if c["name"].upper() == col]
        assert c["jsonPath"] == "." + path


def operator_metric_names() -> set[str]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from selfreward.metrics import Metrics

    m = Metrics()
    m.observe_status("ns", "r", {"phase": "Running", "currentIteration": 1, "currentPhase": "train",
                                 "gpuSecondsByPhase": {"train": 60.0}, "costByPhase": {"train": 0.1},
                                 "history": [{"iteration": 1, "endTime": "2026-01-01T00:00:00Z", "prompts": 1,
                                              "responses": 1, "judged": 1, "parseFailures": 0, "pairs": 1,
                                              "pairsDropped": 0, "meanScore": 1, "scoreStd": 0, "margin": 1,
                                              "dpoLoss": 1, "rewardAccuracy": 1}]})
    m.job_created("ns", "r")
    m.reconcile_observed(0.1, error=True)
    names = set()
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names


def test_metric_names_exist():
    operator_metrics = operator_metric_names()
    worker_source = (ROOT / "operator" / "selfreward" / "worker" / "progress.py").read_text()
    mentioned = set()
    for doc in DOCS:
        mentioned |= set(re.findall(r"\bselfreward_[a-z_]*[a-z]\b", doc.read_text()))
    assert len(mentioned) > 15
    for name in mentioned:
        if name.startswith("selfreward_worker_"):
            assert name in worker_source, f"{name} is not a worker progress metric"
        else:
            assert name in operator_metrics, f"{name} is not an operator metric"
    # the table's abbreviated names (`_responses`, ...) are iteration figures
    text = (ROOT / "docs" / "progress.md").read_text()
    for short in re.findall(r"`(_[a-z_]+)`", text):
        assert "selfreward_iteration" + short in operator_metrics, short


def test_environment_variables_exist():
    where = SOURCE + (CHART / "templates" / "deployment.yaml").read_text() + \
        (ROOT / "images" / "worker" / "Dockerfile").read_text()
    for doc in DOCS:
        for var in set(re.findall(r"\b(SELFREWARD_[A-Z_]*[A-Z]|AWS_[A-Z_]*[A-Z]|HF_[A-Z_]*[A-Z])\b", doc.read_text())):
            if var == "HF_ENDPOINT":  # huggingface_hub's own setting, read by the library
                continue
            assert var in where, f"{doc_id(doc)}: {var} appears nowhere in the code"


def test_sizing_examples_have_the_shape_the_page_states():
    """docs/sizing.md names each example manifest with its nodes x GPUs; the manifests
    load and train with that shape (and with FSDP exactly when they use several GPUs)."""
    from selfreward.spec import load_spec_file

    text = (ROOT / "docs" / "sizing.md").read_text()
    claims = re.findall(r"\[`(examples/runs/[\w.-]+\.yaml)`\]\([^)]*\): (\d+) nodes? x (\d+) GPUs?", text)
    assert len(claims) >= 3, claims
    for path, nodes, gpus in claims:
        spec, _ = load_spec_file(ROOT / path)
        assert spec.training_world("train") == (int(nodes), int(gpus)), path
        assert (spec.training.distributed == "fsdp") == (int(nodes) * int(gpus) > 1), path
        assert spec.resources.for_phase("train").gpus == int(gpus), path
