"""Training on the Hugging Face Trainer: LoRA/QLoRA on Qwen3-VL, eval, early stopping, resumable checkpoints.

A run is prepare (data, model, speed-ups) -> fit (the Trainer) -> finalize (adapter, eval, manifest).
Outputs go to `OUTPUT.partial/` while running (checkpoints included, so `--resume` can continue after a
`kill -9`), and the finished adapter directory is renamed to `OUTPUT` only at the very end: a directory
named OUTPUT is always complete. It holds the peft adapter, `manifest.json`, `train_config.json`,
`eval.json`, `loss_curve.png` and `log_history.json`.

Multi-GPU: run the same command under `accelerate launch` or `torchrun`; the Trainer does DDP.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from artifacts.atomic import partial_path
from trainer.config import TrainConfig
from trainer.speedups import Speedups

logger = logging.getLogger("vlora.trainer")


class ListDataset:
    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.records[i]


def load_splits(config: TrainConfig, processor) -> tuple[list[dict], list[dict]]:
    from trainer.data import load_dataset_file, split

    max_pixels = getattr(processor.image_processor, "size", {}).get("longest_edge")
    records = load_dataset_file(config.train_data, max_pixels)
    if config.eval_data:
        return records, load_dataset_file(config.eval_data, max_pixels)
    return split(records, config.val_fraction, config.seed)


def newest_checkpoint(work: Path) -> Path | None:
    checkpoints = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    # A checkpoint is complete once the Trainer wrote its trainer_state.json (written last).
    complete = [c for c in checkpoints if (c / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def plot_loss(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def training_arguments(config: TrainConfig, work: Path, has_eval: bool, model=None):
    import torch
    from transformers import TrainingArguments

    from trainer.model import fsdp_arguments, has_cuda, resolve_dtype, resolve_optim

    eval_every = config.eval_steps if has_eval and config.eval_steps > 0 else None
    bf16 = has_cuda() and (resolve_dtype(config) == torch.bfloat16 or config.quantization == "4bit")
    return TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        optim=resolve_optim(config),
        max_grad_norm=config.max_grad_norm,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=bool(eval_every and config.early_stopping_patience),
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        remove_unused_columns=False,
        report_to=[],
        dataloader_num_workers=config.num_workers,
        gradient_checkpointing=False,  # applied by wrap_lora with use_reentrant=False
        save_only_model=False,
        use_cpu=not has_cuda(),
        **(fsdp_arguments(model, config) if model is not None else {}),
    )


@dataclass
class Prepared:
    """Everything a run trains with, built in dependency order before the Trainer exists."""

    processor: object
    train_records: list[dict]
    val_records: list[dict]
    model: object  # the peft model
    groups: dict[str, list[str]]
    speedups: Speedups


def prepare_model(config: TrainConfig) -> tuple[object, dict[str, list[str]], Speedups]:
    """Base model -> Liger kernels -> LoRA -> regional compile / CUDA graphs (the measured order)."""
    from trainer.model import load_base, wrap_lora
    from trainer.speedups import apply_kernels, apply_speedups

    base = load_base(config)
    apply_kernels(base, config)
    model, groups = wrap_lora(base, config)
    return model, groups, apply_speedups(model, config)


def prepare(config: TrainConfig) -> Prepared:
    from transformers import set_seed

    from trainer.model import load_processor

    set_seed(config.seed)
    processor = load_processor(config)
    train_records, val_records = load_splits(config, processor)
    print(f"data: {len(train_records)} training and {len(val_records)} validation records")
    model, groups, speedups = prepare_model(config)
    return Prepared(processor, train_records, val_records, model, groups, speedups)


def fit(config: TrainConfig, run: Prepared, work: Path, resume_from: Path | None):
    """Train with the HF Trainer; returns (trainer, seconds)."""
    import torch
    from transformers import EarlyStoppingCallback, Trainer

    from trainer.data import Augment, ChatCollator
    from trainer.speedups import gc_callback, training_speedups

    collator = ChatCollator(run.processor, config.max_length, Augment(enabled=config.augment, seed=config.seed),
                            pad_to_multiple_of=config.pad_to_multiple_of)
    callbacks = [c for c in (gc_callback(config),) if c is not None]
    if config.early_stopping_patience and run.val_records:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    args = training_arguments(config, work, bool(run.val_records), run.model)
    # DDP: only tower/connector adapters can go unused (text-only batches); otherwise skip the extra graph walk.
    args.ddp_find_unused_parameters = bool(run.groups["vision"] or run.groups["merger"])
    trainer = Trainer(
        model=run.model, args=args, train_dataset=ListDataset(run.train_records),
        eval_dataset=ListDataset(run.val_records) if run.val_records else None,
        data_collator=collator, callbacks=callbacks,
    )
    if resume_from:
        print(f"resuming from {resume_from}")
    started = time.time()
    try:
        with training_speedups(run.model, config, autocast=args.bf16 or args.fp16):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.cuda.OutOfMemoryError:
        raise MemoryError(
            "CUDA out of memory. Lower per_device_batch_size (and raise grad_accum to keep the global batch), "
            "keep gradient_checkpointing on, lower max_pixels, or train 4-bit with quantization: 4bit"
            + (" (cuda_graphs keeps one step's activations per captured shape: lower cuda_graph_shapes or "
               "turn it off)" if config.cuda_graphs else "")
        ) from None
    if (report := run.speedups.report()) is not None:
        print(report)
    return trainer, time.time() - started


def finalize(config: TrainConfig, run: Prepared, trainer, work: Path, out: Path, train_seconds: float,
             main_process: bool) -> None:
    """Save the adapter, reports, eval and manifest into `work/final`, then rename it to `out`."""
    from trainer.evaluate import evaluate_records
    from trainer.manifest import write_manifest

    final = work / "final"
    if main_process:
        shutil.rmtree(final, ignore_errors=True)
    if config.fsdp:  # the adapter's weights are sharded: gathered by every process, written by the first
        trainer.save_model(str(final))
    elif main_process:
        run.model.save_pretrained(final, safe_serialization=True)
    if not main_process:
        return
    run.processor.save_pretrained(final / "processor")
    shutil.copy(work / "train_config.json", final / "train_config.json")
    history = trainer.state.log_history
    (final / "log_history.json").write_text(json.dumps(history, indent=2))
    plot_loss(history, final / "loss_curve.png")

    val = run.val_records
    if config.fsdp and val:  # generating needs the whole model in one process
        print(f"fsdp: no generation eval after training; run `vlora-train eval --adapter {out}` on a machine "
              "that holds the model")
    eval_result = evaluate_records(run.model, run.processor, val[: config.eval_max_samples],
                                   max_new_tokens=config.eval_max_new_tokens, batch_size=8) \
        if val and not config.fsdp else {}
    if eval_result:
        eval_result["train_seconds"] = round(train_seconds, 1)
        (final / "eval.json").write_text(json.dumps(
            {k: v for k, v in eval_result.items() if k != "records"}, indent=2))
    write_manifest(final, config, run.groups, run.processor, eval_result)
    final.chmod(0o755)
    os.replace(final, out)
    shutil.rmtree(work, ignore_errors=True)
    summary = eval_result.get("adapter", {})
    print(f"adapter written to {out} in {train_seconds:.0f}s"
          + (f"; exact match {summary.get('exact_match', 0):.1%} (base {eval_result['base']['exact_match']:.1%})"
             if summary else ""))


def train(config: TrainConfig) -> Path:
    """Train an adapter; returns the finished output directory."""
    out = Path(config.output_dir)
    if not config.output_dir or not config.train_data:
        raise ValueError("train_data and output_dir are required")
    if out.exists():
        raise FileExistsError(f"output directory '{out}' already exists; choose another or remove it")
    work = partial_path(out)
    # Under torchrun/accelerate launch every process runs this; the first one owns the checks and the files
    # (the others would otherwise find its fresh work directory and take it for an interrupted run).
    main_process = int(os.environ.get("RANK", "0")) == 0
    if work.exists() and main_process and not config.resume:
        raise FileExistsError(f"an interrupted run is in '{work}'; pass --resume to continue it or delete it")
    resume_from = newest_checkpoint(work) if config.resume and work.exists() else None
    if main_process:
        work.mkdir(parents=True, exist_ok=True)
        (work / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    run = prepare(config)
    trainer, seconds = fit(config, run, work, resume_from)
    finalize(config, run, trainer, work, out, seconds, main_process)
    return out
