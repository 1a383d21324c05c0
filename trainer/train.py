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


@dataclass
class Data:
    """The records a run trains and validates on, checked, and what the manifest records about them."""

    train: object  # a ChatRecords, or a datasets.IterableDataset of chats (streaming)
    val: list[dict]
    info: dict  # source, format, counts, fingerprint, dropped records


def _checked(config: TrainConfig, spec: str, split: str, processor, streaming: bool = False):
    """The rows of one dataset after a full check (every problem listed; overlong records per truncation)."""
    import sys

    from trainer.data import DataError, open_source, scan

    rows = open_source(spec, split, streaming)
    max_pixels = getattr(processor.image_processor, "size", {}).get("longest_edge")
    found = scan(rows, config.format, processor, config.longest, max_pixels,
                 limit=config.validate_limit or None, progress=sys.stderr.isatty())
    if found.problems:
        raise DataError(spec, found.problems)
    if found.too_long and config.truncation == "error":
        raise DataError(spec, [f"{rows.where(i)}: {found.sizes[i]} tokens, over max_length {config.longest} "
                               "(truncation: drop leaves such records out; nothing is ever cut)"
                               for i in found.too_long][:50])
    print(f"data: {spec} ({split}): {found.records} records, format {found.format}"
          + (" (detected)" if config.format == "auto" else "")
          + (f", {len(found.too_long)} over max_length dropped" if found.too_long else ""))
    return rows, found


def _kept(found) -> list[int]:
    """The records' row indices, overlong ones left out."""
    too_long = set(found.too_long)
    return [i for i in found.indices if i not in too_long]


def load_data(config: TrainConfig, processor) -> Data:
    """Open and check the training (and validation) data before anything is written."""
    import random

    from trainer.data import ChatRecords, streamed_chats

    rows, found = _checked(config, config.train_data, config.train_split, processor, config.streaming)
    info = {"source": config.train_data, "split": config.train_split, "format": found.format,
            "records": found.records, "fingerprint": found.fingerprint, "checked": not found.limited,
            "dropped_overlong": len(found.too_long), "streaming": config.streaming,
            "files": [p.name for p in rows.files][:100], "revision": rows.revision}
    val: list[dict] = []
    held_out = 0
    if config.eval_data or config.eval_split:
        eval_rows, eval_found = _checked(config, config.eval_data or config.train_data,
                                         config.eval_split or config.train_split, processor)
        val = list(ChatRecords(eval_rows, eval_found.format, _kept(eval_found)))
        info["eval"] = {"source": config.eval_data or config.train_data, "records": len(val),
                        "fingerprint": eval_found.fingerprint}
    elif config.streaming:
        # A stream cannot be split at random: its first records are held out (and skipped by training).
        held_out = min(config.eval_max_samples, max(1, int(found.records * config.val_fraction))) \
            if config.val_fraction > 0 else 0
        val = list(streamed_chats(rows, found.format, config.seed, 1, take=held_out)) if held_out else []
    if config.streaming:
        drop = config.truncation == "drop"
        # Packing counts every record's tokens itself (and drops what does not fit a row): counted once.
        train = streamed_chats(rows, found.format, config.seed, config.shuffle_buffer, skip=held_out,
                               max_length=config.longest if drop and not config.packing else None,
                               processor=processor)
        info["held_out"] = held_out
        if config.packing:
            from trainer.data import TokenCounter
            from trainer.packing import PackedStream

            train = PackedStream(train, TokenCounter(processor), config.packed_length, config.seed,
                                 window=config.shuffle_buffer, drop=drop, longest=config.longest)
            info["packing"] = {"packed_length": config.packed_length, "streaming": True,
                               "window": config.shuffle_buffer}
            print(f"packing: streamed records in rows of {config.packed_length} tokens, {config.shuffle_buffer} "
                  "records at a time")
        return Data(train, val, info)
    keep = _kept(found)
    if not val and config.val_fraction > 0:
        random.Random(config.seed).shuffle(keep)
        n_val = max(1, int(len(keep) * config.val_fraction))
        val = list(ChatRecords(rows, found.format, sorted(keep[:n_val])))
        keep = sorted(keep[n_val:])
    info["train_records"] = len(keep)
    info["val_records"] = len(val)
    if not config.packing:
        return Data(ChatRecords(rows, found.format, keep), val, info)
    from trainer.packing import PackedRecords, pack

    packs = pack({i: found.sizes[i] for i in keep}, config.packed_length, config.seed)
    used = sum(found.sizes[i] for i in keep)
    info["packing"] = {"rows": len(packs), "packed_length": config.packed_length,
                       "padding_fraction": round(1 - used / max(len(packs) * config.packed_length, 1), 4)}
    print(f"packing: {len(keep)} records in {len(packs)} rows of {config.packed_length} tokens "
          f"({info['packing']['padding_fraction']:.1%} padding)")
    return Data(PackedRecords(ChatRecords(rows, found.format), packs), val, info)


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
        report_to=config.trackers,
        run_name=config.run_name or Path(config.output_dir).name,
        include_num_input_tokens_seen="non_padding",  # train_tokens_per_second counts real tokens only
        # A stream is read by every process itself: accelerate's dispatcher would slice each batch tensor to the
        # batch size along dim 0, which for pixel_values (patches x features) cuts the images.
        accelerator_config={"dispatch_batches": False} if config.streaming else None,
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
    data: Data
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


