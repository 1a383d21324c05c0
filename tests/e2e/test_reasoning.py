"""Reasoning end to end with the official client: a thinking model (the tiny kit's thinking variant: `<think>`
tokens, a template that opens the reasoning) served with `--reasoning-parser qwen3`; the reasoning comes as
`reasoning_content` (and `reasoning`), the answer as `content`, exactly the raw completion split at `</think>`;
constrained output starts after the reasoning, or at once when the prompt closed it (`enable_thinking: false`);
tools are parsed from the answer; `reasoning_effort` (the Responses API's `reasoning.effort`) reaches the template
as vLLM passes it ("none" turns thinking off); the Responses API answers with a reasoning item before the
message. Base and an adapter, streamed and not.

The random weights never close their reasoning on their own within a few tokens: a logit bias on `</think>`
makes them (at +100 at once; at +6 the base model reasons a few tokens first, deterministically at
temperature 0)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import OpenAI

from tests.conftest import MODELS
from tests.e2e.server import start_server

BASE = "tiny-qwen3-vl-thinking"
ADAPTER = "think-a"
MESSAGES = [{"role": "user", "content": "What color is the shape?"}]
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"],
         "additionalProperties": False}
JSON = {"type": "json_schema", "json_schema": {"name": "color", "schema": COLOR, "strict": True}}


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    from transformers import AutoTokenizer

    from trainer.demo import ensure_tiny_model
    from trainer.tiny import make_random_adapter

    model = ensure_tiny_model(MODELS, thinking=True)
    adapter = MODELS / "test-adapters-thinking" / ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        make_random_adapter(model, adapter, rank=8, seed=3, overwrite=True)
    srv = start_server(["--model", str(model), "--adapter", f"{ADAPTER}={adapter}", "--reasoning-parser", "qwen3"],
                       tmp_path_factory.mktemp("thinking-server") / "server.log")
    client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
    tokenizer = AutoTokenizer.from_pretrained(model)
    yield client, tokenizer
    srv.stop()


def _end_bias(tokenizer, bias: float) -> dict:
    return {str(tokenizer.convert_tokens_to_ids("</think>")): bias} if bias else {}


def _chat(client, model, stream, **kw):
    """(reasoning, content, tool calls, finish reason, usage); a stream's deltas assembled."""
    kw = {"messages": MESSAGES, "temperature": 0, "max_tokens": 24, **kw}
    if not stream:
        r = client.chat.completions.create(model=model, **kw)
        m = r.choices[0].message
        assert getattr(m, "reasoning", None) == getattr(m, "reasoning_content", None)  # the two names agree
        calls = [(t.function.name, t.function.arguments) for t in m.tool_calls or []]
        return getattr(m, "reasoning_content", None), m.content, calls, r.choices[0].finish_reason, r.usage
    reasoning, content, calls, finish, usage = "", "", {}, None, None
    for chunk in client.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                                **kw):
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
        assert getattr(delta, "reasoning", None) == getattr(delta, "reasoning_content", None)
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for t in delta.tool_calls or []:
            entry = calls.setdefault(t.index, ["", ""])
            entry[0] += t.function.name or ""
            entry[1] += t.function.arguments or ""
    return reasoning or None, content or None, [tuple(calls[i]) for i in sorted(calls)], finish, usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", [BASE, ADAPTER])
