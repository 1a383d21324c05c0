"""Chat rendering with images, and prompt-length accounting that matches the real processor."""

from __future__ import annotations

import pytest

from service.errors import BadRequest
from service.protocol.chat import ChatCompletionRequest
from service.serving.render import ChatRenderer, to_template_messages
from tests.images import shape_image

IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def messages(*msgs):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": list(msgs)}).messages


@pytest.fixture(scope="module")
def renderer(tiny_processor) -> ChatRenderer:
    return ChatRenderer(tiny_processor)


def test_template_structure():
    out = to_template_messages(messages(
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, IMG, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]},
        {"role": "user", "content": "next"},
    ))
    assert out[0] == {"role": "system", "content": "be brief"}
    assert out[1]["content"] == [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert out[2] == {"role": "assistant", "content": "xy"}


def test_render_places_one_vision_block_per_image(renderer):
    prompt = renderer.render(messages(
        {"role": "system", "content": "S"},
        {"role": "user", "content": [IMG, IMG, {"type": "text", "text": "two?"}]},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "ok"},
    ))
    assert prompt == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * 2 + "two?<|im_end|>\n"
        "<|im_start|>assistant\nyes<|im_end|>\n"
        "<|im_start|>user\nok<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("sizes", [[], [(256, 256)], [(640, 480), (33, 47)], [(2000, 300)]])
def test_prompt_tokens_match_processor(renderer, tiny_processor, sizes):
    content = [IMG] * len(sizes) + [{"type": "text", "text": "What color is the shape?"}]
    prompt = renderer.render(messages({"role": "user", "content": content}))
    images = [shape_image("red", size) for size in sizes] or None
    real = tiny_processor(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
    assert renderer.prompt_tokens(renderer.tokenize(prompt), [renderer.image_tokens(*s) for s in sizes]) == real


def test_placeholder_count_must_match_images(renderer):
    prompt = renderer.render(messages({"role": "user", "content": [IMG, {"type": "text", "text": "q"}]}))
    with pytest.raises(BadRequest):
        renderer.prompt_tokens(renderer.tokenize(prompt), [])


def test_tools_render_like_qwen3_vl_and_need_a_template_that_knows_them(renderer, tiny_processor):
    import copy

    req = ChatCompletionRequest.model_validate({"model": "m", "tools": [
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}], "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"k": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]})
    prompt = renderer.render(req.messages, tools=req.tools, prefill="<tool_call>\n")
    assert prompt.startswith("<|im_start|>system\n# Tools\n") and '"name": "lookup"' in prompt
    assert '<tool_call>\n{"name": "lookup", "arguments": {"k": 1}}\n</tool_call><|im_end|>' in prompt
    assert "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n<tool_call>\n")
    plain = copy.deepcopy(tiny_processor)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(BadRequest) as exc:
        ChatRenderer(plain).render(req.messages, tools=req.tools)
    assert exc.value.param == "tools"


def test_prefill_continues_the_final_assistant_message(renderer):
    req = ChatCompletionRequest.model_validate({"model": "m", "continue_final_message": True,
                                                "add_generation_prompt": False, "messages": [
        {"role": "user", "content": "What color?"}, {"role": "assistant", "content": "The color is"}]})
    prompt = renderer.render(req.messages, add_generation_prompt=False, continue_final_message=True)
    assert prompt.endswith("<|im_start|>assistant\nThe color is")


def test_chat_template_kwargs_reach_the_template(tiny_processor):
    import copy

    processor = copy.deepcopy(tiny_processor)
    processor.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}")
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                                "chat_template_kwargs": {"enable_thinking": False}})
    prompt = ChatRenderer(processor).render(req.messages, template_kwargs=req.chat_template_kwargs)
    assert prompt == "q<no-think>"
    with pytest.raises(ValueError, match="add_generation_prompt cannot be set"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                              "chat_template_kwargs": {"add_generation_prompt": False}})


@pytest.mark.parametrize(("frames", "size", "fps"), [(16, (96, 96), 8), (9, (160, 90), 5), (40, (64, 200), 30),
                                                     (3, (320, 240), 1)])
