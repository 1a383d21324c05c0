"""Shared fixtures: the embedded tiny model and demo adapters, built once per checkout under models/.

The trained demo adapters take minutes to build on 2 cores (the shapes adapter trains on one core for most
of it), so in a checkout without them the build starts in the background once collection has found a test
that needs them, and the modules that need a trained adapter run after the others (those that need both
last): the rest of the suite runs meanwhile.
`trained_colors` waits for the colors adapter only (it is done in about a minute), `trained_demo` for both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("VLORA_TEST_MODELS", ROOT / "models"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAINED_TASKS = ("colors", "shapes")
TRAINED_FIXTURES = ("trained_demo", "trained_colors")
_BUILD = pytest.StashKey[subprocess.Popen]()


def _trained(task: str) -> bool:
    # an adapter's folder appears complete (its output is written aside, then renamed)
    return (MODELS / "adapters" / task / "adapter_config.json").is_file() and \
        (MODELS / "demo-data" / task / "val.jsonl").is_file()


def pytest_collection_modifyitems(session, config, items):
    """Modules that need a trained adapter run after the others, those that need both last (their order kept
    within each part): the build runs while the rest of the suite does, instead of a test waiting for it."""
    def part(module) -> int:
        needs = {name for item in items if item.module is module for name in item.fixturenames}
        return 2 if "trained_demo" in needs else 1 if "trained_colors" in needs else 0

    parts = {module: part(module) for module in {item.module for item in items}}
    items.sort(key=lambda item: parts[item.module])  # stable: the order within each part is kept


def pytest_collection_finish(session):
    if all(_trained(task) for task in TRAINED_TASKS) or not any(
            name in item.fixturenames for item in session.items for name in TRAINED_FIXTURES):
        return
    from trainer.demo import ensure_tiny_model

    ensure_tiny_model(MODELS)  # here first: the build and the demo_assets fixture would both make it
    log = open(MODELS / "demo-build.log", "wb")
    session.config.stash[_BUILD] = subprocess.Popen(
        [sys.executable, "-m", "trainer", "demo-assets", "--out", str(MODELS)], stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)


def pytest_sessionfinish(session):
    build = session.config.stash.get(_BUILD, None)
    if build is not None and build.poll() is None:  # not needed after all (or interrupted): its output resumes
        os.killpg(build.pid, signal.SIGTERM)
        build.wait(60)


def _wait_trained(config, tasks: tuple[str, ...]) -> Path:
    build = config.stash.get(_BUILD, None)
    if build is None:
        from trainer.demo import ensure_demo_assets

        ensure_demo_assets(MODELS)  # made here if absent (nothing collected asked for it early)
        return MODELS
    while build.poll() is None and not all(_trained(task) for task in tasks):
        time.sleep(1)
    if build.poll() not in (None, 0):
        log = (MODELS / "demo-build.log").read_text(errors="replace").splitlines()[-30:]
        pytest.fail("building the trained demo assets failed:\n" + "\n".join(log), pytrace=False)
    return MODELS


@pytest.fixture(scope="session")
def trained_colors(request) -> Path:
    """MODELS with the trained colors adapter and its data."""
    return _wait_trained(request.config, ("colors",))


@pytest.fixture(scope="session")
def trained_demo(request) -> Path:
    """MODELS with both trained demo adapters (colors, shapes) and their data."""
    return _wait_trained(request.config, TRAINED_TASKS)


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
