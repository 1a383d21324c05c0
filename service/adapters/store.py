"""The adapter root: where adapters are found by name, with revisions, and what is checked before a load.

Layout under the configured root (`--adapter-dir`, `/adapters` in the container):

    root/NAME/adapter_config.json          one revision; its id is a fingerprint of the files
    root/NAME/REV/adapter_config.json      several revisions; `NAME` means the newest, `NAME@REV` pins one

Revisions sort naturally (`v2` < `v10`, `2026-01-02` < `2026-01-10`); write a new revision into a new
folder (atomically: write `REV.partial`, then rename) and load it: requests switch to it, the old one is
unloaded once its requests are done. A folder still named `*.partial` (see `artifacts.atomic`) is never
served or listed, as a name or as a revision.

Clients only ever send a name: names are restricted to a safe character set, and every path is resolved
and must stay inside the root, so `..`, absolute paths and symlinks out of the root are refused.

`inspect_adapter` runs the load-time checks that need no engine: the files parse (safetensors headers
and every tensor), the rank is within the engine's maximum, the adapted modules are ones the engine
applies (vision-tower and merger LoRA only with tower LoRA enabled), and the manifest's base fingerprint
matches the served base. Each refusal names its reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from artifacts.atomic import is_partial
from artifacts.manifest import BaseFingerprint, Manifest, ManifestError
from artifacts.modules import GROUPS, module_group
from service.errors import BadRequest, ModelNotFound

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class AdapterRefused(BadRequest):
    """An adapter that exists but must not be served (corrupt, incompatible, failing its golden samples)."""

    def __init__(self, name: str, reasons: list[str]):
        super().__init__(f"adapter '{name}' refused: " + "; ".join(reasons), param="model", code="adapter_refused")
        self.reasons = reasons


def natural_key(text: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def safe_name(name: str) -> bool:
    """An adapter name a client may send: a safe character set, and not an output still being written."""
    return bool(NAME_RE.match(name)) and not is_partial(name)


def safe_rev(rev: str) -> bool:
    return bool(REV_RE.match(rev)) and not is_partial(rev)


def split_model(model: str) -> tuple[str, str | None]:
    """`name` or `name@rev` -> (name, rev or None); refuses anything that is not a safe name."""
    name, sep, rev = model.partition("@")
    if not safe_name(name) or (sep and not safe_rev(rev)):
        raise ModelNotFound.named(model)
    return name, (rev if sep else None)


def pick_revision(name: str, revs: dict, rev: str | None):
    """(revision id, where it is): the given one, or the newest (natural order); 404 when there is none."""
    if not revs:
        raise ModelNotFound.named(name)
    if rev is None:
        rev = max(revs, key=natural_key)
    elif rev not in revs:
        raise ModelNotFound.named(f"{name}@{rev}")
    return rev, revs[rev]


def files_fingerprint(path: Path) -> str:
    """A short id for a flat (single-revision) adapter folder: its config and weights, hashed."""
    digest = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        f = path / name
        if f.is_file():
            digest.update(name.encode())
            with f.open("rb") as fh:  # streamed: weights may be large
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:12]


def is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG).is_file()


class AdapterStore:
    """Finds adapters by name (and revision) under one root; never leaves it."""

    def __init__(self, root: Path | None):
        self.root = root.resolve() if root is not None else None
        self.in_use: set[Path] = set()  # what the registry has loaded (object storage keeps these cached)

    def materialize(self, name: str, rev: str, path: Path) -> Path:
        """The local folder to load a revision from: here, the folder itself."""
        return path

    def _inside(self, path: Path) -> Path | None:
        resolved = path.resolve()
        if self.root is None or not resolved.is_relative_to(self.root):
            return None
        return resolved

    def _folders(self, name: str) -> tuple[Path | None, dict[str, Path]]:
        """(the flat adapter folder, or None; revision id -> folder of the nested layout), unhashed."""
        if self.root is None or not safe_name(name):
            return None, {}
        folder = self._inside(self.root / name)
        if folder is None or not folder.is_dir():
            return None, {}
        if is_adapter_dir(folder):
            return folder, {}
        out = {}
        for sub in folder.iterdir():
            inside = self._inside(sub)
            if inside is not None and safe_rev(sub.name) and inside.is_dir() and is_adapter_dir(inside):
                out[sub.name] = inside
        return None, out

    def exists(self, name: str) -> bool:
        """Whether `name` has a servable adapter under the root (no file is read)."""
        flat, nested = self._folders(name)
        return flat is not None or bool(nested)

    def revisions(self, name: str) -> dict[str, Path]:
        """Revision id -> folder for `name` (empty when absent or unsafe); a flat folder's id hashes its files."""
        flat, nested = self._folders(name)
        return {files_fingerprint(flat): flat} if flat is not None else nested

    def find(self, name: str, rev: str | None = None) -> tuple[str, Path]:
        return pick_revision(name, self.revisions(name), rev)

    def names(self) -> list[str]:
        if self.root is None or not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if self.exists(p.name))


