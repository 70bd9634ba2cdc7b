"""What the two training phases share: TRL configs from the spec, precision and device
choice, LoRA through peft, and saving a trained model as a committed checkpoint.

Both phases (``sft`` in iteration 0 and ``train``, DPO, in iterations 1..N) follow the
same path:

1. read the dtype the start model is stored in (its safetensors headers, before
   loading), then load it in float32: with ``bf16`` on, the trainer runs bfloat16
   autocast over these float32 master weights, and AdamW keeps its state in float32.
   ``model.dtype`` does not change this (it is the generation/judging dtype); only
   ``training.pureBf16`` loads and updates bfloat16 weights (see docs/precision.md);
2. wrap it in a LoRA adapter when ``training.mode`` is ``lora``;
3. train with TRL, no hub, no experiment trackers; intermediate checkpoints go to the
   store for resuming after preemption (``selfreward.resume``);
4. merge the adapter into the weights, cast to the start model's stored dtype, save
   safetensors + tokenizer to a temporary directory, and ``checkpoint.commit`` it
   (files first, MANIFEST.json last). The phase's summary figures travel in the
   manifest's metadata, so a worker that dies after the commit but before the
   dispatcher writes summary.json finds the verified checkpoint on retry and returns
   the same figures instead of training again.

Small data: when there are fewer examples than ``batchSize`` (times
``gradientAccumulation``), the per-device batch is shrunk to the number of examples
and the accumulation to what the data can fill, so the phase still makes at least one
optimizer step per epoch on all of its data. The effective values are in the summary.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from . import checkpoint, models
from .prompt_format import plain_prompt
from .spec import RunSpec
from .storage import Store
from .worker.common import PhaseError

# Figures TRL logs per step that the summaries report, by their camelCase names.
DPO_METRICS = {
    "loss": "dpoLoss",
    "rewards/accuracies": "rewardAccuracy",
    "rewards/chosen": "chosenReward",
    "rewards/rejected": "rejectedReward",
    "rewards/margins": "rewardMargin",
}
SFT_METRICS = {"loss": "trainLoss", "mean_token_accuracy": "meanTokenAccuracy"}
LAST_LOGS = 10  # the summary's loss/reward figures average this many last logged steps
LOSS_CURVE_POINTS = 256  # the summary's lossCurve keeps at most this many points


class TrainingError(PhaseError):
    """Bad training data or settings, with a message meant for the run's status."""


# --- device and precision ---

def use_bf16(setting: Optional[bool]) -> bool:
    """training.bf16: None means on when a CUDA GPU with bfloat16 support is present."""
    import torch

    if setting is not None:
        return bool(setting)
    return models.device() == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def check_devices() -> None:
    """Without training.distributed one training process drives one GPU. Several visible
    GPUs without the launcher would make transformers wrap the model in DataParallel,
    which TRL refuses; say what to change instead of failing deep inside the trainer.
    Under torchrun (WORLD_SIZE/LOCAL_RANK set) each process has its own GPU."""
    import torch

    if models.device() != "cuda" or os.environ.get("WORLD_SIZE") or os.environ.get("LOCAL_RANK"):
        return
    n = torch.cuda.device_count()
    if n > 1:
        raise TrainingError(
            f"{n} GPUs are visible to one training process (training.distributed is none). Set "
            "training.distributed to fsdp to train on all of them, or resources.sft.gpus / resources.train.gpus "
            "to 1 (or CUDA_VISIBLE_DEVICES to one device)."
        )


def load_dtype(spec: RunSpec):
    """The dtype training holds (and updates) the weights in: float32 master weights,
    whatever model.dtype says (that setting is for generation and judging). bf16 then
    means bfloat16 autocast over these weights (training.bf16). Only an explicit
    training.pureBf16 loads bfloat16 weights and updates them in bfloat16."""
    import torch

    return torch.bfloat16 if spec.training.pureBf16 else torch.float32


