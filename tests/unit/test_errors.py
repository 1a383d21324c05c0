"""Error mapping: typed errors, validation errors and crashes all become OpenAI-shaped JSON."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.errors import (
    BadRequest,
    ContextLengthExceeded,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    install_error_handlers,
)
from service.protocol.chat import ChatCompletionRequest


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    errors = {
        "bad": BadRequest("bad thing", param="x"),
        "ctx": ContextLengthExceeded("too long"),
        "missing": ModelNotFound("no model", param="model"),
        "large": PayloadTooLarge("too big"),
        "busy": Overloaded("busy", headers={"Retry-After": "1"}),
        "starting": NotReady("starting"),
        "long": BadRequest("x" * 5000),
    }

    @app.get("/raise/{name}")
    async def raise_(name: str):
        if name == "crash":
            raise RuntimeError("secret internals")
        raise errors[name]

    @app.post("/chat")
    async def chat(body: ChatCompletionRequest):
        return {"ok": True}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("name,status,type_,code", [
    ("bad", 400, "invalid_request_error", None),
    ("ctx", 400, "invalid_request_error", "context_length_exceeded"),
    ("missing", 404, "invalid_request_error", "model_not_found"),
    ("large", 413, "invalid_request_error", "payload_too_large"),
    ("busy", 429, "rate_limit_error", "overloaded"),
    ("starting", 503, "service_unavailable", "not_ready"),
    ("crash", 500, "internal_error", "internal_error"),
])
def test_typed_errors_map_to_status_and_shape(client, name, status, type_, code):
    resp = client.get(f"/raise/{name}")
    assert resp.status_code == status
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_ and err["code"] == code
    assert "secret" not in err["message"]


def test_headers_and_caps(client):
    assert client.get("/raise/busy").headers["retry-after"] == "1"
    assert len(client.get("/raise/long").json()["error"]["message"]) <= 1000


def test_validation_error_is_capped_400_not_422(client):
    resp = client.post("/chat", json={"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {}}]}], "temperature": 9})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "messages.0.content.0.image_url.url"
    assert "temperature" in err["message"]
    assert len(err["message"]) <= 1000


def test_unknown_route_and_method(client):
    assert client.get("/nope").json()["error"]["code"] == "not_found"
    resp = client.get("/chat")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(("content", "headers", "says"), [
    (b"{bad", {"content-type": "application/json"}, "the request body is not valid JSON (Expecting property name "
                                                      "enclosed in double quotes at character 1)"),
    (b"", {"content-type": "application/json"}, "the request body is empty"),
    (b'{"model": "m"}', {"content-type": "text/plain"}, "sent with Content-Type: application/json"),
    (b"[1, 2]", {"content-type": "application/json"}, "must be a JSON object, not an array"),
    (b'"hi"', {"content-type": "application/json"}, "must be a JSON object, not a string"),
])
def test_a_body_that_is_not_a_json_object_says_so(client, content, headers, says):
    resp = client.post("/chat", content=content, headers=headers)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert says in err["message"] and err["param"] is None and err["type"] == "invalid_request_error", err


def test_a_check_across_an_objects_fields_keeps_its_own_message(client):
    """A JSON object that fails a check across its fields (a last assistant message with add_generation_prompt)
    is answered with that check's message, not as a body that is no object."""
    resp = client.post("/chat", json={"model": "m", "messages": [{"role": "user", "content": "q"},
                                                                 {"role": "assistant", "content": "a"}]})
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "the last message must not be an assistant message" in message and "JSON object" not in message
