"""`selfreward worker train --iteration t`: DPO on the iteration's preference pairs,
M_t -> M_{t+1}, committed to iter-<t>/train/checkpoint.

Input: iter-<t>/pairs/pairs.jsonl, one {prompt, chosen, rejected, chosenScore,
rejectedScore} per line. Prompts and responses go to TRL's DPOTrainer in its
conversational format (a user turn, an assistant turn) when the tokenizer has a chat
template, so training sees exactly the chat rendering generation used; as plain text
otherwise.

Reference model (spec.training.reference):
- current: M_t itself, as in Yuan et al. (TRL loads a frozen copy from M_t's directory;
  with LoRA the adapter is switched off, which is M_t);
- base: the fixed base model (or the SFT model M_1 when iteration 0 ran).

training.precomputeRefLogProbs: TRL computes every pair's reference log-probs once,
before the first step (with the policy itself for reference=current, so no copy is ever
loaded; a base reference is dropped right after), and training reads them from the
dataset: no reference model in memory while the optimizer state is.

Zero pairs is an error that says so; fewer pairs than the batch still trains (the
batch shrinks to the pairs, see selfreward.training.fit_batch).
"""
from __future__ import annotations

import os

from .. import distributed, layout, models, resume, training
from ..checkpoint import CheckpointError
from .common import PhaseContext, PhaseError, log


def pairs_path(iteration: int) -> str:
    return f"{layout.phase_dir(iteration, 'pairs')}/pairs.jsonl"


def _no_pairs_error(ctx: PhaseContext, why: str) -> PhaseError:
    spec, t = ctx.spec, ctx.iteration
    detail = ""
    if ctx.store.exists(layout.summary_path(t, "pairs")):
        try:
            s = ctx.store.read_json(layout.summary_path(t, "pairs"))
            figures = {k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k not in ("iteration", "numShards") and not k.endswith("Seconds")}
            if figures:
                detail = " (pairs summary: " + ", ".join(f"{k}={v}" for k, v in sorted(figures.items())) + ")"
        except Exception:  # the summary only adds detail to the message
            pass
    return PhaseError(
        f"iteration {t} produced no preference pairs: {why}{detail}. A pair needs two responses to one prompt "
        f"whose judge scores differ by more than pairs.minMargin={spec.pairs.minMargin}: check that the judge's "
        f"verdicts match judge.scorePattern, raise generation.responsesPerPrompt or judge.samplesPerResponse, "
        f"lower pairs.minMargin, or use more prompts."
    )


def load_pairs(ctx: PhaseContext) -> list[dict]:
    rel = pairs_path(ctx.iteration)
    if not ctx.store.exists(rel):
        if ctx.store.exists(layout.summary_path(ctx.iteration, "pairs")):
            raise _no_pairs_error(ctx, f"{ctx.store.url(rel)} does not exist")
        raise PhaseError(f"iteration {ctx.iteration}: the pairs phase has not committed ({ctx.store.url(rel)} is missing)")
    records = ctx.store.read_jsonl(rel)
    if not records:
        raise _no_pairs_error(ctx, f"{ctx.store.url(rel)} is empty")
    return records


