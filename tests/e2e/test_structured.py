"""Structured outputs, logprobs and logit_bias end to end: a real server, the real vLLM engine and its
structured-output backend, the official `openai` client, for the base and each adapter, streamed and not.

The tiny model's weights are random: free-form strings and numbers ramble until max_tokens, so the schemas
here constrain to enums (what a constraint must guarantee is shown just the same: every answer validates).
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel

from tests.images import data_uri, encode, image_message, shape_image

BASE = "tiny-qwen3-vl"
MODELS = [BASE, "demo-a", "demo-b"]
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "shape": {"enum": ["circle", "square"]},
                   "sure": {"type": "boolean"}},
    "required": ["color", "shape", "sure"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "finding", "schema": SCHEMA, "strict": True}}
TOOL = {"type": "function", "function": {"name": "record", "parameters": SCHEMA}}


class Finding(BaseModel):
    color: Literal["red", "green", "blue"]
    shape: Literal["circle", "square"]


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def messages() -> list[dict]:
    return image_message(data_uri(encode(shape_image("red"))), "Describe the shape as JSON.")


def _create(client, model, messages, stream=False, **kw):
    kw = {"temperature": 0, "max_tokens": 64, **kw}
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish[-1], chunks


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", MODELS)
def test_json_schema_output_validates(client, messages, model, stream):
    text, finish, _ = _create(client, model, messages, stream, response_format=JSON_SCHEMA)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("model", MODELS)
def test_parse_returns_the_pydantic_object(client, messages, model):
    r = client.chat.completions.parse(model=model, messages=messages, response_format=Finding, temperature=0,
                                      max_tokens=64)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Finding) and parsed == Finding.model_validate_json(r.choices[0].message.content)


def test_json_object_is_an_object(client, messages):
    text, finish, _ = _create(client, BASE, messages, response_format={"type": "json_object"})
    assert finish == "stop" and isinstance(json.loads(text), dict)
    for model in MODELS[1:]:  # random adapters write long keys: cut by max_tokens, but an object from the start
        assert _create(client, model, messages, response_format={"type": "json_object"}, max_tokens=8)[0][0] == "{"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", MODELS)
def test_vllm_choice_and_regex_constraints(client, messages, model, stream):
    text, finish, _ = _create(client, model, messages, stream, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert text in ("yes", "no") and finish == "stop"
    text, _, _ = _create(client, model, messages, stream, extra_body={"structured_outputs": {"regex": "[a-c]{3}-[0-9]"}})
    assert len(text) == 5 and set(text[:3]) <= set("abc") and text[3] == "-" and text[4].isdigit()
    grammar = 'root ::= "ok" | "not ok"'
    text, _, _ = _create(client, model, messages, stream, extra_body={"structured_outputs": {"grammar": grammar}})
    assert text in ("ok", "not ok")


@pytest.mark.parametrize("model", [BASE, "demo-a"])
def test_logprobs_in_both_shapes_and_with_n(client, messages, model):
    kw = dict(max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"min_tokens": 6})
    _, _, full = _create(client, model, messages, **kw)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == 6
    for token in content:  # greedy: the sampled token is the best alternative
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].logprob == token.logprob <= 0
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
        assert token.bytes == list(token.token.encode("utf-8", errors="replace"))
    _, _, chunks = _create(client, model, messages, stream=True, **kw)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    _, _, two = _create(client, model, messages, n=2, temperature=0.8, seed=3, max_tokens=4, logprobs=True,
                        extra_body={"min_tokens": 4})
    assert all(len(c.logprobs.content) == 4 and c.logprobs.content[0].top_logprobs == [] for c in two.choices)
    _, _, plain = _create(client, model, messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_logit_bias_forces_a_token(client, messages, tiny_processor):
    tokenizer = tiny_processor.tokenizer
    token_id = tokenizer("red", add_special_tokens=False)["input_ids"][0]
    token = tokenizer.decode([token_id])
    for model in (BASE, "demo-b"):
        _, _, r = _create(client, model, messages, max_tokens=4, logprobs=True, logit_bias={str(token_id): 100},
                          extra_body={"min_tokens": 4})
        assert [t.token for t in r.choices[0].logprobs.content] == [token] * 4


def test_vllm_sampling_extras_reach_the_engine(client, messages, tiny_processor):
    """vLLM's allowed_token_ids, stop_token_ids, bad_words, include_stop_str_in_output and skip_special_tokens do
    what they do on vLLM's server, for an adapter and streamed; the ones not served are a 400 naming them."""
    tokenizer = tiny_processor.tokenizer
    [shape], [color] = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("shape", "color"))  # one token each
    special = tokenizer.convert_tokens_to_ids("<|vision_end|>")

    def ids(r) -> list[int]:
        return [tokenizer.convert_tokens_to_ids(t.token) for t in r.choices[0].logprobs.content]

    def extra(model="demo-a", stream=False, bias=None, max_tokens=6, **vllm):
        kw = {"logit_bias": bias} if bias else {}
        return _create(client, model, messages, stream, max_tokens=max_tokens, logprobs=not stream,
                       extra_body=vllm, **kw)

    _, _, r = extra(allowed_token_ids=[shape, color], min_tokens=6)
    assert set(ids(r)) <= {shape, color} and len(ids(r)) == 6
    _, finish, r = extra(allowed_token_ids=[shape, color], bias={str(color): 50}, stop_token_ids=[color])
    assert finish == "stop" and ids(r) == [color]
    _, _, r = extra(bias={str(shape): 100}, bad_words=["shape"], min_tokens=6)
    assert shape not in ids(r) and len(ids(r)) == 6
    for stream in (False, True):
        kept, finish, _ = extra("demo-b", stream, {str(color): 50}, allowed_token_ids=[shape, color], stop=["color"],
                                include_stop_str_in_output=True)
        cut, _, _ = extra("demo-b", stream, {str(color): 50}, allowed_token_ids=[shape, color], stop=["color"])
        assert finish == "stop" and kept == "color" and cut == ""
        shown, _, _ = extra("demo-b", stream, max_tokens=2, allowed_token_ids=[special], skip_special_tokens=False,
                            min_tokens=2)
        hidden, _, _ = extra("demo-b", stream, max_tokens=2, allowed_token_ids=[special], min_tokens=2)
        assert shown == "<|vision_end|>" * 2 and hidden == ""
    for refused in ({"use_beam_search": True}, {"guided_json": SCHEMA}, {"stop_token_ids": [10**8]}):
        with pytest.raises(openai.BadRequestError) as exc:
            extra(**refused)
        assert exc.value.body["param"] == next(iter(refused)), exc.value.body


