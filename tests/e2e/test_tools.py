"""Tools end to end with the official client: required and named calls constrained so that they always parse
and validate, `auto` calls found by vLLM's tool parser in the model's own `<tool_call>` format (steered here
with a regex, since the tiny model's random weights never call a tool on their own), histories with tool
results rendered through the chat template; base and adapters, streamed and not."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai import OpenAI

BASE = "tiny-qwen3-vl"
MODELS = [BASE, "demo-a", "demo-b"]
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
         "additionalProperties": False}
SHAPE = {"type": "object", "properties": {"shape": {"enum": ["circle", "square"]}, "filled": {"type": "boolean"}},
         "required": ["shape", "filled"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "set_color", "description": "Record the color", "parameters": COLOR}},
         {"type": "function", "function": {"name": "set_shape", "description": "Record the shape", "parameters": SHAPE}}]
SCHEMAS = {"set_color": COLOR, "set_shape": SHAPE}
MESSAGES = [{"role": "user", "content": "What is in the picture? Record it with a tool."}]
CALL = r'<tool_call>\n\{"name": "set_color", "arguments": \{"color": "(red|blue)"\}\}\n</tool_call>'
STEER = {"structured_outputs": {"regex": r"Checking\.\n" + CALL + r"\n" + CALL}}


@pytest.fixture(scope="module")
def client(demo_server) -> OpenAI:
    return OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _run(client, model, stream, **kw):
    """(content, [(id, name, arguments)], finish_reason), assembled from the stream when streaming."""
    kw = {"messages": MESSAGES, "tools": TOOLS, "temperature": 0, "max_tokens": 240, **kw}
    if not stream:
        r = client.chat.completions.create(model=model, **kw)
        m = r.choices[0].message
        return m.content, [(t.id, t.function.name, t.function.arguments) for t in m.tool_calls or []], \
            r.choices[0].finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=model, stream=True, **kw):
        if not chunk.choices:
            continue
        delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
        content += delta.content or ""
        for t in delta.tool_calls or []:
            entry = calls.setdefault(t.index, ["", "", ""])
            entry[0] = entry[0] or t.id or ""
            entry[1] += (t.function.name or "") if t.function else ""
            entry[2] += (t.function.arguments or "") if t.function else ""
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish


def _assert_valid(calls, names):
    assert calls and len({c[0] for c in calls}) == len(calls)
    for call_id, name, arguments in calls:
        assert call_id.startswith("call_") and name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", MODELS)
def test_required_and_named_calls_always_validate(client, model, stream):
    content, calls, finish = _run(client, model, stream, tool_choice="required")
    assert finish == "tool_calls" and not content
    _assert_valid(calls, {"set_color", "set_shape"})
    named = {"type": "function", "function": {"name": "set_shape"}}
    content, calls, finish = _run(client, model, stream, tool_choice=named)
    assert finish == "tool_calls" and len(calls) == 1 and not content
    _assert_valid(calls, {"set_shape"})


@pytest.mark.parametrize("model", [BASE, "demo-b"])
def test_auto_calls_are_parsed_from_the_models_format(client, model):
    full = _run(client, model, False, tool_choice="auto", extra_body=STEER)
    streamed = _run(client, model, True, tool_choice="auto", extra_body=STEER)
    for content, calls, finish in (full, streamed):
        assert content == "Checking.\n" and finish == "tool_calls" and len(calls) == 2
        _assert_valid(calls, {"set_color"})
    assert [c[1:] for c in full[1]] == [c[1:] for c in streamed[1]]
    _, one, _ = _run(client, model, False, tool_choice="auto", parallel_tool_calls=False, extra_body=STEER)
    assert [c[1:] for c in one] == [full[1][0][1:]]
    content, calls, finish = _run(client, model, False, tool_choice="none", extra_body=STEER)
    assert calls == [] and "<tool_call>" in content and finish == "stop"


def test_history_with_calls_and_results_renders(client):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "set_color", "arguments": '{"color": "red"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "set_shape",
                                                             "arguments": '{"shape": "circle", "filled": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "recorded"},
        {"role": "tool", "tool_call_id": "call_2", "content": "recorded"}]
    for model in ("demo-a", BASE):
        r = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=4, temperature=0,
                                           extra_body={"min_tokens": 4})
        assert r.usage.prompt_tokens > 100 and r.usage.completion_tokens == 4


@pytest.mark.parametrize(("kw", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, None),
    ({"messages": MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "set_color", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "x"}]}, "messages"),
])
def test_bad_tool_requests_are_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as exc:
        _run(client, "demo-a", False, **kw)
    assert exc.value.body["param"] == param, exc.value.body


def test_constrained_calls_stream_their_arguments_as_they_are_written(client):
    named = {"type": "function", "function": {"name": "set_shape"}}
    deltas = [t for chunk in client.chat.completions.create(model="demo-a", messages=MESSAGES, tools=TOOLS,
                                                             tool_choice=named, max_tokens=120, temperature=0,
                                                             stream=True)
              if chunk.choices for t in chunk.choices[0].delta.tool_calls or []]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "set_shape"
    fragments = [d.function.arguments for d in deltas if d.function and d.function.arguments]
    assert len(fragments) > 2 and all(d.id is None for d in deltas[1:])  # fragments, not one late delta
    jsonschema.validate(json.loads("".join(fragments)), SHAPE)
