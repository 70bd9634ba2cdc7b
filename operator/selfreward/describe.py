"""`selfreward describe STORE_URI`: a run's history from its artifact store alone (no
cluster): run.json (spec, seeds, runtime) and one table per iteration built from the
phase summaries (``iter-<t>/<phase>/summary.json``), with the image and library
versions each phase ran with. ``--json`` prints the same as one JSON document.

A phase directory without its summary.json is shown as ``incomplete`` (a step that
started and has not committed); an iteration with nothing in it is not listed.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

from . import layout, phases, provenance
from .spec import parse_spec
from .storage import Store

_ITER = re.compile(r"^iter-(\d+)$")
# the phases in run order; phases this module does not know come after, by name
PHASE_ORDER = phases.NAMES
# per phase, the figures a table row shows (those present in the summary)
FIGURES = {
    "sft": ("steps", "trainLoss", "meanTokenAccuracy", "resumedFromStep"),
    "instruct": ("prompts", "promptsKept"),
    "generate": ("prompts", "responses", "tokensPerSecond", "truncatedResponses", "batchesResumed"),
    "judge": ("judged", "meanScore", "scoreStd", "topScoreShare", "parseFailures", "batchesResumed"),
    "metajudge": ("metaJudgedResponses", "orderAgreement", "candidatePairs"),
    "pairs": ("pairs", "pairsDropped", "meanMargin", "margin", "metaPairs"),
    "train": ("steps", "dpoLoss", "rewardAccuracy", "rewardMargin", "resumedFromStep"),
    "eval": ("verifierScore", "judgePairwiseAccuracy", "winRateVsPrevious", "winRateVsBaseline"),
}
OTHER_FIGURES = 4  # figures shown for a phase FIGURES does not name: its first numeric ones
VERSIONS_SHOWN = ("torch", "transformers", "trl", "selfreward")


class DescribeError(RuntimeError):
    """The store holds no run."""


def _phase_key(name: str) -> tuple[int, str]:
    return (PHASE_ORDER.index(name), name) if name in PHASE_ORDER else (len(PHASE_ORDER), name)


def _numbers(summary: dict) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def history(store: Store) -> dict:
    """The run's record: run.json's contents and, per iteration, each phase's state and summary."""
    if not store.exists(provenance.RUN_JSON) and not any(_ITER.match(n) for n in store.list("")):
        raise DescribeError(f"{store.url('')} holds no run (no {provenance.RUN_JSON}, no iter-<t>/ directories)")
    record: dict[str, Any] = {}
    spec_doc = None
    if store.exists(provenance.RUN_JSON):
        try:
            raw = store.read_json(provenance.RUN_JSON)
        except ValueError as e:
            raise DescribeError(f"{store.url(provenance.RUN_JSON)} is not JSON ({e})") from None
        spec_doc = provenance.run_json_spec(raw)
        if isinstance(raw, dict) and "runJsonVersion" in raw:
            record = {k: raw.get(k) for k in ("createdAt", "createdBy", "updatedAt", "seeds", "runtime") if k in raw}
    iterations_planned = None
    if isinstance(spec_doc, dict):
        try:
            spec = parse_spec(spec_doc, store.url(provenance.RUN_JSON))
            iterations_planned = spec.iterations
            record.setdefault("seeds", {"run": spec.seed, "training": spec.training.seed})
            record["model"] = spec.model.uri
        except ValueError:
            record["specInvalid"] = True
    out: dict[str, Any] = {"store": store.url(""), "run": record, "iterationsPlanned": iterations_planned,
                           "spec": spec_doc, "iterations": []}
    for t in sorted(int(m.group(1)) for n in store.list("") if (m := _ITER.match(n))):
        phases = []
        for name in sorted(store.list(f"iter-{t}"), key=_phase_key):
            rel = layout.summary_path(t, name)
            if store.exists(rel):
                try:
                    summary = store.read_json(rel)
                except ValueError:
                    phases.append({"phase": name, "state": "unreadable"})
                    continue
                phases.append({"phase": name, "state": "done", "summary": summary})
            elif store.list(layout.phase_dir(t, name)):
                phases.append({"phase": name, "state": "incomplete"})
        if phases:
            out["iterations"].append({"iteration": t, "phases": phases})
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _figures(phase: str, summary: dict) -> str:
    nums = _numbers(summary)
    names = [k for k in FIGURES.get(phase, ()) if k in nums]
    if phase not in FIGURES:
        names = [k for k in nums if k not in ("iteration", "numShards", "shard")][:OTHER_FIGURES]
    return " ".join(f"{k}={_fmt(nums[k])}" for k in names)


def _runtime(summary: dict) -> tuple[str, str]:
    rt = summary.get("runtime") if isinstance(summary.get("runtime"), dict) else {}
    versions = rt.get("versions") if isinstance(rt.get("versions"), dict) else {}
    shown = " ".join(f"{k}={versions[k]}" for k in VERSIONS_SHOWN if versions.get(k))
    return str(rt.get("image") or "-"), shown or "-"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render(h: dict) -> str:
    run = h["run"]
    lines = [f"run in {h['store']}"]
    if run.get("model"):
        lines.append(f"  model       {run['model']}")
    if h.get("iterationsPlanned") is not None:
        lines.append(f"  iterations  {h['iterationsPlanned']} planned")
    if run.get("createdAt"):
        lines.append(f"  created     {run['createdAt']} by {run.get('createdBy', '?')}"
                     + (f", spec updated {run['updatedAt']}" if run.get("updatedAt") else ""))
    if run.get("seeds"):
        lines.append("  seeds       " + " ".join(f"{k}={v}" for k, v in run["seeds"].items()))
    rt = run.get("runtime") or {}
    if rt:
        image, versions = _runtime({"runtime": rt})
        project = rt.get("project") or {}
        lines.append(f"  image       {image}")
        lines.append(f"  versions    {versions}")
        lines.append(f"  project     {project.get('version', '?')} (git {project.get('gitRevision') or 'unknown'})")
    if not h["iterations"]:
        lines.append("no phase has started")
    for it in h["iterations"]:
        t = it["iteration"]
        lines.append("")
        lines.append(f"iteration {t}" + (" (SFT)" if t == 0 else ""))
        rows = []
        for p in it["phases"]:
            s = p.get("summary") or {}
            image, versions = _runtime(s)
            dur = s.get("durationSeconds")
            rows.append([p["phase"], p["state"], _fmt(dur) + "s" if isinstance(dur, (int, float)) else "-",
                         _figures(p["phase"], s) or "-", image, versions])
        lines.extend("  " + r for r in _table(rows, ["phase", "state", "duration", "figures", "image", "versions"]))
    return "\n".join(lines) + "\n"


def describe(uri: str, endpoint: Optional[str] = None, region: Optional[str] = None, as_json: bool = False) -> str:
    h = history(Store(uri, endpoint, region))
    return json.dumps(h, indent=2, sort_keys=True) + "\n" if as_json else render(h)