def test_return_token_ids_gives_the_engines_prompt_and_output_ids(client, messages, tiny_processor):
    """vLLM's return_token_ids: the prompt's ids as the engine saw them (the image expanded: as many as
    usage.prompt_tokens), each choice's generated ids (their text is the answer), streamed per chunk too."""
    kw = {"max_tokens": 6, "n": 2, "temperature": 1, "seed": 5, "extra_body": {"return_token_ids": True, "min_tokens": 6}}
    _, _, whole = _create(client, "demo-a", messages, **kw)
    tokenizer = tiny_processor.tokenizer
    prompt = whole.model_extra["prompt_token_ids"]
    assert len(prompt) == whole.usage.prompt_tokens
    assert prompt.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) > 4
    for choice in whole.choices:
        ids = choice.model_extra["token_ids"]
        assert len(ids) == 6 and tokenizer.decode(ids, skip_special_tokens=True) == choice.message.content
    _, _, chunks = _create(client, "demo-a", messages, stream=True, **kw)
    assert [c.model_extra.get("prompt_token_ids") for c in chunks if c.model_extra.get("prompt_token_ids")] == [prompt]
    streamed = {0: [], 1: []}
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] += choice.model_extra.get("token_ids") or []
    assert streamed == {c.index: c.model_extra["token_ids"] for c in whole.choices}
    plain = client.completions.create(model="demo-b", prompt="The shape is", max_tokens=3,
                                      extra_body={"return_token_ids": True, "min_tokens": 3})
    choice = plain.choices[0].model_extra
    assert choice["prompt_token_ids"] == tokenizer("The shape is")["input_ids"] and len(choice["token_ids"]) == 3
    _, _, without = _create(client, "demo-a", messages, max_tokens=2)
    assert "prompt_token_ids" not in without.model_extra and "token_ids" not in without.choices[0].model_extra


