"""`/v1/responses` end to end with the official client: text and image input, instructions, streamed typed
events, structured text format, base and adapters, and the 400s for what is not served."""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI

from tests.images import data_uri, encode, shape_image

BASE = "tiny-qwen3-vl"


@pytest.fixture(scope="module")
def client(demo_server) -> OpenAI:
    return OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _input():
    return [{"role": "user", "content": [{"type": "input_image", "image_url": data_uri(encode(shape_image("red")))},
                                         {"type": "input_text", "text": "What color is the shape?"}]}]


@pytest.mark.parametrize("model", [BASE, "demo-a"])
def test_response_matches_the_chat_answer_and_streams_the_same(client, model):
    r = client.responses.create(model=model, input=_input(), max_output_tokens=8, temperature=0,
                                instructions="Answer briefly.")
    chat = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _input()[0]["content"][0]["image_url"]}},
                                     {"type": "text", "text": "What color is the shape?"}]}])
    assert r.object == "response" and r.id.startswith("resp_") and r.store is False
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    events = list(client.responses.create(model=model, input=_input(), max_output_tokens=8, temperature=0,
                                          instructions="Answer briefly.", stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[-1] == f"response.{r.status}"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == r.output_text


def test_string_input_and_json_schema_format(client):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"],
              "additionalProperties": False}
    r = client.responses.create(model="demo-b", input="Which color?", max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_schema", "name": "c", "schema": schema, "strict": True}})
    assert json.loads(r.output_text)["color"] in ("red", "blue") and r.status == "completed"


@pytest.mark.parametrize(("kw", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, "input.0.content.0.input_image.file_id"),
])
def test_unsupported_fields_are_400_naming_them(client, kw, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="demo-a", **{"input": "hi", "max_output_tokens": 4, **kw})
    assert exc.value.body["param"].startswith(param.split(".")[0]), exc.value.body
