"""Adapters from object storage: a real S3-compatible server (moto's server mode, on 127.0.0.1, started here)
and a real vlora server with `--adapter-url s3://...`; nothing reaches any other address (the endpoint is set
for boto3, credentials are given, instance metadata is off)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import start_server

BUCKET = "vlora-adapters"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield {"server": server, "client": client, "url": f"http://127.0.0.1:{port}"}
    server.stop()


def upload(client, folder: Path, prefix: str) -> int:
    total = 0
    for f in sorted(folder.iterdir()):
        if f.is_file():
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{f.name}", Body=f.read_bytes(), ChecksumAlgorithm="SHA256")
            total += f.stat().st_size
    return total


@pytest.fixture(scope="module")
def server(s3, demo_assets, tmp_path_factory):
    client = s3["client"]
    upload(client, demo_assets["demo-a"], "root/demo/v1")  # two revisions of one name
    upload(client, demo_assets["demo-b"], "root/demo/v2")
    size = upload(client, demo_assets["demo-a"], "root/flat")  # one flat adapter
    upload(client, demo_assets["demo-b"], "root/spare")
    bad = demo_assets["demo-b"] / "adapter_model.safetensors"  # declared checksum of other bytes: corrupted
    upload(client, demo_assets["demo-b"], "root/corrupt")
    client.put_object(Bucket=BUCKET, Key="root/corrupt/adapter_model.safetensors", Body=bad.read_bytes()[:-8] + b"XXXXXXXX",
                      ChecksumAlgorithm="SHA256",
                      ChecksumSHA256=base64.b64encode(hashlib.sha256(bad.read_bytes()).digest()).decode())
    cache = tmp_path_factory.mktemp("adapter-cache")
    env = {"AWS_ENDPOINT_URL_S3": s3["url"], "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    srv = start_server(["--model", str(demo_assets["model"]), "--adapter-url", f"s3://{BUCKET}/root",
                        "--preload", "none", "--max-lora-rank", "16", "--adapter-cache-dir", str(cache),
                        "--adapter-cache-bytes", str(int(size * 2.5)), "--adapter-listing-ttl-s", "0.5"],
                       tmp_path_factory.mktemp("s3-server") / "server.log", env=env)
    srv.cache = cache
    yield srv
    srv.stop()


def chat(server, model, max_tokens=12) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "describe a red circle"}],
        "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0})


def test_listing_and_revisions_like_a_local_root(server):
    models = {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
    assert {"demo", "flat", "spare", "corrupt"} <= models
    newest, v1, v2 = chat(server, "demo"), chat(server, "demo@v1"), chat(server, "demo@v2")
    assert newest.status_code == v1.status_code == v2.status_code == 200, newest.text
    text = {k: r.json()["choices"][0]["message"]["content"] for k, r in (("new", newest), ("v1", v1), ("v2", v2))}
    assert text["new"] == text["v2"] != text["v1"]  # NAME is the newest revision; NAME@REV pins one
    flat = chat(server, "flat")
    assert flat.status_code == 200 and flat.json()["choices"][0]["message"]["content"] == text["v1"]  # same files


def test_concurrent_first_requests_download_once(server):
    async def burst():
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": "spare", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            return await asyncio.gather(*(http.post(f"{server.url}/v1/chat/completions", json=body) for _ in range(6)))

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 6
    downloads = [json.loads(line) for line in server.log_path.read_text().splitlines()
                 if line.startswith("{") and '"adapter downloaded"' in line]
    assert len([d for d in downloads if d.get("adapter") == "spare"]) == 1


def test_a_corrupted_object_is_refused_and_never_cached(server):
    r = chat(server, "corrupt")
    assert r.status_code == 400, r.text
    assert "adapter_model.safetensors does not match" in r.json()["error"]["message"]
    assert not list(server.cache.glob("corrupt/*"))  # the partial download was removed, nothing to load later
    assert chat(server, "flat").status_code == 200  # the others are unaffected


def test_cache_is_bounded_and_keeps_what_is_in_use(server, s3, demo_assets):
    """The bound holds 2.5 adapters; four are loaded (in use: kept). Unloaded, two become evictable, and the
    next download evicts them; asked for again, one is downloaded again."""
    import time

    cached = {p.parent.name for p in server.cache.glob("*/*")}
    assert {"demo", "flat", "spare"} <= cached
    for name in ("spare", "flat"):
        assert httpx.delete(f"{server.url}/v1/adapters/{name}", timeout=30).status_code == 200  # admin API (no keys)
    time.sleep(0.5)  # unloads run once their requests are done
    upload(s3["client"], demo_assets["demo-b"], "root/extra")
    time.sleep(0.6)  # the listing TTL
    assert chat(server, "extra").status_code == 200
    cached = {p.parent.name for p in server.cache.glob("*/*")}
    assert "spare" not in cached and "flat" not in cached and {"demo", "extra"} <= cached, cached
    assert chat(server, "flat").status_code == 200
    downloads = [line for line in server.log_path.read_text().splitlines() if '"adapter downloaded"' in line]
    assert len([d for d in downloads if '"adapter": "flat"' in d]) == 2


def test_store_going_away_affects_only_what_needs_a_download(server, s3, demo_assets):
    upload(s3["client"], demo_assets["demo-a"], "root/late")
    import time

    time.sleep(0.6)  # the listing TTL
    assert "late" in {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
    s3["server"].stop()
    try:
        time.sleep(0.6)
        r = chat(server, "late")
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable", r.text
        assert chat(server, "demo").status_code == 200  # loaded before: unaffected
        models = {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
        assert "demo" in models  # the last listing answers
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        s3["server"].start()