@pytest.mark.parametrize("bias", [0, 6])
def test_reasoning_is_the_raw_completion_split_at_the_end_tag(thinking, model, stream, bias):
    client, tokenizer = thinking
    bias_ = _end_bias(tokenizer, bias)
    reasoning, content, _, finish, usage = _chat(client, model, stream, logit_bias=bias_)
    # The same prompt and sampling through /v1/completions, which splits nothing: the raw text.
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    raw = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=24, logit_bias=bias_)
    text = raw.choices[0].text
    if "</think>" in text:
        before, _, after = text.partition("</think>")
        assert (reasoning, content) == (before or None, after.replace("</think>", "") or None)
    else:
        assert (reasoning, content) == (text, None) and finish == "length"
    assert finish == raw.choices[0].finish_reason
    thought = usage.completion_tokens_details.reasoning_tokens
    assert thought <= usage.completion_tokens and (thought > 0) == bool(reasoning)
    if model == BASE and bias == 6:  # both parts present: the split is exercised, not only its edge cases
        assert reasoning and content


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", [BASE, ADAPTER])
def test_constrained_output_starts_after_the_reasoning(thinking, model, stream):
    client, tokenizer = thinking
    # Closed at once by the bias, the reasoning is empty and the answer is the schema's JSON. Were the grammar
    # applied from the first token, `</think>` could not be emitted and the JSON would land in the reasoning.
    reasoning, content, _, finish, _ = _chat(client, model, stream, response_format=JSON,
                                             logit_bias=_end_bias(tokenizer, 100))
    assert reasoning is None and finish == "stop"
    jsonschema.validate(json.loads(content), COLOR)
    if model == BASE:  # reasoning first, then the constrained answer
        reasoning, content, _, finish, _ = _chat(client, model, stream, response_format=JSON,
                                                 logit_bias=_end_bias(tokenizer, 6))
        assert reasoning and finish == "stop"
        jsonschema.validate(json.loads(content), COLOR)
    # The prompt closed the reasoning (Qwen3's enable_thinking: false): constrained from the first token.
    reasoning, content, _, finish, usage = _chat(client, model, stream, response_format=JSON,
                                                 extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reasoning is None and finish == "stop"
    jsonschema.validate(json.loads(content), COLOR)
    assert usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_calls_are_parsed_from_the_answer_and_reasoning_can_be_left_out(thinking, stream):
    client, tokenizer = thinking
    tools = [{"type": "function", "function": {"name": "set_color", "parameters": COLOR}}]
    call = r'<tool_call>\n\{"name": "set_color", "arguments": \{"color": "(red|blue)"\}\}\n</tool_call>'
    reasoning, content, calls, finish, _ = _chat(client, BASE, stream, tools=tools, max_tokens=200,
                                                 logit_bias=_end_bias(tokenizer, 6),
                                                 extra_body={"structured_outputs": {"regex": call}})
    assert reasoning and content is None and finish == "tool_calls"
    assert [name for name, _ in calls] == ["set_color"]
    jsonschema.validate(json.loads(calls[0][1]), COLOR)
    kept = _chat(client, BASE, stream, logit_bias=_end_bias(tokenizer, 6))
    dropped = _chat(client, BASE, stream, logit_bias=_end_bias(tokenizer, 6), extra_body={"include_reasoning": False})
    assert kept[0] and dropped[0] is None and dropped[1:4] == kept[1:4]


@pytest.mark.parametrize("model", [BASE, ADAPTER])
def test_responses_answer_with_a_reasoning_item_before_the_message(thinking, model):
    client, _ = thinking
    # Unbiased (the Responses API has no logit_bias), the random weights reason until max_output_tokens.
    kw = {"model": model, "input": "What color is the shape?", "temperature": 0, "max_output_tokens": 24}
    chat = _chat(client, model, False)
    whole = client.responses.create(**kw)
    assert [item.type for item in whole.output] == ["reasoning", "message"] and whole.status == "incomplete"
    assert whole.output[0].content[0].text == chat[0]
    assert (whole.output_text or None) == chat[1]
    assert whole.usage.output_tokens_details.reasoning_tokens == chat[4].completion_tokens_details.reasoning_tokens
    events = list(client.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    done = events[-1].response
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and events[2].item.type == "reasoning"
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == chat[0]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (chat[1] or "")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [item.type for item in done.output] == ["reasoning", "message"]
    assert [o.content for o in done.output] == [o.content for o in whole.output]  # ids differ, nothing else


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_reasoning_effort_none_turns_thinking_off_as_enable_thinking_does(thinking, stream):
    client, _ = thinking
    off = _chat(client, BASE, stream, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    none = _chat(client, BASE, stream, reasoning_effort="none")
    assert none[0] is None and none[1:4] == off[1:4] and none[4].prompt_tokens == off[4].prompt_tokens
    low, default = _chat(client, BASE, stream, reasoning_effort="low"), _chat(client, BASE, stream)
    assert low[0] and low[:4] == default[:4]  # Qwen3's template has no effort levels: on is on
    # the Responses API's reasoning option reaches the template the same way
    kw = {"model": BASE, "input": "What color is the shape?", "temperature": 0, "max_output_tokens": 24}
    r = client.responses.create(reasoning={"effort": "none"}, **kw)
    assert [item.type for item in r.output] == ["message"] and r.output_text == (off[1] or "")
    assert r.reasoning.effort == "none" and r.usage.output_tokens_details.reasoning_tokens == 0
    assert [item.type for item in client.responses.create(reasoning={"effort": "high"}, **kw).output] == [
        "reasoning", "message"]
