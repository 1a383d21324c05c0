"""An adapter root in object storage: `--adapter-url s3://bucket/prefix`, pulled on first use into a local cache.

The layout is the local root's (`prefix/NAME/adapter_config.json`, or `prefix/NAME/REV/...` for revisions),
and so are names, revisions, `NAME@REV`, listing, hot replace, canaries and the load-time checks: the
registry asks this store what `AdapterStore` answers and gets a local folder to load from (`materialize`).

- Any S3-compatible store, through boto3 and its usual configuration: credentials and region from the AWS
  environment or files, IRSA or instance roles, `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`) for MinIO,
  Ceph, R2, ... No hand-written HTTP.
- The cache (`--adapter-cache-dir`, bounded by `--adapter-cache-bytes`) holds one folder per revision, written
  atomically (`REV.partial-*` then renamed, so a failed or partial download is never loaded) and evicted
  least recently used first; revisions in use are never evicted. Every object is checked as it arrives: its
  size, its SHA-256 when the store has one (uploaded with `ChecksumAlgorithm=SHA256`), else its MD5 against a
  single-part ETag; a mismatch refuses that revision (400, naming the file).
- Listings are cached for `--adapter-listing-ttl-s`. When the store cannot be reached, adapters already in the
  cache keep loading, listings answer from the last one seen, and an adapter that would need a download
  answers 503 `adapter_unavailable` (the others are unaffected).
- Concurrent first requests for one revision download it once: the registry runs one load per revision.
Written here, not with fsspec's file cache: that cache neither checks store checksums nor bounds bytes with
in-use pinning.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from service.adapters.store import CONFIG, AdapterRefused, pick_revision, safe_name, safe_rev
from service.errors import AdapterUnavailable

logger = logging.getLogger("vlora.adapters.s3")
COMPLETE = ".vlora-source.json"  # in a cached revision: what it was downloaded from (objects, sizes, etags)


@dataclass(frozen=True)
class RemoteRevision:
    """One revision folder in the store: its key prefix and its objects (relative name -> (size, etag))."""

    prefix: str
    objects: tuple[tuple[str, int, str], ...]

    @property
    def bytes(self) -> int:
        return sum(size for _, size, _ in self.objects)


class S3AdapterStore:
    def __init__(self, url: str, cache_dir: Path, cache_bytes: int, listing_ttl_s: float = 10.0, client=None):
        if not url.startswith("s3://"):
            raise ValueError(f"--adapter-url must be s3://bucket/prefix, not '{url}'")
        bucket, _, prefix = url[5:].partition("/")
        self.url, self.bucket, self.prefix = url, bucket, (prefix.strip("/") + "/") if prefix.strip("/") else ""
        self.cache_dir, self.cache_bytes, self.listing_ttl_s = Path(cache_dir), cache_bytes, listing_ttl_s
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.root = None  # no local root: nothing is resolved against the file system
        self._client = client
        self._listings: dict[str, tuple[float, tuple[list[str], dict[str, tuple[int, str]]]]] = {}
        self._lock = threading.Lock()
        self.in_use: set[Path] = set()  # cached folders the registry has loaded: never evicted

    @property
    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3")
        return self._client

    # listing ------------------------------------------------------------------------------------

    def _list(self, prefix: str) -> tuple[list[str], dict[str, tuple[int, str]]]:
        """(sub-folder names, objects name -> (size, etag)) directly under `prefix`, cached for the TTL; the last
        listing when the store cannot be reached (empty when there is none)."""
        now = time.monotonic()
        cached = self._listings.get(prefix)
        if cached is not None and now - cached[0] < self.listing_ttl_s:
            return cached[1]
        try:
            folders, objects = [], {}
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                folders += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
                objects.update({o["Key"][len(prefix):]: (o["Size"], o["ETag"].strip('"')) for o in page.get("Contents", [])})
        except Exception as exc:  # botocore's connection and client errors: answer from what we know
            logger.warning("adapter store listing failed", extra={"url": self.url, "error": str(exc)[:300]})
            return cached[1] if cached is not None else ([], {})
        self._listings[prefix] = (now, (folders, objects))
        return folders, objects

    def _revisions(self, name: str) -> dict[str, RemoteRevision]:
        if not safe_name(name):
            return {}
        base = f"{self.prefix}{name}/"
        folders, objects = self._list(base)
        if CONFIG in objects:  # flat: one revision, named by its files' etags
            digest = hashlib.sha256(json.dumps(sorted(objects.items())).encode()).hexdigest()[:12]
            return {digest: RemoteRevision(base, tuple((k, *v) for k, v in sorted(objects.items())))}
        out = {}
        for rev in folders:
            if not safe_rev(rev) or rev.endswith(".partial"):
                continue
            _, files = self._list(f"{base}{rev}/")
            if CONFIG in files:
                out[rev] = RemoteRevision(f"{base}{rev}/", tuple((k, *v) for k, v in sorted(files.items())))
        return out

    def exists(self, name: str) -> bool:
        return bool(self._revisions(name))

    def revisions(self, name: str) -> dict[str, RemoteRevision]:
        return self._revisions(name)

    def find(self, name: str, rev: str | None = None) -> tuple[str, RemoteRevision]:
        return pick_revision(name, self._revisions(name), rev)

    def names(self) -> list[str]:
        folders, _ = self._list(self.prefix)
        return sorted(n for n in folders if safe_name(n) and self.exists(n))

    # the cache ----------------------------------------------------------------------------------

    def _cached(self, name: str, rev: str, remote: RemoteRevision) -> Path | None:
        folder = self.cache_dir / name / rev
        try:
            source = json.loads((folder / COMPLETE).read_text())
        except (OSError, ValueError):
            return None
        return folder if source.get("objects") == [list(o) for o in remote.objects] else None

    def materialize(self, name: str, rev: str, remote: RemoteRevision) -> Path:
        """The revision's local folder: from the cache, or downloaded and checked into it (blocking: the
        registry runs it in a thread, once per revision at a time)."""
        folder = self._cached(name, rev, remote)
        if folder is None:
            folder = self._download(name, rev, remote)
        os.utime(folder)  # least recently used goes first
        self._evict(keep=folder)
        return folder

    def _download(self, name: str, rev: str, remote: RemoteRevision) -> Path:
        if remote.bytes > self.cache_bytes:
            raise AdapterRefused(name, [f"it is {remote.bytes} bytes, more than --adapter-cache-bytes"])
        target = self.cache_dir / name / rev
        work = target.with_name(f"{rev}.partial-{uuid.uuid4().hex[:8]}")
        work.mkdir(parents=True)
        started = time.perf_counter()
        try:
            for rel, size, etag in remote.objects:
                if "/" in rel or rel in ("", ".", ".."):
                    continue  # only the revision folder's own files
                self._fetch(f"{remote.prefix}{rel}", work / rel, name, rel, size, etag)
            (work / COMPLETE).write_text(json.dumps({"url": f"s3://{self.bucket}/{remote.prefix}",
                                                     "objects": [list(o) for o in remote.objects]}))
            with self._lock:
                if target.exists():
                    shutil.rmtree(target)
                os.replace(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        logger.info("adapter downloaded", extra={"adapter": name, "revision": rev, "bytes": remote.bytes,
                                                 "seconds": round(time.perf_counter() - started, 3)})
        return target

    def _fetch(self, key: str, dest: Path, name: str, rel: str, size: int, etag: str) -> None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
            sha, md5, got = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
            with open(dest, "wb") as f:
                for chunk in obj["Body"].iter_chunks(1 << 20):
                    sha.update(chunk)
                    md5.update(chunk)
                    got += len(chunk)
                    f.write(chunk)
        except Exception as exc:
            if _is_integrity_error(exc):
                raise AdapterRefused(name, [f"{rel} does not match the store's checksum ({exc})"]) from None
            raise AdapterUnavailable(f"adapter '{name}' is unavailable: the adapter store cannot be read "
                                     f"({type(exc).__name__})", headers={"Retry-After": "10"}) from None
        declared = obj.get("ChecksumSHA256")
        if got != size:
            raise AdapterRefused(name, [f"{rel} is {got} bytes, the store lists {size}"])
        if declared and base64.b64encode(sha.digest()).decode() != declared:
            raise AdapterRefused(name, [f"{rel} does not match its SHA-256 in the store"])
        if not declared and "-" not in etag and md5.hexdigest() != etag:
            raise AdapterRefused(name, [f"{rel} does not match its ETag (MD5) in the store"])

    def _evict(self, keep: Path) -> None:
        """Least recently used revisions go until the cache fits its bound (never one in use)."""
        with self._lock:
            folders = [p for p in self.cache_dir.glob("*/*") if p.is_dir() and (p / COMPLETE).is_file()]
            sizes = {p: sum(f.stat().st_size for f in p.iterdir() if f.is_file()) for p in folders}
            total = sum(sizes.values())
            for folder in sorted(folders, key=lambda p: p.stat().st_mtime):
                if total <= self.cache_bytes:
                    break
                if folder == keep or folder in self.in_use:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                total -= sizes[folder]
                logger.info("adapter evicted from the cache", extra={"folder": f"{folder.parent.name}/{folder.name}"})


def _is_integrity_error(exc: Exception) -> bool:
    return type(exc).__name__ in ("FlexibleChecksumError", "ChecksumError")

