"""Adapter lifecycle and security against one real server: admin API, on-demand loads, hot replace,
load-time checks, API keys and tenants, hostile images, and the image-URL address policy.

Every connection goes to 127.0.0.1. The URL tests use two local image servers: A (allowlisted by port)
and B (not allowlisted); B must record zero hits for every refused URL, redirects included.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import MODELS
from tests.e2e.server import start_server
from tests.images import data_uri, encode, image_message, shape_image

ADMIN, ACME, GLOBEX = "sk-admin-000001", "sk-acme-0000001", "sk-globex-00001"
GREEDY = dict(temperature=0, max_tokens=8, extra_body={"min_tokens": 8})


def _handler(hits: list[str], redirect_to: str | None = None):
    png = encode(shape_image("blue"))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            if self.path == "/redirect" and redirect_to:
                self.send_response(302)
                self.send_header("Location", redirect_to)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    return Handler


class _ImageServers:
    def __init__(self):
        self.hits_a: list[str] = []
        self.hits_b: list[str] = []
        self.b = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hits_b))
        self.port_b = self.b.server_address[1]
        self.a = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), _handler(self.hits_a, f"http://127.0.0.1:{self.port_b}/shape.png"))
        self.port_a = self.a.server_address[1]
        for httpd in (self.a, self.b):
            threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def close(self):
        self.a.shutdown()
        self.b.shutdown()


@pytest.fixture(scope="module")
def images():
    servers = _ImageServers()
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def root(demo_assets, trained_colors, tmp_path_factory):
    from trainer.tiny import make_random_adapter

    tmp = tmp_path_factory.mktemp("adapters")
    root = tmp / "root"
    test_adapters = MODELS / "test-adapters"
    shutil.copytree(test_adapters / "demo-a", root / "demo-a")  # flat: one revision
    shutil.copytree(test_adapters / "demo-b", root / "fresh")  # untouched until the single-flight test
    shutil.copytree(test_adapters / "demo-a", root / "swap" / "v1")
    shutil.copytree(MODELS / "adapters" / "colors", root / "colors" / "v1")
    shutil.copytree(test_adapters / "demo-a", root / "broken")
    weights = root / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(MODELS / "adapters" / "colors", root / "wrongbase")
    manifest = json.loads((root / "wrongbase" / "manifest.json").read_text())
    manifest["base"]["config_sha256"] = "0" * 64
    (root / "wrongbase" / "manifest.json").write_text(json.dumps(manifest))
    model = demo_assets["model"]
    make_random_adapter(model, root / "vision", rank=8, seed=5, target_modules=["qkv"])
    make_random_adapter(model, root / "big", rank=32, seed=6)
    shutil.copytree(test_adapters / "demo-a", tmp / "outside")
    os.symlink(tmp / "outside", root / "evil")
    return root


@pytest.fixture(scope="module")
def server(demo_assets, root, images, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(json.dumps({"tenants": [
        {"name": "ops", "keys": [ADMIN], "adapters": ["*"], "base": True, "admin": True},
        {"name": "acme", "keys": [ACME], "adapters": ["demo-a", "swap"]},
        {"name": "globex", "keys": [GLOBEX], "adapters": ["colors"], "base": True},
    ]}))
    srv = start_server(
        ["--model", str(demo_assets["model"]), "--adapter-dir", str(root), "--preload", "none",
         "--max-lora-rank", "16", "--api-keys-file", str(keys),
         "--image-url-allowlist", f"127.0.0.1:{images.port_a}", "--no-prefix-cache-per-tenant"],
        tmp_path_factory.mktemp("adapters-server") / "server.log",
    )
    yield srv
    srv.stop()


def _client(server, key=ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def _post(server, body, key=ADMIN, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"} if key else {}, **kw)


def _admin(server, method, path, key=ADMIN, **kw) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=120, **kw)


def _body(model, url=None, **extra):
    return {"model": model, "messages": image_message(url or data_uri(encode(shape_image("red")))),
            "temperature": 0, "max_tokens": 8, "min_tokens": 8, **extra}


def _text(server, model, key=ADMIN) -> str:
    r = _post(server, _body(model), key)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _error(r: httpx.Response, status: int, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if code:
        assert err["code"] == code, err
    return err["message"]


def _loaded(server) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for card in _admin(server, "GET", "/v1/adapters").json()["data"]:
        out.setdefault(card["name"], []).append(card)
    return out


# -- access control -------------------------------------------------------------------------------------

def test_missing_or_wrong_keys_get_401(server):
    for key in (None, "sk-wrong-key-0001", ADMIN[:-1]):
        r = _post(server, _body("demo-a"), key)
        _error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        _client(server, "sk-wrong-key-0001").models.list()
    for path in ("/health", "/ready", "/metrics"):  # public by default
        assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 200
    assert ADMIN not in server.log_path.read_text() and ACME not in server.log_path.read_text()


def test_tenants_see_and_use_only_their_adapters(server):
    acme = {m.id for m in _client(server, ACME).models.list().data}
    assert acme == {"demo-a", "swap"}  # no base, nothing of other tenants
    globex = {m.id for m in _client(server, GLOBEX).models.list().data}
    assert globex == {"tiny-qwen3-vl", "colors"}
    admin = {m.id for m in _client(server).models.list().data}
    assert {"demo-a", "swap", "colors", "tiny-qwen3-vl"} <= admin and "evil" not in admin
    # Another tenant's adapter answers exactly like a name that does not exist.
    other = _error(_post(server, _body("colors"), ACME), 404, "model_not_found")
    absent = _error(_post(server, _body("no-such-adapter"), ACME), 404, "model_not_found")
    assert other.replace("colors", "X") == absent.replace("no-such-adapter", "X")
    _error(_post(server, _body("tiny-qwen3-vl"), ACME), 404, "model_not_found")
    assert httpx.get(f"{server.url}/v1/models/colors", headers={"Authorization": f"Bearer {ACME}"}).status_code == 404
    assert _text(server, "demo-a", ACME)
    _error(_admin(server, "GET", "/v1/adapters", ACME), 403, "permission_denied")
    _error(_admin(server, "POST", "/v1/adapters", ACME, json={"name": "swap"}), 403)


# -- adapter root -----------------------------------------------------------------------------------------

def test_path_traversal_is_refused(server):
    for name in ("../demo-a", "/etc/passwd", "demo-a/../colors", "evil", "..", "%2e%2e", "colors@../v1"):
        _error(_admin(server, "POST", "/v1/adapters", json={"name": name}), 404)
        _error(_post(server, _body(name)), 404, "model_not_found")
    _error(_admin(server, "POST", "/v1/adapters", json={"name": "demo-a", "path": "/tmp"}), 400)  # no paths
    assert _admin(server, "DELETE", "/v1/adapters/..%2F..%2Fetc").status_code in (404, 405)
    assert "evil" not in _loaded(server)


def test_concurrent_first_requests_load_once(server):
    assert "fresh" not in _loaded(server)
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: _post(server, _body("fresh")).status_code, range(6)))
    assert statuses == [200] * 6
    [card] = _loaded(server)["fresh"]
    assert card["active"] and card["rank"] == 8 and card["targets"] == {"language": [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]}
    assert card["residency"] == "engine" and card["load_seconds"] > 0
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'vlora_adapter_loads_total{adapter="fresh"} 1.0' in metrics


@pytest.mark.parametrize(("name", "reason"), [
    ("broken", "corrupt"), ("wrongbase", "another base model"), ("vision", "vision-tower/merger modules (qkv)"),
    ("big", "rank 32 exceeds the engine's max_lora_rank 16"),
])
def test_bad_adapters_fail_only_their_own_load(server, name, reason):
    with ThreadPoolExecutor(4) as pool:
        healthy = [pool.submit(_post, server, _body("demo-a")) for _ in range(3)]
        bad = _post(server, _body(name))
        assert reason in _error(bad, 400, "adapter_refused")
        assert [f.result().status_code for f in healthy] == [200] * 3
    assert reason in _error(_admin(server, "POST", "/v1/adapters", json={"name": name}), 400, "adapter_refused")
    assert name not in _loaded(server)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_hot_replace_under_load(server, root):
    before = _text(server, "swap")
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            started = time.monotonic()
            r = _post(server, _body("swap"))
            results.append((started, r.status_code, r.json()["choices"][0]["message"]["content"]
                            if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    shutil.copytree(MODELS / "test-adapters" / "demo-b", root / "swap" / "v2.partial")
    os.rename(root / "swap" / "v2.partial", root / "swap" / "v2")  # how a new revision lands
    loaded = _admin(server, "POST", "/v1/adapters", json={"name": "swap"})
    switched_at = time.monotonic()
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["revision"] == "v2" and loaded.json()["active"]
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(120)
    assert results and all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200][:3]
    after = _text(server, "swap")
    assert after != before and after == _text(server, "swap@v2")
    assert all(text == after for started, _, text in results if started > switched_at)
    assert any(started > switched_at for started, _, _ in results)
    deadline = time.monotonic() + 10
    while len(_loaded(server)["swap"]) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [c["revision"] for c in _loaded(server)["swap"]] == ["v2"]  # v1 unloaded once its requests ended
    assert _text(server, "swap@v1") == before  # pinning an old revision still works (loaded again)


def test_failing_golden_samples_refuse_the_new_revision(server, root):
    before = _text(server, "colors")
    assert [c["revision"] for c in _loaded(server)["colors"]] == ["v1"]
    shutil.copytree(root / "colors" / "v1", root / "colors" / "v2")
    manifest = json.loads((root / "colors" / "v2" / "manifest.json").read_text())
    manifest["golden_samples"][0]["expected"] = "not what this adapter says"
    (root / "colors" / "v2" / "manifest.json").write_text(json.dumps(manifest))
    refused = _admin(server, "POST", "/v1/adapters", json={"name": "colors"})
    assert "golden samples failed" in _error(refused, 400, "adapter_refused")
    cards = _loaded(server)["colors"]
    assert [(c["revision"], c["active"]) for c in cards] == [("v1", True)]
    assert _text(server, "colors") == before
    shutil.rmtree(root / "colors" / "v2")


def test_unload_then_on_demand_reload(server):
    assert _text(server, "demo-a")
    deleted = _admin(server, "DELETE", "/v1/adapters/demo-a")
    assert deleted.status_code == 200 and deleted.json()["deleted"]
    deadline = time.monotonic() + 10
    while "demo-a" in _loaded(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "demo-a" not in _loaded(server)
    _error(_admin(server, "DELETE", "/v1/adapters/demo-a"), 404)
    assert _text(server, "demo-a")  # still under the root: served again on demand
    assert "demo-a" in _loaded(server)


# -- hostile images ---------------------------------------------------------------------------------------

def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height grayscale pixels, with a tiny (incomplete) image body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(
        b"IEND", b"")


def test_hostile_images(server):
    bomb = _error(_post(server, _body("demo-a", data_uri(_png_bomb(20000, 20000)))), 413, "payload_too_large")
    assert "400000000 pixels" in bomb
    jpeg = encode(shape_image("red", (512, 512)), "JPEG")
    _error(_post(server, _body("demo-a", data_uri(jpeg[: len(jpeg) // 2], "image/jpeg"))), 400)
    huge = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + os.urandom(50 * 1024 * 1024)).decode()
    _error(_post(server, _body("demo-a", huge)), 413, "payload_too_large")
    assert _text(server, "demo-a")


def test_image_url_address_policy_on_loopback(server, images):
    images.hits_a.clear()
    images.hits_b.clear()
    ok = _post(server, _body("demo-a", f"http://127.0.0.1:{images.port_a}/shape.png"))
    assert ok.status_code == 200, ok.text
    assert images.hits_a == ["/shape.png"]
    port = images.port_b
    for host in ("127.0.0.1", "localhost", "[::1]", "0.0.0.0", "2130706433", "0x7f000001", "127.1", "0177.0.0.1",
                 "[::ffff:127.0.0.1]"):
        message = _error(_post(server, _body("demo-a", f"http://{host}:{port}/shape.png")), 400)
        assert "non-public" in message or "does not resolve" in message, (host, message)
    # A redirect from the allowlisted server to a loopback port that is not allowlisted: refused.
    message = _error(_post(server, _body("demo-a", f"http://127.0.0.1:{images.port_a}/redirect")), 400)
    assert "non-public" in message
    assert images.hits_a == ["/shape.png", "/redirect"]
    assert images.hits_b == []  # B was never contacted
    for url in ("file:///etc/passwd", f"ftp://127.0.0.1:{port}/x.png", "gopher://127.0.0.1/"):
        assert "scheme" in _error(_post(server, _body("demo-a", url)), 400)


def test_tenants_share_cached_prefixes_when_the_cache_is_not_per_tenant(server):
    """With --no-prefix-cache-per-tenant one tenant's prompt finds another's cached prefix (test_tenants.py: by
    default it does not)."""
    body = {"model": "tiny-qwen3-vl", "max_tokens": 1, "messages": [{"role": "user", "content": "Count these: " + ", ".join(
        f"item {i}" for i in range(80))}]}
    first = _post(server, body).json()["usage"]
    other = _post(server, body, key=GLOBEX).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert other["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"] // 2
    # a client's own cache_salt (vLLM's) still keeps its requests apart, across tenants too
    salted = {**body, "cache_salt": "user-7"}
    cached = [_post(server, salted, key=key).json()["usage"]["prompt_tokens_details"]["cached_tokens"]
              for key in (ADMIN, GLOBEX)]
    assert cached[0] == 0 and cached[1] >= first["prompt_tokens"] // 2
