"""Base model loading (bf16/fp32 or 4-bit QLoRA) and the LoRA wrapping."""

from __future__ import annotations

import gc
import logging
import os
import re
import warnings
from contextlib import contextmanager

from trainer.config import TrainConfig

logger = logging.getLogger("vlora.trainer")

# What vLLM applies when serving: language-model linear layers. Vision-tower and merger LoRA weights are
# ignored unless the engine runs with tower/connector LoRA enabled.
VISION_RE = re.compile(r"(^|\.)visual\.blocks\.")
MERGER_RE = re.compile(r"(^|\.)visual\.(merger|deepstack_merger_list)")


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_dtype(config: TrainConfig):
    import torch

    if config.dtype == "bf16" or (config.dtype == "auto" and has_cuda()):
        return torch.bfloat16
    return torch.float32


def resolve_optim(config: TrainConfig) -> str:
    """The optimizer name for `optim: auto`: bitsandbytes' 8-bit AdamW on CUDA, except under FSDP (it cannot
    update sharded DTensor parameters: fused torch AdamW there), torch AdamW on CPU."""
    if config.optim != "auto":
        return config.optim
    return "adamw_torch_fused" if config.fsdp else "adamw_bnb_8bit" if has_cuda() else "adamw_torch"


def base_of(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _inner(model):
    base = base_of(model)
    return getattr(base, "model", base)


def decoder_layers(model) -> list:
    """The language model's decoder layers of a (peft-wrapped) Qwen3-VL-style model, or []."""
    return list(getattr(getattr(_inner(model), "language_model", None), "layers", []))


def load_processor(config: TrainConfig):
    from transformers import AutoProcessor

    kwargs = {}
    if config.min_pixels:
        kwargs["min_pixels"] = config.min_pixels
    if config.max_pixels:
        kwargs["max_pixels"] = config.max_pixels
    return AutoProcessor.from_pretrained(config.base_model, **kwargs)


def load_base(config: TrainConfig, dtype=None):
    import torch
    from transformers import AutoModelForImageTextToText

    dtype = dtype or resolve_dtype(config)
    kwargs: dict = {"dtype": dtype, "attn_implementation": config.attn_implementation}
    if config.quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            # By default the vision tower stays in 16 bits (small; quantising it costs accuracy).
            llm_int8_skip_modules=["lm_head"] if config.quantize_vision else ["visual", "lm_head"],
        )
        kwargs["dtype"] = torch.bfloat16
    if has_cuda() and not config.fsdp:  # FSDP moves each process's shard to its GPU when it wraps the model
        # Under accelerate/torchrun each process loads onto its own GPU (LOCAL_RANK), not all onto GPU 0.
        local_rank = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        torch.cuda.set_device(local_rank)
        kwargs["device_map"] = {"": local_rank}
    return AutoModelForImageTextToText.from_pretrained(config.base_model, **kwargs)


