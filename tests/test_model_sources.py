"""Where a model comes from: plain Hugging Face directories on S3 (SeaweedFS on
loopback), pvc:// claims, hub ids at a revision, checkpoints imported with
`selfreward import-model`; trustRemoteCode off unless asked for, everywhere; the
store's concurrent transfers."""
from __future__ import annotations

import ast
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfreward import checkpoint, layout, models
from selfreward.checkpoint import CheckpointError
from selfreward.spec import parse_spec
from selfreward.storage import MAX_PART, MAX_PARTS, MIN_PART, Store, StorageError, part_size
from selfreward.worker import run_phase
from selfreward.worker.train import pairs_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import _client, make_bucket, s3_env, s3_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["What is two plus two?", "Name a colour.", "Why do cats purr?", "What is a verb?"]


@pytest.fixture(scope="module")
def s3():
    """One SeaweedFS for the module; tests use their own prefixes."""
    saved = {k: os.environ.get(k) for k in s3_env("x")}
    with s3_server() as endpoint:
        make_bucket(endpoint, "models")
        make_bucket(endpoint, "runs")
        os.environ.update(s3_env(endpoint))
        try:
            yield endpoint
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFREWARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model stored in bfloat16, as real base models are."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16") / "model"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def upload_plain(endpoint: str, local: Path, prefix: str, multipart_over: int = 0) -> None:
    """Upload a model directory as `aws s3 cp --recursive` would (no manifest); files over
    multipart_over bytes go up in 5 MiB parts, as the AWS CLI does above its threshold."""
    from boto3.s3.transfer import TransferConfig

    c = _client(endpoint)
    cfg = TransferConfig(multipart_threshold=multipart_over or 8 << 20, multipart_chunksize=5 << 20)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), "models", f"{prefix}/{p.relative_to(local)}", Config=cfg)


def quick_spec(model_uri: str, storage: str, prompts: Path, **model_over) -> object:
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return parse_spec({
        "model": {"uri": model_uri, **model_over},
        "prompts": {"uri": str(prompts)},
        "iterations": 1,
        "storage": {"uri": storage},
        "generation": {"responsesPerPrompt": 3, "maxNewTokens": 8, "batchSize": 8},
        "judge": {"samplesPerResponse": 2, "maxNewTokens": 16, "batchSize": 16,
                  "scorePattern": r"([0-9])", "minScore": 0, "maxScore": 9},
        "training": {"maxSteps": 1, "batchSize": 2, "maxLength": 96},
        "seed": 3,
    })


def run_iteration(spec) -> dict:
    """generate, judge, pairs, train of iteration 1, in this process; the train summary."""
    for phase in ("generate", "judge", "pairs"):
        run_phase(spec, phase, 1)
    return run_phase(spec, "train", 1)


def _tensors(model_dir) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# --- plain Hugging Face directories on S3 --------------------------------------------

def test_plain_s3_directory_is_fetched_verified_by_etag_and_cached(s3, cache, tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "blob.dat").write_bytes(os.urandom(11 << 20))  # a multipart object: an ETag of 3 parts
    upload_plain(s3, model, "plain/a", multipart_over=5 << 20)
    local, report = checkpoint.fetch_plain(Store("s3://models/plain/a"))
    names = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == names
    for n in names:
        assert (local / n).read_bytes() == (model / n).read_bytes(), n
    # every file's ETag (single-part MD5s, and the 3-part one via a HEAD of part 1) was recomputed
    assert report["etagVerified"] == len(names) and not report["cached"]
    assert str(local).startswith(str(cache))
    again, report2 = checkpoint.fetch_plain(Store("s3://models/plain/a"))
    assert again == local and report2["cached"]
    assert models.resolve_uri("s3://models/plain/a") == str(local)


