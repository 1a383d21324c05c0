"""`/v1/responses` end to end with the official client: text and image input, instructions, streamed typed
events, structured text format, function tools (calls as `function_call` items, results sent back as
`function_call_output`), base and adapters, stored responses (retrieve, delete, input items, a conversation
continued with `previous_response_id` equal to the same conversation sent whole), and the 400s for what is not
served."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.e2e.test_tools import COLOR, SCHEMAS, SHAPE, STEER
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
    assert r.object == "response" and r.id.startswith("resp_") and r.store is True
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


@pytest.mark.parametrize("model", [BASE, "demo-a"])
def test_output_text_logprobs_are_the_chat_logprobs_whole_and_streamed(client, model):
    """include: ["message.output_text.logprobs"] with top_logprobs: the output text carries the logprobs the chat
    path answers for the same request; streamed, the text deltas carry them in order and the done event all."""
    kw = {"model": model, "max_output_tokens": 6, "temperature": 0, "include": ["message.output_text.logprobs"],
          "top_logprobs": 3}
    r = client.responses.create(input=_input(), **kw)
    chat = client.chat.completions.create(model=model, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                                          messages=[{"role": "user", "content": [
                                              {"type": "image_url", "image_url": {"url": _input()[0]["content"][0]["image_url"]}},
                                              {"type": "text", "text": "What color is the shape?"}]}])

    def rows(logprobs):
        return [(t.token, round(t.logprob, 4), t.bytes, [(a.token, round(a.logprob, 4)) for a in t.top_logprobs])
                for t in logprobs]

    whole = rows(r.output[0].content[0].logprobs)
    assert whole == rows(chat.choices[0].logprobs.content) and len(whole) == r.usage.output_tokens
    assert r.top_logprobs == 3 and all(len(row[3]) == 3 for row in whole)
    events = list(client.responses.create(input=_input(), stream=True, **kw))
    streamed = [(t.token, round(t.logprob, 4)) for e in events if e.type == "response.output_text.delta"
                for t in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert streamed == [row[:2] for row in whole[:len(streamed)]] and streamed
    assert [(t.token, round(t.logprob, 4)) for t in done.logprobs] == [row[:2] for row in whole]
    plain = client.responses.create(model=model, input="hi", max_output_tokens=2)
    assert plain.output[0].content[0].logprobs == []


@pytest.mark.parametrize(("kw", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"include": ["message.output_text.logprobs"], "top_logprobs": 21}, "top_logprobs"),
    ({"include": ["everything"]}, "include"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}],
      "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"reasoning": {"summary": "auto"}}, "reasoning"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, "input.0.content.0.input_image.file_id"),
])
def test_unsupported_fields_are_400_naming_them(client, kw, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="demo-a", **{"input": "hi", "max_output_tokens": 4, **kw})
    assert exc.value.body["param"].startswith(param.split(".")[0]), exc.value.body


TOOLS = [{"type": "function", "name": "set_color", "description": "Record the color", "parameters": COLOR},
         {"type": "function", "name": "set_shape", "description": "Record the shape", "parameters": SHAPE}]
ASK = "What is in the picture? Record it with a tool."


def _calls(client, model, stream: bool, **kw) -> tuple[str, list[tuple[str, str, str]], list[str]]:
    """(text, [(call_id, name, arguments)], output item types), from the stream's events when streaming."""
    kw = {"input": ASK, "tools": TOOLS, "temperature": 0, "max_output_tokens": 240, **kw}
    if not stream:
        r = client.responses.create(model=model, **kw)
        calls = [(o.call_id, o.name, o.arguments) for o in r.output if o.type == "function_call"]
        return r.output_text, calls, [o.type for o in r.output]
    events = list(client.responses.create(model=model, stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    streamed = {e.item_id: "" for e in events if e.type == "response.function_call_arguments.delta"}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            streamed[e.item_id] += e.delta
    calls = []
    for o in done.output:
        if o.type == "function_call":
            added = next(e.item for e in events if e.type == "response.output_item.added" and e.item.id == o.id)
            final = next(e.arguments for e in events
                         if e.type == "response.function_call_arguments.done" and e.item_id == o.id)
            assert added.name == o.name and streamed.get(o.id, "") == final == o.arguments
            calls.append((o.call_id, o.name, o.arguments))
    return done.output_text, calls, [o.type for o in done.output]


def _valid(calls, names):
    assert calls and len({c[0] for c in calls}) == len(calls)
    for call_id, name, arguments in calls:
        assert call_id.startswith("call_") and name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", [BASE, "demo-a"])
def test_required_and_named_tool_calls_come_as_function_call_items(client, model, stream):
    text, calls, types = _calls(client, model, stream, tool_choice="required")
    assert types == ["function_call"] * len(calls) and text == ""
    _valid(calls, {"set_color", "set_shape"})
    text, calls, types = _calls(client, model, stream, tool_choice={"type": "function", "name": "set_shape"})
    assert types == ["function_call"] and text == ""
    _valid(calls, {"set_shape"})


def test_auto_calls_follow_the_models_text_and_a_result_goes_back_as_input(client):
    full = _calls(client, "demo-b", False, tool_choice="auto", extra_body=STEER)
    streamed = _calls(client, "demo-b", True, tool_choice="auto", extra_body=STEER)
    for text, calls, types in (full, streamed):
        assert text == "Checking.\n" and types == ["message", "function_call", "function_call"]
        _valid(calls, {"set_color"})
    assert [c[1:] for c in full[1]] == [c[1:] for c in streamed[1]]
    _, one, _ = _calls(client, "demo-b", False, tool_choice="auto", parallel_tool_calls=False, extra_body=STEER)
    assert [c[1:] for c in one] == [full[1][0][1:]]
    text, calls, types = _calls(client, "demo-b", False, tool_choice="none", extra_body=STEER)
    assert calls == [] and types == ["message"] and "<tool_call>" in text
    # the calls and their results sent back: rendered through the chat template as the chat path renders them
    call_id, name, arguments = full[1][0]
    history = [{"role": "user", "content": ASK},
               {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments},
               {"type": "function_call_output", "call_id": call_id, "output": "recorded"}]
    r = client.responses.create(model="demo-a", input=history, tools=TOOLS, max_output_tokens=4, temperature=0)
    chat = client.chat.completions.create(model="demo-a", max_tokens=4, temperature=0, tools=[
        {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS], messages=[
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "recorded"}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens > 100
    assert r.output_text == (chat.choices[0].message.content or "")


def _turn(text: str) -> dict:
    return {"role": "user", "content": [{"type": "input_text", "text": text}]}


def _said(r) -> dict:
    return {"role": "assistant", "content": [{"type": "output_text", "text": r.output_text}]}


@pytest.mark.parametrize("model", [BASE, "demo-a"])
def test_a_stored_conversation_continues_as_if_sent_whole(client, model):
    kw = {"model": model, "max_output_tokens": 8, "temperature": 0, "instructions": "Answer briefly.",
          "extra_body": {"min_tokens": 8}}
    first = client.responses.create(input=_input(), **kw)
    assert first.store is True and client.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = client.responses.create(previous_response_id=first.id, input="And the shape?", **kw)
    whole = client.responses.create(store=False, input=[*_input(), _said(first), _turn("And the shape?")], **kw)
    assert second.previous_response_id == first.id and whole.store is False
    assert second.output_text == whole.output_text and second.usage.input_tokens == whole.usage.input_tokens
    # a third turn, streamed, through the chain of two; stored when its stream ends
    events = list(client.responses.create(previous_response_id=second.id, input="Thanks.", stream=True, **kw))
    assert events[0].response.store is True
    third = events[-1].response
    whole = client.responses.create(store=False, **kw, input=[
        *_input(), _said(first), _turn("And the shape?"), _said(second), _turn("Thanks.")])
    assert third.output_text == whole.output_text and third.usage.input_tokens == whole.usage.input_tokens
    assert client.responses.retrieve(third.id).output_text == third.output_text
    # input items: each response's own input, newest first by default, paged
    items = client.responses.input_items.list(first.id)
    assert [i.type for i in items.data] == ["message"] and items.has_more is False
    assert [part.type for part in items.data[0].content] == ["input_image", "input_text"]
    [only] = client.responses.input_items.list(third.id).data
    assert only.role == "user" and only.content[0].text == "Thanks." and only.id.startswith("msg_")


def test_a_tool_result_continues_the_stored_call(client):
    kw = {"model": "demo-a", "tools": TOOLS, "temperature": 0}
    call = client.responses.create(input=ASK, tool_choice={"type": "function", "name": "set_shape"},
                                   max_output_tokens=240, **kw)
    [fc] = [o for o in call.output if o.type == "function_call"]
    result = {"type": "function_call_output", "call_id": fc.call_id, "output": "recorded"}
    follow = client.responses.create(previous_response_id=call.id, input=[result], max_output_tokens=4, **kw)
    whole = client.responses.create(store=False, max_output_tokens=4, **kw, input=[
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments}, result])
    assert follow.usage.input_tokens == whole.usage.input_tokens > 100 and follow.output_text == whole.output_text


def _stored_bytes(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("vlora_responses_stored_bytes ")))


def test_unstored_deleted_and_unknown_responses_are_404(client, demo_server):
    unstored = client.responses.create(model="demo-a", input="hi", max_output_tokens=2, store=False)
    before = _stored_bytes(demo_server)
    kept = client.responses.create(model="demo-a", input="hi", max_output_tokens=2)
    assert _stored_bytes(demo_server) > before
    client.responses.delete(kept.id)
    for gone in (unstored.id, kept.id, "resp_unknown"):
        with pytest.raises(openai.NotFoundError) as exc:
            client.responses.retrieve(gone)
        assert exc.value.body["param"] == "response_id", exc.value.body
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(gone)
        with pytest.raises(openai.NotFoundError) as exc:
            client.responses.create(model="demo-a", input="hi", max_output_tokens=2, previous_response_id=gone)
        assert exc.value.body["param"] == "previous_response_id"
        assert exc.value.body["code"] == "previous_response_not_found"
    listed = client.responses.create(model="demo-a", input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.input_items.list(listed.id, after="msg_not_there")
    assert exc.value.body["param"] == "after"


def _settled(client, rid: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while (r := client.responses.retrieve(rid)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, f"{rid} still {r.status}"
        time.sleep(0.1)
    return r


def _engine_running(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("vlora_engine_requests_running ")))


def test_background_responses_are_polled_and_cancelled(client, demo_server):
    kw = {"model": "demo-a", "input": _input(), "temperature": 0, "max_output_tokens": 64,
          "extra_body": {"min_tokens": 64}}
    queued = client.responses.create(background=True, **kw)
    assert queued.status == "queued" and queued.background is True and queued.store is True
    ids = [item.id for item in client.responses.input_items.list(queued.id).data]
    done = _settled(client, queued.id)
    assert [item.id for item in client.responses.input_items.list(done.id).data] == ids  # the same items throughout
    sync = client.responses.create(store=False, **kw)
    assert done.status == sync.status and done.output_text == sync.output_text and done.background is True
    assert done.usage.output_tokens == sync.usage.output_tokens == 64
    # cancelled while it generates (several seconds of tokens): stays cancelled; a finished one cannot change
    long = client.responses.create(background=True, **{**kw, "max_output_tokens": 3000,
                                                       "extra_body": {"min_tokens": 3000}})
    deadline = time.monotonic() + 10
    while not _engine_running(demo_server):  # under way in the engine
        assert time.monotonic() < deadline, "the background response never reached the engine"
        time.sleep(0.05)
    assert client.responses.retrieve(long.id).status == "in_progress"
    assert client.responses.cancel(long.id).status == "cancelled"
    assert client.responses.retrieve(long.id).status == "cancelled"
    deadline = time.monotonic() + 10  # and the engine stopped generating it
    while _engine_running(demo_server):
        assert time.monotonic() < deadline, "the cancelled response still runs in the engine"
        time.sleep(0.1)
    assert client.responses.cancel(done.id).status == done.status == "incomplete"  # max_output_tokens reached
    with pytest.raises(openai.BadRequestError) as exc:  # not a background response
        client.responses.cancel(client.responses.create(**kw).id)
    assert exc.value.body["param"] == "response_id"


def _key(event) -> tuple:
    return event.type, event.sequence_number, getattr(event, "delta", None)


def test_a_streamed_background_response_resumes_from_any_event(client, demo_server):
    kw = {"model": "demo-a", "input": _input(), "temperature": 0, "max_output_tokens": 24,
          "extra_body": {"min_tokens": 24}}
    events = list(client.responses.create(background=True, stream=True, **kw))
    sync = client.responses.create(store=False, **kw)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[0].response.background is True
    assert events[-1].type == f"response.{sync.status}" and events[-1].response.output_text == sync.output_text
    rid = events[0].response.id
    assert client.responses.retrieve(rid).output_text == sync.output_text  # stored as it ended
    # the whole stream again, and from any sequence number: the same events
    assert [_key(e) for e in client.responses.retrieve(rid, stream=True)] == [_key(e) for e in events]
    for after in (0, 5, len(events) - 2):
        again = list(client.responses.retrieve(rid, stream=True, starting_after=after))
        assert [_key(e) for e in again] == [_key(e) for e in events[after + 1:]]
    assert list(client.responses.retrieve(rid, stream=True, starting_after=len(events) + 10)) == []
    # a response with no event log (not streamed, or not in the background) is a 400 naming stream
    for other in (client.responses.create(**kw).id, client.responses.create(background=True, **kw).id):
        with pytest.raises(openai.BadRequestError) as exc:
            list(client.responses.retrieve(other, stream=True))
        assert exc.value.body["param"] == "stream"
    with pytest.raises(openai.NotFoundError):
        list(client.responses.retrieve("resp_unknown", stream=True))
    r = httpx.get(f"{demo_server.url}/v1/responses/{rid}", params={"stream": "true", "starting_after": -1}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after"
    # the kept events count against --responses-store-bytes as part of their response, and go with it
    replay = httpx.get(f"{demo_server.url}/v1/responses/{rid}", params={"stream": "true"}, timeout=30).text
    held = _stored_bytes(demo_server)
    client.responses.delete(rid)
    assert held - _stored_bytes(demo_server) >= len(replay)
    with pytest.raises(openai.NotFoundError):
        list(client.responses.retrieve(rid, stream=True))


def test_a_dropped_background_stream_keeps_generating_and_is_resumed_live(client, demo_server):
    kw = {"model": "demo-a", "input": _input(), "temperature": 0, "max_output_tokens": 3000,
          "extra_body": {"min_tokens": 3000}}
    first = client.responses.create(background=True, stream=True, **kw)
    seen = []
    for event in first:
        seen.append(event)
        if len(seen) == 8:
            break
    first.close()  # the connection is gone; the response goes on in the server
    rid = seen[0].response.id
    assert client.responses.retrieve(rid).status == "in_progress"
    resumed = client.responses.retrieve(rid, stream=True, starting_after=seen[-1].sequence_number)
    later = []
    for event in resumed:  # live: the engine still writes them
        later.append(event)
        if len(later) == 20:
            client.responses.cancel(rid)
    # the events continue where the first stream stopped, and cancelling ends the resumed stream
    assert [e.sequence_number for e in later] == list(range(8, 8 + len(later)))
    assert all(e.type == "response.output_text.delta" for e in later)
    assert 20 <= len(later) < 3000
    assert client.responses.retrieve(rid).status == "cancelled"
    deadline = time.monotonic() + 10
    while _engine_running(demo_server):
        assert time.monotonic() < deadline, "the cancelled response still runs in the engine"
        time.sleep(0.1)


@pytest.mark.parametrize(("kw", "param", "error"), [
    ({"store": False}, "background", openai.BadRequestError),
    ({"store": False, "stream": True}, "background", openai.BadRequestError),
    ({"model": "no-such-adapter"}, "model", openai.NotFoundError),
    ({"input": "word " * 5000}, "messages", openai.BadRequestError),  # over the context: refused at once
])
def test_background_refusals_are_the_calls_answer(client, kw, param, error):
    with pytest.raises(error) as exc:
        client.responses.create(**{"model": "demo-a", "input": "hi", "max_output_tokens": 4, "background": True,
                                   **kw})
    assert exc.value.body["param"] == param, exc.value.body
