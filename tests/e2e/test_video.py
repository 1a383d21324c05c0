"""Video inputs end to end: `video_url` parts decoded by vLLM's video loader (Qwen3-VL's frame sampling),
counted exactly by the model's processor for the context check, for the base and adapters, streamed and not;
and the refusals (count, address policy, undecodable bytes)."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from tests.videos import moving_circle_mp4, video_data_uri

BASE = "tiny-qwen3-vl"
MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def client(demo_server) -> OpenAI:
    return OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def video() -> str:
    return video_data_uri(moving_circle_mp4())


def _messages(*urls: str) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "video_url", "video_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": "Where does the circle move?"}]}]


@pytest.mark.parametrize("model", [BASE, "demo-a", "demo-b"])
def test_video_answers_stream_and_non_stream_alike(client, video, model):
    kw = dict(model=model, messages=_messages(video), max_tokens=8, temperature=0, extra_body={"min_tokens": 8})
    full = client.chat.completions.create(**kw)
    text_only = client.chat.completions.create(**{**kw, "messages": [{"role": "user", "content": "Where?"}]})
    assert full.usage.prompt_tokens > text_only.usage.prompt_tokens + 20  # frames became tokens
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content


def test_video_tokens_are_counted_exactly_for_the_context_check(client, demo_server, video):
    ok = client.chat.completions.create(model="demo-a", messages=_messages(video), max_tokens=2, temperature=0)
    prompt = ok.usage.prompt_tokens  # what the engine counted
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="demo-a", messages=_messages(video), max_tokens=MAX_MODEL_LEN - prompt + 1)
    assert exc.value.body["code"] == "context_length_exceeded"
    assert f"the prompt has {prompt} tokens" in exc.value.body["message"]  # vlora's own count, before the engine
    scrape = httpx.get(f"{demo_server.url}/metrics", timeout=10).text
    counted = [line for line in scrape.splitlines() if line.startswith('vlora_video_tokens_total{adapter="demo-a"}')]
    assert counted and float(counted[0].split()[-1]) > 0


@pytest.mark.parametrize(("urls", "param"), [
    (["VIDEO", "VIDEO"], "messages"),  # over --max-videos-per-request (1)
    (["http://127.0.0.2:9/clip.mp4"], "video_url"),  # loopback, not allowlisted: refused before connecting
    (["data:video/mp4;base64,AAAAAAAA"], "video_url"),  # not a decodable video
    (["data:image/png;base64,AAAA"], "video_url"),  # not a video at all
])
def test_video_refusals_name_their_field(client, video, urls, param):
    urls = [video if u == "VIDEO" else u for u in urls]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="demo-a", messages=_messages(*urls), max_tokens=2)
    assert exc.value.body["param"] == param, exc.value.body
