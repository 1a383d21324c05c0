"""Protocol models: what the official client sends parses; what is wrong is refused with a reason."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    DeltaMessage,
    ImagePart,
)
from service.serving.sse import DONE, sse_event

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def req(**kw) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return ChatCompletionRequest.model_validate(body)


def test_openai_client_shapes_parse():
    r = req(messages=[{"role": "system", "content": "s"},
                      {"role": "user", "content": [IMAGE, {"type": "text", "text": "q"}]},
                      {"role": "assistant", "content": "a"},
                      {"role": "user", "content": [{"type": "text", "text": "again"}]}],
            stream=True, stream_options={"include_usage": True}, max_completion_tokens=5, stop="x",
            top_k=5, min_p=0.1, seed=3, n=2, unknown_field="ignored")
    assert r.image_count() == 1
    assert isinstance(r.messages[1].images()[0], ImagePart)
    assert r.include_usage and r.output_limit == 5 and r.stop == ["x"]


def test_image_url_as_bare_string():
    r = req(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/y.png"}]}])
    assert r.messages[0].images()[0].image_url.url == "https://x/y.png"


@pytest.mark.parametrize("kw,needle", [
    ({"messages": []}, "at least 1"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": [{"role": "critic", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user"}]}, "needs content"),
    ({"messages": [{"role": "assistant", "content": [IMAGE]}]}, "only accepted in user messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "last message"),
    ({"messages": [{"role": "user", "content": "q"}], "continue_final_message": True,
      "add_generation_prompt": False}, "must be an assistant one"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "continue_final_message": True}, "add_generation_prompt: false"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "up to 4"),
    ({"stop": [""]}, "non-empty"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"functions": [{"name": "f"}]}, "'functions' is not supported"),
    ({"modalities": ["text", "audio"]}, "text only, not 'audio'"),
    ({"use_beam_search": True}, "'use_beam_search' is not supported by this server: beam search"),
    ({"guided_json": {"type": "object"}}, 'send structured_outputs: {"json": ...}'),
    ({"priority": 3}, "its tenant's class"),
    ({"request_id": "r1"}, "X-Request-ID"),
    ({"chat_template": "{{ x }}"}, "'chat_template' is not supported"),
    ({"echo": True, "tools": [TOOL], "tool_choice": "required"}, "echo leads the content"),
    ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words.0"),
    ({"web_search_options": {}}, "'web_search_options' is not supported"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "not among the tools"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "constrains the output"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [
        {"id": "c1", "function": {"name": "f", "arguments": "{}"}}]}]}, "only assistant messages"),
    ({"prompt_logprobs": -1}, "the whole vocabulary at every position"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": 0, "stream": True}, "not when streaming"),
    ({"return_tokens_as_token_ids": "yes please"}, "return_tokens_as_token_ids"),
    ({"truncate_prompt_tokens": 8}, "a chat prompt over the context is refused, never cut"),
    ({"mm_processor_kwargs": {"size": {"longest_edge": 9}}}, "size: only an image's min_pixels and max_pixels"),
    ({"mm_processor_kwargs": {"min_pixels": 9, "max_pixels": 3}}, "min_pixels 9 is above max_pixels 3"),
    ({"mm_processor_kwargs": {"max_pixels": 0}}, "a whole number of pixels"),
    ({"media_io_kwargs": {"video": {"num_frames": 8}}}, "the server's loaders"),
    ({"documents": "the manual"}, "documents"),
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"abc": 1}}, "token ids"),
    ({"logit_bias": {"5": 101}}, "[-100, 100]"),
    ({"response_format": {"type": "json_schema"}}, "needs its json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "exactly one"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "send one of"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "disagree"),
])
def test_invalid_requests(kw, needle):
    with pytest.raises(ValidationError) as exc:
        req(**kw)
    assert needle in str(exc.value)


def test_text_response_format_is_accepted():
    r = req(response_format={"type": "text"})
    assert r.response_format.type == "text" and r.constraint() is None


def test_vllm_extras_at_their_inert_defaults_are_accepted():
    """A client that sends vLLM's defaults (beam search off, length_penalty 1, priority 0, ...) is served."""
    r = req(use_beam_search=False, length_penalty=1.0, priority=0, return_token_ids=False, mm_processor_kwargs={},
            skip_special_tokens=True, stop_token_ids=[], bad_words=None)
    assert r.use_beam_search is False and r.stop_token_ids == []