@pytest.mark.parametrize("model", [BASE, "demo-a"])
def test_prompt_logprobs_score_the_chat_prompt_as_completions_score_its_ids(client, messages, model):
    """vLLM's prompt_logprobs on chat: per prompt position (the image's included) the prompt's token with its
    rank and the k most likely (ranks 1..k), the first null; the same numbers /v1/completions gives for the
    same token ids."""
    _, _, r = _create(client, model, messages, max_tokens=2,
                      extra_body={"prompt_logprobs": 2, "return_token_ids": True})
    ids, positions = r.model_extra["prompt_token_ids"], r.model_extra["prompt_logprobs"]
    assert len(positions) == len(ids) == r.usage.prompt_tokens and positions[0] is None
    for token_id, position in zip(ids[1:], positions[1:], strict=True):
        own = position[str(token_id)]
        ranked = sorted((p for p in position.values() if p["rank"] <= 2), key=lambda p: p["rank"])
        assert own["logprob"] <= 0 and own["rank"] >= 1 and isinstance(own["decoded_token"], str)
        assert [p["rank"] for p in ranked] == [1, 2] and ranked[0]["logprob"] >= ranked[1]["logprob"]
        assert own["logprob"] <= ranked[0]["logprob"] and len(position) == 2 + (own["rank"] > 2)
    text_ids = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a shape."}],
                                              max_tokens=1, extra_body={"prompt_logprobs": 0, "return_token_ids": True})
    prompt = text_ids.model_extra["prompt_token_ids"]
    scored = client.completions.create(model=model, prompt=prompt, max_tokens=1,
                                       extra_body={"prompt_logprobs": 0}).choices[0].model_extra["prompt_logprobs"]
    chat = text_ids.model_extra["prompt_logprobs"]
    assert scored[0] is None and chat[0] is None and len(scored) == len(chat) == len(prompt)
    for token_id, a, b in zip(prompt[1:], chat[1:], scored[1:], strict=True):
        assert list(a) == list(b) == [str(token_id)] and a[str(token_id)]["rank"] == b[str(token_id)]["rank"]
        assert a[str(token_id)]["logprob"] == pytest.approx(b[str(token_id)]["logprob"], abs=1e-4)
    for refused in ({"prompt_logprobs": -1}, {"prompt_logprobs": 21}):
        with pytest.raises(openai.BadRequestError) as exc:
            _create(client, model, messages, max_tokens=1, extra_body=refused)
        assert exc.value.body["param"] == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError) as exc:
        _create(client, model, messages, stream=True, max_tokens=1, extra_body={"prompt_logprobs": 1})
    assert exc.value.body["param"] == "prompt_logprobs" and "streaming" in exc.value.body["message"]


def test_return_tokens_as_token_ids_names_each_logprob_token_by_its_id(client, messages):
    """vLLM's return_tokens_as_token_ids: the sampled tokens and their alternatives as "token_id:N" (N the id the
    engine generated, as return_token_ids lists them), their bytes their text's; whole and streamed alike."""
    kw = dict(max_tokens=6, logprobs=True, top_logprobs=2)
    ids_kw = {"min_tokens": 6, "return_token_ids": True}
    _, _, named = _create(client, "demo-a", messages, **kw, extra_body=ids_kw)
    _, _, by_id = _create(client, "demo-a", messages, **kw, extra_body={**ids_kw, "return_tokens_as_token_ids": True})
    ids = by_id.choices[0].model_extra["token_ids"]
    assert ids == named.choices[0].model_extra["token_ids"]
    content, texts = by_id.choices[0].logprobs.content, named.choices[0].logprobs.content
    assert [t.token for t in content] == [f"token_id:{i}" for i in ids]
    assert [t.bytes for t in content] == [t.bytes for t in texts] and [t.logprob for t in content] == [t.logprob for t in texts]
    for t in content:
        assert len(t.top_logprobs) == 2 and all(a.token.startswith("token_id:") and a.token[9:].isdigit()
                                                for a in t.top_logprobs)
        assert t.top_logprobs[0].token == t.token  # greedy
    _, _, chunks = _create(client, "demo-a", messages, stream=True, **kw,
                           extra_body={**ids_kw, "return_tokens_as_token_ids": True})
    streamed = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]
    prompt = "The shape is"
    legacy = dict(model="demo-b", prompt=prompt, max_tokens=3, logprobs=2, echo=True, temperature=0)
    text_lp = client.completions.create(**legacy, extra_body={"min_tokens": 3}).choices[0].logprobs
    id_choice = client.completions.create(**legacy, extra_body={"min_tokens": 3, "return_tokens_as_token_ids": True,
                                                                "return_token_ids": True}).choices[0]
    id_lp = id_choice.logprobs
    every = id_choice.model_extra["prompt_token_ids"] + id_choice.model_extra["token_ids"]
    assert id_lp.tokens == [f"token_id:{i}" for i in every] and id_lp.text_offset == text_lp.text_offset
    assert id_lp.token_logprobs == text_lp.token_logprobs
    assert all(all(k.startswith("token_id:") for k in top) for top in id_lp.top_logprobs if top)


