"""Adapter registry: model names -> adapters, from `--adapter NAME=PATH` and an adapter directory.

The base model is served under its own name; every adapter under its name, with `parent` = the base.
Adapter names are what clients send in `model`, so they are restricted to a safe character set.
"""

from __future__ import annotations

import re
from pathlib import Path

from service.errors import ModelNotFound

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def collect_adapters(pairs: list[str], adapter_dir: Path | None) -> dict[str, str]:
    """Adapters to load at start: the subfolders of `adapter_dir` that hold an adapter, then `pairs`."""
    found: dict[str, str] = {}
    if adapter_dir is not None:
        if not adapter_dir.is_dir():
            raise ValueError(f"adapter directory '{adapter_dir}' does not exist")
        for sub in sorted(adapter_dir.iterdir()):
            if sub.is_dir() and is_adapter_dir(sub) and NAME_RE.match(sub.name):
                found[sub.name] = str(sub)
    for pair in pairs:
        name, _, path = pair.partition("=")
        name, path = name.strip(), path.strip()
        if not NAME_RE.match(name):
            raise ValueError(f"adapter name '{name}' must match {NAME_RE.pattern}")
        if not is_adapter_dir(Path(path)):
            raise ValueError(f"adapter '{name}': '{path}' holds no adapter_config.json")
        found[name] = path
    return found


class AdapterRegistry:
    """Resolves a request's `model` to None (the base) or an adapter name the engine has loaded."""

    def __init__(self, base_name: str, engine):
        self.base_name = base_name
        self.engine = engine

    def names(self) -> list[str]:
        return [a.name for a in self.engine.adapters()]

    def resolve(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model in self.names():
            return model
        raise ModelNotFound(f"The model '{model}' does not exist", param="model")
