"""The playground page in a real browser (Debian's Chromium driven by Playwright) against a real server.

One server with keys (an admin tenant and a tenant that may use `colors` only), the two trained demo adapters
under an adapter root. The page must show exactly what the API answers, stream visibly, score a batch as the
API's own answers score, render model output as text under its CSP, show a tenant only its adapters and no
admin controls, and load/unload with the admin key. Screenshots of each view go to the test's temporary
directory (and to VLORA_SCREENSHOT_DIR when set: `docs/playground/` holds the committed ones).

Chromium is kept on loopback: hostnames other than 127.0.0.1 do not resolve, its background services are
off, and every request the page makes off 127.0.0.1 is aborted (and fails the test).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest

from tests.conftest import MODELS
from tests.e2e.server import start_server
from trainer.data import load_dataset_file, prompt_and_answer
from trainer.evaluate import normalise

ADMIN, ACME = "sk-admin-playground", "sk-acme-playground"
BASE = "tiny-qwen3-vl"
MODELS_ALL = [BASE, "colors", "shapes"]
XSS = "<img src=x onerror=\"window.__pwned=1\">"
DONE = "() => { const p = [...document.querySelectorAll('.pane')]; return p.length > 0 && p.every(x => x.dataset.state === 'done' || x.dataset.state === 'error'); }"
CHROMIUM_ARGS = ["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-domain-reliability", "--no-first-run", "--disable-default-apps"]


@pytest.fixture(scope="module")
def server(trained_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("playground-root")
    for task in ("colors", "shapes"):
        shutil.copytree(MODELS / "adapters" / task, root / task)
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"tenants": [
        {"name": "ops", "keys": [ADMIN], "adapters": ["*"], "base": True, "admin": True},
        {"name": "acme", "keys": [ACME], "adapters": ["colors"], "base": False}]}))
    srv = start_server(["--model", str(MODELS / BASE), "--adapter-dir", str(root), "--api-keys-file", str(keys)],
                       tmp_path_factory.mktemp("playground-server") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    exe = os.environ.get("VLORA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("Chromium is missing: install Debian's chromium package (.ci/run does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    off_loopback, problems = [], []

    def guard(route):
        if urlparse(route.request.url).hostname == "127.0.0.1" or route.request.url.startswith("data:"):
            return route.continue_()
        off_loopback.append(route.request.url)
        return route.abort()

    context.route("**/*", guard)
    tab = context.new_page()
    tab.on("pageerror", lambda exc: problems.append(str(exc)))
    tab.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" and "401" not in msg.text else None)
    yield tab
    context.close()
    assert not off_loopback, off_loopback
    assert not problems, problems  # no script errors, no CSP violations


def screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if os.environ.get("VLORA_SCREENSHOT_DIR"):
        Path(os.environ["VLORA_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / f"{name}.png", Path(os.environ["VLORA_SCREENSHOT_DIR"]) / f"{name}.png")


def open_page(page, server, key: str | None = ADMIN) -> None:
    page.goto(f"{server.url}/playground")
    if key:
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#api-key", key)
        page.click("#key-save")
    page.wait_for_selector("#models input")


def choose(page, models: list[str]) -> None:
    for box in page.query_selector_all("#models input"):
        box.set_checked(box.get_attribute("value") in models)


def panes(page) -> dict[str, dict]:
    return {p.get_attribute("data-model"): {"text": p.query_selector(".output").text_content(),
                                            "state": p.get_attribute("data-state"),
                                            "finish": p.get_attribute("data-finish"),
                                            "stats": p.query_selector(".stats").text_content()}
            for p in page.query_selector_all(".pane")}


def client(server, key=ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


IMAGE = MODELS / "demo-data/colors/images/val-00000.png"


def test_page_headers_and_key_kept_in_session_storage(page, server):
    r = httpx.get(f"{server.url}/playground", timeout=10)  # public: no key needed for the page itself
    csp = r.headers["content-security-policy"]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    assert "<script>" not in r.text and " style=" not in r.text  # no inline script or style
    assert httpx.get(f"{server.url}/playground/api/adapters", timeout=10).status_code == 401
    open_page(page, server)
    assert page.evaluate("() => sessionStorage.getItem('vlora-api-key')") == ADMIN
    assert page.evaluate("() => localStorage.length") == 0


def test_side_by_side_shows_exactly_what_the_api_answers(page, server, tmp_path):
    open_page(page, server)
    page.set_input_files("#image-file", str(IMAGE))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#prompt", "What color is the shape?")
    page.fill("#max-tokens", "24")
    choose(page, MODELS_ALL)
    page.click("#run")
    page.wait_for_function(DONE, timeout=120_000)
    shown = panes(page)
    assert set(shown) == set(MODELS_ALL)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(IMAGE)}},
                                             {"type": "text", "text": "What color is the shape?"}]}]
    for model in MODELS_ALL:
        r = client(server).chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24, seed=0)
        assert shown[model]["state"] == "done"
        assert shown[model]["text"] == r.choices[0].message.content, model
        assert shown[model]["finish"] == r.choices[0].finish_reason
        assert f"completion {r.usage.completion_tokens} tokens" in shown[model]["stats"]
        assert "TTFT" in shown[model]["stats"] and "tok/s" in shown[model]["stats"]
    assert shown["colors"]["text"] == "orange"
    assert "greedy" in page.text_content("#repro")
    screenshot(page, tmp_path, "compare")


def test_streaming_is_visible_before_the_finish(page, server):
    open_page(page, server)
    choose(page, [BASE])
    page.fill("#max-tokens", "400")
    page.click("summary")
    page.fill("#extra", json.dumps({"min_tokens": 400}))
    page.evaluate("""() => { window.__seen = []; new MutationObserver(() => { const p = document.querySelector('.pane');
        if (p) window.__seen.push([p.dataset.state, p.querySelector('.output').textContent.length]); })
        .observe(document.getElementById('panes'), {subtree: true, childList: true, characterData: true, attributes: true}); }""")
    page.click("#run")
    page.wait_for_function(DONE, timeout=120_000)
    final = len(panes(page)[BASE]["text"])
    partial = page.evaluate("() => window.__seen.filter(([s, n]) => s === 'streaming' && n > 0).map(([s, n]) => n)")
    assert partial and min(partial) < final, (partial[:5], final)


def test_model_output_and_labels_render_as_text(page, server):
    open_page(page, server)
    choose(page, ["colors"])
    page.click("summary")
    page.fill("#extra", json.dumps({"structured_outputs": {"choice": [XSS]}}))
    page.click("#run")
    page.wait_for_function(DONE, timeout=120_000)
    assert panes(page)["colors"]["text"] == XSS  # the probe came back from the model, shown literally
    page.click("#tab-batch")
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                           {"role": "assistant", "content": XSS}]}
    page.fill("#batch-jsonl", json.dumps(record))
    page.fill("#batch-max-tokens", "4")
    page.click("#batch-run")
    page.wait_for_selector("#batch-grid:not([hidden])")
    assert page.text_content("#batch-body td.label") == XSS
    assert page.evaluate("() => document.querySelectorAll('main img:not(#preview)').length") == 0
    assert page.evaluate("() => window.__pwned") is None


def test_batch_grid_exact_match_equals_the_apis(page, server, tmp_path):
    records = (load_dataset_file(MODELS / "demo-data/colors/val.jsonl")[:8]
               + load_dataset_file(MODELS / "demo-data/shapes/val.jsonl")[:8])
    lines, uploads = [], []
    for i, record in enumerate(records):  # half the images inline, half uploaded and named
        messages = json.loads(json.dumps(record["messages"]))
        for m in messages:
            for part in m["content"]:
                if part["type"] == "image":
                    path = Path(part["image"])
                    if i % 2:
                        part["image"] = data_uri(path)
                    else:
                        named = tmp_path / f"ex{i}-{path.name}"
                        shutil.copy(path, named)
                        uploads.append(str(named))
                        part["image"] = named.name
        lines.append(json.dumps({"messages": messages}))
    open_page(page, server)
    choose(page, MODELS_ALL)
    page.click("#tab-batch")
    page.fill("#batch-jsonl", "\n".join(lines))
    page.set_input_files("#batch-images", uploads)
    page.fill("#batch-max-tokens", "6")
    page.click("#batch-run")
    page.wait_for_selector("#batch-grid:not([hidden])", timeout=120_000)
    shown = {c.get_attribute("data-model"): float(c.get_attribute("data-exact-match"))
             for c in page.query_selector_all("#batch-foot th[data-model]")}
    for model in MODELS_ALL:
        hits = 0
        for record in records:
            messages, answer = prompt_and_answer(record)
            content = [{"type": "image_url", "image_url": {"url": data_uri(Path(p["image"]))}} if p["type"] == "image"
                       else {"type": "text", "text": p["text"]} for p in messages[0]["content"]]
            r = client(server).chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                       temperature=0, max_tokens=6, seed=0)
            hits += normalise(r.choices[0].message.content) == normalise(answer)
        assert shown[model] == pytest.approx(hits / len(records)), model
    assert shown["colors"] >= 0.5 and shown[BASE] <= 0.25
    assert page.query_selector_all("#batch-body tr.disagree")  # base vs adapters: highlighted
    screenshot(page, tmp_path, "batch")


def test_tenant_key_sees_only_its_adapters_and_no_admin_controls(page, server):
    open_page(page, server, ACME)
    offered = {b.get_attribute("value").split("@")[0] for b in page.query_selector_all("#models input")}
    assert offered == {"colors"}
    page.click("#tab-console")
    page.wait_for_selector("#console-body tr")
    assert [r.get_attribute("data-adapter") for r in page.query_selector_all("#console-body tr")] == ["colors"]
    assert page.is_hidden("#admin-form") and not page.query_selector_all("button.unload")
    refused = httpx.delete(f"{server.url}/v1/adapters/colors", headers={"Authorization": f"Bearer {ACME}"}, timeout=10)
    assert refused.status_code == 403  # and the server refuses it anyway


def test_console_shows_cards_and_the_admin_loads_and_unloads(page, server, tmp_path):
    client(server).chat.completions.create(model="shapes", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    open_page(page, server)
    page.click("#tab-console")
    page.wait_for_selector("#console-body tr[data-adapter='shapes']")

    def cells(name):
        return [c.text_content() for c in page.query_selector_all(f"#console-body tr[data-adapter='{name}'] td")]

    shapes = cells("shapes")
    scores = json.loads((MODELS / "adapters/shapes/eval.json").read_text())  # as this clone's training left it
    eval_cell = f"{scores['adapter']['exact_match']:.1%} / {scores['base']['exact_match']:.1%} (n={scores['adapter']['n']})"
    assert shapes[2] == "yes" and shapes[3] == "16" and shapes[6] == eval_cell  # loaded, rank, eval
    assert shapes[7] == "4 passed" and shapes[8].endswith("ms")  # golden samples; live TTFT p50
    manifest = json.loads((MODELS / "adapters/shapes/manifest.json").read_text())
    assert shapes[5] == manifest["base"]["weights_sha256"][:12]
    screenshot(page, tmp_path, "console")
    page.click("#console-body tr[data-adapter='shapes'] button.unload")
    page.wait_for_function("() => document.querySelector(\"#console-body tr[data-adapter='shapes'] td:nth-child(3)\").textContent === 'no'")
    page.fill("#admin-name", "shapes")
    page.click("#admin-load")
    page.wait_for_function("() => document.querySelector(\"#console-body tr[data-adapter='shapes'] td:nth-child(3)\").textContent === 'yes'")
    r = client(server).chat.completions.create(model="shapes", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.model == "shapes"