def test_logprob_token_ids_score_the_named_tokens_in_their_order(client, messages):
    """vLLM's logprob_token_ids: each position's alternatives are the named tokens, in the order named, with the
    logprobs the top-k alternatives give them; whole, streamed and on completions; misuse is a 400 naming it."""
    kw = dict(max_tokens=4, logprobs=True)
    as_ids = {"min_tokens": 4, "return_tokens_as_token_ids": True}
    _, _, top = _create(client, "demo-a", messages, top_logprobs=3, **kw, extra_body=as_ids)
    first = top.choices[0].logprobs.content[0].top_logprobs
    best = {a.token: a.logprob for a in first}
    named = [int(a.token[9:]) for a in reversed(first)] + [7]
    _, _, r = _create(client, "demo-a", messages, **kw, extra_body={**as_ids, "logprob_token_ids": named})
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == [t.token for t in top.choices[0].logprobs.content]  # greedy, the same
    for token in content:
        assert [a.token for a in token.top_logprobs] == [f"token_id:{i}" for i in named]
    for alt in content[0].top_logprobs[:3]:
        assert alt.logprob == pytest.approx(best[alt.token], abs=1e-4)
    _, _, chunks = _create(client, "demo-a", messages, stream=True, **kw,
                           extra_body={**as_ids, "logprob_token_ids": named})
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [[a.token for a in t.top_logprobs] for t in streamed] == [[a.token for a in t.top_logprobs] for t in content]
    legacy = client.completions.create(model="demo-b", prompt="The shape is", max_tokens=2, logprobs=0,
                                       extra_body={"logprob_token_ids": named, "return_tokens_as_token_ids": True})
    assert all(list(top) == [f"token_id:{i}" for i in named] for top in legacy.choices[0].logprobs.top_logprobs)
    for bad in ({"logprobs": False}, {"top_logprobs": 2}, {"extra_body": {"logprob_token_ids": [10**6]}}):
        with pytest.raises(openai.BadRequestError) as exc:
            _create(client, "demo-a", messages, **{**kw, "extra_body": {"logprob_token_ids": named}, **bad})
        assert exc.value.body["param"] == "logprob_token_ids", exc.value.body
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="demo-b", prompt="The shape is", max_tokens=2, logprobs=0, echo=True,
                                  extra_body={"logprob_token_ids": named})
    assert exc.value.body["param"] == "logprob_token_ids"


def test_mm_processor_kwargs_set_an_images_pixel_budget(client, server, tiny_processor):
    """vLLM's mm_processor_kwargs for Qwen-VL: min_pixels / max_pixels resize each image into the request's
    budget; the engine expands it to the tokens vlora counted (usage, /tokenize), flat or under images_kwargs;
    a budget above the server's, other settings, and completions are a 400 naming it."""
    import httpx

    pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def pads(size: tuple[int, int], kwargs: dict | None) -> tuple[int, int, int]:
        msgs = image_message(data_uri(encode(shape_image("red", size=size))), "Color?")
        extra = {"return_token_ids": True, **({"mm_processor_kwargs": kwargs} if kwargs else {})}
        r = client.chat.completions.create(model="demo-a", messages=msgs, max_tokens=1, extra_body=extra)
        counted = httpx.post(f"{server.url}/tokenize", timeout=60, json={
            "model": "demo-a", "messages": msgs, **({"mm_processor_kwargs": kwargs} if kwargs else {})}).json()["count"]
        ids = r.model_extra["prompt_token_ids"]
        assert r.usage.prompt_tokens == len(ids) == counted
        return ids.count(pad), len(ids), counted

    assert pads((256, 256), None)[0] == 64  # the server's budget (4096 .. 131072 pixels, 32x32 per token)
    assert pads((256, 256), {"max_pixels": 128 * 128})[0] == 16
    assert pads((256, 256), {"images_kwargs": {"max_pixels": 128 * 128}})[0] == 16
    assert pads((32, 32), None)[0] == 4 and pads((32, 32), {"min_pixels": 128 * 128})[0] == 16
    msgs = image_message(data_uri(encode(shape_image("red"))), "Color?")
    for bad in ({"max_pixels": 10**6}, {"size": {"longest_edge": 4096}}, {"min_pixels": 8192, "max_pixels": 4096}):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="demo-a", messages=msgs, max_tokens=1,
                                           extra_body={"mm_processor_kwargs": bad})
        assert exc.value.body["param"] == "mm_processor_kwargs", exc.value.body
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="demo-a", prompt="x", max_tokens=1,
                                  extra_body={"mm_processor_kwargs": {"max_pixels": 4096}})
    assert exc.value.body["param"] == "mm_processor_kwargs"


