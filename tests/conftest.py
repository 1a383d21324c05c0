"""Shared fixtures: the embedded tiny model and demo adapters, built once per checkout under models/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("VLORA_TEST_MODELS", ROOT / "models"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_assets() -> dict[str, Path]:
    """The tiny model and two random (untrained) adapters, demo-a and demo-b."""
    from trainer.demo import ensure_random_adapters, ensure_tiny_model

    model = ensure_tiny_model(MODELS)
    adapters = ensure_random_adapters(MODELS / "test-adapters", model)
    return {"model": model, "adapter_dir": MODELS / "test-adapters", **adapters}


@pytest.fixture(scope="session")
def tiny_processor(demo_assets):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(demo_assets["model"])
