"""What a run ran with, so a team can reproduce it: ``run.json`` at the store's root and
the ``runtime`` block of every phase summary.

``run.json`` is written once, by whichever comes first: ``selfreward run`` before its
first step, or on the cluster the first worker (every worker checks). It holds::

    {"runJsonVersion": 1, "createdAt": ..., "createdBy": "local"|"worker",
     "spec": {...the spec as applied...},
     "seeds": {"run": spec.seed, "training": spec.training.seed},
     "runtime": {"image": ..., "versions": {"torch": ..., ...}, "project": {...}}}

A worker cannot see its own image digest (only the kubelet resolves it): the Job passes
the image reference in ``$SELFREWARD_IMAGE``, and the operator records the digest it
sees in the pods' status (``imageID``) in ``status.workerImageID``. Stores written before
this format hold the bare spec as run.json; :func:`run_json_spec` reads both.
"""
from __future__ import annotations

import functools
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from .storage import Store

RUN_JSON = "run.json"
RUN_JSON_VERSION = 1
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors", "selfreward")


def library_versions() -> dict[str, Optional[str]]:
    """Installed versions of the libraries that decide what training computes (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Optional[str]] = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    import platform

    out["python"] = platform.python_version()
    return out


def git_revision() -> Optional[str]:
    """The project's git revision: $SELFREWARD_GIT_REVISION (images set it at build
    time), else ``git rev-parse HEAD`` when the package runs from a git checkout."""
    env = os.environ.get("SELFREWARD_GIT_REVISION", "").strip()
    return env or _checkout_revision()


@functools.lru_cache(maxsize=1)  # the checkout does not change under a running worker; the env may
def _checkout_revision() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    if out.returncode != 0 or len(rev) != 40:
        return None
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                           capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL)
    return rev + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def runtime() -> dict[str, Any]:
    """The image, library versions and project version this process runs with."""
    from . import __version__

    return {
        "image": os.environ.get("SELFREWARD_IMAGE") or None,
        "versions": library_versions(),
        "project": {"version": __version__, "gitRevision": git_revision()},
    }


def run_record(spec, created_by: str) -> dict[str, Any]:
    return {
        "runJsonVersion": RUN_JSON_VERSION,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "createdBy": created_by,
        "spec": spec.model_dump(mode="json", exclude_none=True),
        "seeds": {"run": spec.seed, "training": spec.training.seed},
        "runtime": runtime(),
    }


def run_json_spec(doc: Any) -> Any:
    """The spec mapping inside a run.json document (either format)."""
    if isinstance(doc, dict) and "runJsonVersion" in doc:
        return doc.get("spec")
    return doc


def ensure_run_json(store: Store, spec, created_by: str = "worker") -> bool:
    """Write run.json unless one is there; True when this call wrote it. Two shards of
    a first step may both write it: the same spec, nearly the same moment."""
    if store.exists(RUN_JSON):
        return False
    store.write_json(RUN_JSON, run_record(spec, created_by))
    return True
