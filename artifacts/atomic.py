"""Atomic outputs: a directory is built under `NAME.partial` and renamed to `NAME` only when complete.

This is the one `.partial` scheme of the project. The trainer works in `OUTPUT.partial/` (resumable with
`--resume`); merges, tiny models and demo data are built there by `atomic_dir`; operators write a new adapter
revision as `REV.partial/` and rename it. The adapter store never serves or lists a `.partial` folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def partial_path(out: str | Path) -> Path:
    """Where `out` is built before it is complete."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def is_partial(name: str) -> bool:
    """Whether a folder name is an output still being written (never to be served or listed)."""
    return name.endswith(PARTIAL_SUFFIX)


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield `out.partial`, which becomes `out` when the block succeeds (and is removed if it fails).

    A leftover `out.partial` (an interrupted build) is replaced only with `overwrite`, like `out` itself."""
    out = Path(out)
    work = partial_path(out)
    for existing, what in ((out, "exists"), (work, "is left from an interrupted build")):
        if existing.exists():
            if not overwrite:
                raise FileExistsError(f"{existing} {what}; remove it (or overwrite) or choose another directory")
            shutil.rmtree(existing)
    work.mkdir(parents=True)
    try:
        yield work
        work.chmod(0o755)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
