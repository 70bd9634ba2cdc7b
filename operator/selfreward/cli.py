"""The `selfreward` command."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .spec import PHASES, SpecError, load_spec_file


def cmd_worker(args) -> int:
    from .ownership import owner_of
    from .worker import main_phase

    spec, meta = load_spec_file(args.spec)
    # a Job's run document names the run: its workers claim the store for it (ownership)
    return main_phase(spec, args.phase, args.iteration, args.shard, args.num_shards, args.termination_log,
                      owner=owner_of(meta))


def cmd_cleanup(args) -> int:
    """Delete what the run wrote to its store, if the store's owner marker proves it is
    the run's (the operator's cleanup Job, deleteOnRunDeletion). Exit 0 also when it
    refuses: retrying cannot change the proof; the summary says why."""
    from .ownership import cleanup, owner_of
    from .storage import Store
    from .worker.common import write_termination_log

    spec, meta = load_spec_file(args.spec)
    summary = cleanup(Store.for_spec(spec), owner_of(meta))
    write_termination_log(summary)
    if "refused" in summary:
        print(f"refused to delete anything: {summary['refused']}", file=sys.stderr)
    else:
        print(f"deleted {summary['deleted']} object(s) under {spec.storage.uri}; kept {summary['kept']} "
              "not written by the run")
    return 0


def cmd_run(args) -> int:
    from .local import run_local

    spec, meta = load_spec_file(args.spec)
    return run_local(spec, name=meta.get("name") or os.path.splitext(os.path.basename(args.spec))[0],
                     quiet=args.quiet, python=sys.executable, parallel=args.parallel, state_dir=args.state_dir,
                     nproc_per_node=args.nproc_per_node)


def cmd_make_tiny_model(args) -> int:
    from .tiny import make_tiny_model

    make_tiny_model(args.dir, seed=args.seed, corpus=args.corpus, dtype=args.dtype,
                    chat_template=not args.no_chat_template, hidden_size=args.hidden_size, layers=args.layers,
                    heads=args.heads)
    print(f"tiny model written to {args.dir}")
    return 0


def cmd_import_model(args) -> int:
    """Copy a model (local dir, file://, pvc:// copy, plain or committed s3:// dir, hub id)
    into a store as a committed checkpoint, then verify what was written."""
    import json
    import posixpath

    from . import checkpoint, models
    from .storage import Store

    if not (args.dest.startswith(("s3://", "file://")) or "://" not in args.dest):
        print(f"import-model: DEST {args.dest!r} must be s3://bucket/prefix, file:///path or a local path",
              file=sys.stderr)
        return 2
    try:
        local = models.resolve_uri(args.src, args.endpoint, args.revision)
        parent, name = posixpath.split(args.dest.rstrip("/"))
        if not name or parent in ("s3:", "file:", ""):
            raise checkpoint.CheckpointError(f"DEST {args.dest!r} needs a folder below the bucket or root")
        store = Store(parent, args.endpoint)
        meta = {"importedFrom": args.src}
        if args.revision:
            meta["revision"] = args.revision
        figures = checkpoint.commit(local, store, name, metadata=meta)
        checkpoint.verify(store, name)
    except checkpoint.CheckpointError as e:
        print(f"import-model: {e}", file=sys.stderr)
        return 1
    print(json.dumps({**figures, "verified": True}))
    return 0


def cmd_crd(args) -> int:
    from .crd import crd_yaml

    text = crd_yaml()
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


# `selfreward validate` exit codes: the pre-commit contract (docs/gitops.md)
VALIDATE_OK, VALIDATE_INVALID, VALIDATE_USAGE = 0, 1, 2
_MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def _manifest_files(path: str) -> list[str]:
    """A file as given, or a directory's YAML/JSON files (recursively, sorted; hidden
    directories such as .git skipped)."""
    if not os.path.isdir(path):
        return [path]
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(_MANIFEST_SUFFIXES)]
    return out


def _mentions_a_run(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"SelfRewardRun" in f.read()
    except OSError:
        return True


def cmd_validate(args) -> int:
    """Check run specs as the cluster would: every SelfRewardRun in every file (multi-
    document YAML; other kinds skipped), or a bare spec in a file given by name. Exit 0
    when all are valid, 1 when any is invalid, 2 when a path cannot be read."""
    from pathlib import Path

    from .spec import SpecFileError, is_run_manifest, load_document, load_spec_documents

    status, checked = VALIDATE_OK, 0
    for given in args.paths:
        if not os.path.exists(given):
            print(f"{given}: no such file or directory", file=sys.stderr)
            return VALIDATE_USAGE
        in_dir = os.path.isdir(given)
        for path in _manifest_files(given):
            try:
                docs = load_spec_documents(Path(path))
            except SpecFileError as e:
                print(str(e), file=sys.stderr)
                return VALIDATE_USAGE
            except SpecError as e:
                if in_dir and not _mentions_a_run(path):
                    continue  # not YAML we can read (a Helm template, say), and no run in it
                print(str(e), file=sys.stderr)
                status = VALIDATE_INVALID
                continue
            docs = [(i, d) for i, d in enumerate(docs) if d is not None]
            # a file named on the command line may hold one bare spec (what `selfreward run` takes)
            bare = (not in_dir and len(docs) == 1
                    and not (isinstance(docs[0][1], dict) and ("kind" in docs[0][1] or "apiVersion" in docs[0][1])))
            for i, doc in docs:
                if not (bare or is_run_manifest(doc)):
                    continue  # another kind of manifest (a Kustomization, a Secret, ...)
                where = path if len(docs) == 1 else f"{path} (document {i + 1})"
                checked += 1
                try:
                    spec, meta = load_document(doc, Path(path), where, require_name=not bare)
                except SpecError as e:
                    print(str(e), file=sys.stderr)
                    status = VALIDATE_INVALID
                    continue
                if not args.quiet:
                    name = meta.get("name") or meta.get("generateName") or "spec"
                    print(f"{where}: {name} valid ({spec.iterations} iterations)")
    if checked == 0 and not args.quiet:
        print("no SelfRewardRun found", file=sys.stderr)
    return status


def cmd_describe(args) -> int:
    from .describe import DescribeError, describe
    from .storage import StorageError

    try:
        sys.stdout.write(describe(args.store, args.endpoint, args.region, as_json=args.json))
    except (DescribeError, StorageError) as e:
        print(f"describe: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    from . import export as E
    from .checkpoint import CheckpointError
    from .describe import DescribeError
    from .storage import Store, StorageError

    try:
        if E.looks_like_store(args.source):
            store = Store(args.source, args.endpoint, args.region)
            rel = E.from_store(store, args.iteration)
        else:
            store, rel = E.from_run(E.read_run(args.source, args.namespace), args.iteration)
        done = E.export(store, rel, args.dest, with_adapter=args.adapter, force=args.force,
                        dest_endpoint=args.dest_endpoint)
    except (E.ExportError, DescribeError, StorageError, CheckpointError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    print(f"exported {done['source']} to {done['dest']} ({done['files']} files, {done['bytes']} bytes)")
    return 0


def cmd_operator(args) -> int:
    from .controller import run_operator

    return run_operator(args)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfreward", description="Self-Rewarding LM training runs.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a whole run on this machine (phases as local processes)")
    r.add_argument("spec", help="run spec YAML (a bare spec or a SelfRewardRun manifest)")
    r.add_argument("--quiet", action="store_true", help="no live progress display")
    r.add_argument("--parallel", type=int, default=1, help="shards of a phase run at once (default 1)")
    r.add_argument("--state-dir", default=None, help="spec, worker logs and results; default: a temp dir per run")
    r.add_argument("--nproc-per-node", type=_positive, default=None,
                   help="training processes with training.distributed fsdp; default: $SELFREWARD_NPROC_PER_NODE, "
                        "else every visible GPU, else 1")
    r.set_defaults(func=cmd_run)

    w = sub.add_parser("worker", help="run one phase (the Job containers' entrypoint)")
    w.add_argument("phase", choices=PHASES)
    w.add_argument("--spec", required=True, help="run spec file (YAML/JSON, bare spec or SelfRewardRun manifest)")
    w.add_argument("--iteration", type=int, default=int(os.environ.get("SELFREWARD_ITERATION", "1")))
    w.add_argument("--shard", type=int, default=None, help="default: $JOB_COMPLETION_INDEX, else 0")
    w.add_argument("--num-shards", type=int, default=None, help="default: the spec's shards for the phase")
    w.add_argument("--termination-log", default="", help="default: /dev/termination-log when writable")
    w.set_defaults(func=cmd_worker)

    cl = sub.add_parser("cleanup", help="delete a run's artifacts (the operator's cleanup Job)")
    cl.add_argument("--spec", required=True,
                    help="the run's manifest (as the Job mounts it): its metadata.uid must match the store's owner")
    cl.set_defaults(func=cmd_cleanup)

    t = sub.add_parser("make-tiny-model", help="build a tiny random Llama and an offline tokenizer")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--corpus", default=None, help="text/JSONL file to train the tokenizer on")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the weights are stored in (real models are mostly bfloat16)")
    t.add_argument("--no-chat-template", action="store_true",
                   help="a tokenizer without a chat template, as a base model has")
    t.add_argument("--hidden-size", type=int, default=64, help="width of the model")
    t.add_argument("--layers", type=int, default=2, help="transformer blocks")
    t.add_argument("--heads", type=int, default=4, help="attention heads (divides --hidden-size)")
    t.set_defaults(func=cmd_make_tiny_model)

    im = sub.add_parser("import-model", help="copy a model into a store as a committed, verified checkpoint")
    im.add_argument("src", help="local dir, file://, s3:// (plain HF dir or checkpoint), pvc:// or a hub id")
    im.add_argument("dest", help="s3://bucket/prefix/name or file:///path/name (the model.uri to use)")
    im.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of a hub SRC")
    im.add_argument("--endpoint", default=None, help="S3 endpoint; default $AWS_ENDPOINT_URL_S3")
    im.set_defaults(func=cmd_import_model)

    c = sub.add_parser("crd", help="print the SelfRewardRun CRD generated from the spec model")
    c.add_argument("-o", "--output")
    c.set_defaults(func=cmd_crd)

    v = sub.add_parser(
        "validate", help="check run specs as the cluster would (files, directories of manifests)",
        description="Check every SelfRewardRun in the given files and directories (multi-document YAML; "
        "other kinds are skipped; a file given by name may hold a bare spec). "
        "Exit 0: all valid; 1: something is invalid; 2: a path cannot be read.")
    v.add_argument("paths", nargs="+", metavar="PATH", help="a manifest or spec file, or a directory of them")
    v.add_argument("-q", "--quiet", action="store_true", help="print only what is invalid")
    v.set_defaults(func=cmd_validate)

    d = sub.add_parser("describe", help="print a run's history from its artifact store (no cluster needed)")
    d.add_argument("store", help="the run's storage URI (s3://bucket/prefix, file:///path or a local path)")
    d.add_argument("--endpoint", default=None, help="S3 endpoint URL; default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL")
    d.add_argument("--region", default=None)
    d.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    d.set_defaults(func=cmd_describe)

    x = sub.add_parser("export", help="write a trained model as a Hugging Face directory (local path or s3://)")
    x.add_argument("source", help="the run's storage URI (s3://, file://, a local path) or a SelfRewardRun's name")
    x.add_argument("dest", help="a local directory or an s3:// prefix (hub-style: upload it as it is)")
    x.add_argument("--iteration", type=int, default=None,
                   help="export M_{t+1}, iteration t's checkpoint (0: the SFT model); default: the best, else the final one")
    x.add_argument("--adapter", action="store_true", help="LoRA runs: also write the PEFT adapter to DEST/adapter")
    x.add_argument("--force", action="store_true", help="write into a DEST that is not empty")
    x.add_argument("-n", "--namespace", default=None, help="the run's namespace (a run name as source)")
    x.add_argument("--endpoint", default=None, help="S3 endpoint of the source store")
    x.add_argument("--region", default=None)
    x.add_argument("--dest-endpoint", default=None, help="S3 endpoint of DEST; default: the source's")
    x.set_defaults(func=cmd_export)

    sub.add_parser("launch", add_help=False,
                   help="torchrun ARGS, keeping a rank's exit code 2 (the distributed sft/train container command)")

    o = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    o.add_argument("--namespace", "-n", action="append", default=[], help="namespace to serve (repeatable)")
    o.add_argument("--all-namespaces", "-A", action="store_true", help="serve the whole cluster")
    o.add_argument("--metrics-port", type=int, default=int(os.environ.get("SELFREWARD_METRICS_PORT", "8080")))
    o.add_argument("--health-port", type=int, default=int(os.environ.get("SELFREWARD_HEALTH_PORT", "8081")))
    o.add_argument("--peering", default=os.environ.get("SELFREWARD_PEERING") or None,
                   help="kopf peering name (for several replicas); default: standalone")
    o.add_argument("--priority", type=int, default=None, help="peering priority; default: random, never equal")
    o.add_argument("--worker-image", default=os.environ.get("SELFREWARD_WORKER_IMAGE", "ghcr.io/selfreward/worker:0.1.0"))
    o.add_argument("--verbose", action="store_true")
    o.set_defaults(func=cmd_operator)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # every later argument is torchrun's, none is ours
        from .distributed import launch

        return launch(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
