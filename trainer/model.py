"""Base model loading (bf16/fp32 or 4-bit QLoRA), the LoRA wrapping, and the Trainer's FSDP arguments.

Speed-ups that act on the loaded model (kernels, compile, CUDA graphs) are `trainer/speedups.py`'s."""

from __future__ import annotations

import logging
import os
import re
import warnings

from artifacts.modules import serving_notes, split_targets
from trainer.config import TrainConfig

logger = logging.getLogger("vlora.trainer")


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


class ModelNotFound(ValueError):
    pass


def resolve_base_model(name: str) -> None:
    """The base model exists: a local folder, or a hub id the hub (or its cache) answers; else one line saying
    where it was looked for (a relative path is relative to the current directory, not to the recipe)."""
    from pathlib import Path

    from transformers import AutoConfig

    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFound(f"base model folder {local.resolve()} has no config.json")
        return
    try:
        AutoConfig.from_pretrained(name)
    except Exception:  # OSError, hub errors, offline mode: the message below says all that helps
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "TRUE") else ""
        raise ModelNotFound(
            f"base model '{name}' was found neither locally (resolved: {local.resolve()}) nor on a reachable "
            f"hub{offline}; give an absolute path, a path relative to the current directory, or a hub id"
        ) from None


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
    if config.attn_implementation == "varlen":
        from trainer.attention import register

        register()
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


def wrap_lora(model, config: TrainConfig):
    """Apply LoRA (after k-bit preparation or gradient checkpointing, as configured); returns (peft model,
    adapted module names grouped by language/vision/merger)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.quantization == "4bit" and config.kbit_fp32_upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif config.gradient_checkpointing and not config.fsdp:  # FSDP checkpoints its wrapped layers itself
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if config.gradient_checkpointing and config.checkpoint_layers and not config.fsdp:
        from trainer.layers import decoder_layers

        for layer in decoder_layers(model)[config.checkpoint_layers:]:  # these keep their activations
            layer.gradient_checkpointing = False
    if config.gradient_checkpointing and config.offload_checkpoints and not config.fsdp:
        from trainer.layers import decoder_layers
        from trainer.offload import offload_checkpoints

        offload_checkpoints(decoder_layers(model))
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
    for note in serving_notes(groups):
        logger.warning(note)
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
