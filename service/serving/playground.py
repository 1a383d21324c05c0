"""The playground page's data: the page and its assets, and the adapter console's cards.

The page (`service/playground/`: one HTML file, one script, one style sheet, no framework and no build step:
it needs a file picker, fetch streams and a few tables, which the browser gives) is served by the app itself,
under a strict Content-Security-Policy (no inline script or style, nothing from another origin, no framing).
It calls the public API with the key the user types (kept in session storage), so it shows and may do
exactly what that key may; the console's cards come from `cards` here, filtered the same way as /v1/models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from artifacts.manifest import Manifest, ManifestError

ASSETS = Path(__file__).resolve().parents[1] / "playground"
TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
PATHS = ["/playground", "/playground/app.js", "/playground/style.css"]  # public: no key needed for the page


@dataclass(frozen=True)
class Assets:
    files: dict[str, bytes]

    @classmethod
    def load(cls) -> Assets:
        return cls({name: (ASSETS / name).read_bytes() for name in TYPES})


def _manifest(path: str | Path | None) -> Manifest | None:
    try:
        return Manifest.read(path) if path else None
    except ManifestError:
        return None


def _eval(manifest: Manifest | None) -> dict:
    figures = (manifest.eval if manifest else {}) or {}
    return {who: {k: figures[who].get(k) for k in ("exact_match", "n")} for who in ("adapter", "base")
            if isinstance(figures.get(who), dict)}


def adapter_card(name: str, registry, metrics, resident_keys: set[str]) -> dict:
    """What the console shows for one adapter (loaded or only under the root)."""
    active = registry.active.get(name)
    revisions = sorted(registry.store.revisions(name))
    path = active.path if active else registry.configured.get(name) or (
        registry.store.revisions(name).get(max(revisions)) if revisions else None)
    meta = active.meta if active else None
    manifest = meta.manifest if meta else _manifest(path)
    golden = len(manifest.golden_samples) if manifest else 0
    return {
        "name": name,
        "revision": active.rev if active else None,
        "revisions": revisions or ([active.rev] if active else []),
        "loaded": active is not None and active.key in resident_keys,
        "rank": meta.rank if meta else (manifest.lora.r if manifest else None),
        "targets": meta.targets if meta else (manifest.targets if manifest else {}),
        "base_weights_sha256": manifest.base.weights_sha256 if manifest else None,
        "eval": _eval(manifest),
        "golden": {"samples": golden, "problems": list(active.golden_problems) if active else [],
                   "checked": active is not None},
        "live": metrics.adapter_summary(name),
    }


def cards(tenant, registry, metrics, base: str, resident_keys: set[str]) -> dict:
    data = []
    if tenant.base:
        data.append({"name": base, "base": True, "loaded": True, "live": metrics.adapter_summary(None)})
    data += [adapter_card(n, registry, metrics, resident_keys) for n in registry.available() if tenant.may_use_adapter(n)]
    return {"object": "list", "admin": tenant.admin, "data": data,
            "available": registry.available() if tenant.admin else []}