# -- load-time checks (no engine needed) ---------------------------------------------------------------

@dataclass
class AdapterMeta:
    rank: int
    targets: dict[str, list[str]] = field(default_factory=dict)  # language / vision / merger -> modules
    manifest: Manifest | None = None

    def adapts(self, module: str) -> bool:
        """Whether the adapter's weights change `module` (e.g. `lm_head`: LoRA on it, or a retrained copy)."""
        return any(module in modules for modules in self.targets.values())


def _module_of(key: str) -> str:
    """`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight` -> `q_proj`."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_") and i > 0:
            return parts[i - 1]
    return parts[-2] if len(parts) > 1 else key


def inspect_adapter(name: str, path: Path, *, max_rank: int, tower_lora: bool,
                    base_fingerprint: BaseFingerprint | None) -> AdapterMeta:
    """Run the engine-independent load checks; raises AdapterRefused naming every problem found."""
    import torch
    from safetensors import safe_open

    reasons: list[str] = []
    try:
        config = json.loads((path / CONFIG).read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise AdapterRefused(name, [f"{CONFIG} is unreadable: {exc}"]) from None
    weights = path / WEIGHTS
    if not weights.is_file():
        raise AdapterRefused(name, [f"{WEIGHTS} is missing (only safetensors adapters are served)"])
    targets: dict[str, set[str]] = {group: set() for group in GROUPS}
    rank = 0
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            if not keys:
                raise ValueError("it holds no tensors")
            for key in keys:
                tensor = f.get_tensor(key)
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"tensor {key} holds NaN or infinite values")
                if ".lora_A." in key:
                    rank = max(rank, int(tensor.shape[0]))
                targets[module_group(key)].add(_module_of(key))
    except Exception as exc:  # safetensors raises assorted types for truncated or garbled files
        raise AdapterRefused(name, [f"{WEIGHTS} is corrupt: {exc}"]) from None
    if rank == 0:
        reasons.append("no lora_A tensors found")
    elif rank > max_rank:
        reasons.append(f"rank {rank} exceeds the engine's max_lora_rank {max_rank}")
    tower = sorted(targets["vision"] | targets["merger"])
    if tower and not tower_lora:
        reasons.append(f"it adapts vision-tower/merger modules ({', '.join(tower)}) that this server does not "
                       "apply (start it with --enable-tower-lora)")
    manifest = None
    try:
        manifest = Manifest.read(path)
    except ManifestError as exc:
        reasons.append(str(exc))
    if manifest is not None and (mismatch := manifest.base.mismatch(base_fingerprint)):
        reasons.append(mismatch)
    if reasons:
        raise AdapterRefused(name, reasons)
    return AdapterMeta(rank=rank, targets={k: sorted(v) for k, v in targets.items() if v}, manifest=manifest)