BOUNDED = {"type": "object", "properties": {"note": {"type": "string", "minLength": 3, "maxLength": 6}},
           "required": ["note"], "additionalProperties": False}


def _control_tokens(tokenizer) -> dict[str, int]:
    """A logit_bias toward every token that decodes to a control character (U+0000-U+001F)."""
    return {str(i): 60 for i in range(len(tokenizer)) if any(ord(ch) < 32 for ch in tokenizer.decode([i]))}


def _strict_object(text: str) -> dict:
    """The JSON object in `text`, parsed as strictly as RFC 8259 reads (raw control characters refused)."""
    return json.loads(text, strict=True)


@pytest.mark.parametrize("stream", [False, True])
def test_bounded_strings_with_control_characters_are_valid_json(client, messages, tiny_processor, stream):
    """xgrammar lets a string with minLength/maxLength hold raw control characters, which JSON forbids; pushed
    toward them with logit_bias, the model writes some, and vlora's answer escapes them: strict parsers,
    `parse()` and the schema all accept it, and the decoded string is what the model wrote."""
    bias = _control_tokens(tiny_processor.tokenizer)
    fmt = {"type": "json_schema", "json_schema": {"name": "bounded", "schema": BOUNDED, "strict": True}}
    text, finish, r = _create(client, "demo-a", messages, stream, response_format=fmt, logit_bias=bias,
                              logprobs=True)
    assert finish == "stop", text
    value = _strict_object(text)
    jsonschema.validate(value, BOUNDED)
    tokens = [t.token for c in (r if stream else [r]) if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]
    assert any(ord(ch) < 32 for t in tokens for ch in t), tokens  # the model wrote raw control characters
    assert any(ord(ch) < 32 for ch in value["note"])  # and they are in the string, escaped in the JSON


def test_forced_tool_call_with_control_characters_has_valid_arguments(client, messages, tiny_processor):
    tool = {"type": "function", "function": {"name": "note", "parameters": BOUNDED}}
    bias = _control_tokens(tiny_processor.tokenizer)
    whole = client.chat.completions.create(model="demo-b", messages=messages, tools=[tool], tool_choice="required",
                                           logit_bias=bias, temperature=0, max_tokens=120)
    [call] = whole.choices[0].message.tool_calls
    arguments = _strict_object(call.function.arguments)
    jsonschema.validate(arguments, BOUNDED)
    assert any(ord(ch) < 32 for ch in arguments["note"])
    streamed = "".join(tc.function.arguments or "" for chunk in client.chat.completions.create(
        model="demo-b", messages=messages, tools=[tool], tool_choice="required", logit_bias=bias, temperature=0,
        max_tokens=120, stream=True) if chunk.choices for tc in chunk.choices[0].delta.tool_calls or [])
    assert _strict_object(streamed) == arguments


