"""Training benchmark at Qwen3-VL-8B scale: the common recipe vs the trainer's bf16 LoRA and QLoRA recipes.

    python bench/train_gpu.py --out bench/results/train-gpu            # on one GPU
    python bench/train_gpu.py --shape tiny --configs baseline,ours     # the same code path on a CPU

A model of the published Qwen3-VL-8B shape with random weights is written once (speed and memory do not
depend on weight values). Workload: per-device batch 2, each sample one 448x448 image (196 image tokens
after the 2x2 merge) plus 512 text tokens, LoRA r=16 on the language model's attention and MLP; 5
warm-up steps, then 20 timed steps, same data, seed and learning-rate schedule for every configuration.
Each configuration runs in its own process (clean peak-memory counters) through Hugging Face's Trainer.

    baseline   the common recipe: Trainer + peft, bf16, gradient checkpointing, SDPA, torch AdamW,
               LoRA r=16/alpha=32 on q,k,v,o,gate,up,down (QLoRA variant: peft's
               prepare_model_for_kbit_training)
    ours       trainer/configs/qwen3-vl-8b-lora.yaml through trainer.model (load_base, wrap_lora; CUDA graphs)
    qlora      trainer/configs/qwen3-vl-8b-qlora.yaml likewise (bitsandbytes nf4, double quant)
    ...        plus single-lever variants (see VARIANTS) to show what each lever is worth

Prints one table last: tokens/s, s/step, peak allocated/reserved GiB, trainable parameters, the speedup
over the baseline, and the largest loss difference from the baseline over the first 20 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_TOKENS, TEXT_TOKENS, BATCH, WARMUP, TIMED = 196, 512, 2, 5, 20
IDS = {"image": 151655, "video": 151656, "vision_start": 151652, "vision_end": 151653, "pad": 151643}

SHAPES = {
    "8b": dict(
        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                                      "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24]),
    ),
    "tiny": dict(
        text=dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                                      "mrope_section": [12, 10, 10], "mrope_interleaved": True}),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=2304,
                    deepstack_visual_indexes=[0]),
    ),
}

# name -> (recipe file or None for the common recipe, TrainConfig overrides)
VARIANTS = {
    "baseline": (None, {}),
    "ours": ("qwen3-vl-8b-lora.yaml", {}),
    "ours-no-graphs": ("qwen3-vl-8b-lora.yaml", {"cuda_graphs": False}),
    "ours-fsdp": ("qwen3-vl-8b-lora.yaml", {"cuda_graphs": False, "fsdp": True}),
    "ours-no-liger": ("qwen3-vl-8b-lora.yaml", {"kernels": "none"}),
    "ours-input-cast": ("qwen3-vl-8b-lora.yaml", {"lora_input_cast": True}),
    "ours-auto-gc": ("qwen3-vl-8b-lora.yaml", {"gc_every": 0}),
    "ours-no-swiglu": ("qwen3-vl-8b-lora.yaml", {"kernels": "rms_norm,rope,fused_linear_cross_entropy"}),
    "ours-ckpt": ("qwen3-vl-8b-lora.yaml", {"cuda_graphs": False, "gradient_checkpointing": True}),
    "ours-compile": ("qwen3-vl-8b-lora.yaml", {"cuda_graphs": False, "torch_compile": True}),
    "ours-compile-cudagraphs": ("qwen3-vl-8b-lora.yaml", {"cuda_graphs": False, "torch_compile": True, "compile_mode": "reduce-overhead"}),
    "ours-compile-no-liger": ("qwen3-vl-8b-lora.yaml", {"cuda_graphs": False, "torch_compile": True, "kernels": "none"}),
    "baseline-qlora": (None, {"quantization": "4bit"}),
    "qlora": ("qwen3-vl-8b-qlora.yaml", {}),
    "qlora-no-liger": ("qwen3-vl-8b-qlora.yaml", {"kernels": "none"}),
    "qlora-graphs": ("qwen3-vl-8b-qlora.yaml", {"cuda_graphs": True, "gradient_checkpointing": False}),
    "qlora-vision-16bit": ("qwen3-vl-8b-qlora.yaml", {"quantize_vision": False}),
    # --workload varlen: the same recipes with padding-free packing (rows of PACKED_LENGTH tokens)
    "ours-packed": ("qwen3-vl-8b-lora.yaml", {"packing": True}),
    "ours-packed-no-graphs": ("qwen3-vl-8b-lora.yaml", {"packing": True, "cuda_graphs": False}),
    "ours-packed-ckpt": ("qwen3-vl-8b-lora.yaml", {"packing": True, "cuda_graphs": False,
                                                    "gradient_checkpointing": True}),
    "qlora-packed": ("qwen3-vl-8b-qlora.yaml", {"packing": True}),
    # CUDA graphs with gradient checkpointing inside the captures (all layers, or the first N: checkpoint_layers)
    "ours-packed-graphs-ckpt": ("qwen3-vl-8b-lora.yaml", {"packing": True, "gradient_checkpointing": True}),
    "ours-packed-graphs-ckpt28": ("qwen3-vl-8b-lora.yaml", {"packing": True, "gradient_checkpointing": True,
                                                             "checkpoint_layers": 28}),
    "ours-packed-graphs-ckpt24": ("qwen3-vl-8b-lora.yaml", {"packing": True, "gradient_checkpointing": True,
                                                             "checkpoint_layers": 24}),
    "qlora-graphs-ckpt": ("qwen3-vl-8b-qlora.yaml", {"cuda_graphs": True}),  # the QLoRA recipe since these runs
    "qlora-no-graphs": ("qwen3-vl-8b-qlora.yaml", {"cuda_graphs": False}),  # the QLoRA recipe before them
    "qlora-graphs-ckpt-8bit": ("qwen3-vl-8b-qlora.yaml", {"cuda_graphs": True, "optim": "adamw_bnb_8bit"}),
    "qlora-packed-graphs": ("qwen3-vl-8b-qlora.yaml", {"packing": True, "cuda_graphs": True}),
    "qlora-packed-graphs-8bit": ("qwen3-vl-8b-qlora.yaml", {"packing": True, "cuda_graphs": True,
                                                            "optim": "adamw_bnb_8bit"}),
    # attention per packed sample (PyTorch's FlashAttention-2 varlen kernel, trainer/attention.py) and checkpointed
    # layer inputs kept in CPU memory (trainer/offload.py)
    "ours-packed-varlen": ("qwen3-vl-8b-lora.yaml", {"packing": True, "attn_implementation": "varlen"}),
    "ours-packed-graphs-ckpt-varlen": ("qwen3-vl-8b-lora.yaml", {"packing": True, "gradient_checkpointing": True,
                                                                  "attn_implementation": "varlen"}),
    "ours-packed-graphs-ckpt28-varlen": ("qwen3-vl-8b-lora.yaml", {"packing": True, "gradient_checkpointing": True,
                                                                    "checkpoint_layers": 28,
                                                                    "attn_implementation": "varlen"}),
    "qlora-packed-varlen": ("qwen3-vl-8b-qlora.yaml", {"packing": True, "attn_implementation": "varlen"}),
    "qlora-packed-offload": ("qwen3-vl-8b-qlora.yaml", {"packing": True, "cuda_graphs": False,
                                                        "offload_checkpoints": True}),
    "qlora-packed-offload-varlen": ("qwen3-vl-8b-qlora.yaml", {"packing": True, "cuda_graphs": False,
                                                               "offload_checkpoints": True,
                                                               "attn_implementation": "varlen"}),
    "qlora-offload": ("qwen3-vl-8b-qlora.yaml", {"cuda_graphs": False, "offload_checkpoints": True}),
    # Unsloth's FastVisionModel, the trainer users pick instead (wheels: ../shared/anchors/unsloth/), as its
    # notebooks set it up: gradient checkpointing "unsloth", 8-bit AdamW, the same LoRA targets and rank.
    "unsloth": ("unsloth", {}),
    "unsloth-4bit": ("unsloth", {"quantization": "4bit"}),
}
PACKED_LENGTH = 4096
VARLEN_IMAGE_SIDES = (224, 320, 448, 672)  # 49 / 100 / 196 / 441 tokens after the 2x2 merge


def make_model(shape: str, path: Path) -> None:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if (path / "config.json").is_file():
        return
    spec = SHAPES[shape]
    config = Qwen3VLConfig(text_config={**spec["text"], "pad_token_id": IDS["pad"]}, vision_config=spec["vision"],
                           image_token_id=IDS["image"], video_token_id=IDS["video"],
                           vision_start_token_id=IDS["vision_start"], vision_end_token_id=IDS["vision_end"],
                           tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    from artifacts.atomic import partial_path

    tmp = partial_path(path)
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)
    n = sum(p.numel() for p in model.parameters())
    print(f"random {shape} model: {n / 1e9:.2f} B parameters -> {path}", flush=True)


def samples(n: int, seed: int = 0) -> list[dict]:
    """`n` samples: [text | vision_start image_pad*196 vision_end | text], 710 tokens, loss on the text
    after the image."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    grid = 448 // 16  # 28 x 28 patches, merged 2 x 2 -> 196 tokens
    out = []
    for _ in range(n):
        before = torch.randint(0, 150000, (16,), generator=gen)
        after = torch.randint(0, 150000, (TEXT_TOKENS - 16,), generator=gen)
        image = torch.full((IMAGE_TOKENS,), IDS["image"])
        ids = torch.cat([before, torch.tensor([IDS["vision_start"]]), image, torch.tensor([IDS["vision_end"]]), after])
        labels = ids.clone()
        labels[: 16 + IMAGE_TOKENS + 2] = -100
        out.append({
            "input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == IDS["image"]).long(),
            "pixel_values": torch.randn(grid * grid, 3 * 2 * 16 * 16, generator=gen),
            "image_grid_thw": torch.tensor([[1, grid, grid]]),
        })
    return out


