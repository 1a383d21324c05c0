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
    from trainer.cli import DEMO_ADAPTERS, ensure_demo_assets

    ensure_demo_assets(MODELS)
    assets = {"model": MODELS / "tiny-qwen3-vl", "adapter_dir": MODELS / "adapters"}
    assets.update({name: MODELS / "adapters" / name for name in DEMO_ADAPTERS})
    return assets


@pytest.fixture(scope="session")
def tiny_processor(demo_assets):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(demo_assets["model"])