def test_a_forced_call_is_the_same_whole_and_streamed_wherever_max_tokens_cuts_it(client, messages):
    """Swept over the cut: before the name is complete (no call), inside the arguments (the call so far), after
    the call (whole): the answer and the stream agree on content, calls and finish_reason."""
    def streamed(**kw):
        content, calls, finish = "", {}, None
        for chunk in client.chat.completions.create(stream=True, **kw):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for tc in choice.delta.tool_calls or []:
                    name, args = calls.get(tc.index, ("", ""))
                    calls[tc.index] = (name + (tc.function.name or ""), args + (tc.function.arguments or ""))
                finish = choice.finish_reason or finish
        return content or None, [calls[i] for i in sorted(calls)], finish

    regimes = set()
    for max_tokens in (*range(4, 64, 6), 120):
        kw = {"model": "demo-b", "messages": messages, "tools": [TOOL], "tool_choice": "required",
              "temperature": 0, "max_tokens": max_tokens}
        whole = client.chat.completions.create(**kw).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
        regimes.add("whole" if whole.finish_reason == "tool_calls" else "partial" if calls else "none")
        s_content, s_calls, s_finish = streamed(**kw)
        assert (whole.message.content, whole.finish_reason) == (s_content, s_finish), max_tokens
        assert [n for n, _ in calls] == [n for n, _ in s_calls], max_tokens
        if whole.finish_reason == "tool_calls":  # whole: re-serialized arguments; streamed: as written
            assert [json.loads(a) for _, a in calls] == [json.loads(a) for _, a in s_calls]
        else:
            assert calls == s_calls, max_tokens
    assert regimes == {"none", "partial", "whole"}, regimes


def test_a_forced_call_cut_short_is_the_same_whole_and_streamed(client, messages):
    """max_tokens ends a required call inside its arguments: both answers hold the call with the arguments
    written so far and finish_reason "length", as OpenAI answers a call that max_tokens cut."""
    kw = {"model": "demo-a", "messages": messages, "tools": [TOOL], "tool_choice": "required", "temperature": 0,
          "max_tokens": 30}
    whole = client.chat.completions.create(**kw).choices[0]
    [call] = whole.message.tool_calls
    assert whole.finish_reason == "length" and call.function.name == "record"
    assert '"arguments"' not in call.function.arguments and call.function.arguments.startswith("{")
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "record" and deltas[0].id
    assert "".join(tc.function.arguments or "" for tc in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string",
                                                                                         "pattern": "(("}}}},
     "response_format"),
    ({"extra_body": {"structured_outputs": {"regex": "(("}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= ("}}}, "structured_outputs"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_bad_constraints_are_400_naming_the_field(client, server, messages, extra, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="demo-a", messages=messages, max_tokens=4, **extra)
    assert exc.value.body["param"] == param, exc.value.body
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert _create(client, "demo-a", messages, max_tokens=2)[0]


def test_mixed_batch_of_constrained_and_free_requests_equals_solo(client, server, messages):
    """Constrained, logprob, tool and unconstrained requests for different adapters in one engine batch each
    get exactly their solo output."""
    cases = [
        ("demo-a", {"response_format": JSON_SCHEMA}),
        ("demo-b", {"max_tokens": 16, "extra_body": {"min_tokens": 16}}),
        (BASE, {"extra_body": {"structured_outputs": {"choice": ["yes", "no"]}}}),
        ("demo-b", {"response_format": JSON_SCHEMA}),
        (BASE, {"max_tokens": 16, "extra_body": {"min_tokens": 16}}),
        ("demo-a", {"max_tokens": 8, "logprobs": True, "top_logprobs": 2, "extra_body": {"min_tokens": 8}}),
        ("demo-b", {"tools": [TOOL], "tool_choice": "required", "max_tokens": 120}),
        (BASE, {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "record"}}, "max_tokens": 120}),
    ]

    def key(r):
        lp, message = r.choices[0].logprobs, r.choices[0].message
        calls = [(t.function.name, t.function.arguments) for t in message.tool_calls or []]
        return (message.content, calls), [(t.token, t.logprob) for t in lp.content] if lp else None

    solo = [key(_create(client, m, messages, **kw)[2]) for m, kw in cases]

    async def mixed():
        aclient = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        jobs = cases * 2
        results = await asyncio.gather(*(aclient.chat.completions.create(
            model=m, messages=messages, **{"temperature": 0, "max_tokens": 64, **kw}) for m, kw in jobs))
        await aclient.close()
        return [key(r) for r in results]

    together = asyncio.run(mixed())
    for i, got in enumerate(together):
        want = solo[i % len(cases)]
        assert got[0] == want[0], f"case {i % len(cases)} differs in a mixed batch"
        if want[1] is not None:
            assert [t for t, _ in got[1]] == [t for t, _ in want[1]]
            assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got[1], want[1], strict=True))
