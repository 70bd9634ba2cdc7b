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
                     quiet=args.quiet, python=sys.executable, parallel=args.parallel, state_dir=args.state_dir)


def cmd_make_tiny_model(args) -> int:
    from .tiny import make_tiny_model

    make_tiny_model(args.dir, seed=args.seed, corpus=args.corpus, dtype=args.dtype,
                    chat_template=not args.no_chat_template)
    print(f"tiny model written to {args.dir}")
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


def cmd_validate(args) -> int:
    spec, _ = load_spec_file(args.spec)
    print(f"{args.spec}: valid ({spec.iterations} iterations)")
    return 0


def cmd_operator(args) -> int:
    from .controller import run_operator

    return run_operator(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfreward", description="Self-Rewarding LM training runs.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a whole run on this machine (phases as local processes)")
    r.add_argument("spec", help="run spec YAML (a bare spec or a SelfRewardRun manifest)")
    r.add_argument("--quiet", action="store_true", help="no live progress display")
    r.add_argument("--parallel", type=int, default=1, help="shards of a phase run at once (default 1)")
    r.add_argument("--state-dir", default=None, help="spec, worker logs and results; default: a temp dir per run")
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
    t.set_defaults(func=cmd_make_tiny_model)

    c = sub.add_parser("crd", help="print the SelfRewardRun CRD generated from the spec model")
    c.add_argument("-o", "--output")
    c.set_defaults(func=cmd_crd)

    v = sub.add_parser("validate", help="check a run spec file")
    v.add_argument("spec")
    v.set_defaults(func=cmd_validate)

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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
