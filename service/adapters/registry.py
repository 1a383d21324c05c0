"""Adapter registry: which adapter revision a request's `model` means, and the adapter lifecycle.

Names come from two places: `--adapter NAME=PATH` (operator-configured paths, loaded at start) and the
adapter root (`--adapter-dir`, see `store.py`), whose adapters load at start (`--preload all`) or on the
first request that names them (`--preload none`), exactly once even under concurrent first requests.

Each loaded revision is its own engine adapter (`NAME@REV`, a fresh engine id), so prefixes cached for
one revision are never reused for another. Loading a new revision of a loaded name switches new requests
to it; requests already running on the old revision finish on it, and the old revision is unloaded when
the last of them ends. Loads run the checks of `store.inspect_adapter`, then the golden samples of the
adapter's manifest (a load-time canary): a failing adapter is refused with the reason and the previous
revision stays. Start adapters whose golden samples fail are kept, but readiness reports them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from artifacts.manifest import BaseFingerprint, Manifest
from service.adapters.s3store import S3AdapterStore
from service.adapters.store import (
    NAME_RE,
    AdapterMeta,
    AdapterRefused,
    AdapterStore,
    files_fingerprint,
    inspect_adapter,
    is_adapter_dir,
    safe_name,
    split_model,
)
from service.engine.base import Engine, EngineEvents, engine_adapter_name
from service.errors import AdapterUnavailable, ModelNotFound

# (engine adapter name, adapter folder, its manifest) -> problems found replaying its golden samples
GoldenCheck = Callable[[str, Path, Manifest], Awaitable[list[str]]]

logger = logging.getLogger("vlora.adapters")


def parse_adapter_pairs(pairs: list[str]) -> dict[str, str]:
    """`--adapter NAME=PATH` pairs -> {name: path}; refuses unsafe names and folders without an adapter."""
    found: dict[str, str] = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        name, path = name.strip(), path.strip()
        if not safe_name(name):
            raise ValueError(f"adapter name '{name}' must match {NAME_RE.pattern} (and not end in .partial)")
        if not is_adapter_dir(Path(path)):
            raise ValueError(f"adapter '{name}': '{path}' holds no adapter_config.json")
        found[name] = path
    return found


def collect_adapters(pairs: list[str], adapter_dir: Path | None) -> dict[str, str]:
    """`--adapter NAME=PATH` pairs (validated) plus, for the rank estimate, the newest revision of every
    adapter under `adapter_dir`."""
    found: dict[str, str] = {}
    if adapter_dir is not None:
        if not adapter_dir.is_dir():
            raise ValueError(f"adapter directory '{adapter_dir}' does not exist")
        store = AdapterStore(adapter_dir)
        for name in store.names():
            found[name] = str(store.find(name)[1])
    found.update(parse_adapter_pairs(pairs))
    return found


@dataclass
class Revision:
    name: str
    rev: str
    path: str
    source: str  # "config" (--adapter), "root" (adapter directory)
    meta: AdapterMeta | None = None
    loaded_at: float = 0.0
    load_seconds: float = 0.0
    in_flight: int = 0
    retired: bool = False
    golden_problems: list[str] = field(default_factory=list)
    stamp: tuple = ()  # its files (name, size, mtime) when loaded: see AdapterRegistry.check_files
    content: str = ""  # its config and weights hashed when loaded (files_fingerprint)
    checked: tuple = ()  # the last changed stamp whose content check_files hashed
    broken: str | None = None  # why it answers errors: its files were removed or changed on disk

    @property
    def key(self) -> str:
        """The engine's adapter name: one per revision."""
        return engine_adapter_name(self.name, self.rev)