def varlen_samples(n: int, seed: int = 0) -> list[dict]:
    """`n` samples of the variable-length workload, fixed by the seed: 1-3 images of sides drawn from
    VARLEN_IMAGE_SIDES, text of 16-1536 tokens in all (log-uniform), 20-80 % of it in the user turn before the
    images and the rest in the answer (the loss)."""
    import math
    import random

    import torch

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = int(math.exp(rng.uniform(math.log(16), math.log(1536))))
        user = max(1, int(text * rng.uniform(0.2, 0.8)))
        answer = max(1, text - user)
        pieces, types, grids, pixels = [torch.randint(0, 150000, (user,), generator=gen)], [torch.zeros(user)], [], []
        for _ in range(rng.randint(1, 3)):
            side = rng.choice(VARLEN_IMAGE_SIDES) // 16  # patches per side before the merge
            tokens = side * side // 4
            pieces += [torch.tensor([IDS["vision_start"]]), torch.full((tokens,), IDS["image"]),
                       torch.tensor([IDS["vision_end"]])]
            types += [torch.zeros(1), torch.ones(tokens), torch.zeros(1)]
            grids.append(torch.tensor([[1, side, side]]))
            pixels.append(torch.randn(side * side, 3 * 2 * 16 * 16, generator=gen))
        pieces.append(torch.randint(0, 150000, (answer,), generator=gen))
        types.append(torch.zeros(answer))
        ids = torch.cat(pieces)
        labels = torch.full_like(ids, -100)
        labels[-answer:] = ids[-answer:]
        out.append({"input_ids": ids, "labels": labels, "mm_token_type_ids": torch.cat(types).long(),
                    "pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)})
    return out


def padded_collate(multiple: int | None):
    """Unpacked batches of varlen samples: right-padded to the longest (to a multiple of `multiple`)."""
    import torch

    def collate_padded(batch: list[dict]) -> dict:
        longest = max(len(b["input_ids"]) for b in batch)
        if multiple:
            longest = -(-longest // multiple) * multiple
        out = {"input_ids": [], "labels": [], "attention_mask": [], "mm_token_type_ids": []}
        for b in batch:
            pad = longest - len(b["input_ids"])
            out["input_ids"].append(torch.cat([b["input_ids"], torch.full((pad,), IDS["pad"])]))
            out["labels"].append(torch.cat([b["labels"], torch.full((pad,), -100)]))
            out["attention_mask"].append(torch.cat([torch.ones(len(b["input_ids"])), torch.zeros(pad)]).long())
            out["mm_token_type_ids"].append(torch.cat([b["mm_token_type_ids"], torch.zeros(pad).long()]))
        batch_out = {k: torch.stack(v) for k, v in out.items()}
        batch_out["pixel_values"] = torch.cat([b["pixel_values"] for b in batch])
        batch_out["image_grid_thw"] = torch.cat([b["image_grid_thw"] for b in batch])
        return batch_out

    return collate_padded


def collate(batch: list[dict]) -> dict:
    import torch

    out = {k: torch.stack([b[k] for b in batch]) for k in ("input_ids", "labels", "attention_mask", "mm_token_type_ids")}
    out["pixel_values"] = torch.cat([b["pixel_values"] for b in batch])
    out["image_grid_thw"] = torch.cat([b["image_grid_thw"] for b in batch])
    if os.environ.get("VLORA_BENCH_TRACE"):
        print(f"rank {os.environ.get('RANK', '0')} batch {[int(b['input_ids'][0]) for b in batch]}", flush=True)
    return out


def build(variant: str, model_dir: Path):
    """(peft model, optimizer name, TrainConfig or None, Speedups or None) for one variant."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from trainer.config import TARGET_PRESETS, TrainConfig
    from trainer.model import resolve_optim
    from trainer.train import prepare_model

    recipe, overrides = VARIANTS[variant]
    cuda = torch.cuda.is_available()
    if recipe == "unsloth":
        from unsloth import FastVisionModel

        _tokenizer_for(model_dir)
        model, _ = FastVisionModel.from_pretrained(str(model_dir), load_in_4bit=overrides.get("quantization") == "4bit",
                                                   dtype=torch.bfloat16, max_seq_length=PACKED_LENGTH,
                                                   use_gradient_checkpointing="unsloth")
        model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, bias="none",
                                               finetune_vision_layers=False, finetune_language_layers=True,
                                               finetune_attention_modules=True, finetune_mlp_modules=True)
        FastVisionModel.for_training(model)
        return model, "adamw_8bit", None, None
    if recipe is None:  # the common recipe, written the way its tutorials write it
        kwargs: dict = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
        if overrides.get("quantization") == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
        if cuda:
            kwargs["device_map"] = {"": 0}
        model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs)
        if "quantization_config" in kwargs:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGET_PRESETS["llm"], bias="none")
        return get_peft_model(model, lora), "adamw_torch", None, None
    config = TrainConfig.load(ROOT / "trainer" / "configs" / recipe, {**overrides, "base_model": str(model_dir)})
    model, _, speedups = prepare_model(config)
    return model, resolve_optim(config), config, speedups


def _tokenizer_for(model_dir: Path) -> None:
    """Unsloth's loader wants a processor in the model folder; the data is pre-tokenized, so the tiny kit's
    (its contents do not matter) is written there once."""
    if (model_dir / "tokenizer_config.json").is_file():
        return
    from trainer.tiny import build_processor, build_tokenizer

    build_processor(build_tokenizer()).save_pretrained(model_dir)


def worker(variant: str, model_dir: Path, result_file: Path, grad_accum: int = 1, sequential: bool = False,
           workload: str = "fixed") -> None:
    if variant.startswith("unsloth"):
        import unsloth  # noqa: F401 - first, so that its patches reach transformers and peft
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from trainer.model import fsdp_arguments
    from trainer.speedups import gc_callback, training_speedups

    set_seed(0)
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model, optim, config, speedups = build(variant, model_dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = WARMUP + TIMED
    packed = bool(config and config.packing)
    batch_size = 1 if packed else BATCH  # a packed row holds ~5 samples of the varlen workload
    real_tokens: list[int] = []  # per step, padding not counted
    shapes: list[int] = []  # tokens per step, padding counted
    sample_counts: list[int] = []
    if workload == "fixed":
        data = samples(steps * BATCH * grad_accum * world)
        batch_collate = collate
    else:
        pool = varlen_samples(40 * steps)  # the same samples, in the same order, for every configuration
        if packed:
            from trainer.packing import RopeIndex, join_row, pack, stack_rows

            rope = RopeIndex.of(model)
            lengths = {i: len(x["input_ids"]) for i, x in enumerate(pool[:8 * steps])}
            rows = sorted(pack(lengths, PACKED_LENGTH, seed=0), key=min)[:steps * grad_accum * world]
            data = [[pool[i] for i in row] for row in rows]

            def batch_collate(batch):
                real_tokens.append(sum(len(x["input_ids"]) for row in batch for x in row))
                shapes.append(PACKED_LENGTH * len(batch))
                sample_counts.append(sum(len(row) for row in batch))
                return stack_rows([join_row(row, PACKED_LENGTH, IDS["pad"], rope) for row in batch])
        else:
            data = pool[:steps * BATCH * grad_accum * world]
            padded = padded_collate(config.pad_to_multiple_of if config else None)

            def batch_collate(batch):
                real_tokens.append(sum(len(x["input_ids"]) for x in batch))
                out = padded(batch)
                shapes.append(out["input_ids"].numel())
                sample_counts.append(len(batch))
                return out

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)

    class Profile(TrainerCallback):
        """torch.profiler over 3 steps after the warm-up (VLORA_BENCH_PROFILE=DIR): where the time goes."""

        def __init__(self, out: Path):
            self.out, self.prof, self.wall = out, None, 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == WARMUP and self.prof is None:
                from torch.profiler import ProfilerActivity, profile

                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.wall = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == WARMUP + 3:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.wall
                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                on_gpu = [e for e in events if e.device_type.name == "CUDA"]
                gpu = sum(e.self_device_time_total for e in on_gpu) / 1e6
                kernels = sum(e.count for e in on_gpu)
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / f"{variant}.txt").write_text(
                    f"{variant}: 3 steps, wall {wall:.3f} s, GPU busy {gpu:.3f} s ({100 * gpu / wall:.0f} %), "
                    f"{kernels} kernel launches\n\n"
                    + events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60) + "\n"
                    + events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
                self.prof = None

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(result_file.parent / f"tmp-{variant}"), per_device_train_batch_size=batch_size, max_steps=steps,
        gradient_accumulation_steps=grad_accum, ddp_find_unused_parameters=False,
        learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, optim=optim,
        bf16=cuda, save_strategy="no", report_to=[], seed=0, data_seed=0, remove_unused_columns=False,
        dataloader_pin_memory=cuda, gradient_checkpointing=False, disable_tqdm=True,
        max_grad_norm=1.0, weight_decay=0.0, **(fsdp_arguments(model, config) if config else {}),
    )

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    class SequentialTrainer(Trainer):
        """Samples in order: one GPU with accumulation and several GPUs see the same global batches."""

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    cls = SequentialTrainer if sequential else Trainer
    callbacks = [clock]
    if config and (collector := gc_callback(config)) is not None:
        callbacks.append(collector)
    if os.environ.get("VLORA_BENCH_PROFILE") and cuda:
        callbacks.append(Profile(Path(os.environ["VLORA_BENCH_PROFILE"])))
    if workload == "varlen":  # in order: every configuration sees the pool from its start
        cls = SequentialTrainer
    trainer = cls(model=model, args=args, train_dataset=Data(), data_collator=batch_collate, callbacks=callbacks)
    with training_speedups(model, config, autocast=args.bf16) if config else contextlib.nullcontext():
        trainer.train()
    if rank != 0:
        return
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = clock.times[WARMUP:]
    tokens = BATCH * (TEXT_TOKENS + IMAGE_TOKENS + 2) * grad_accum * world
    extra = {}
    if workload == "varlen":  # the timed steps' real tokens (the collator runs once per step and process)
        timed_steps = slice(WARMUP * grad_accum, (WARMUP + TIMED) * grad_accum)
        tokens = sum(real_tokens[timed_steps]) / TIMED
        extra = {"workload": "varlen", "packed": packed, "samples_per_step": sum(sample_counts[timed_steps]) / TIMED,
                 "padding_fraction": 1 - sum(real_tokens[timed_steps]) / max(sum(shapes[timed_steps]), 1),
                 "mean_loss": sum(losses[WARMUP:]) / max(len(losses[WARMUP:]), 1)}
    result = {
        "variant": variant, "trainable_params": trainable, "optim": optim, "gpus": world, "grad_accum": grad_accum,
        "global_batch": BATCH * grad_accum * world,
        "seconds_per_step": sum(timed) / len(timed), "tokens_per_s": tokens * len(timed) / sum(timed),
        "step_seconds": timed,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "losses": losses[:TIMED], "recipe": config.to_dict() if config else "common recipe",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", **extra,
    }
    if speedups is not None and speedups.graphs is not None:
        result["cuda_graphs"] = speedups.graphs.stats()
    result_file.write_text(json.dumps(result, indent=2))


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def multi_gpu_check(n: int, shape: str, model_dir: Path, out: Path, timeout: float, fsdp: bool = False) -> str:
    """`ours` on one GPU (N-step accumulation) and DDP on N GPUs (torchrun), same global batches; with
    `fsdp`, `ours-no-graphs` on one GPU against `ours-fsdp` (FSDP2, full shard) on N GPUs."""
    one_variant, many_variant, how, tag = (("ours-no-graphs", "ours-fsdp", "FSDP2", "-fsdp") if fsdp
                                           else ("ours", "ours", "DDP", ""))
    common = [__file__, "--shape", shape, "--model-dir", str(model_dir), "--sequential"]
    runs = {
        "1gpu": [sys.executable, *common, "--worker", one_variant, "--grad-accum", str(n)],
        f"{n}gpu": [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *common,
                    "--worker", many_variant, "--grad-accum", "1"],
    }
    results = {}
    for name, cmd in runs.items():
        started = time.time()
        result_file = out / f"multi{tag}-{name}.json"
        # One process on a machine with several GPUs would otherwise get DataParallel from the Trainer.
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"} if name == "1gpu" else None
        proc = subprocess.run([*cmd, "--result", str(result_file)], capture_output=True, text=True, timeout=timeout,
                              env=env)
        if proc.returncode != 0 or not result_file.is_file():
            log = out / f"multi{tag}-{name}.log"
            log.write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
            return f"{name}: FAILED ({proc.returncode}); see {log.name}"
        results[name] = json.loads(result_file.read_text())
        print(f"{name}: {results[name]['tokens_per_s']:.0f} tok/s in {time.time() - started:.0f}s", flush=True)
    one, many = results["1gpu"], results[f"{n}gpu"]
    dloss = max(abs(a - b) for a, b in zip(one["losses"], many["losses"], strict=False))
    single = (json.loads((out / f"{one_variant}.json").read_text())["tokens_per_s"]
              if (out / f"{one_variant}.json").is_file() else None)
    lines = [f"multi-GPU check on {many['device']}: `{one_variant}` on 1 GPU vs `{many_variant}` on {n}, global batch "
             f"{many['global_batch']}, {WARMUP} warm-up + {TIMED} timed steps",
             f"{'run':<28}{'tok/s':>9}{'s/step':>9}{'alloc GiB/GPU':>15}",
             f"{'1 GPU, accumulation ' + str(n):<28}{one['tokens_per_s']:>9.0f}{one['seconds_per_step']:>9.3f}"
             f"{_gib(one['peak_allocated_gib']):>15}",
             f"{f'{n} GPUs, {how} (torchrun)':<28}{many['tokens_per_s']:>9.0f}{many['seconds_per_step']:>9.3f}"
             f"{_gib(many['peak_allocated_gib']):>15}",
             f"scaling {n} GPUs / 1 GPU: {many['tokens_per_s'] / one['tokens_per_s']:.2f}x (target >= {0.9 * n:.1f}x)",
             f"max |loss difference| over {len(many['losses'])} steps: {dloss:.4f}"]
    if single:
        lines.append(f"(1 GPU without accumulation, from the benchmark table: {single:.0f} tok/s)")
    text = "\n".join(lines)
    (out / f"multi-gpu-{n}{tag}.txt").write_text(text + "\n")
    return text


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["variant"] == "baseline"), None)
    qbase = next((r for r in results if r["variant"] == "baseline-qlora"), None)
    head = (f"{'config':<20}{'tok/s':>9}{'s/step':>9}{'alloc GiB':>11}{'rsvd GiB':>10}{'trainable':>12}"
            f"{'speedup':>9}{'max |dloss|':>13}{'step min-max s':>16}")
    lines = [f"device: {results[0]['device']}; batch {BATCH} x ({IMAGE_TOKENS} image + {TEXT_TOKENS} text tokens); "
             f"{WARMUP} warm-up + {TIMED} timed steps", head, "-" * len(head)]
    for r in results:
        ref = qbase if "qlora" in r["variant"] and qbase else base
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        dloss = (max(abs(a - b) for a, b in zip(r["losses"], ref["losses"], strict=False))
                 if ref and r["losses"] and ref["losses"] else float("nan"))
        alloc = f"{r['peak_allocated_gib']:.2f}" if r["peak_allocated_gib"] is not None else "-"
        rsvd = f"{r['peak_reserved_gib']:.2f}" if r["peak_reserved_gib"] is not None else "-"
        steps = r.get("step_seconds") or []
        spread = f"{min(steps):.3f}-{max(steps):.3f}" if steps else "-"
        lines.append(f"{r['variant']:<20}{r['tokens_per_s']:>9.0f}{r['seconds_per_step']:>9.3f}{alloc:>11}{rsvd:>10}"
                     f"{r['trainable_params']:>12,}{speed:>9}{dloss:>13.4f}{spread:>16}")
    lines.append("speedup and loss difference: QLoRA variants against baseline-qlora, the others against baseline")
    return "\n".join(lines)


def varlen_table(results: list[dict]) -> str:
    base = next((r for r in results if r["variant"] == "baseline"), None)
    head = (f"{'config':<24}{'real tok/s':>11}{'samples/s':>10}{'s/step':>9}{'alloc GiB':>11}{'rsvd GiB':>10}"
            f"{'padding':>9}{'speedup':>9}{'mean loss':>11}")
    lines = [f"device: {results[0]['device']}; varlen workload (1-3 images of 224-672 px, 16-1536 text tokens per "
             f"sample); unpacked batch {BATCH}, packed 1 row of {PACKED_LENGTH}; {WARMUP} warm-up + {TIMED} timed "
             "steps", head, "-" * len(head)]
    for r in results:
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        samples_s = r["samples_per_step"] / r["seconds_per_step"]
        lines.append(f"{r['variant']:<24}{r['tokens_per_s']:>11.0f}{samples_s:>10.2f}{r['seconds_per_step']:>9.3f}"
                     f"{_gib(r['peak_allocated_gib']):>11}{_gib(r['peak_reserved_gib']):>10}"
                     f"{r['padding_fraction']:>9.1%}{speed:>9}{r['mean_loss']:>11.4f}")
    lines.append("real tokens: padding not counted; speedup: real tokens/s over baseline (the common recipe); the "
                 "packed rows hold other samples per step, so losses are compared as means over the timed steps")
    return "\n".join(lines)


def tabulate(results: list[dict], workload: str) -> str:
    return varlen_table(results) if workload == "varlen" else table(results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--configs", default="baseline,ours,ours-no-graphs,baseline-qlora,qlora,qlora-graphs")
    p.add_argument("--model-dir", type=Path, default=None, help="where the random model is written (default /tmp)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train-gpu")
    p.add_argument("--tabulate", nargs="+", type=Path, help="print the table of result JSON files and exit")
    p.add_argument("--variant-timeout", type=float, default=300, help="seconds one configuration may take")
    p.add_argument("--multi-gpu", type=int, default=0, metavar="N",
                   help="instead: the multi-GPU check of `ours` (DDP over N GPUs through torchrun vs one GPU with "
                        "N-step accumulation, same global batch): loss curves and scaling")
    p.add_argument("--fsdp", action="store_true", help="with --multi-gpu: FSDP2 (full shard) instead of DDP")
    p.add_argument("--workload", choices=["fixed", "varlen"], default="fixed",
                   help="fixed: every sample one 448x448 image + 512 text tokens; varlen: 1-3 images of 224-672 px "
                        "and 16-1536 text tokens per sample (packed configurations: *-packed)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--sequential", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    model_dir = args.model_dir or Path("/tmp") / f"qwen3-vl-{args.shape}-random"
    if args.tabulate:
        order = list(VARIANTS)
        results = sorted((json.loads(f.read_text()) for f in args.tabulate), key=lambda r: order.index(r["variant"]))
        print(tabulate(results, args.workload))
        return
    if args.worker:
        worker(args.worker, model_dir, args.result, args.grad_accum, args.sequential, args.workload)
        return
    if args.multi_gpu:
        args.out.mkdir(parents=True, exist_ok=True)
        make_model(args.shape, model_dir)
        print(multi_gpu_check(args.multi_gpu, args.shape, model_dir, args.out, args.variant_timeout, args.fsdp))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    make_model(args.shape, model_dir)
    print(f"model ready in {time.time() - started:.0f}s", flush=True)
    results = []
    for variant in args.configs.split(","):
        result_file = args.out / f"{variant}.json"
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--model-dir", str(model_dir),
                                   "--worker", variant, "--result", str(result_file), "--workload", args.workload],
                                  capture_output=True, text=True,
                                  timeout=args.variant_timeout,
                                  env={"CUDA_VISIBLE_DEVICES": "0", **os.environ})
        except subprocess.TimeoutExpired:
            print(f"{variant}: TIMED OUT after {args.variant_timeout:.0f}s", flush=True)
            continue
        if proc.returncode != 0 or not result_file.is_file():
            (args.out / f"{variant}.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
            print(f"{variant}: FAILED ({proc.returncode})\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}", flush=True)
            continue
        results.append(json.loads(result_file.read_text()))
        print(f"{variant}: {results[-1]['tokens_per_s']:.0f} tok/s in {time.time() - t0:.0f}s", flush=True)
    if results:
        text = tabulate(results, args.workload)
        (args.out / "table.txt").write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