def load_model(path: str, dtype, *, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    from .models import note_loaded

    note_loaded(path)  # the summary records which model the phase trained from
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TrainingError(f"the tokenizer of {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def stored_dtype(model_path: str, *, trust_remote_code: bool = False) -> Any:
    """The dtype the start model's weights are stored in, read from its files before
    loading (loading rewrites config.dtype)."""
    from .precision import stored_dtype as from_files

    return from_files(model_path, trust_remote_code=trust_remote_code)


def checkpoint_dtype(spec: RunSpec, start_model: str) -> Any:
    """The dtype a trained checkpoint is saved in: training.checkpointDtype, whose
    default (stored) is the start model's stored dtype."""
    import torch

    choice = spec.training.checkpointDtype
    if choice != "stored":
        return getattr(torch, choice)
    return stored_dtype(start_model, trust_remote_code=spec.model.trustRemoteCode)


def lora_config(spec: RunSpec):
    from peft import LoraConfig

    from .spec import LoraSpec

    lora = spec.model.lora or LoraSpec()
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=_lora_targets(spec),
        task_type="CAUSAL_LM",
        bias="none",
    )


def _lora_targets(spec: RunSpec) -> list[str] | str:
    from .spec import LoraSpec

    wanted = list((spec.model.lora or LoraSpec()).targetModules)
    return "all-linear" if wanted == ["all-linear"] else wanted  # peft's shorthand is a plain string


def check_lora_targets(model, spec: RunSpec) -> None:
    """Fail with the model's own linear-layer names when model.lora.targetModules names
    none of its modules (architectures differ: Llama q_proj, GPT-2 c_attn, ...). A
    target matches a module named exactly so or ending in ".<target>", as in peft."""
    import torch

    wanted = _lora_targets(spec)
    if wanted == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    if any(n == w or n.endswith("." + w) for w in wanted for n in names):
        return
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, torch.nn.Linear)})
    raise TrainingError(
        f"model.lora.targetModules {wanted} match no layer of {type(model).__name__}; "
        f"its linear layers are named: {', '.join(linear)}"
    )


# --- batch shape ---