def split_targets(module_names: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {"language": [], "vision": [], "merger": []}
    for name in module_names:
        key = "merger" if MERGER_RE.search(name) else "vision" if VISION_RE.search(name) else "language"
        groups[key].append(name)
    return groups


def serving_warnings(groups: dict[str, list[str]]) -> list[str]:
    notes = []
    for part in ("vision", "merger"):
        if groups[part]:
            notes.append(f"{len(groups[part])} {part} module(s) are adapted; vLLM ignores these LoRA weights unless "
                         "the server enables tower/connector LoRA (enable_tower_connector_lora)")
    return notes


def apply_kernels(model, config: TrainConfig) -> tuple[str, ...]:
    """Liger's fused kernels for Qwen3-VL's language model (RMSNorm, RoPE, SwiGLU, and the linear
    cross-entropy that never materialises the full-vocabulary logits); returns the parts applied. With
    `torch_compile` only the fused cross-entropy is kept: it sits outside the compiled decoder layers, and
    inductor fuses the norms, RoPE and SwiGLU inside them itself (dynamo cannot trace Liger's RMSNorm)."""
    parts = config.liger_parts
    if not parts or (config.kernels == "auto" and not has_cuda()):
        return ()
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl
    except ImportError:
        if config.kernels != "auto":
            raise ImportError(f"kernels: {config.kernels} needs the liger-kernel package (pip install liger-kernel)") \
                from None
        return ()
    if type(model).__name__ != "Qwen3VLForConditionalGeneration":
        return ()
    if config.torch_compile:
        parts = tuple(p for p in parts if p == "fused_linear_cross_entropy")
    if config.fsdp:  # the fused loss reads lm_head's weight without calling the module: FSDP would not gather it
        parts = tuple(p for p in parts if p != "fused_linear_cross_entropy")
    apply_liger_kernel_to_qwen3_vl(rope="rope" in parts, rms_norm="rms_norm" in parts,
                                   fused_linear_cross_entropy="fused_linear_cross_entropy" in parts, model=model)
    if "swiglu" in parts:
        # Liger's Qwen3-VL patch ignores swiglu; bind its fused SiLU*mul forward to each loaded MLP (the
        # gate/up/down projections stay the model's own modules, so LoRA still wraps them).
        from types import MethodType

        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

        for layer in model.model.language_model.layers:
            if getattr(layer.mlp.config, "hidden_act", None) in ("silu", "swish"):
                layer.mlp.forward = MethodType(LigerSwiGLUMLP.forward, layer.mlp)
    if parts:
        print(f"kernels: Liger {', '.join(parts)} applied")
    return parts


def compile_layers(model, mode: str = "default") -> int:
    """Regional torch.compile: each language decoder layer and vision block is compiled in place (identical
    layers share one graph, so compiling is quick and the loss and lm_head stay eager); returns the count."""
    layers = decoder_layers(model) + list(getattr(getattr(_inner(model), "visual", None), "blocks", []))
    for layer in layers:
        layer.compile(mode=mode)
    print(f"torch.compile ({mode}): {len(layers)} layers compiled regionally")
    return len(layers)


def wrap_lora(model, config: TrainConfig):
    """Apply LoRA; returns (peft model, adapted module names grouped by language/vision/merger)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    apply_kernels(model, config)
    if config.quantization == "4bit" and config.kbit_fp32_upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif config.gradient_checkpointing and not config.fsdp:  # FSDP checkpoints its wrapped layers itself
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    regex = re.compile(config.target_regex)
    targets = [n for n, _ in model.named_modules() if regex.fullmatch(n)]
    if not targets:
        raise ValueError(f"target pattern {config.targets!r} matches no module of {config.base_model}")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      use_rslora=config.use_rslora, target_modules=config.target_regex, bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, lora)
    groups = split_targets(targets)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%); "
          f"adapted modules: {len(groups['language'])} language, {len(groups['vision'])} vision, "
          f"{len(groups['merger'])} merger")
    for note in serving_warnings(groups):
        logger.warning(note)
        print(f"WARNING: {note}")
    if config.torch_compile:
        compile_layers(peft_model, config.compile_mode)
    if config.cuda_graphs:
        from trainer.graphs import graph_layers

        graph_layers(peft_model, config.cuda_graph_shapes)
    return peft_model, groups


def fsdp_arguments(model, config: TrainConfig) -> dict:
    """TrainingArguments for FSDP2 through accelerate: each decoder layer and vision block its own unit
    (full shard), activation checkpointing there when gradient_checkpointing is on; {} without fsdp."""
    if not config.fsdp:
        return {}
    names = sorted({type(m).__name__ for m in model.modules()
                    if type(m).__name__.endswith(("DecoderLayer", "VisionBlock"))})
    if not names:
        raise ValueError("fsdp: no decoder layer or vision block class found to shard by")
    # The string form is what transformers < 5.20 (pinned) documents; it is what the benchmark measured.
    return {"fsdp": "full_shard auto_wrap",
            "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": names,
                            "activation_checkpointing": config.gradient_checkpointing}}


@contextmanager
def training_speedups(model, config: TrainConfig, autocast: bool):
    """While the Trainer runs under autocast (bf16 mixed precision), peft's cast of each adapted layer's bf16
    input to the fp32 adapter dtype is skipped: autocast casts it back to bf16 for the matmul anyway, so the
    result is the same and two copies per layer and step go. Outside training (e.g. the generation eval) the
    casts come back. (Garbage collection between steps is gc_callback's, a Trainer callback.)"""
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model, active=autocast and not config.lora_input_cast):
        yield


def gc_callback(config: TrainConfig):
    """A TrainerCallback collecting garbage every `gc_every` steps with automatic collection off (a full
    collection over the autograd graph's many objects otherwise lands inside a step); None when 0."""
    if not config.gc_every:
        return None
    from transformers import TrainerCallback

    every = config.gc_every

    class GcEverySteps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            gc.collect()
            gc.disable()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % every == 0:
                gc.collect(1)

        def on_train_end(self, args, state, control, **kw):
            gc.enable()

    return GcEverySteps()