@resume.sigterm_saves()
def run(ctx: PhaseContext) -> dict:
    import torch
    from trl import DPOConfig, DPOTrainer

    spec, store, t = ctx.spec, ctx.store, ctx.iteration
    training.quiet_libraries()
    tr = spec.training
    out_rel = layout.checkpoint_dir(t, "train")

    done = training.committed_summary(store, out_rel)
    if done is not None:
        log(f"iter-{t}/train: checkpoint {store.url(out_rel)} already committed and verified; not training again")
        done["resumedFromCheckpoint"] = True
        return done

    records = load_pairs(ctx)
    try:
        policy_path = models.policy_model(spec, store, t)
        ref_path = models.reference_model(spec, store, t) if tr.reference == "base" else None
    except CheckpointError as e:
        raise PhaseError(f"iteration {t}: cannot load the start model: {e}") from None

    if ref_path is not None and os.path.realpath(ref_path) == os.path.realpath(policy_path):
        ref_path = None  # the fixed reference is M_t itself this iteration (t=1): one copy less in memory
    training.check_devices()

    tokenizer = training.load_tokenizer(policy_path, trust_remote_code=spec.model.trustRemoteCode)
    conversational = training.chat_format(tokenizer)
    try:
        rows = training.preference_rows(records, conversational, store.url(pairs_path(t)))
    except training.TrainingError as e:
        raise PhaseError(str(e)) from None

    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    world = training.processes()
    bs, ga = training.fit_batch(len(rows), tr.batchSize, tr.gradientAccumulation, world)
    if (bs, ga) != (tr.batchSize, tr.gradientAccumulation):
        log(f"iter-{t}/train: {len(rows)} pairs < batch {tr.batchSize}x{world}x{tr.gradientAccumulation}; "
            f"training with batch {bs}x{world}x{ga}")
    bf16 = training.use_bf16(tr.bf16)
    dtype = training.load_dtype(spec)
    save_dtype = training.checkpoint_dtype(spec, policy_path)  # before loading: loading rewrites config.dtype
    saves = resume.Resume(store, layout.phase_dir(t, "train"), tr.checkpointing, resume.fingerprint(
        rows=rows, policy=resume.model_identity(policy_path), reference=resume.model_identity(ref_path),
        training=tr.model_dump(exclude={"checkpointing"}), batch=[bs, ga]), f"iter-{t}/train")
    with training.scratch_dir() as scratch:
        config = DPOConfig(
            **training.common_args(
                output_dir=scratch, learning_rate=tr.learningRate, epochs=tr.epochs, batch_size=bs, accumulation=ga,
                max_length=tr.maxLength, max_steps=tr.maxSteps, bf16=bf16,
                gradient_checkpointing=tr.gradientCheckpointing, seed=tr.seed, fsdp=training.fsdp_settings(spec),
            ),
            beta=tr.beta,
            loss_type=[tr.lossType],
            trust_remote_code=spec.model.trustRemoteCode,  # TRL loads the reference model itself
            precompute_ref_log_probs=tr.precomputeRefLogProbs,
        )

        torch.manual_seed(tr.seed)
        policy = training.load_model(policy_path, dtype, trust_remote_code=spec.model.trustRemoteCode)
        ref = (training.load_model(ref_path, dtype, trust_remote_code=spec.model.trustRemoteCode)
               if ref_path is not None else None)
        peft_config = None
        if tr.mode == "lora":
            training.check_lora_targets(policy, spec)
            peft_config = training.lora_config(spec)

        trainer = DPOTrainer(
            model=policy,
            ref_model=ref,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[training.progress_callback(ctx.report), saves.callback()],
        )
        training.quiet_trainer(trainer)
        if tr.precomputeRefLogProbs and ref is not None:
            # The trainer computed every pair's reference log-probs while it was built, but
            # keeps a reference model it was given (and accelerate keeps the prepared one):
            # drop both references so the copy is freed before training allocates.
            trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not trainer.ref_model]
            trainer.ref_model = ref = None
            training.free_memory()
        kept = training.kept_examples(trainer, len(rows), f"iter-{t}/train", "pair", "training.maxLength", tr.maxLength)
        log(f"iter-{t}/train: DPO on {kept} pairs ({'lora' if peft_config else 'full'}, reference={tr.reference}, "
            f"bf16={bf16}, weights {str(dtype).removeprefix('torch.')}, saved as "
            f"{str(save_dtype).removeprefix('torch.')}, device={models.device()}, processes={world})")
        result, seconds = training.timed(lambda: saves.train(trainer))

    summary = {
        "pairs": len(rows),
        "pairsTrained": kept,
        "mode": tr.mode,
        "reference": tr.reference,
        "lossType": tr.lossType,
        "beta": tr.beta,
        "batchSize": bs,
        "gradientAccumulation": ga,
        "bf16": bf16,
        "pureBf16": tr.pureBf16,
        "precomputeRefLogProbs": tr.precomputeRefLogProbs,
        "checkpointDtype": str(save_dtype).removeprefix("torch."),
        "conversational": conversational,
    }
    summary.update(training.train_figures(trainer, result, kept, seconds))
    summary.update(training.summarize_logs(trainer.state.log_history, training.DPO_METRICS))
    summary.update(saves.figures(summary))
    if "dpoLoss" not in summary and "finalTrainLoss" in summary:
        summary["dpoLoss"] = summary["finalTrainLoss"]

    metadata = {
        "iteration": t,
        "phase": "train",
        "policy": models.policy_checkpoint(spec, store, t) or spec.model.uri,  # M_t, or the best after a rollback
        "base": spec.model.uri,
        "reference": tr.reference,
        "referenceModel": ((models.policy_checkpoint(spec, store, t) if tr.reference == "current"
                            else layout.reference_checkpoint(spec, t)) or spec.model.uri),
        "mode": tr.mode,
    }
    # rank 0 commits, the others wait for it (selfreward.distributed)
    model = training.trained_model(trainer, training.rebuild_for_save(policy_path, dtype, spec))
    del trainer, policy, ref
    if model is not None:  # rank 0 commits; the other ranks have taken part in gathering
        training.commit_adapter(model, store, layout.adapter_dir(out_rel), metadata)  # lora: for export --adapter
        summary = training.commit_model(model, tokenizer, store, out_rel, save_dtype, metadata, summary)
        log(f"iter-{t}/train: committed {store.url(out_rel)} (rank {distributed.rank()} of {world})")
        saves.clear()  # the final checkpoint has committed: nothing is left to resume
    del model
    distributed.barrier()
    training.free_memory()
    return summary
