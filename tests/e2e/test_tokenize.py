"""`/tokenize` and `/detokenize` end to end (vLLM's paths and shapes): a chat's tokens with its image, video and
tools expanded as the engine expands them, counted exactly as a chat completion's usage counts them; a text
prompt and its round trip; and the refusals, naming their field."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from tests.e2e.test_video import _messages as video_messages
from tests.images import data_uri, encode, image_message, shape_image
from tests.videos import moving_circle_mp4, video_data_uri

TOOL = {"type": "function", "function": {"name": "record", "parameters": {
    "type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}}}


@pytest.fixture(scope="module")
def client(demo_server) -> OpenAI:
    return OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _tokenize(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/tokenize", json=body, timeout=60)


@pytest.mark.parametrize("case", ["image", "video", "tools"])
def test_a_chats_count_is_the_engines(client, demo_server, tiny_processor, case):
    """The count equals the prompt tokens the engine reports for the same chat; each image placeholder is
    expanded to the image's tokens."""
    if case == "video":
        messages, extra = video_messages(video_data_uri(moving_circle_mp4())), {}
    else:
        messages = image_message(data_uri(encode(shape_image("red", (300, 200)))), "What color?")
        extra = {"tools": [TOOL]} if case == "tools" else {}
    out = _tokenize(demo_server, model="demo-a", messages=messages, return_token_strs=True, **extra)
    assert out.status_code == 200, out.text
    body = out.json()
    engine = client.chat.completions.create(model="demo-a", messages=messages, max_tokens=1, **extra)
    assert body["count"] == len(body["tokens"]) == engine.usage.prompt_tokens
    assert body["max_model_len"] == 4096 and len(body["token_strs"]) == body["count"]
    tokenizer = tiny_processor.tokenizer
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>" if case != "video" else "<|video_pad|>")
    assert body["tokens"].count(pad) > 4  # expanded, not one placeholder
    if case == "tools":
        assert "record" in tokenizer.decode(body["tokens"])


def test_a_text_prompt_and_its_round_trip(demo_server, tiny_processor):
    out = _tokenize(demo_server, prompt="The shape is red.", return_token_strs=True).json()
    tokenizer = tiny_processor.tokenizer
    assert out["tokens"] == tokenizer("The shape is red.")["input_ids"] and out["count"] == len(out["tokens"])
    assert out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])
    back = httpx.post(f"{demo_server.url}/detokenize", json={"model": "demo-b", "tokens": out["tokens"]}, timeout=30)
    assert back.json() == {"prompt": "The shape is red."}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("/tokenize", {"model": "demo-a", "messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "chat_template": "{{ 1 }}"}, 400, "chat_template"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://10.0.0.1/a.png"}}]}]}, 400, "image_url"),  # the address policy, no connection made
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [10**7]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
])
def test_refusals_name_their_field(demo_server, path, body, status, param):
    out = httpx.post(f"{demo_server.url}{path}", json=body, timeout=30)
    assert out.status_code == status and out.json()["error"]["param"] == param, out.text


def test_messages_a_chat_completion_refuses_are_a_400_not_a_500(demo_server):
    """Checks across fields (here: a last assistant message with add_generation_prompt, found by the fuzz test)
    refuse a /tokenize body as they refuse the same chat completion, with its message."""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "d"}]
    out = httpx.post(f"{demo_server.url}/tokenize", json={"messages": messages}, timeout=30)
    chat = httpx.post(f"{demo_server.url}/v1/chat/completions", json={"model": "demo-a", "messages": messages},
                      timeout=30)
    assert out.status_code == chat.status_code == 400, out.text
    assert out.json()["error"]["message"] == chat.json()["error"]["message"]
    assert "must not be an assistant message" in out.json()["error"]["message"]
