"""The container images: their Dockerfiles are parsed and checked against the
repository and the CLI, and their pinned Python packages are resolved together by
pip's own resolver.

No Docker engine exists here, so nothing is built. The resolution check runs
`pip install --dry-run --report` for the image's platform (CPython 3.12,
manylinux x86_64): pip downloads only the packages' metadata and proves that one set
of distributions satisfies every pin and every Requires-Dist, which is the failure an
image build would hit. It needs the package index; where the index cannot be
reached, that test is skipped (and says so), the static checks still run.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from selfreward.cli import build_parser
from selfreward.jobs import SPEC_FILE

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {
    "operator": ROOT / "images" / "operator",
    "worker": ROOT / "images" / "worker",
}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ML_PACKAGES = {"torch", "transformers", "trl", "peft", "accelerate", "vllm", "datasets"}


@dataclass
class Dockerfile:
    args: dict[str, str] = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)  # {"from": ref, "name": alias, "instructions": [...]}

    @property
    def final(self) -> dict:
        return self.stages[-1]


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with line continuations joined and comments dropped; global ARG
    defaults substituted into FROM lines."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    df = Dockerfile()
    for line in lines:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ARG" and not df.stages:
            name, _, default = rest.partition("=")
            df.args[name.strip()] = default.strip()
        elif word == "FROM":
            parts = rest.split()
            ref = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: df.args[m.group(1) or m.group(2)], parts[0])
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            df.stages.append({"from": ref, "name": alias, "instructions": []})
        else:
            assert df.stages, f"{path}: {word} before FROM"
            df.stages[-1]["instructions"].append((word, rest.strip()))
    return df


def instructions(stage: dict, word: str) -> list[str]:
    return [rest for w, rest in stage["instructions"] if w == word]


@pytest.fixture(scope="module", params=sorted(IMAGES))
def image(request):
    name = request.param
    return name, parse_dockerfile(IMAGES[name] / "Dockerfile")


def test_copy_sources_exist(image):
    name, df = image
    stage_names = {s["name"] for s in df.stages if s["name"]}
    seen = 0
    for stage in df.stages:
        for rest in instructions(stage, "COPY") + instructions(stage, "ADD"):
            words = shlex.split(rest)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            if any(f.startswith("--from=") for f in flags):
                assert flags[0].split("=", 1)[1] in stage_names
                continue
            for src in paths[:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY source {src} missing from the build context"
                seen += 1
    assert seen


def test_dockerignore_keeps_what_copy_needs(image):
    """BuildKit's <Dockerfile>.dockerignore: everything out but what COPY reads."""
    name, df = image
    ignore = (IMAGES[name] / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore
    for stage in df.stages:
        for rest in instructions(stage, "COPY"):
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            if "--from=" in rest:
                continue
            for src in words[:-1]:
                top = src.split("/")[0]
                assert f"!{top}" in ignore or f"!{top}/" in ignore, f"{name}: {src} excluded from the context"


def entrypoint(df: Dockerfile) -> list[str]:
    (ep,) = instructions(df.final, "ENTRYPOINT")
    argv = json.loads(ep)  # exec form only: signals reach the process
    assert isinstance(argv, list)
    return argv


def test_entrypoint_is_a_selfreward_subcommand(image):
    name, df = image
    argv = entrypoint(df)
    assert argv[0] in PYPROJECT["project"]["scripts"], f"{argv[0]} is not a console script of the package"
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert argv[1] in subcommands
    assert argv[1] == name
    # What Kubernetes appends must parse: the operator chart's args, the Job's phase.
    extra = {"operator": ["--namespace=ml", "--metrics-port=8080", "--health-port=8081"],
             "worker": ["generate", "--iteration", "1", "--spec", SPEC_FILE]}[name]
    args = parser.parse_args(argv[1:] + extra)
    assert args.command == name


def test_user_is_numeric_and_not_root(image):
    name, df = image
    users = instructions(df.final, "USER")
    assert users, f"{name}: the final stage sets no USER"
    user = users[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"{name}: USER {user} is not a numeric non-root uid"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    # The uid matches what the cluster runs it as.
    expected = {"operator": "10001", "worker": "1000"}[name]
    assert uid == expected
    if name == "operator":
        import yaml
        values = yaml.safe_load((ROOT / "charts" / "selfreward" / "values.yaml").read_text())
        assert values["securityContext"]["runAsUser"] == int(uid)
    else:
        from selfreward.jobs import Settings
        assert Settings().run_as_user == int(uid)


def test_base_images_pinned(image):
    name, df = image
    for stage in df.stages:
        ref = stage["from"]
        if ref in {s["name"] for s in df.stages}:
            continue
        if "@sha256:" in ref:
            continue
        repo, _, tag = ref.rpartition(":")
        assert repo and "/" not in tag, f"{name}: {ref} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {ref} is not pinned to a version"
    if name == "worker":
        assert df.final["from"].startswith("nvidia/cuda:") and "runtime" in df.final["from"]


def requirements(name: str) -> dict[str, Requirement]:
    out = {}
    for line in (IMAGES[name] / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req
    return out


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_requirements_pinned_and_match_pyproject(name):
    reqs = requirements(name)
    for key, req in reqs.items():
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{name}: {req} is not pinned with =="
    declared = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    extras = PYPROJECT["project"]["optional-dependencies"]
    if name == "operator":
        declared += [Requirement(r) for r in extras["operator"]]
        assert not (set(reqs) & ML_PACKAGES), "the operator image must not carry the ML stack"
    else:
        declared += [Requirement(r) for r in extras["ml"] + extras["vllm"]]
    for req in declared:
        key = canonicalize_name(req.name)
        assert key in reqs, f"{name}: {req.name} (pyproject) is not pinned in the image"
        pinned = Version(next(iter(reqs[key].specifier)).version)
        assert req.specifier.contains(pinned, prereleases=True), \
            f"{name}: pinned {req.name}=={pinned} is outside pyproject's {req.specifier}"


def test_operator_runs_without_the_ml_stack():
    """The operator image has no torch: importing the operator's modules must not need it."""
    modules = ["selfreward.cli", "selfreward.spec", "selfreward.status", "selfreward.storage"]
    for mod in ("controller", "reconcile", "jobs", "conditions", "metrics", "crd"):
        if (ROOT / "operator" / "selfreward" / f"{mod}.py").exists():
            modules.append(f"selfreward.{mod}")
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(ML_PACKAGES)!r}:\n"
        "            raise ImportError('blocked in the operator image: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}:\n"
        "    __import__(m)\n"
        "from selfreward.cli import build_parser\n"
        "build_parser().parse_args(['operator', '-A'])\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# --- resolution with pip ------------------------------------------------------------

PLATFORM_ARGS = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
# The images' glibc is 2.36 (Debian bookworm) and 2.39 (Ubuntu 24.04): every manylinux
# tag up to 2.36 is installable on both.
for _minor in range(17, 37):
    PLATFORM_ARGS += ["--platform", f"manylinux_2_{_minor}_x86_64"]
PLATFORM_ARGS += ["--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]

UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Network is unreachable", "Could not fetch URL", "ProxyError", "ConnectTimeoutError")


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory):
    """Both images' pins resolved by pip at the same time (the work is mostly waiting on
    the index): {image: (returncode, output, report or None)}."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    # This machine's pip configuration caps torch at the CPU wheels on its disk; the
    # image installs from the index alone.
    env["PIP_CONFIG_FILE"] = os.devnull
    env.pop("PIP_CONSTRAINT", None)
    procs = {}
    for name in sorted(IMAGES):
        report = tmp_path_factory.mktemp(name) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), *PLATFORM_ARGS, "-r", str(IMAGES[name] / "requirements.txt")]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env),
                       report)
    out = {}
    for name, (proc, report) in procs.items():
        try:
            output, _ = proc.communicate(timeout=540)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        out[name] = (proc.returncode, output, json.loads(report.read_text()) if report.exists() else None)
    return out


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_pinned_set_resolves(name, resolutions):
    returncode, output, report = resolutions[name]
    if returncode != 0 and any(s in output for s in UNREACHABLE):
        pytest.skip(f"package index unreachable: {output.strip().splitlines()[-1][:200]}")
    assert returncode == 0, output[-4000:]
    installed = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    for key, req in requirements(name).items():
        assert installed.get(key) == next(iter(req.specifier)).version, f"{key}: resolved {installed.get(key)}"
    if name == "operator":
        assert not (set(installed) & ML_PACKAGES)
    else:
        # torch from the index is the CUDA build: its NVIDIA runtime wheels come along.
        assert any(k.startswith("nvidia-") for k in installed)
