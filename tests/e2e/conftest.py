"""End-to-end fixtures shared between modules."""

from __future__ import annotations

import pytest

from tests.e2e.server import start_server


@pytest.fixture(scope="session")
def demo_server(demo_assets, tmp_path_factory):
    """A plain `vlora-serve` of the tiny model with the demo adapter root, for tests that need no flags
    (they must not depend on the server having seen no traffic before them)."""
    srv = start_server(["--model", str(demo_assets["model"]), "--adapter-dir", str(demo_assets["adapter_dir"])],
                       tmp_path_factory.mktemp("demo-server") / "server.log")
    yield srv
    srv.stop()
