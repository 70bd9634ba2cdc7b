"""What the two training phases share: TRL configs from the spec, precision and device
choice, LoRA through peft, and saving a trained model as a committed checkpoint.

Both phases (``sft`` in iteration 0 and ``train``, DPO, in iterations 1..N) follow the
same path:

1. load the start model in float32 (or in the dtype ``model.dtype`` names explicitly);
   with ``bf16`` on, the trainer runs bfloat16 autocast over float32 master weights;
2. wrap it in a LoRA adapter when ``training.mode`` is ``lora``;
3. train with TRL, no hub, no experiment trackers, no intermediate checkpoints;
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
    """One training process drives one GPU. Several visible GPUs without a distributed
    launcher would make transformers wrap the model in DataParallel, which TRL refuses;
    say what to change instead of failing deep inside the trainer."""
    import torch

    if models.device() != "cuda" or os.environ.get("WORLD_SIZE") or os.environ.get("LOCAL_RANK"):
        return
    n = torch.cuda.device_count()
    if n > 1:
        raise TrainingError(
            f"{n} GPUs are visible to one training process; the sft/train phases use one GPU per pod. "
            "Set resources.sft.gpus / resources.train.gpus to 1 (or CUDA_VISIBLE_DEVICES to one device)."
        )


def load_dtype(spec: RunSpec):
    """Training loads float32 master weights unless model.dtype names a low precision."""
    import torch

    if spec.model.dtype in ("bfloat16", "float16"):
        return models.torch_dtype(spec.model.dtype)
    return torch.float32


def load_model(path: str, dtype):
    from transformers import AutoModelForCausalLM

    from .models import note_loaded

    note_loaded(path)  # the summary records which model the phase trained from
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TrainingError(f"the tokenizer of {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def stored_dtype(model) -> Any:
    """The dtype the start model's weights were stored in (from its config), float32 if unknown."""
    import torch

    dt = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


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

def fit_batch(examples: int, batch_size: int, accumulation: int) -> tuple[int, int]:
    """(per-device batch, accumulation) that give at least one full optimizer step.

    With fewer examples than the batch, the batch shrinks to the examples; the
    accumulation shrinks to the number of full batches the data holds."""
    if examples < 1:
        raise TrainingError("no training examples")
    bs = min(batch_size, examples)
    ga = max(1, min(accumulation, examples // bs))
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
) -> dict:
    """TrainingArguments shared by the SFT and DPO configs."""
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
    )


# --- data ---

def chat_format(tokenizer) -> bool:
    """Use TRL's conversational format when the tokenizer has a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


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
            rows.append({"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]})
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
            rows.append({"prompt": rec["prompt"], "completion": rec["response"]})
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
    samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    if args.max_steps is None or args.max_steps <= 0:  # epochs bound the data seen; the last batch may be short
        samples = min(samples, examples * args.num_train_epochs)
    out = {
        "steps": steps,
        "samplesSeen": int(samples),
        "trainSeconds": round(seconds, 3),
        "samplesPerSecond": round(samples / max(seconds, 1e-9), 3),
    }
    if "train_loss" in metrics:
        out["finalTrainLoss"] = round(float(metrics["train_loss"]), 6)
    tokens = [h["num_tokens"] for h in trainer.state.log_history if h.get("num_tokens") is not None]
    if tokens:
        out["tokensPerSecond"] = round(float(tokens[-1]) / max(seconds, 1e-9), 1)
    return out


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


def free_memory() -> None:
    """Collect dropped models/trainers and return cached GPU memory."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    """The trainer's output_dir, removed afterwards: never used for checkpoints
    (save_strategy=no); $SELFREWARD_SCRATCH chooses where it lives."""
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