def fit_batch(examples: int, batch_size: int, accumulation: int, processes: int = 1) -> tuple[int, int]:
    """(per-device batch, accumulation) that give at least one full optimizer step.

    An optimizer step takes batch x processes x accumulation examples. With fewer
    examples than that, the batch shrinks to each process's share of the examples; the
    accumulation shrinks to the number of full global batches the data holds."""
    if examples < 1:
        raise TrainingError("no training examples")
    bs = max(1, min(batch_size, examples // max(1, processes)))
    ga = max(1, min(accumulation, examples // (bs * max(1, processes))))
    return bs, ga


def common_args(
    *,
    output_dir: str,
    learning_rate: float,
    epochs: float,
    batch_size: int,
    accumulation: int,
    max_length: int,
    max_steps: Optional[int],
    bf16: bool,
    gradient_checkpointing: bool,
    seed: int,
    fsdp: Any = None,
) -> dict:
    """TrainingArguments shared by the SFT and DPO configs. ``fsdp`` (a spec.FSDPSpec,
    for training.distributed fsdp) turns on FSDP2 through accelerate: one wrapped unit
    per transformer block (the model's _no_split_modules), a full state dict to save."""
    from transformers import TrainingArguments

    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the
    # old name stays as a deprecated alias that TRL still reads).
    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return dict(
        output_dir=output_dir,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps else -1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_length=max_length,
        bf16=bf16,
        fp16=False,
        use_cpu=models.device() == "cpu",
        seed=seed,
        data_seed=seed,
        report_to="none",
        push_to_hub=False,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=False,
        **{checkpointing: gradient_checkpointing},
        **_fsdp_args(fsdp),
    )


def _fsdp_args(fsdp: Any) -> dict:
    if fsdp is None:
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": fsdp.reshardAfterForward,
            "cpu_offload": fsdp.cpuOffload,
            "activation_checkpointing": fsdp.activationCheckpointing,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


# --- data ---

def chat_format(tokenizer) -> bool:
    """Use TRL's conversational format when the tokenizer has a chat template; without
    one, rows carry the plain prompt format (selfreward.prompt_format) generation used."""
    from .prompt_format import has_chat_template

    return has_chat_template(tokenizer)


def require_text(rec: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(rec, dict):
        raise TrainingError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for f in fields:
        v = rec.get(f)
        if not isinstance(v, str) or not v.strip():
            raise TrainingError(f"{where}: field {f!r} must be a non-empty string")


def preference_rows(records: list[dict], conversational: bool, where: str) -> list[dict]:
    """pairs.jsonl records -> rows of TRL's preference format."""
    rows = []
    for n, rec in enumerate(records, 1):
        require_text(rec, ("prompt", "chosen", "rejected"), f"{where} record {n}")
        if conversational:
            rows.append({
                "prompt": [{"role": "user", "content": rec["prompt"]}],
                "chosen": [{"role": "assistant", "content": rec["chosen"]}],
                "rejected": [{"role": "assistant", "content": rec["rejected"]}],
            })
        else:
            rows.append({"prompt": plain_prompt(rec["prompt"]), "chosen": rec["chosen"], "rejected": rec["rejected"]})
    return rows


def completion_rows(records: list[dict], conversational: bool, where: str) -> list[dict]:
    """prompt/response records -> rows of TRL's prompt-completion format."""
    rows = []
    for n, rec in enumerate(records, 1):
        require_text(rec, ("prompt", "response"), f"{where} line {n}")
        if conversational:
            rows.append({
                "prompt": [{"role": "user", "content": rec["prompt"]}],
                "completion": [{"role": "assistant", "content": rec["response"]}],
            })
        else:
            rows.append({"prompt": plain_prompt(rec["prompt"]), "completion": rec["response"]})
    return rows


# --- progress and figures ---

def progress_callback(report: Callable[..., None]):
    """A TrainerCallback that forwards each logged step to ctx.report and logs about ten
    lines per run to stderr."""
    from transformers import TrainerCallback

    from .worker.common import log

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            figures = {"step": state.global_step, "totalSteps": state.max_steps, "loss": float(logs["loss"])}
            for key, name in (("rewards/accuracies", "rewardAccuracy"), ("rewards/margins", "rewardMargin")):
                if key in logs:
                    figures[name] = float(logs[key])
            report(**figures)
            if not state.is_world_process_zero:
                return  # one line per step per launch
            every = max(1, state.max_steps // 10)
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                extra = "".join(f" {k}={v:.4g}" for k, v in figures.items() if k not in ("step", "totalSteps"))
                log(f"step {state.global_step}/{state.max_steps}{extra}")

    return _Progress()


def quiet_libraries() -> None:
    """No progress bars from datasets/transformers in worker logs (our callback logs steps)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def quiet_trainer(trainer) -> None:
    """Drop the trainer's stdout printer of every log dict."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def summarize_logs(log_history: list[dict], names: dict[str, str], last: int = LAST_LOGS) -> dict:
    """Average each metric over the last `last` logged training steps."""
    steps = [h for h in log_history if "loss" in h and "train_runtime" not in h]
    out: dict[str, float] = {}
    for key, name in names.items():
        vals = [float(h[key]) for h in steps if key in h and h[key] is not None and math.isfinite(float(h[key]))]
        if vals:
            tail = vals[-last:]
            out[name] = round(sum(tail) / len(tail), 6)
    return out


def train_figures(trainer, result, examples: int, seconds: float) -> dict:
    """Steps, wall time and throughput of one trainer.train() call."""
    metrics = dict(result.metrics or {})
    args = trainer.args
    steps = int(trainer.state.global_step)
    processes = max(1, int(getattr(args, "world_size", 1) or 1))
    samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    if args.max_steps is None or args.max_steps <= 0:  # epochs bound the data seen; the last batch may be short
        samples = min(samples, examples * args.num_train_epochs)
    out = {
        "steps": steps,
        "samplesSeen": int(samples),
        "trainSeconds": round(seconds, 3),
        "samplesPerSecond": round(samples / max(seconds, 1e-9), 3),
        "processes": processes,
        "parallelism": parallelism(trainer),
        "lossCurve": loss_curve(trainer.state.log_history),
    }
    if "train_loss" in metrics:
        out["finalTrainLoss"] = round(float(metrics["train_loss"]), 6)
    tokens = [h["num_tokens"] for h in trainer.state.log_history if h.get("num_tokens") is not None]
    if tokens:
        out["tokensPerSecond"] = round(float(tokens[-1]) / max(seconds, 1e-9), 1)
    return out


def parallelism(trainer) -> str:
    """How accelerate ran the processes: "fsdp2" (sharded), "ddp" (data parallel: several
    processes on CPUs, where accelerate offers no FSDP), or "single"."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None:
        return "single"
    if getattr(accelerator, "is_fsdp2", False):
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def loss_curve(log_history: list[dict], limit: int = LOSS_CURVE_POINTS) -> list[float]:
    """The logged training loss per step (the mean over all processes), thinned to at
    most ``limit`` evenly spaced points (always keeping the last) for long runs."""
    losses = [round(float(h["loss"]), 6) for h in log_history
              if "loss" in h and "train_runtime" not in h and math.isfinite(float(h["loss"]))]
    if len(losses) <= limit:
        return losses
    every = math.ceil(len(losses) / limit)
    thinned = losses[::every]
    if (len(losses) - 1) % every:
        thinned.append(losses[-1])
    return thinned


# --- saving ---

def merged_model(model):
    """A plain transformers model: LoRA adapters merged into the weights."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def save_model(model, tokenizer, out_dir: str | Path, dtype) -> Path:
    """Save weights (safetensors, in `dtype`) and tokenizer to out_dir."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = merged_model(model)
    # TRL patches a fused LM-head forward onto the model; the weights are untouched.
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = model.to(dtype)
    model.config.use_cache = True
    with torch.no_grad():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not any(p.suffix == ".safetensors" for p in out.iterdir()):
        raise TrainingError(f"saving the model to {out} wrote no .safetensors file")
    return out


def committed_summary(store: Store, rel: str) -> Optional[dict]:
    """The summary recorded with an already committed, verified checkpoint, if any."""
    if not checkpoint.is_committed(store, rel):
        return None
    try:
        manifest = checkpoint.verify(store, rel)
    except checkpoint.CheckpointError:
        return None  # a broken commit is redone
    summary = (manifest.get("metadata") or {}).get("summary")
    return dict(summary) if isinstance(summary, dict) else None


def commit_model(model, tokenizer, store: Store, rel: str, dtype, metadata: dict, summary: dict) -> dict:
    """Save to a temporary directory, commit to store/rel; return the checkpoint figures
    merged into the summary (which is also recorded in the manifest)."""
    tmp = tempfile.mkdtemp(prefix="selfreward-ckpt-")
    try:
        save_model(model, tokenizer, tmp, dtype)
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        full = dict(summary)
        full["checkpointBytes"] = size
        full["checkpoint"] = store.url(rel)
        meta = dict(metadata)
        meta["summary"] = full
        figures = checkpoint.commit(tmp, store, rel, meta)
        full.update(figures)
        return full
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_adapter(model, store: Store, rel: str, metadata: dict) -> Optional[dict]:
    """LoRA runs: commit the PEFT adapter itself (before commit_model merges it) to
    store/rel, for `selfreward export --adapter`; None for a full fine-tune."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return None
    tmp = tempfile.mkdtemp(prefix="selfreward-adapter-")
    try:
        model.save_pretrained(tmp)
        return checkpoint.commit(tmp, store, rel, metadata)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def trained_model(trainer, rebuild: Callable[[], Any]):
    """The trained model to save, on rank 0; None on the other ranks.

    Under FSDP2 the parameters are sharded DTensors: every rank takes part in gathering
    the full state dict, and rank 0 loads it into a fresh copy of the start model
    (``rebuild()``, with the LoRA adapter when training.mode is lora) on the CPU, so the
    usual merge-and-save path works on plain tensors. Otherwise (one process, or data
    parallel on CPUs) every rank holds the whole model and rank 0 uses it as it is."""
    from . import distributed

    accelerator = trainer.accelerator
    if getattr(accelerator, "is_fsdp2", False):
        state = accelerator.get_state_dict(trainer.model)  # a collective: every rank calls it
        if not distributed.is_main():
            return None
        model = rebuild()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lora_" not in k]:
            raise TrainingError(f"the gathered FSDP state does not fit the model: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
        return model
    return trainer.model if distributed.is_main() else None


def rebuild_for_save(path: str, dtype, spec: RunSpec) -> Callable[[], Any]:
    """A fresh copy of the start model shaped like the trained one (for trained_model)."""
    def rebuild():
        model = load_model(path, dtype, trust_remote_code=spec.model.trustRemoteCode)
        if spec.training.mode == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(spec))
        return model

    return rebuild


def fsdp_settings(spec: RunSpec):
    """spec.training.fsdp when the phase trains with FSDP, else None (for common_args)."""
    return spec.training.fsdp if spec.training.distributed == "fsdp" else None


def processes() -> int:
    """Training processes of this launch (WORLD_SIZE under torchrun, else 1)."""
    from . import distributed

    return distributed.world_size()


def free_memory() -> None:
    """Collect dropped models/trainers and return cached GPU memory."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    """The trainer's output_dir, removed afterwards: it holds only the intermediate
    checkpoint being uploaded (selfreward.resume); $SELFREWARD_SCRATCH chooses where it lives."""
    path = tempfile.mkdtemp(prefix="selfreward-trainer-", dir=os.environ.get("SELFREWARD_SCRATCH"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def kept_examples(trainer, total: int, where: str, what: str, limit_field: str, limit: int) -> int:
    """How many examples the trainer kept after tokenizing; the ones whose prompt alone
    fills the length limit are dropped by TRL. None left is an error; some dropped is logged."""
    from .worker.common import PhaseError, log

    kept = len(trainer.train_dataset)
    if kept == 0:
        raise PhaseError(f"{where}: every prompt fills {limit_field}={limit} tokens; no {what} is left "
                         f"to train on (raise {limit_field})")
    if kept < total:
        log(f"{where}: {total - kept} of {total} {what}s dropped: their prompt alone fills {limit_field}={limit} tokens")
    return kept


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0

