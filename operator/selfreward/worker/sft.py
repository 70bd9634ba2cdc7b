"""`selfreward worker sft --iteration 0`: supervised fine-tuning of the base model M_0
into M_1 on instruction data (IFT) plus optional judge-training data (EFT), as in
iteration 0 of Yuan et al. (2024). The result is committed to iter-0/sft/checkpoint.

Both data sets are JSONL with ``prompt`` and ``response`` per line; EFT examples are the
judge's rubric prompt with a graded answer as the response, so the model also learns
to judge. They are mixed into one training set (the trainer shuffles with the seed).
The loss covers the response tokens only (TRL's prompt-completion format).

Settings come from ``spec.sft`` (learning rate, epochs, batch, length, steps); the
machine-level settings shared with DPO (mode full/LoRA, bf16, gradient checkpointing,
seed) come from ``spec.training``.
"""
from __future__ import annotations


from .. import distributed, layout, models, resume, training
from ..storage import StorageError, read_uri_jsonl
from .common import PhaseContext, PhaseError, log


def _read(uri: str, endpoint, what: str) -> list[dict]:
    try:
        return read_uri_jsonl(uri, endpoint)
    except FileNotFoundError:
        raise PhaseError(f"sft: the {what} {uri} does not exist") from None
    except StorageError as e:
        raise PhaseError(f"sft: the {what} is not valid JSONL: {e}") from None


@resume.sigterm_saves()
def run(ctx: PhaseContext) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    spec, store = ctx.spec, ctx.store
    training.quiet_libraries()
    if not spec.sft_enabled:
        raise PhaseError("sft: spec.sft is not set or not enabled; iteration 0 does not run")
    sft, tr = spec.sft, spec.training
    out_rel = layout.checkpoint_dir(0, "sft")

    done = training.committed_summary(store, out_rel)
    if done is not None:
        log(f"iter-0/sft: checkpoint {store.url(out_rel)} already committed and verified; not training again")
        done["resumedFromCheckpoint"] = True
        return done

    ift = _read(sft.instructionDataUri, spec.storage.endpoint, "instruction data")
    eft = _read(sft.judgeDataUri, spec.storage.endpoint, "judge (EFT) data") if sft.judgeDataUri else []
    if not ift:
        raise PhaseError(f"sft: the instruction data {sft.instructionDataUri} holds no examples")

    base_path = models.base_model(spec)
    training.check_devices()
    tokenizer = training.load_tokenizer(base_path, trust_remote_code=spec.model.trustRemoteCode)
    conversational = training.chat_format(tokenizer)
    try:
        rows = training.completion_rows(ift, conversational, sft.instructionDataUri)
        if eft:
            rows += training.completion_rows(eft, conversational, sft.judgeDataUri)
    except training.TrainingError as e:
        raise PhaseError(f"sft: {e}") from None

    world = training.processes()
    bs, ga = training.fit_batch(len(rows), sft.batchSize, sft.gradientAccumulation, world)
    bf16 = training.use_bf16(tr.bf16)
    dtype = training.load_dtype(spec)
    save_dtype = training.checkpoint_dtype(spec, base_path)  # before loading: loading rewrites config.dtype
    saves = resume.Resume(store, layout.phase_dir(0, "sft"), sft.checkpointing, resume.fingerprint(
        rows=rows, base=resume.model_identity(base_path), sft=sft.model_dump(exclude={"checkpointing"}),
        training=tr.model_dump(exclude={"checkpointing"}), batch=[bs, ga]), "iter-0/sft")
    with training.scratch_dir() as scratch:
        config = SFTConfig(
            **training.common_args(
                output_dir=scratch, learning_rate=sft.learningRate, epochs=sft.epochs, batch_size=bs, accumulation=ga,
                max_length=sft.maxLength, max_steps=sft.maxSteps, bf16=bf16,
                gradient_checkpointing=tr.gradientCheckpointing, seed=tr.seed, fsdp=training.fsdp_settings(spec),
            ),
            completion_only_loss=True,
            shuffle_dataset=True,
            trust_remote_code=spec.model.trustRemoteCode,
        )

        torch.manual_seed(tr.seed)
        model = training.load_model(base_path, dtype, trust_remote_code=spec.model.trustRemoteCode)
        if tr.mode == "lora":
            training.check_lora_targets(model, spec)
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=training.lora_config(spec) if tr.mode == "lora" else None,
            callbacks=[training.progress_callback(ctx.report), saves.callback()],
        )
        training.quiet_trainer(trainer)
        kept = training.kept_examples(trainer, len(rows), "iter-0/sft", "example", "sft.maxLength", sft.maxLength)
        log(f"iter-0/sft: {len(ift)} instruction + {len(eft)} judge examples ({tr.mode}, bf16={bf16}, "
            f"weights {str(dtype).removeprefix('torch.')}, saved as {str(save_dtype).removeprefix('torch.')}, "
            f"device={models.device()}, processes={world})")
        result, seconds = training.timed(lambda: saves.train(trainer))

    summary = {
        "examples": len(ift),
        "eftExamples": len(eft),
        "trainExamples": kept,
        "examplesDropped": len(rows) - kept,
        "mode": tr.mode,
        "batchSize": bs,
        "gradientAccumulation": ga,
        "bf16": bf16,
        "pureBf16": tr.pureBf16,
        "checkpointDtype": str(save_dtype).removeprefix("torch."),
        "conversational": conversational,
    }
    summary.update(training.train_figures(trainer, result, kept, seconds))
    summary.update(training.summarize_logs(trainer.state.log_history, training.SFT_METRICS))
    summary.update(saves.figures(summary))
    if "trainLoss" not in summary and "finalTrainLoss" in summary:
        summary["trainLoss"] = summary["finalTrainLoss"]
    metadata = {
        "iteration": 0,
        "phase": "sft",
        "base": spec.model.uri,
        "instructionData": sft.instructionDataUri,
        "judgeData": sft.judgeDataUri,
        "mode": tr.mode,
    }
    # rank 0 commits, the others wait for it (selfreward.distributed)
    trained = training.trained_model(trainer, training.rebuild_for_save(base_path, dtype, spec))
    del trainer, model
    if trained is not None:  # rank 0 commits; the other ranks have taken part in gathering
        training.commit_adapter(trained, store, layout.adapter_dir(out_rel), metadata)  # lora: for export --adapter
        summary = training.commit_model(trained, tokenizer, store, out_rel, save_dtype, metadata, summary)
        log(f"iter-0/sft: committed {store.url(out_rel)} (rank {distributed.rank()} of {world})")
        saves.clear()  # the final checkpoint has committed: nothing is left to resume
    del trained
    distributed.barrier()
    training.free_memory()
    return summary
