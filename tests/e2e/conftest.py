"""End-to-end fixtures shared between modules."""

from __future__ import annotations

import pytest

from tests.e2e.server import MAX_BODY_BYTES, MAX_IMAGE_BYTES, MAX_IMAGES_PER_REQUEST, MAX_PIXELS, start_server


@pytest.fixture(scope="session")
def demo_server(demo_assets, tmp_path_factory):
    """One `vlora-serve` of the tiny model with the demo adapter root, shared by the modules that need no other
    flags than these: images by URL from 127.0.0.1 only, and the caps of tests/e2e/server.py. Tests must not depend on the
    server having seen no traffic before them. It must exit 0 when stopped (a clean drain)."""
    srv = start_server(
        ["--model", str(demo_assets["model"]), "--adapter-dir", str(demo_assets["adapter_dir"]),
         "--image-url-allowlist", "127.0.0.1/32"],
        tmp_path_factory.mktemp("demo-server") / "server.log",
        env={"VLORA_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES), "VLORA_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
             "VLORA_MAX_IMAGE_PIXELS": str(MAX_PIXELS), "VLORA_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES_PER_REQUEST)},
    )
    yield srv
    assert srv.stop() == 0, srv.log_tail()