class AdapterRegistry:
    def __init__(self, base_name: str, engine: Engine, *, golden_check: GoldenCheck, events: EngineEvents,
                 store: AdapterStore | S3AdapterStore | None = None, configured: dict[str, str] | None = None,
                 tower_lora: bool = False, base_fingerprint: BaseFingerprint | None = None, preload: str = "all"):
        self.base_name = base_name
        self.engine = engine
        self.golden_check = golden_check
        self.events = events
        self.store = store or AdapterStore(None)
        self.configured = dict(configured or {})
        self.tower_lora = tower_lora
        self.base_fingerprint = base_fingerprint
        self.preload = preload
        self.active: dict[str, Revision] = {}  # name -> the revision new requests get
        self.resident: dict[str, Revision] = {}  # engine key -> every loaded revision
        self._loading: dict[str, asyncio.Future] = {}
        self._lock = asyncio.Lock()
        self._unloads: set[asyncio.Task] = set()

    # queries ------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.active)

    def available(self) -> list[str]:
        """Names that can be served: loaded, configured, or under the root."""
        return sorted(set(self.active) | set(self.configured) | set(self.store.names()))

    def golden_failures(self) -> dict[str, list[str]]:
        return {r.name: r.golden_problems for r in self.active.values() if r.golden_problems}

    def known(self, model: str) -> bool:
        name = model.partition("@")[0]
        return name in self.active or name in self.configured or self.store.exists(name)

    # start --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the configured adapters (and, with preload=all, the root's); golden failures are kept."""
        for name, path in self.configured.items():
            await self._load(name, files_fingerprint(Path(path)), Path(path), "config", activate=True,
                             refuse_on_golden=False)
        if self.preload == "all":
            for name in self.store.names():
                if name not in self.active:
                    rev, path = self.store.find(name)
                    await self._load(name, rev, path, "root", activate=True, refuse_on_golden=False)

    # resolution ---------------------------------------------------------------------------------

    async def resolve(self, model: str, allowed: Callable[[str], bool] | None = None) -> Revision | None:
        """The revision serving `model` (None = the base), loading it first if it is under the root."""
        if model == self.base_name:
            return None
        name, rev = split_model(model)
        if allowed is not None and not allowed(name):
            raise ModelNotFound.named(model)
        current = self.active.get(name)
        if current is not None and (rev is None or rev == current.rev):
            if current.broken:
                raise AdapterUnavailable(f"adapter '{name}' is unavailable: {current.broken}; restore its files or "
                                         "load a new revision", headers={"Retry-After": "30"})
            return current
        if rev is not None and engine_adapter_name(name, rev) in self.resident:
            return self.resident[engine_adapter_name(name, rev)]
        if name in self.configured:
            raise ModelNotFound.named(model)
        found_rev, path = self.store.find(name, rev)
        return await self._load(name, found_rev, path, "root", activate=rev is None or name not in self.active)

    def acquire(self, revision: Revision | None) -> None:
        if revision is not None:
            revision.in_flight += 1

    def release(self, revision: Revision | None) -> None:
        if revision is None:
            return
        revision.in_flight -= 1
        if revision.retired and revision.in_flight <= 0:
            self._schedule_unload(revision)

    # lifecycle ----------------------------------------------------------------------------------

    async def load(self, name: str, rev: str | None = None) -> Revision:
        """Admin load: the newest (or the given) revision from the root becomes the active one."""
        if not safe_name(name):
            raise ModelNotFound.named(name, param="name")
        found_rev, path = self.store.find(name, rev)
        return await self._load(name, found_rev, path, "root", activate=True)

    async def unload(self, name: str) -> list[Revision]:
        """Retire every revision of `name` (each unloads when its last request ends)."""
        async with self._lock:
            revisions = [r for r in self.resident.values() if r.name == name]
            if not revisions:
                raise ModelNotFound(f"adapter '{name}' is not loaded", param="name")
            self.active.pop(name, None)
            for r in revisions:
                self._retire(r)
        return revisions

    async def _load(self, name: str, rev: str, path: Path, source: str, *, activate: bool,
                    refuse_on_golden: bool = True) -> Revision:
        key = engine_adapter_name(name, rev)
        pending = self._loading.get(key)
        if pending is not None:  # a concurrent first request: wait for the same load
            revision = await asyncio.shield(pending)
        else:
            future = asyncio.get_running_loop().create_future()
            self._loading[key] = future
            try:
                revision = await self._load_once(name, rev, path, source, refuse_on_golden)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody else needs to
                raise
            else:
                future.set_result(revision)
            finally:
                self._loading.pop(key, None)
        if activate:
            async with self._lock:
                old = self.active.get(name)
                if revision.retired:  # re-activated before its unload ran
                    revision.retired = False
                self.active[name] = revision
                if old is not None and old is not revision:
                    logger.info("adapter revision switched", extra={"adapter": name, "from": old.rev, "to": rev})
                    self._retire(old)
        return revision

    async def _load_once(self, name: str, rev: str, path: Path, source: str, refuse_on_golden: bool) -> Revision:
        key = engine_adapter_name(name, rev)
        if key in self.resident:
            return self.resident[key]
        started = time.perf_counter()
        if source == "root":  # a local root gives its folder; object storage downloads into its cache first
            path = Path(await asyncio.to_thread(self.store.materialize, name, rev, path))
        revision = Revision(name=name, rev=rev, path=str(path), source=source)
        # Taken before the engine reads the files: a change while it loads shows as a change (check_files).
        revision.stamp = files_stamp(Path(path))
        revision.content = await asyncio.to_thread(files_fingerprint, Path(path))
        try:
            revision.meta = await asyncio.to_thread(
                inspect_adapter, name, path, max_rank=self.engine.max_lora_rank, tower_lora=self.tower_lora,
                base_fingerprint=self.base_fingerprint)
        except AdapterRefused:
            self.events.adapter_event("load_failed", key, None)
            raise
        await self.engine.load_adapter(key, str(path))
        manifest = revision.meta.manifest
        if manifest is not None and manifest.golden_samples:
            problems = await self.golden_check(key, Path(path), manifest)
            if problems and refuse_on_golden:
                await self.engine.unload_adapter(key)
                self.events.adapter_event("load_failed", key, None)
                raise AdapterRefused(name, [f"golden samples failed: {p}" for p in problems])
            revision.golden_problems = problems
        revision.loaded_at = time.time()
        revision.load_seconds = time.perf_counter() - started
        self.resident[key] = revision
        self.store.in_use.add(Path(path))
        logger.info("adapter ready", extra={"adapter": name, "revision": rev, "source": source,
                                            "load_ms": round(revision.load_seconds * 1000, 1)})
        return revision

    def check_files(self) -> None:
        """An active adapter whose folder was removed, or whose files changed since it was loaded, answers a
        clear 503 (the engine's copy is not what the root now holds; the next load would read the new files)
        until they are back or a new revision is loaded; the others are unaffected. Files rewritten with the
        bytes the engine loaded (a restore from backup, a re-sync) are the same adapter: it serves again. Only
        a changed stamp is hashed, once per change."""
        for revision in list(self.active.values()):  # a snapshot: this runs in a thread
            path = Path(revision.path)
            stamp = files_stamp(path)
            if stamp and stamp != revision.stamp and stamp != revision.checked:
                revision.checked = stamp
                if files_fingerprint(path) == revision.content:
                    revision.stamp = stamp
            broken = ("its folder was removed" if not stamp else
                      "its files changed on disk since it was loaded" if stamp != revision.stamp else None)
            if broken != revision.broken:
                revision.broken = broken
                (logger.warning if broken else logger.info)(
                    "adapter unavailable" if broken else "adapter available again",
                    extra={"adapter": revision.name, "revision": revision.rev, "reason": broken})

    def unavailable(self) -> dict[str, str]:
        return {r.name: r.broken for r in list(self.active.values()) if r.broken}

    def _retire(self, revision: Revision) -> None:
        revision.retired = True
        if revision.in_flight <= 0:
            self._schedule_unload(revision)

    def _schedule_unload(self, revision: Revision) -> None:
        async def unload():
            async with self._lock:
                if not revision.retired or revision.in_flight > 0 or self.resident.get(revision.key) is not revision:
                    return
                self.resident.pop(revision.key, None)
                self.store.in_use.discard(Path(revision.path))
                try:
                    await self.engine.unload_adapter(revision.key)
                except ModelNotFound:
                    pass
                logger.info("adapter revision unloaded", extra={"adapter": revision.name, "revision": revision.rev})

        task = asyncio.get_running_loop().create_task(unload())
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def settle(self) -> None:
        """Wait for scheduled unloads (tests and shutdown)."""
        while self._unloads:
            await asyncio.gather(*list(self._unloads), return_exceptions=True)


def files_stamp(path: Path) -> tuple:
    """(name, size, mtime) of every file of an adapter folder (empty when the folder is gone): cheap to take
    every few seconds, and any rewrite changes it."""
    try:
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))
    except OSError:
        return ()

