"""Base model loading (bf16/fp32 or 4-bit QLoRA) and the LoRA wrapping."""

from __future__ import annotations

import logging
import os
import re
import warnings

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
    if has_cuda():
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


def apply_kernels(model, config: TrainConfig) -> bool:
    """Liger's fused kernels for Qwen3-VL (RMSNorm, RoPE, linear cross-entropy that never materialises the
    full-vocabulary logits); returns whether they were applied."""
    if config.kernels == "none" or (config.kernels == "auto" and not has_cuda()):
        return False
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl
    except ImportError:
        if config.kernels == "liger":
            raise ImportError("kernels: liger needs the liger-kernel package (pip install liger-kernel)") from None
        return False
    if type(model).__name__ != "Qwen3VLForConditionalGeneration":
        return False
    apply_liger_kernel_to_qwen3_vl(rope=True, rms_norm=True, fused_linear_cross_entropy=True, swiglu=False,
                                   model=model)
    print("kernels: Liger RMSNorm, RoPE and fused linear cross-entropy applied")
    return True


def wrap_lora(model, config: TrainConfig):
    """Apply LoRA; returns (peft model, adapted module names grouped by language/vision/merger)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    apply_kernels(model, config)
    if config.quantization == "4bit" and config.kbit_fp32_upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif config.gradient_checkpointing:
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
    return peft_model, groups