def test_text_modality_and_hints_that_do_not_change_the_answer_are_accepted():
    """`modalities: ["text"]` is what is served; `prediction` (a latency hint) and `store` change no output."""
    r = req(modalities=["text"], prediction={"type": "content", "content": "x"}, store=False)
    assert r.modalities == ["text"]


def test_constraints_and_logprobs_are_read_once():
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"]}
    r = req(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}})
    assert r.constraint() == ("json", schema, "response_format")
    assert req(response_format={"type": "json_object"}).constraint() == ("json_object", None, "response_format")
    assert req(structured_outputs={"choice": ["a", "b"]}).constraint() == ("choice", ["a", "b"], "structured_outputs")
    assert req(structured_outputs={"json": schema}).constraint() == ("json", schema, "structured_outputs")
    assert req(logprobs=True).top_logprobs_wanted == 0 and req(logprobs=True, top_logprobs=5).top_logprobs_wanted == 5
    assert req().top_logprobs_wanted is None and req(logit_bias={"7": -100}).logit_bias == {"7": -100}


def test_sse_encoding():
    chunk = ChatCompletionChunk(id="c1", created=1, model="m",
                                choices=[ChunkChoice(index=0, delta=DeltaMessage(content="hi"))])
    event = sse_event(chunk)
    assert event.startswith("data: {") and event.endswith("}\n\n")
    assert '"content":"hi"' in event and "null" not in event
    assert DONE == "data: [DONE]\n\n"


def test_tool_modes_and_histories_parse():
    assert req().tool_mode == "none" and req(tools=[TOOL]).tool_mode == "auto"
    assert req(tools=[TOOL], tool_choice="none").tool_mode == "none"
    assert req(tools=[TOOL], tool_choice="required").forced_tools
    assert req(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "lookup"}}).tool_mode == "named"
    history = req(tools=[TOOL], messages=[
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}])
    assert history.messages[1].tool_calls[0].function.name == "lookup" and history.messages[2].tool_call_id == "c1"


def test_completions_truncate_the_prompt_as_vllm_does():
    """vLLM's truncate_prompt_tokens: the last k tokens (its default side), the first k with truncation_side
    right, the context length with -1; 0 keeps nothing and is refused."""
    from service.protocol.completions import CompletionRequest

    def truncated(context=5, **kw):
        return CompletionRequest(model="m", prompt="p", **kw).truncated(list(range(8)), context)

    assert truncated(truncate_prompt_tokens=3) == [5, 6, 7]
    assert truncated(truncate_prompt_tokens=3, truncation_side="right") == [0, 1, 2]
    assert truncated(truncate_prompt_tokens=-1) == [3, 4, 5, 6, 7]
    assert truncated(truncate_prompt_tokens=20) == truncated() == list(range(8))
    for bad, needle in ((0, "at least one token"), (-2, "greater than or equal to -1")):
        with pytest.raises(ValidationError, match=needle):
            truncated(truncate_prompt_tokens=bad)
    with pytest.raises(ValidationError, match="truncation_side"):
        truncated(truncate_prompt_tokens=2, truncation_side="middle")


def test_chat_echo_repeats_a_final_assistant_message_only():
    """vLLM's chat echo: the last message's text when it is the assistant's (a prefill), else nothing."""
    user = {"role": "user", "content": "q"}
    prefill = {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    assert req(messages=[user, prefill], echo=True, add_generation_prompt=False,
               continue_final_message=True).echoed == "a\nb"
    assert req(messages=[user], echo=True).echoed == "" and req(messages=[user, prefill], add_generation_prompt=False,
                                                                 continue_final_message=True).echoed == ""