def test_video_tokens_come_from_the_processors_arithmetic_without_processing_the_frames(tiny_processor, frames, size,
                                                                                       fps):
    from service.engine.vllm_engine import VLLMEngine
    from tests.videos import moving_circle_mp4

    clip = VLLMEngine.load_video(None, moving_circle_mp4(frames=frames, size=size, fps=fps),
                                 type(tiny_processor.video_processor).__name__, fps=2.0, max_frames=32)
    renderer = ChatRenderer(tiny_processor)
    assert renderer.video_ids(clip) == renderer._video_ids_processed(clip)  # the processor run whole
    # the engine's own budget (--engine-arg mm_processor_kwargs, flat: vLLM applies it to videos too)
    budgeted = ChatRenderer(tiny_processor, {"max_pixels": 64 * 64 * 4})
    assert budgeted.video_ids(clip) == budgeted._video_ids_processed(clip)
    assert len(budgeted.video_ids(clip)) < len(renderer.video_ids(clip))  # every clip here is over that budget


def test_an_image_the_processor_cannot_resize_is_a_400_naming_it(renderer):
    """Qwen's resize refuses an aspect ratio over 200: a client error, not a crash of the request."""
    with pytest.raises(BadRequest, match="4000x10 pixels cannot be processed: absolute aspect ratio") as exc:
        renderer.image_tokens(4000, 10)
    assert exc.value.param == "image_url"


def test_a_video_the_processor_cannot_resize_is_a_400_naming_it(tiny_processor):
    from service.engine.vllm_engine import VLLMEngine
    from tests.videos import moving_circle_mp4

    clip = VLLMEngine.load_video(None, moving_circle_mp4(frames=4, size=(840, 4), fps=4),
                                 type(tiny_processor.video_processor).__name__, fps=2.0, max_frames=4)
    with pytest.raises(BadRequest, match="840x4 pixels cannot be processed") as exc:
        ChatRenderer(tiny_processor).video_ids(clip)
    assert exc.value.param == "video_url"


@pytest.mark.parametrize("server,request_budget", [
    ({"max_pixels": 128 * 128}, None),
    ({"images_kwargs": {"size": {"shortest_edge": 32 * 32, "longest_edge": 256 * 256}}}, None),
    ({"max_pixels": 256 * 256}, {"min_pixels": None, "max_pixels": 64 * 64}),
    (None, {"min_pixels": 128 * 128, "max_pixels": None}),
])
def test_image_tokens_follow_the_engines_and_the_requests_pixel_budget(tiny_processor, server, request_budget):
    """The engine's own mm_processor_kwargs (--engine-arg) size every image, and a request's (up to the
    server's maximum) its own: the counts are the processor's, run with the same budget."""
    renderer = ChatRenderer(tiny_processor, server)
    sizing = renderer.image_sizing(**request_budget) if request_budget else None
    for size in ((512, 512), (40, 30), (300, 90)):
        budget = sizing or renderer.image_budget
        real = tiny_processor.image_processor(images=[shape_image("red", size)], return_tensors="pt", size={
            "shortest_edge": budget["min_pixels"], "longest_edge": budget["max_pixels"]})
        assert renderer.image_tokens(*size, sizing) == real["image_grid_thw"].prod().item() // 4
    with pytest.raises(BadRequest, match="above this server's"):
        renderer.image_sizing(None, renderer.image_budget["max_pixels"] + 1)


def test_documents_reach_a_template_that_renders_them_and_are_refused_by_one_that_does_not(tiny_processor):
    """vLLM's chat `documents` (retrieval): passed to a chat template that renders them; the tiny model's, like
    Qwen's, does not, and a 400 names them rather than leaving them out as vLLM's server does."""
    import copy

    from service.protocol.chat import ChatCompletionRequest

    docs = [{"title": "Manual", "text": "Red means stop."}]
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                                "documents": docs})
    with pytest.raises(BadRequest) as exc:
        ChatRenderer(tiny_processor).render(req.messages, documents=req.documents)
    assert exc.value.param == "documents"
    processor = copy.deepcopy(tiny_processor)
    processor.chat_template = ("{% for d in documents %}[{{ d['title'] }}: {{ d['text'] }}]{% endfor %}"
                               "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert ChatRenderer(processor).render(req.messages, documents=req.documents) == "[Manual: Red means stop.]q"
