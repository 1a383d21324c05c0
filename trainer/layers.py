"""Where the layers are in a (peft-wrapped) Qwen3-VL-style model: decoder layers, vision blocks."""

from __future__ import annotations


def base_of(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _inner(model):
    base = base_of(model)
    return getattr(base, "model", base)


def decoder_layers(model) -> list:
    """The language model's decoder layers, or []."""
    return list(getattr(getattr(_inner(model), "language_model", None), "layers", []))


def vision_blocks(model) -> list:
    """The vision tower's blocks, or []."""
    return list(getattr(getattr(_inner(model), "visual", None), "blocks", []))
