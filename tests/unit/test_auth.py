"""API keys and tenants: parsing, matching, allowlists (the HTTP behaviour is in tests/e2e/test_adapters.py)."""

from __future__ import annotations

import hashlib

import pytest

from service.adapters.store import split_model
from service.auth import KeyRing, Tenant, parse_tenants

TENANTS = """
tenants:
  - name: acme
    keys: ["sk-acme-0001", "sha256:{digest}"]
    adapters: ["acme-*", "colors"]
  - name: ops
    keys: ["sk-ops-00001"]
    adapters: ["*"]
    base: true
    admin: true
"""


def _ring(tmp_path) -> KeyRing:
    f = tmp_path / "keys.yaml"
    f.write_text(TENANTS.format(digest=hashlib.sha256(b"sk-acme-hashed").hexdigest()))
    return KeyRing.from_settings(["sk-default-01"], [], f)


def test_keys_map_to_tenants(tmp_path):
    ring = _ring(tmp_path)
    assert ring.authenticate("sk-acme-0001").name == "acme"
    assert ring.authenticate("sk-acme-hashed").name == "acme"  # stored only as a digest
    assert ring.authenticate("sk-ops-00001").admin
    assert ring.authenticate("sk-default-01").name == "default"
    for wrong in ("", "sk-acme-000", "sk-acme-00011", "SK-ACME-0001", "sha256:" + "0" * 64):
        assert ring.authenticate(wrong) is None
    assert all(len(digest) == 32 for digest, _ in ring.entries)  # no key kept in clear


def test_tenant_allowlists():
    acme = Tenant("acme", ("acme-*", "colors"), base=False)
    assert acme.may_use_adapter("acme-invoices") and acme.may_use_adapter(split_model("colors@v2")[0])
    assert not acme.may_use_adapter("shapes") and not acme.base
    assert not acme.may_use_adapter("acme")  # patterns match whole names


@pytest.mark.parametrize(("text", "message"), [
    ("tenants: {}", "'tenants' list"),
    ("tenants: [{name: a}]", "'keys' list"),
    ("tenants: [{name: a, keys: [short]}]", "at least 8"),
    ("tenants: [{name: a, keys: ['sha256:abc']}]", "64 hex"),
    ("tenants: [{name: a, keys: [sk-long-key], adapter: [x]}]", "unknown fields"),
    ("tenants: [{name: a, keys: [sk-long-key], adapters: x}]", "list of names"),
    ("{{{", "unreadable"),
])
def test_bad_tenant_files_are_refused_clearly(tmp_path, text, message):
    f = tmp_path / "keys.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_tenants(f)
