"""API keys and tenants: who may call, which adapters each key may use, who may use the admin API.

Keys come from settings (`VLORA_API_KEYS`, `VLORA_ADMIN_API_KEYS`: full access) and from a tenants file
(`VLORA_API_KEYS_FILE`, YAML or JSON, typically a mounted Kubernetes Secret):

    tenants:
      - name: acme
        keys: ["sk-acme-1", "sha256:<hex digest of a key>"]
        adapters: ["acme-*", "colors"]     # fnmatch patterns over adapter names
        base: false                        # may the key use the base model?
      - name: ops
        keys: ["sk-ops"]
        adapters: ["*"]
        base: true
        admin: true                        # may load/unload adapters
      - name: globex
        keys: ["sk-globex-1"]
        adapters: ["globex-*"]
        max_concurrent: 8                  # requests running + waiting
        requests_per_minute: 600
        tokens_per_minute: 200000          # prompt + completion, image tokens counted
        priority: high                     # high | normal | low: vLLM's priority and the fair-share weight
    adapters:                              # limits per adapter, whoever calls it
      colors: {max_concurrent: 16, tokens_per_minute: 500000}

Keys are kept only as SHA-256 digests and compared in constant time against every digest (no early
exit); they never reach logs. Limits and fair share: service/limits.py. With no keys configured at all, authentication is off (a warning is logged
at start). A key that may not use an adapter gets the same 404 as a name that does not exist, so tenants
learn nothing about each other.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import APIError, Unauthorized, api_error_response
from service.limits import LIMIT_FIELDS, PRIORITIES, Limits, priority_class

OPEN_TENANT_NAME = "open"


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: tuple[str, ...] = ("*",)
    base: bool = True
    admin: bool = False
    limits: Limits = field(default_factory=Limits)
    priority: str = "normal"

    @property
    def engine_priority(self) -> int:
        return PRIORITIES[self.priority][0]

    @property
    def weight(self) -> float:
        return PRIORITIES[self.priority][1]

    def may_use_adapter(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.adapters)


OPEN = Tenant(OPEN_TENANT_NAME, admin=True)
PUBLIC = Tenant("public", adapters=(), base=False)  # what a keyless call to a public path may use: nothing


def _digest(key: str) -> bytes:
    if key.startswith("sha256:"):
        try:
            raw = bytes.fromhex(key[7:])
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ValueError("a 'sha256:' key must be followed by 64 hex digits")
        return raw
    if len(key) < 8:
        raise ValueError("API keys must be at least 8 characters long")
    return hashlib.sha256(key.encode()).digest()


@dataclass
class KeyRing:
    entries: list[tuple[bytes, Tenant]] = field(default_factory=list)
    adapter_limits: dict[str, Limits] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def add(self, key: str, tenant: Tenant) -> None:
        self.entries.append((_digest(key), tenant))

    def authenticate(self, token: str) -> Tenant | None:
        """The tenant of `token`, comparing against every stored digest in constant time."""
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for digest, tenant in self.entries:
            if hmac.compare_digest(presented, digest) and found is None:
                found = tenant
        return found

    @classmethod
    def from_settings(cls, api_keys: list[str], admin_api_keys: list[str], keys_file: Path | None) -> KeyRing:
        ring = cls()
        for key in api_keys:
            ring.add(key, Tenant("default"))
        for key in admin_api_keys:
            ring.add(key, Tenant("admin", admin=True))
        if keys_file is not None:
            for tenant, keys in parse_tenants(keys_file):
                for key in keys:
                    ring.add(key, tenant)
            ring.adapter_limits = parse_adapter_limits(keys_file)
        return ring

    def replace_with(self, other: KeyRing) -> None:
        """Take another ring's keys and limits in place (the middleware and the quotas hold this object)."""
        self.entries, self.adapter_limits = other.entries, other.adapter_limits

    @property
    def prioritised(self) -> bool:
        """Whether any tenant has a priority class other than normal (vLLM's priority scheduling is then on)."""
        return any(t.priority != "normal" for _, t in self.entries)


def _read_keys_file(path: Path) -> dict:
    import yaml

    try:
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"API keys file '{path}' is unreadable: {exc}") from None
    return data


def parse_adapter_limits(path: Path) -> dict[str, Limits]:
    section = _read_keys_file(path).get("adapters") or {}
    if not isinstance(section, dict):
        raise ValueError(f"API keys file '{path}': 'adapters' must map adapter names to limits")
    out = {}
    for name, entry in section.items():
        where = f"API keys file '{path}': adapter '{name}'"
        if not isinstance(entry, dict) or set(entry) - set(LIMIT_FIELDS):
            raise ValueError(f"{where} takes only {', '.join(LIMIT_FIELDS)}")
        out[str(name)] = Limits.parse(entry, where)
    return out


def parse_tenants(path: Path) -> list[tuple[Tenant, list[str]]]:
    data = _read_keys_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
        raise ValueError(f"API keys file '{path}' must hold a 'tenants' list")
    out = []
    for i, entry in enumerate(data["tenants"]):
        if not isinstance(entry, dict) or not entry.get("name") or not isinstance(entry.get("keys"), list):
            raise ValueError(f"API keys file '{path}': tenant #{i} needs a 'name' and a 'keys' list")
        unknown = set(entry) - {"name", "keys", "adapters", "base", "admin", "priority", *LIMIT_FIELDS}
        if unknown:
            raise ValueError(f"API keys file '{path}': tenant '{entry['name']}' has unknown fields {sorted(unknown)}")
        adapters = entry.get("adapters", [])
        if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
            raise ValueError(f"API keys file '{path}': tenant '{entry['name']}' adapters must be a list of names")
        where = f"API keys file '{path}': tenant '{entry['name']}'"
        tenant = Tenant(str(entry["name"]), tuple(adapters), bool(entry.get("base", False)),
                        bool(entry.get("admin", False)), Limits.parse(entry, where),
                        priority_class(entry.get("priority"), where))
        keys = [str(k) for k in entry["keys"]]
        for key in keys:
            try:
                _digest(key)
            except ValueError as exc:
                raise ValueError(f"API keys file '{path}': tenant '{entry['name']}': {exc}") from None
        out.append((tenant, keys))
    return out


class Authenticate:
    """ASGI middleware: a valid Bearer key (unless the path is public) -> `scope['state']['tenant']`."""

    def __init__(self, app, ring: KeyRing, public_paths: list[str]):
        self.app = app
        self.ring = ring
        self.public = {p.rstrip("/") or "/" for p in public_paths}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})
        if not self.ring.enabled:
            scope["state"]["tenant"] = OPEN
            return await self.app(scope, receive, send)
        path = scope.get("path", "").rstrip("/") or "/"
        if path in self.public:
            scope["state"]["tenant"] = PUBLIC
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        tenant = self.ring.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if tenant is None:
            error: APIError = Unauthorized(
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'" if header
                else "Missing API key: send 'Authorization: Bearer <key>'")
            error.headers = {"WWW-Authenticate": "Bearer"}
            return await api_error_response(error)(scope, receive, send)
        scope["state"]["tenant"] = tenant
        return await self.app(scope, receive, send)


def tenant_of(request) -> Tenant:
    return getattr(request.state, "tenant", None) or OPEN


def file_stamp(path: Path) -> bytes | None:
    """What tells a changed tenants file apart (its bytes' digest; None when it cannot be read)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).digest()
    except OSError:
        return None

