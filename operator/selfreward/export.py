"""`selfreward export RUN_OR_STORE [--iteration t] DEST`: a trained model as a standard
Hugging Face directory (config, safetensors weights, tokenizer, a README.md model card
with the run's figures), written to a local path or an s3:// prefix. The directory is
hub-style: ``huggingface-cli upload ORG/NAME DEST`` publishes it as it is.

What is exported:
- ``--iteration t``: M_{t+1}, the checkpoint of iteration t (``iter-<t>/train/checkpoint``;
  t = 0 is the SFT model ``iter-0/sft/checkpoint``);
- otherwise, from a run on the cluster (RUN_OR_STORE is a SelfRewardRun's name):
  ``status.bestCheckpoint`` when the eval gate named one, else ``status.finalCheckpoint``;
  from a store: the newest eval summary's ``bestCheckpoint``, else the newest committed
  training checkpoint.

Checkpoints are merged models already (LoRA adapters are merged when a phase commits),
so the weights are copied byte for byte after verifying them against the checkpoint's
manifest. LoRA runs also commit the adapter itself (``iter-<t>/<phase>/adapter``);
``--adapter`` adds it as ``adapter/`` (a PEFT directory; it applies to the model the
iteration started from, which the model card names).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from . import checkpoint, layout, provenance
from .describe import history
from .storage import Store

ADAPTER = "adapter"  # the adapter's folder inside an export
_ITER_CKPT = re.compile(r"^iter-(\d+)/(train|sft)/checkpoint$")


class ExportError(RuntimeError):
    """What to export cannot be found or written; the message says why."""


def iteration_checkpoint(iteration: int) -> str:
    return layout.checkpoint_dir(0, "sft") if iteration == 0 else layout.checkpoint_dir(iteration, "train")


def _relative(uri: str, store: Store) -> Optional[str]:
    """uri as a path inside store, or None when it lies outside."""
    root = store.url("").rstrip("/")
    full = uri.rstrip("/")
    if store.protocol == "file" and full.startswith("/"):
        full = "file://" + full
    if full == root:
        return ""
    return full[len(root) + 1:] if full.startswith(root + "/") else None


def from_run(run: dict, iteration: Optional[int]) -> tuple[Store, str]:
    """(store, checkpoint path in it) for a SelfRewardRun object (spec + status)."""
    spec, status = run.get("spec") or {}, run.get("status") or {}
    storage = spec.get("storage") or {}
    if not storage.get("uri"):
        raise ExportError("the run has no spec.storage.uri")
    store = Store(storage["uri"], storage.get("endpoint"), storage.get("region"))
    if iteration is not None:
        return store, iteration_checkpoint(iteration)
    for field in ("bestCheckpoint", "finalCheckpoint"):
        uri = status.get(field)
        if not uri:
            continue
        rel = _relative(uri, store)
        if rel is None:
            raise ExportError(f"status.{field} is {uri}, outside the run's store {store.url('')}: it is the base "
                              f"model, not a trained checkpoint; give --iteration to export a trained one")
        return store, rel
    raise ExportError("the run's status names no bestCheckpoint or finalCheckpoint yet; give --iteration")


def from_store(store: Store, iteration: Optional[int]) -> str:
    """The checkpoint path to export from a store alone."""
    if iteration is not None:
        return iteration_checkpoint(iteration)
    h = history(store)
    for it in reversed(h["iterations"]):
        for p in it["phases"]:
            best = (p.get("summary") or {}).get("bestCheckpoint")
            if p["phase"] == "eval" and isinstance(best, str) and best:
                return best
    for it in reversed(h["iterations"]):
        rel = iteration_checkpoint(it["iteration"])
        if checkpoint.is_committed(store, rel):
            return rel
    raise ExportError(f"{store.url('')} holds no committed training checkpoint")


def _figures_table(h: dict, upto: int) -> list[str]:
    cols = [("generate", "prompts", "prompts"), ("generate", "responses", "responses"),
            ("judge", "meanScore", "mean score"), ("pairs", "pairs", "pairs"),
            ("train", "steps", "steps"), ("train", "dpoLoss", "DPO loss"),
            ("train", "rewardAccuracy", "reward accuracy"), ("sft", "trainLoss", "SFT loss"),
            ("eval", "verifierScore", "verifier score"), ("eval", "winRateVsBaseline", "win rate vs M1")]
    rows = []
    for it in h["iterations"]:
        if it["iteration"] > upto:
            continue
        by = {p["phase"]: p.get("summary") or {} for p in it["phases"]}
        rows.append((it["iteration"], [by.get(ph, {}).get(k) for ph, k, _ in cols]))
    used = [i for i in range(len(cols)) if any(r[1][i] is not None for r in rows)]
    if not rows or not used:
        return ["No phase summaries were found in the store."]

    def cell(v: Any) -> str:
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    out = ["| iteration | " + " | ".join(cols[i][2] for i in used) + " |",
           "|---|" + "---|" * len(used)]
    out += [f"| {t} | " + " | ".join(cell(vals[i]) for i in used) + " |" for t, vals in rows]
    return out


def model_card(store: Store, rel: str, manifest: dict, with_adapter: bool) -> str:
    """README.md: what the model is, the run that made it, its figures per iteration."""
    h = history(store)
    spec = h.get("spec") or {}
    m = _ITER_CKPT.match(rel)
    upto = int(m.group(1)) if m else max([it["iteration"] for it in h["iterations"]] or [0])
    meta = manifest.get("metadata") or {}
    base = (spec.get("model") or {}).get("uri", "")
    rt = h["run"].get("runtime") or {}
    tr = spec.get("training") or {}
    front = ["---", "library_name: transformers", "tags:", "- selfreward", "- self-rewarding", "- dpo"]
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", base or "") and not os.path.exists(base):
        front.append(f"base_model: {base}")
    front.append("---")
    model = f"M{upto + 1}" if m else "the exported model"
    project = rt.get("project") or {}
    about = []
    if base:
        about.append(f"- base model: `{base}`")
    if h.get("iterationsPlanned") is not None:
        about.append(f"- iterations planned: {h['iterationsPlanned']}")
    if spec:
        about.append(f"- training: mode {tr.get('mode', 'full')}, loss {tr.get('lossType', 'sigmoid')}, "
                     f"beta {tr.get('beta', 0.1)}, learning rate {tr.get('learningRate', 1e-6)}, "
                     f"reference {tr.get('reference', 'current')}")
    if h["run"].get("seeds"):
        about.append(f"- seeds: {json.dumps(h['run']['seeds'], sort_keys=True)}")
    if rt:
        about.append(f"- worker image: `{rt.get('image') or 'not recorded'}`; selfreward {project.get('version')} "
                     f"(git {project.get('gitRevision') or 'not recorded'})")
        about.append(f"- libraries: {', '.join(f'{k} {v}' for k, v in (rt.get('versions') or {}).items() if v)}")
    lines = front + [
        "",
        f"# {model} of a Self-Rewarding run",
        "",
        f"Trained by selfreward (Self-Rewarding Language Models, Yuan et al. 2024): iteration {upto} of the run "
        f"in `{store.url('')}`, checkpoint `{rel}`, exported {time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        "## The run",
        "",
        *(about or [f"The store holds no {provenance.RUN_JSON}: the run's settings are not recorded."]),
        "",
        "## Figures per iteration",
        "",
        *_figures_table(h, upto),
        "",
        "## Files",
        "",
        "- `config.json`, `*.safetensors`, tokenizer files: the model (LoRA adapters, if any, merged into it); "
        "load it with `AutoModelForCausalLM.from_pretrained`.",
    ]
    if with_adapter:
        lines.append(f"- `adapter/`: the PEFT LoRA adapter of this iteration; it applies to "
                     f"`{meta.get('policy') or meta.get('base') or 'the model the iteration started from'}`.")
    weights = {n: f["sha256"] for n, f in manifest["files"].items() if n.endswith(".safetensors")}
    lines += ["", "## Weights (sha256)", ""] + [f"- `{n}`: `{d}`" for n, d in sorted(weights.items())]
    return "\n".join(lines) + "\n"


def _stage(store: Store, rel: str, with_adapter: bool, out: Path) -> dict:
    manifest = checkpoint.read_manifest(store, rel)
    local = checkpoint.fetch(store, rel)  # verified: every file's size and sha256
    for name in manifest["files"]:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(local) / name, target)
    checkpoint.verify_local(out, manifest, f"export of {store.url(rel)}")  # the copy is byte-exact
    if with_adapter:
        arel = layout.adapter_dir(rel)
        if not checkpoint.is_committed(store, arel):
            raise ExportError(f"{store.url(arel)} holds no committed adapter: the iteration trained in full "
                              f"mode, or before adapters were kept; export without --adapter")
        amanifest = checkpoint.read_manifest(store, arel)
        alocal = checkpoint.fetch(store, arel)
        for name in amanifest["files"]:
            target = out / ADAPTER / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(alocal) / name, target)
    (out / "README.md").write_text(model_card(store, rel, manifest, with_adapter))
    return manifest


def export(store: Store, rel: str, dest: str, *, with_adapter: bool = False, force: bool = False,
           dest_endpoint: Optional[str] = None) -> dict:
    """Write the checkpoint at store/rel to dest as a Hugging Face directory; return figures."""
    if not checkpoint.is_committed(store, rel):
        raise ExportError(f"{store.url(rel)} is not a committed checkpoint (the iteration has not finished "
                          f"training, or it does not exist)")
    target = Store(dest, dest_endpoint or store.endpoint)
    if target.protocol == store.protocol and (target.root + "/").startswith(store.root.rstrip("/") + "/"):
        raise ExportError(f"{dest} lies inside the run's store {store.url('')}; export somewhere else")
    if target.list("") and not force:
        raise ExportError(f"{target.url('')} is not empty; give --force to write into it")
    with tempfile.TemporaryDirectory(prefix="selfreward-export-") as tmp:
        out = Path(tmp)
        try:
            manifest = _stage(store, rel, with_adapter, out)
        except checkpoint.CheckpointError as e:
            raise ExportError(str(e)) from None
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        # the model card last: a directory with a README.md is a finished export
        for name in sorted(files, key=lambda n: n == "README.md"):
            target.put_file(out / name, name)
        total = sum((out / n).stat().st_size for n in files)
    return {"source": store.url(rel), "dest": target.url(""), "files": len(files), "bytes": total,
            "adapter": with_adapter, "weights": sorted(n for n in manifest["files"] if n.endswith(".safetensors"))}


def read_run(name: str, namespace: Optional[str]) -> dict:
    """The SelfRewardRun object from the cluster of the current kubeconfig context."""
    from kubernetes import client, config

    try:
        config.load_kube_config()
    except Exception:  # in a pod: the service account
        config.load_incluster_config()
    ns = namespace or "default"
    try:
        return client.CustomObjectsApi().get_namespaced_custom_object(
            "selfreward.dev", "v1alpha1", ns, "selfrewardruns", name)
    except client.ApiException as e:
        raise ExportError(f"cannot read SelfRewardRun {ns}/{name}: {e.status} {e.reason}") from None


def looks_like_store(arg: str) -> bool:
    return "://" in arg or arg.startswith(("/", ".")) or os.path.exists(arg)
