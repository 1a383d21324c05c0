"""A merged model (adapter baked in by `vlora-train merge`) is served simply as the model."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import MODELS
from tests.e2e.server import start_server
from tests.e2e.test_demo_adapters import _served_accuracy
from trainer.data import load_dataset_file


@pytest.fixture(scope="module")
def merged(trained_colors, tmp_path_factory):
    from trainer.merge import merge

    out = tmp_path_factory.mktemp("merged") / "tiny-colors"
    report = merge(str(MODELS / "adapters" / "colors"), str(out), data=str(MODELS / "demo-data/colors/val.jsonl"), k=2)
    assert report["outputs_equal"]
    return out


def test_merged_model_serves_without_adapters(merged, tmp_path):
    server = start_server(["--model", str(merged)], tmp_path / "server.log")
    try:
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["tiny-colors"]
        records = load_dataset_file(MODELS / "demo-data/colors/val.jsonl")[:50]
        accuracy = asyncio.run(_served_accuracy(server.url, "tiny-colors", records, max_tokens=6))
        assert accuracy >= 0.9
    finally:
        assert server.stop() == 0