def test_plain_s3_directory_that_is_damaged_is_refused_naming_the_file(s3, cache, tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short, as an interrupted copy leaves it
    upload_plain(s3, model, "plain/cut")
    with pytest.raises(CheckpointError, match=r"model.safetensors is damaged or cut short: its header says"):
        models.resolve_uri("s3://models/plain/cut")
    assert not list((cache / "models").glob("[!.]*"))  # nothing half-checked is cached

    shutil.copy(Path(tiny_model) / "model.safetensors", weights)
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    upload_plain(s3, model, "plain/shard")
    with pytest.raises(CheckpointError, match="names shards that are missing: model-00002-of-00002.safetensors"):
        models.resolve_uri("s3://models/plain/shard")

    # a sha256 in the object's metadata is checked too
    upload_plain(s3, Path(tiny_model), "plain/meta")
    _client(s3).put_object(Bucket="models", Key="plain/meta/config.json",
                           Body=(Path(tiny_model) / "config.json").read_bytes(), Metadata={"sha256": "0" * 64})
    with pytest.raises(CheckpointError, match="config.json sha256 .* does not match its sha256 metadata"):
        models.resolve_uri("s3://models/plain/meta")

    _client(s3).put_object(Bucket="models", Key="plain/noconfig/model.safetensors", Body=b"x")
    with pytest.raises(CheckpointError, match="has no config.json: not a Hugging Face model directory"):
        models.resolve_uri("s3://models/plain/noconfig")
    with pytest.raises(CheckpointError, match="does not exist"):
        models.resolve_uri("s3://models/plain/nothing-here")


def test_transfer_refuses_a_size_that_is_not_the_expected_one(s3, tmp_path):
    store = Store("s3://runs/sizes")
    f = tmp_path / "f"
    f.write_bytes(os.urandom(3 << 20))
    sent = store.put_files([(f, "f")])
    assert sent["f"]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    with pytest.raises(StorageError, match="has 3145728 bytes, expected 3145727"):
        store.get_files([("f", tmp_path / "g", (3 << 20) - 1)])
    with pytest.raises(StorageError, match="expected 0"):
        store.get_files([("f", tmp_path / "g", 0)])


def test_multipart_transfers_round_trip_hashed_while_streaming(s3, tmp_path):
    big = tmp_path / "big.safetensors"
    big.write_bytes(os.urandom(40 << 20))  # 5 parts of 8 MiB at concurrency 8
    (tmp_path / "config.json").write_text("{}")
    store = Store("s3://runs/mp")
    store.put_files([(big, "d/big.safetensors"), (tmp_path / "config.json", "d/config.json")])
    etag = store.head("d/big.safetensors")["ETag"].strip('"')
    assert etag.endswith("-5")  # it went up as a multipart upload, sized to the file
    got = store.get_files([("d/big.safetensors", tmp_path / "back", 40 << 20)], md5={"d/big.safetensors": 8 << 20})
    assert (tmp_path / "back").read_bytes() == big.read_bytes()
    assert got["d/big.safetensors"]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    assert got["d/big.safetensors"]["md5"] == etag


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=5 << 40), st.integers(min_value=1, max_value=64))
def test_part_sizes_fit_s3_limits(size, concurrency):
    part = part_size(size, concurrency)
    assert part % (1 << 20) == 0 and part >= MIN_PART
    assert -(-size // part) <= MAX_PARTS
    assert part <= max(MAX_PART, -(-size // MAX_PARTS) + (1 << 20))


def test_quickstart_run_with_a_bf16_plain_directory_on_s3(s3, cache, tmp_path, bf16_model):
    """An iteration (generate, judge, pairs, train) with the base model a plain bf16 HF
    directory in a bucket and the artifacts in another, as on a cluster."""
    upload_plain(s3, bf16_model, "plain/bf16")
    spec = quick_spec("s3://models/plain/bf16", "s3://runs/plain-bf16", tmp_path / "prompts.jsonl")
    run_iteration(spec)
    store = Store.for_spec(spec)
    ckpt = layout.checkpoint_dir(1, "train")
    assert checkpoint.is_committed(store, ckpt)
    # the phases trained the fetched model: M_1 has its tensors, changed by the DPO step
    base, trained = _tensors(bf16_model), _tensors(checkpoint.fetch(store, ckpt))
    assert set(base) == set(trained)
    assert any(not (base[k].float() == trained[k].float()).all() for k in base)
    assert len(list((cache / "models").glob("[!.]*"))) == 1  # fetched once into the cache, used by every phase


# --- pvc:// -----------------------------------------------------------------------------

def test_pvc_model_runs_an_iteration_from_the_mounted_claim(cache, tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "claims"  # stands for the pods' mount root: <root>/<claim>/<path>
    shutil.copytree(tiny_model, root / "base-models" / "llm" / "tiny")
    spec = quick_spec("pvc://base-models/llm/tiny", f"file://{tmp_path}/store", tmp_path / "prompts.jsonl")

    monkeypatch.delenv("SELFREWARD_PVC_ROOT", raising=False)
    with pytest.raises(models.ModelSourceError, match="is not a directory .*set SELFREWARD_PVC_ROOT"):
        models.base_model(spec)
    monkeypatch.setenv("SELFREWARD_PVC_ROOT", str(root))
    assert models.base_model(spec) == str(root / "base-models" / "llm" / "tiny")
    summary = run_iteration(spec)
    assert summary["checkpoint"].endswith("iter-1/train/checkpoint")
    base, trained = _tensors(tiny_model), _tensors(checkpoint.fetch(Store.for_spec(spec), layout.checkpoint_dir(1, "train")))
    assert set(base) == set(trained) and any(not (base[k] == trained[k]).all() for k in base)
    # the claim is read, never written
    assert sorted(p.name for p in (root / "base-models" / "llm" / "tiny").iterdir()) == sorted(
        p.name for p in Path(tiny_model).iterdir())


# --- hub ids ---------------------------------------------------------------------------

def _hub_cache(root: Path, repo: str, refs: dict[str, Path]) -> None:
    """A Hugging Face hub cache holding `repo` at the given refs (as snapshot_download leaves it)."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    for ref, src in refs.items():
        commit = hashlib.sha1(f"{repo}{ref}".encode()).hexdigest()
        (base / "refs" / ref).write_text(commit)
        shutil.copytree(src, base / "snapshots" / commit)


def test_hub_id_resolves_at_its_revision_offline(tmp_path, monkeypatch, tiny_model, bf16_model):
    _hub_cache(tmp_path / "hub", "acme/tiny", {"main": Path(tiny_model), "bf16": bf16_model})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main = models.resolve_uri("acme/tiny")
    at = models.resolve_uri("acme/tiny", revision="bf16")
    assert main != at
    assert json.loads(Path(at, "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads(Path(main, "config.json").read_text()).get("dtype") != "bfloat16"
    spec = parse_spec({"model": {"uri": "acme/tiny", "revision": "bf16"}, "prompts": {"uri": "p"},
                       "storage": {"uri": "file:///x"}})
    assert models.base_model(spec) == at
    with pytest.raises(models.ModelSourceError, match="not in the hub cache and the hub cannot be reached"):
        models.resolve_uri("acme/other")
    with pytest.raises(models.ModelSourceError, match="no such directory"):
        models.resolve_uri("./not/here")


def test_hub_errors_never_carry_the_token(tmp_path, monkeypatch):
    """A hub (or a proxy) that echoes the request headers into its error page: the error the
    run reports must not contain the token."""
    class Echo(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = f"bad request, headers were: {dict(self.headers)}".encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = "hf_secrettokenvalue0123456789"
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
        with pytest.raises(models.ModelSourceError) as e:
            models.resolve_uri("acme/gated")
        assert token not in str(e.value) and "acme/gated" in str(e.value)
    finally:
        server.shutdown()


# --- trustRemoteCode --------------------------------------------------------------------

def test_every_from_pretrained_call_passes_trust_remote_code():
    """A from_pretrained (or vllm.LLM, or a TRL config: DPOTrainer loads the reference
    model itself) without trust_remote_code= would take the library's default instead of
    spec.model.trustRemoteCode."""
    calls = []
    for path in sorted((ROOT / "operator" / "selfreward").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("from_pretrained", "LLM") or \
                    isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("DPOConfig", "SFTConfig"):
                calls.append(f"{path.name}:{node.lineno}")
                kws = {k.arg for k in node.keywords}
                assert "trust_remote_code" in kws, f"{path.name}:{node.lineno} loads without trust_remote_code"
    assert len(calls) >= 7, calls  # hf backend (2), vllm, training (2), DPOConfig, SFTConfig


def _remote_code_model(tiny_model: str, out: Path) -> Path:
    """The tiny model as a repository that ships its own modeling code (auto_map), with a
    model_type transformers does not know: loading it needs trust_remote_code."""
    shutil.copytree(tiny_model, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update({"model_type": "srtest_llama", "architectures": ["SrTestForCausalLM"],
                "auto_map": {"AutoConfig": "srtest.SrTestConfig", "AutoModelForCausalLM": "srtest.SrTestForCausalLM"}})
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "srtest.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class SrTestConfig(LlamaConfig):\n    model_type = 'srtest_llama'\n\n\n"
        "class SrTestForCausalLM(LlamaForCausalLM):\n    config_class = SrTestConfig\n")
    return out


def test_trust_remote_code_is_off_by_default_and_reaches_every_phase(cache, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = _remote_code_model(tiny_model, tmp_path / "remote")
    spec = quick_spec(str(model), f"file://{tmp_path}/off", tmp_path / "prompts.jsonl")
    assert spec.model.trustRemoteCode is False
    with pytest.raises(Exception, match="trust_remote_code"):
        run_phase(spec, "generate", 1)
    assert not (tmp_path / "modules").exists() or not list((tmp_path / "modules").rglob("srtest.py"))

    # on: generate and train (policy, tokenizer, and the reference TRL loads itself) load it;
    # one call without the flag would fail here
    spec = quick_spec(str(model), f"file://{tmp_path}/on", tmp_path / "prompts.jsonl", trustRemoteCode=True)
    assert run_phase(spec, "generate", 1)["responses"] == 12
    store = Store.for_spec(spec)
    store.write_jsonl(pairs_path(1), [{"prompt": p, "chosen": "A fine answer.", "rejected": "No.",
                                       "chosenScore": 4.0, "rejectedScore": 1.0} for p in PROMPTS])
    summary = run_phase(spec, "train", 1)
    local = checkpoint.fetch(Store.for_spec(spec), layout.checkpoint_dir(1, "train"))
    assert json.loads((local / "config.json").read_text())["model_type"] == "srtest_llama"
    assert summary["checkpointBytes"] > 0


# --- import-model --------------------------------------------------------------------------

def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfreward", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_import_model_round_trip_to_s3_and_a_local_store(s3, cache, tmp_path, tiny_model):
    src = tmp_path / "src"
    shutil.copytree(tiny_model, src)
    (src / ".cache" / "huggingface").mkdir(parents=True)  # what a hub download leaves beside the model
    (src / ".cache" / "huggingface" / "x.metadata").write_text("not the model")
    r = _cli("import-model", str(src), "s3://models/imported/tiny")
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["verified"] is True and figures["checkpoint"] == "s3://models/imported/tiny"
    manifest = checkpoint.read_manifest(Store("s3://models/imported"), "tiny")
    assert set(manifest["files"]) == {p.name for p in Path(tiny_model).iterdir() if p.is_file()}
    assert manifest["metadata"]["importedFrom"] == str(src)
    # the imported URI is a model.uri: a committed checkpoint, verified by sha256
    local = Path(models.resolve_uri("s3://models/imported/tiny"))
    for name in manifest["files"]:
        assert (local / name).read_bytes() == (Path(tiny_model) / name).read_bytes()
    # a file damaged in the store afterwards is refused
    _client(s3).put_object(Bucket="models", Key="imported/tiny/config.json", Body=b'{"model_type": "llama"}')
    shutil.rmtree(cache)
    with pytest.raises(CheckpointError, match="config.json"):
        models.resolve_uri("s3://models/imported/tiny")

    # to a local store, from the imported S3 checkpoint's twin
    r = _cli("import-model", str(src), f"file://{tmp_path}/store/tiny")
    assert r.returncode == 0, r.stderr
    assert checkpoint.verify(Store(f"file://{tmp_path}/store"), "tiny")["files"] == manifest["files"]
    r = _cli("import-model", str(tmp_path / "missing"), f"file://{tmp_path}/store/x", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "import-model: model" in r.stderr and "Traceback" not in r.stderr
    r = _cli("import-model", str(src), "gs://bucket/x")
    assert r.returncode == 2 and "DEST" in r.stderr