def check_inputs(config: TrainConfig) -> tuple[object, Data]:
    """The processor and the checked data: everything that can refuse a run, before anything is written."""
    from transformers import set_seed

    from trainer.model import load_processor

    set_seed(config.seed)
    processor = load_processor(config)
    data = load_data(config, processor)
    size = "streamed" if config.streaming else f"{len(data.train)} training"
    print(f"data: {size} and {len(data.val)} validation records")
    return processor, data


def prepare(config: TrainConfig, processor=None, data: Data | None = None) -> Prepared:
    if processor is None or data is None:
        processor, data = check_inputs(config)
    model, groups, speedups = prepare_model(config)
    return Prepared(processor, data, model, groups, speedups)


class TrackRun:
    """Names the run in the trackers and remembers the MLflow run, so that the manifest joins it at the end."""

    def __init__(self):
        self.mlflow_run_id: str | None = None

    def callback(self):
        from transformers import TrainerCallback

        track = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if "mlflow" in (args.report_to or []) and state.is_world_process_zero:
                    import mlflow

                    run = mlflow.active_run()
                    track.mlflow_run_id = run.info.run_id if run else None

        return _Callback()

    def attach(self, config: TrainConfig, files: list[Path], logging_dir: Path) -> None:
        """The run's config and manifest, where the trackers keep files (MLflow artifacts, W&B run files,
        TensorBoard text beside the run's scalars)."""
        if "mlflow" in config.trackers and self.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            for f in files:
                client.log_artifact(self.mlflow_run_id, str(f))
        if "wandb" in config.trackers:
            import wandb

            if wandb.run is not None:  # still open after training: the files join it, then it is finished
                for f in files:  # copied (a link would point into OUT.partial, renamed a moment later)
                    kept = Path(wandb.run.dir) / f.name
                    shutil.copyfile(f, kept)
                    wandb.save(str(kept), base_path=wandb.run.dir, policy="now")
                wandb.finish()
        if "tensorboard" in config.trackers:
            from torch.utils.tensorboard import SummaryWriter

            runs = sorted((p for p in logging_dir.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
            with SummaryWriter(str(runs[-1] if runs else logging_dir)) as writer:  # beside the run's scalars
                for f in files:
                    writer.add_text(f.name, "```\n" + f.read_text()[:100_000] + "\n```")


def fit(config: TrainConfig, run: Prepared, work: Path, resume_from: Path | None, track: TrackRun | None = None):
    """Train with the HF Trainer; returns (trainer, seconds)."""
    import torch
    from transformers import EarlyStoppingCallback, Trainer

    from trainer.data import Augment, ChatCollator
    from trainer.speedups import gc_callback, training_speedups

    track = track or TrackRun()

    sample_options = dict(augment=Augment(enabled=config.augment, seed=config.seed), video_fps=config.video_fps,
                          video_max_frames=config.video_max_frames)
    if config.packing:
        from trainer.packing import PackingCollator, RopeIndex

        collator = PackingCollator(run.processor, RopeIndex.of(run.model), config.packed_length, **sample_options)
    else:
        collator = ChatCollator(run.processor, pad_to_multiple_of=config.pad_to_multiple_of, **sample_options)
    callbacks = [c for c in (gc_callback(config), track.callback()) if c is not None]
    if config.early_stopping_patience and run.data.val:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    args = training_arguments(config, work, bool(run.data.val), run.model)
    # DDP: only tower/connector adapters can go unused (text-only batches); otherwise skip the extra graph walk.
    args.ddp_find_unused_parameters = bool(run.groups["vision"] or run.groups["merger"])
    trainer = Trainer(
        model=run.model, args=args, train_dataset=run.data.train,
        eval_dataset=([[chat] for chat in run.data.val] if config.packing else run.data.val) or None,
        data_collator=collator, callbacks=callbacks,
        # Its pad token lets the Trainer count real tokens where a batch has no attention mask (packed rows).
        processing_class=run.processor.tokenizer,
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
             main_process: bool, track: TrackRun | None = None) -> None:
    """Save the adapter, reports, eval and manifest into `work/final`, then rename it to `out`."""
    from trainer.evaluate import evaluate_records, resolve_backend
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

    if (work / "runs").is_dir():  # the trackers' local logs (TensorBoard event files) stay with the adapter
        shutil.move(str(work / "runs"), str(final / "runs"))
    val = run.data.val
    if config.fsdp and val:  # generating needs the whole model in one process
        print(f"fsdp: no generation eval after training; run `vlora-train eval --adapter {out}` on a machine "
              "that holds the model")
    eval_result = {}
    if val and not config.fsdp:
        backend = resolve_backend(config.eval_backend)
        if backend == "vllm":  # the engine needs the memory the trained model holds
            _release(run, trainer)
        eval_result = evaluate_records(run.model, run.processor, val[: config.eval_max_samples],
                                       max_new_tokens=config.eval_max_new_tokens, batch_size=8, backend=backend,
                                       base_model=config.base_model, adapter_dir=str(final))
    if eval_result:
        eval_result["train_seconds"] = round(train_seconds, 1)
        (final / "eval.json").write_text(json.dumps(
            {k: v for k, v in eval_result.items() if k != "records"}, indent=2))
    write_manifest(final, config, run.groups, run.processor, eval_result, run.data.info)
    (track or TrackRun()).attach(config, [final / "manifest.json", final / "train_config.json"], final / "runs")
    final.chmod(0o755)
    os.replace(final, out)
    shutil.rmtree(work, ignore_errors=True)
    summary = eval_result.get("adapter", {})
    print(f"adapter written to {out} in {train_seconds:.0f}s"
          + (f"; exact match {summary.get('exact_match', 0):.1%} (base {eval_result['base']['exact_match']:.1%})"
             if summary else ""))


def _release(run: Prepared, trainer) -> None:
    """Free the accelerator memory of the trained model and its optimizer (the adapter is saved already)."""
    import gc

    import torch

    trainer.optimizer = trainer.lr_scheduler = None
    run.model.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train(config: TrainConfig) -> Path:
    """Train an adapter; returns the finished output directory. The base model and the data are checked
    before anything is written: a refused run leaves nothing behind."""
    from trainer.model import resolve_base_model

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
    resolve_base_model(config.base_model)
    _tracker_env(config)
    processor, data = check_inputs(config)
    resume_from = newest_checkpoint(work) if config.resume and work.exists() else None
    if main_process:
        work.mkdir(parents=True, exist_ok=True)
        (work / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    run = prepare(config, processor, data)
    if "tensorboard" in config.trackers:  # one folder per run, kept across --resume (moved into OUT at the end)
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(work / "runs" / (config.run_name or out.name)))
    track = TrackRun()
    trainer, seconds = fit(config, run, work, resume_from, track)
    finalize(config, run, trainer, work, out, seconds, main_process, track)
    return out


def _tracker_env(config: TrainConfig) -> None:
    """The experiment and tags as the Trainer's integrations read them (MLFLOW_EXPERIMENT_NAME, MLFLOW_TAGS as
    JSON, WANDB_TAGS); what the user set already wins."""
    if "mlflow" in config.trackers:
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "vlora")  # created when absent (a fresh store has none)
    tags = [t.strip() for t in (config.run_tags or "").split(",") if t.strip()]
    if tags:
        os.environ.setdefault("MLFLOW_TAGS", json.dumps({t: "true" for t in tags}))
        os.environ.setdefault("WANDB_TAGS", ",".join(tags))
