"""Training configuration: one dataclass with help text, checked in `__post_init__`, from YAML + CLI flags.

    vlora-train train --config trainer/configs/qwen3-vl-8b-qlora.yaml --train-data data.jsonl --output-dir out
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

TARGET_PRESETS = {
    # language-model attention + MLP (the default; what vLLM applies)
    "llm": r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
    "llm+vision": r".*(language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
                  r"|visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(linear_fc1|linear_fc2)))",
    "llm+merger": r".*(language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
                  r"|visual\.(merger|deepstack_merger_list\.\d+)\.(linear_fc1|linear_fc2))",
}

LIGER_PARTS = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")


def _f(default: Any, help: str, **kw):  # noqa: A002 - dataclass field with help text
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    base_model: str = _f("models/tiny-qwen3-vl", "Base model directory or hub id.")
    train_data: str = _f("", "Training data: a file (JSONL, JSON, parquet, arrow), files (a,b) or a glob, a "
                         "save_to_disk folder, a folder laid out like a hub dataset, or a hub id (see trainer/sources.py).")
    train_split: str = _f("train", "Split of train_data (folders and hub ids).")
    eval_data: str | None = _f(None, "Validation data (as train_data); default: eval_split of train_data if given, "
                               "else held out from train_data by val_fraction.")
    eval_split: str | None = _f(None, "Split of train_data (or of eval_data) to validate on, e.g. 'validation'.")
    val_fraction: float = _f(0.1, "Fraction of train_data held out when no validation data is given (streaming: "
                             "the first eval_max_samples records are held out instead).")
    format: str = _f("auto", "Record layout: auto (detected and reported), messages, llava, sharegpt or qa.")
    streaming: bool = _f(False, "Train from a stream (datasets' IterableDataset) for data larger than memory; needs "
                         "max_steps; --resume continues from the next unseen record.")
    shuffle_buffer: int = _f(1000, "Streaming: records in the shuffle buffer (deterministic from seed).")
    packing: bool = _f(False, "Pack several whole samples into each row of packed_length tokens (per-sample mRoPE "
                       "positions and attention; no padding but each row's tail; one row shape for CUDA graphs).")
    packed_length: int = _f(4096, "Tokens per packed row; longer samples per truncation.")
    truncation: str = _f("error", "Records over max_length: 'error' (refuse, naming them) or 'drop' (leave them "
                         "out, counted in the manifest). Never cut.")
    validate_limit: int = _f(0, "Check only the first N records before training (0: all; streaming sets that "
                             "are too long to scan first).")
    report_to: str = _f("none", "Trackers: none, or a comma list of tensorboard, mlflow, wandb (the Trainer's "
                        "integrations).")
    run_name: str | None = _f(None, "Run name for the trackers (default: the output directory's name).")
    run_tags: str | None = _f(None, "Comma list of tags for the trackers (MLflow tags, W&B tags).")
    output_dir: str = _f("", "Where the adapter, manifest and reports are written (atomically).")
    # LoRA
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    targets: str = _f("llm", f"Target preset ({', '.join(TARGET_PRESETS)}) or a regex over module names.")
    # Base model
    quantization: str = _f("none", "'none' or '4bit' (QLoRA: bitsandbytes nf4, double quant, bf16 compute).")
    dtype: str = _f("auto", "'auto' (bf16 on GPU, fp32 on CPU), 'bf16', 'fp32'.")
    gradient_checkpointing: bool = _f(True, "Recompute activations in the backward pass (less memory).")
    checkpoint_layers: int = _f(0, "With gradient_checkpointing: checkpoint only the first N language decoder layers "
                                "(0: all); the others keep their activations (faster, more memory).")
    offload_checkpoints: bool = _f(False, "With gradient_checkpointing: keep each checkpointed decoder layer's input in "
                                   "CPU memory until the backward pass needs it (less device memory; eager layers "
                                   "only, lora_dropout: 0; see trainer/offload.py).")
    attn_implementation: str = _f("sdpa", "Attention kernel: 'sdpa', 'eager', or 'varlen' (packed rows: each sample's "
                                  "causal attention only, through PyTorch's FlashAttention-2 variable-length kernel "
                                  "on CUDA; SDPA with the block-diagonal mask elsewhere; see trainer/attention.py).")
    kernels: str = _f("auto", "'auto' (Liger fused RMSNorm/RoPE/SwiGLU/linear cross-entropy on CUDA when liger-kernel "
                      "is installed), 'liger' (required), 'none', or a comma list of Liger parts "
                      f"({', '.join(LIGER_PARTS)}).")
    kbit_fp32_upcast: bool = _f(False, "QLoRA: upcast the frozen 16-bit weights (embeddings, lm_head, vision tower) "
                                "to fp32 as peft's prepare_model_for_kbit_training does (memory heavy).")
    torch_compile: bool = _f(False, "Compile each decoder layer with torch.compile (regional compilation; the first "
                             "steps are slower). Liger then keeps only its fused linear cross-entropy.")
    compile_mode: str = _f("default", "torch.compile mode with torch_compile: 'default', 'reduce-overhead' (CUDA "
                           "graphs: fewer kernel launches from the CPU) or 'max-autotune-no-cudagraphs'.")
    lora_input_cast: bool = _f(False, "Let peft cast each adapted layer's input to the adapter's fp32 dtype during "
                               "mixed-precision training (autocast casts it back to bf16 for the matmul: two copies "
                               "per layer and step for the same result).")
    gc_every: int = _f(50, "During training, run Python's garbage collector every N steps instead of automatically "
                       "(pauses land between steps, not inside them; 0: automatic).")
    cuda_graphs: bool = _f(False, "Capture each language decoder layer's forward and backward as CUDA graphs once per "
                           "batch shape and replay them (one launch per layer instead of hundreds: for steps the CPU "
                           "cannot launch fast enough). Needs CUDA, fixed batch shapes (see pad_to_multiple_of) and "
                           "keeps one step's activations per shape (with gradient_checkpointing: the checkpointed "
                           "layers' inputs, each layer recomputed inside its backward graph); not with torch_compile.")
    fsdp: bool = _f(False, "Shard the model, gradients and optimizer state over the GPUs with FSDP2 (through accelerate; "
                    "launch with accelerate launch or torchrun): for models that do not fit one card. Each process "
                    "loads the model to CPU memory and keeps only its shard on the GPU. Not with cuda_graphs, "
                    "torch_compile or 4-bit.")
    cuda_graph_shapes: int = _f(4, "With cuda_graphs: how many batch shapes are captured; batches of other shapes run "
                                "eagerly.")
    quantize_vision: bool = _f(False, "QLoRA: quantise the vision tower to 4 bits too (less memory).")
    # Optimisation
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    per_device_batch_size: int = _f(2, "Samples per device per step.")
    grad_accum: int = _f(8, "Gradient accumulation steps.")
    epochs: float = _f(1.0, "Training epochs (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Stop after this many optimiser steps (> 0 overrides epochs).")
    warmup_ratio: float = _f(0.03, "Fraction of steps for linear warmup.")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule (any transformers scheduler name).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    optim: str = _f("auto", "'auto' (8-bit AdamW on GPU, torch AdamW on CPU) or a transformers optimizer name.")
    max_grad_norm: float = _f(1.0, "Gradient clipping.")
    # Evaluation, checkpoints
    eval_steps: int = _f(50, "Evaluate every N steps (0: only at the end).")
    save_steps: int = _f(50, "Checkpoint every N steps.")
    save_total_limit: int = _f(2, "Keep at most this many checkpoints.")
    early_stopping_patience: int = _f(0, "Stop after N evaluations without eval-loss improvement (0: off).")
    logging_steps: int = _f(5, "Log the loss every N steps.")
    seed: int = _f(0, "Random seed.")
    # Data
    min_pixels: int | None = _f(None, "Processor min_pixels override.")
    max_pixels: int | None = _f(None, "Processor max_pixels override.")
    max_length: int | None = _f(None, "Longest record in tokens (images counted); longer ones per truncation.")
    pad_to_multiple_of: int | None = _f(None, "Pad each batch to a multiple of this many tokens (few distinct batch "
                                        "shapes, e.g. for cuda_graphs).")
    augment: bool = _f(False, "Random resized crop + colour jitter (no flips).")
    video_fps: float = _f(2.0, "Video parts: frames sampled per second by the model's video processor.")
    video_max_frames: int = _f(32, "Video parts: frames sampled from one video at most.")
    num_workers: int = _f(0, "DataLoader worker processes.")
    golden_samples: int = _f(4, "Validation samples stored in the manifest for load-time checks.")
    eval_max_samples: int = _f(200, "Validation samples used by the final generation eval.")
    eval_max_new_tokens: int = _f(32, "Max new tokens in the final generation eval.")
    eval_backend: str = _f("auto", "Generation for the final eval: 'vllm' (vLLM's offline engine, the serving engine), "
                           "'transformers', or 'auto' (vllm when installed).")
    # Resume
    resume: bool = _f(False, "Continue from the newest checkpoint of an interrupted run in output_dir.")

    def __post_init__(self) -> None:
        problems = []
        if self.kernels not in ("auto", "liger", "none") and not set(self.liger_parts) <= set(LIGER_PARTS):
            problems.append(f"kernels must be auto, liger, none or a comma list of {', '.join(LIGER_PARTS)}, "
                            f"not {self.kernels!r}")
        if self.quantization not in ("none", "4bit"):
            problems.append(f"quantization must be 'none' or '4bit', not {self.quantization!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            problems.append(f"dtype must be auto, bf16 or fp32, not {self.dtype!r}")
        if self.lora_r < 1 or self.lora_alpha < 1:
            problems.append("lora_r and lora_alpha must be positive")
        if not 0 <= self.lora_dropout < 1:
            problems.append("lora_dropout must be in [0, 1)")
        if self.targets not in TARGET_PRESETS and not any(c in self.targets for c in ".*\\|("):
            problems.append(f"unknown target preset {self.targets!r}; use one of {sorted(TARGET_PRESETS)} "
                            "or a module-name regex")
        if not 0 <= self.val_fraction < 1:
            problems.append("val_fraction must be in [0, 1)")
        if self.per_device_batch_size < 1 or self.grad_accum < 1:
            problems.append("per_device_batch_size and grad_accum must be >= 1")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune-no-cudagraphs"):
            problems.append(f"compile_mode must be default, reduce-overhead or max-autotune-no-cudagraphs, "
                            f"not {self.compile_mode!r}")
        if self.cuda_graphs and self.gradient_checkpointing and self.lora_dropout:
            problems.append("cuda_graphs with gradient_checkpointing needs lora_dropout: 0 (a capture cannot replay "
                            "the forward's dropout masks in the recompute)")
        if self.checkpoint_layers < 0:
            problems.append("checkpoint_layers must be >= 0")
        if self.offload_checkpoints:
            if not self.gradient_checkpointing:
                problems.append("offload_checkpoints needs gradient_checkpointing: true (it offloads the checkpoints)")
            if self.cuda_graphs:
                problems.append("offload_checkpoints needs cuda_graphs: false (a capture owns its inputs' memory)")
            if self.lora_dropout:
                problems.append("offload_checkpoints needs lora_dropout: 0 (the recompute does not replay the "
                                "forward's dropout masks)")
            if self.fsdp:
                problems.append("offload_checkpoints does not apply with fsdp (FSDP checkpoints its layers itself)")
        if self.cuda_graphs and self.torch_compile:
            problems.append("cuda_graphs cannot be combined with torch_compile (set one of them false)")
        if self.fsdp and (self.cuda_graphs or self.torch_compile or self.quantization == "4bit"):
            problems.append("fsdp cannot be combined with cuda_graphs, torch_compile or quantization: 4bit")
        if self.fsdp and "bnb" in self.optim:
            problems.append(f"optim {self.optim} (bitsandbytes) cannot update FSDP's sharded parameters; use "
                            "adamw_torch_fused or auto")
        if self.cuda_graph_shapes < 1:
            problems.append("cuda_graph_shapes must be >= 1")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            problems.append("pad_to_multiple_of must be >= 1")
        if self.gc_every < 0:
            problems.append("gc_every must be >= 0")
        if self.format not in ("auto", "messages", "llava", "sharegpt", "qa"):
            problems.append(f"format must be auto, messages, llava, sharegpt or qa, not {self.format!r}")
        if self.eval_backend not in ("auto", "vllm", "transformers"):
            problems.append(f"eval_backend must be auto, vllm or transformers, not {self.eval_backend!r}")
        if self.truncation not in ("error", "drop"):
            problems.append(f"truncation must be 'error' or 'drop', not {self.truncation!r}")
        if self.packing and self.packed_length < 64:
            problems.append("packed_length must be >= 64")
        if self.streaming and self.max_steps <= 0:
            problems.append("streaming needs max_steps (a stream has no length to count epochs by)")
        unknown_trackers = sorted(set(self.trackers) - {"tensorboard", "mlflow", "wandb"})
        if unknown_trackers:
            problems.append(f"report_to: unknown tracker(s) {', '.join(unknown_trackers)} (use none, tensorboard, "
                            "mlflow, wandb)")
        if self.learning_rate <= 0:
            problems.append("learning_rate must be positive")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def liger_parts(self) -> tuple[str, ...]:
        """The Liger kernels asked for (before CUDA/compile/installation decide what is applied)."""
        if self.kernels == "none":
            return ()
        if self.kernels in ("auto", "liger"):
            return LIGER_PARTS
        return tuple(p.strip() for p in self.kernels.split(",") if p.strip())

    @property
    def longest(self) -> int | None:
        """Tokens a record may have: max_length, and a packed row's length when packing."""
        limits = [n for n in (self.max_length, self.packed_length if self.packing else None) if n]
        return min(limits) if limits else None

    @property
    def trackers(self) -> list[str]:
        return [t.strip() for t in self.report_to.split(",") if t.strip() and t.strip() != "none"]

    @property
    def target_regex(self) -> str:
        return TARGET_PRESETS.get(self.targets, self.targets)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def saved_with(cls, adapter_dir: str | Path) -> dict:
        """The training config saved beside an adapter (`train_config.json`), or {} when there is none."""
        import json

        saved = Path(adapter_dir) / "train_config.json"
        return json.loads(saved.read_text()) if saved.is_file() else {}

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
        """YAML (optional) then overrides (CLI flags); unknown keys are refused with the valid ones named."""
        values: dict = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"config file '{path}' does not exist")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"config file '{path}' must be a mapping of keys to values")
            values.update(loaded)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            import difflib

            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, cls.field_names(), 1)) else k
                     for k in unknown]
            raise ValueError(f"unknown config key(s): {', '.join(hints)}")
        return cls(**values)
