"""`/v1/completions` end to end with the official client: base and adapters, streamed and not, legacy
logprobs, a constraint, and the refusals that name their field."""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI

from tests.e2e.test_structured import BOUNDED, _control_tokens

BASE = "tiny-qwen3-vl"
PROMPT = "What color is the shape? The shape is"


@pytest.fixture(scope="module")
def client(demo_server) -> OpenAI:
    return OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("model", [BASE, "demo-a", "demo-b"])
def test_stream_and_non_stream_agree(client, model):
    kw = dict(model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"min_tokens": 8})
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 8 and full.usage.prompt_tokens > 5
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert len({c.id for c in chunks}) == 1 and chunks[-1].usage.completion_tokens == 8


def test_adapters_answer_differently_and_reproducibly(client):
    kw = dict(prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"min_tokens": 8})
    texts = {m: client.completions.create(model=m, **kw).choices[0].text for m in (BASE, "demo-a", "demo-b")}
    assert len(set(texts.values())) == 3
    assert client.completions.create(model="demo-a", **kw).choices[0].text == texts["demo-a"]


def test_legacy_logprobs_and_constraints(client):
    r = client.completions.create(model="demo-b", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"min_tokens": 5})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset[0] == 0 and all(len(top) <= 2 for top in lp.top_logprobs)
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in range(5))
    choice = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=5, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert choice.choices[0].text in ("red", "blue")


def test_constrained_json_with_control_characters_is_valid_json_whole_and_streamed(client, tiny_processor):
    """The chat path's escaping of raw control characters in bounded strings (test_structured.py) holds here too."""
    kw = dict(model="demo-b", prompt=PROMPT, max_tokens=40, temperature=0, logit_bias=_control_tokens(tiny_processor.tokenizer),
              extra_body={"structured_outputs": {"json": BOUNDED}})
    whole = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    value = json.loads(whole)
    assert streamed == whole and any(ord(ch) < 32 for ch in value["note"]), whole


@pytest.mark.parametrize("model", [BASE, "demo-a"])
def test_echo_puts_the_prompt_before_the_completion(client, model):
    kw = dict(model=model, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=2, extra_body={"min_tokens": 6})
    plain = client.completions.create(**kw)
    echoed = client.completions.create(echo=True, **kw)
    assert [c.text for c in echoed.choices] == [PROMPT + c.text for c in plain.choices]
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens  # the prompt is not counted twice
    texts: dict[int, str] = {}
    for chunk in client.completions.create(echo=True, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(2)] == [c.text for c in echoed.choices]


def _texts(chunks) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    return texts


def test_a_batch_of_prompts_answers_each_prompt_as_alone(client, tiny_processor):
    prompts = [PROMPT, "The color is", "Shapes and colors:"]
    kw = dict(model="demo-a", max_tokens=5, temperature=0, extra_body={"min_tokens": 5})
    solo = [client.completions.create(prompt=p, **kw) for p in prompts]
    batch = client.completions.create(prompt=prompts, **kw)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [r.choices[0].text for r in solo]
    assert batch.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in solo)
    assert batch.usage.completion_tokens == 15
    chunks = list(client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True}, **kw))
    assert _texts(chunks) == {i: r.choices[0].text for i, r in enumerate(solo)}
    assert len({c.id for c in chunks}) == 1 and chunks[-1].usage.completion_tokens == 15
    # token ids instead of text: the same prompts, the same answers (echo gives the prompt's text back)
    ids = [tiny_processor.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert client.completions.create(prompt=ids[0], **kw).choices[0].text == solo[0].choices[0].text
    by_ids = client.completions.create(prompt=ids, echo=True, **kw)
    assert [c.text for c in by_ids.choices] == [p + r.choices[0].text for p, r in zip(prompts, solo, strict=True)]
    # n choices per prompt: the k-th prompt's choices are k*n .. k*n+n-1
    sampled = dict(model="demo-b", max_tokens=4, temperature=1.0, seed=5, n=2)
    alone = [client.completions.create(prompt=p, **sampled).choices for p in prompts[:2]]
    both = client.completions.create(prompt=prompts[:2], **sampled).choices
    assert [(c.index, c.text) for c in both] == [(k * 2 + c.index, c.text) for k, cs in enumerate(alone) for c in cs]


def _merged_stream_logprobs(chunks) -> dict[int, dict[str, list]]:
    out: dict[int, dict[str, list]] = {}
    for chunk in chunks:
        for c in chunk.choices:
            merged = out.setdefault(c.index, {"text": [], "tokens": [], "token_logprobs": [], "text_offset": []})
            merged["text"].append(c.text)
            if c.logprobs is not None:
                for key in ("tokens", "token_logprobs", "text_offset"):
                    merged[key] += getattr(c.logprobs, key)
    return out


@pytest.fixture(scope="module")
def reference(demo_assets):
    """The tiny model in transformers (fp32), bare and with demo-a (peft): an independent scorer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    def load(adapter=None):
        model = AutoModelForImageTextToText.from_pretrained(demo_assets["model"], dtype=torch.float32)
        return (PeftModel.from_pretrained(model, demo_assets["adapter_dir"] / adapter) if adapter else model).eval()

    return {BASE: load(), "demo-a": load("demo-a")}


def _scores(model, ids: list[int]) -> list[float]:
    """log p(token i | the tokens before it), for i >= 1."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


@pytest.mark.parametrize("model", [BASE, "demo-a"])
def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(client, model, reference, tiny_processor):
    kw = dict(model=model, max_tokens=4, temperature=0, logprobs=2, extra_body={"min_tokens": 4})
    plain = client.completions.create(prompt=PROMPT, **kw).choices[0]
    echoed = client.completions.create(prompt=PROMPT, echo=True, **kw)
    lp, n = echoed.choices[0].logprobs, echoed.usage.prompt_tokens
    assert echoed.choices[0].text == PROMPT + plain.text and len(lp.tokens) == n + 4
    assert "".join(lp.tokens[:n]) == PROMPT and lp.text_offset[n] == len(PROMPT)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    assert all(x <= 0 and len(top) <= 2 for x, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True))
    assert lp.tokens[n:] == plain.logprobs.tokens
    assert lp.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)
    # the prompt's scores are the model's own, through the adapter too (transformers + peft in fp32 against
    # the engine's bf16)
    ids = tiny_processor.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert lp.token_logprobs[1:n] == pytest.approx(_scores(reference[model], ids), abs=0.1)
    sampled = {**kw, "n": 2, "temperature": 1.0, "seed": 7}  # two choices: each streams the prompt's logprobs
    whole = client.completions.create(prompt=PROMPT, echo=True, **sampled).choices
    streamed = _merged_stream_logprobs(client.completions.create(prompt=PROMPT, echo=True, stream=True, **sampled))
    for i in range(2):
        assert "".join(streamed[i]["text"]) == whole[i].text
        assert streamed[i]["tokens"] == whole[i].logprobs.tokens
        assert streamed[i]["text_offset"] == whole[i].logprobs.text_offset
        assert streamed[i]["tokens"][:n] == lp.tokens[:n] and streamed[i]["token_logprobs"][0] is None
        assert streamed[i]["token_logprobs"][1:] == pytest.approx(whole[i].logprobs.token_logprobs[1:], abs=1e-4)


def test_prompt_logprobs_beside_echo_keep_each_its_own_count(client):
    """prompt_logprobs (vLLM's shape, in each choice) and echo's logprobs ask the engine once: each answer keeps
    as many alternatives as it asked for, and they agree on every prompt token's logprob."""
    r = client.completions.create(model="demo-a", prompt=PROMPT, max_tokens=2, echo=True, logprobs=1, n=2,
                                  seed=3, extra_body={"prompt_logprobs": 3, "return_token_ids": True})
    n = r.usage.prompt_tokens
    for choice in r.choices:
        lp, positions = choice.logprobs, choice.model_extra["prompt_logprobs"]
        ids = choice.model_extra["prompt_token_ids"]
        assert len(positions) == len(ids) == n and positions[0] is None and lp.top_logprobs[0] is None
        assert all(len(top) <= 1 for top in lp.top_logprobs[1:])
        for token_id, position, logprob in zip(ids[1:], positions[1:], lp.token_logprobs[1:n], strict=True):
            own = position[str(token_id)]
            assert sorted(p["rank"] for p in position.values())[:3] == [1, 2, 3]
            assert len(position) == 3 + (own["rank"] > 3) and own["logprob"] == logprob
    assert r.choices[0].model_extra["prompt_logprobs"] == r.choices[1].model_extra["prompt_logprobs"]
    assert "prompt_logprobs" not in client.completions.create(model="demo-a", prompt=PROMPT,
                                                              max_tokens=1).choices[0].model_extra


def test_truncate_prompt_tokens_serves_the_kept_tokens(client, tiny_processor):
    """vLLM's truncate_prompt_tokens: the engine reads only the last k tokens (the first k with truncation_side
    right); usage counts them, echo returns their text, and the answer is the one to those tokens sent alone."""
    ids = tiny_processor.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    kw = dict(model="demo-a", max_tokens=4, temperature=0, echo=True, extra_body={"min_tokens": 4})
    for side, kept in (("left", ids[-4:]), ("right", ids[:4])):
        cut = client.completions.create(prompt=PROMPT, **{**kw, "extra_body": {
            "min_tokens": 4, "truncate_prompt_tokens": 4, "truncation_side": side, "return_token_ids": True}})
        alone = client.completions.create(prompt=kept, **kw)
        choice = cut.choices[0]
        assert cut.usage.prompt_tokens == 4 and choice.model_extra["prompt_token_ids"] == kept
        assert choice.text == alone.choices[0].text and choice.text.startswith(tiny_processor.tokenizer.decode(kept))
    whole = client.completions.create(prompt=PROMPT, **{**kw, "extra_body": {"truncate_prompt_tokens": 1000}})
    assert whole.usage.prompt_tokens == len(ids) and whole.choices[0].text.startswith(PROMPT)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="demo-a", messages=[{"role": "user", "content": PROMPT}],
                                       extra_body={"truncate_prompt_tokens": 4})
    assert exc.value.body["param"] == "truncate_prompt_tokens"


def test_echo_with_logprobs_batched_with_other_adapters_gets_its_solo_answer(client):
    """The engine computes prompt logprobs beside other requests' sampling (a vLLM bug crashed it there:
    service/engine/vllm_fixes.py, lora-prompt-logprobs)."""
    from concurrent.futures import ThreadPoolExecutor

    kw = dict(max_tokens=6, temperature=0, extra_body={"min_tokens": 6})
    jobs = [dict(model=m, prompt=PROMPT + " " * i, echo=i % 2 == 0, logprobs=2, **kw)
            for i, m in enumerate([BASE, "demo-a", "demo-b", "demo-a", BASE, "demo-b"])]

    def answer(job):
        c = client.completions.create(**job).choices[0]
        return c.text, c.logprobs.tokens, c.logprobs.token_logprobs

    solo = [answer(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(answer, jobs))
    for (text, tokens, lps), (want_text, want_tokens, want_lps) in zip(batched, solo, strict=True):
        assert (text, tokens) == (want_text, want_tokens)
        assert [x is None for x in lps] == [x is None for x in want_lps]
        # batched GEMMs round differently on CPU: the same tokens, logprobs within 1e-2
        assert [x for x in lps if x is not None] == pytest.approx([x for x in want_lps if x is not None], abs=1e-2)


@pytest.mark.parametrize(("kw", "param"), [
    ({"prompt": []}, "prompt"),
    ({"prompt": [PROMPT, ""]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),  # a token id outside the vocabulary
    ({"prompt": [PROMPT] * 65}, "prompt"),
    ({"prompt": [PROMPT, "word " * 40000]}, "prompt"),  # one prompt of the batch over the context
    ({"suffix": "x"}, "suffix"),
    ({"logprobs": 6}, "logprobs"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"prompt": "<|vision_start|><|image_pad|><|vision_end|>"}, "prompt"),
])
def test_refusals_name_their_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="demo-a", **{"prompt": PROMPT, "max_tokens": 4, **kw})
    assert exc.value.body["param"] == param, exc.value.body


@pytest.mark.parametrize("model", [BASE, "demo-a"])
def test_prefill_continues_the_final_message_exactly_like_the_raw_prompt(client, model):
    kw = dict(max_tokens=6, temperature=0, extra_body={"min_tokens": 6})
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What color?"},
                               {"role": "assistant", "content": "The color is"}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "min_tokens": 6},
        max_tokens=6, temperature=0)
    raw = client.completions.create(model=model, prompt="<|im_start|>user\nWhat color?<|im_end|>\n"
                                                        "<|im_start|>assistant\nThe color is", **kw)
    assert chat.choices[0].message.content == raw.choices[0].text
    assert chat.usage.prompt_tokens == raw.usage.prompt_tokens
    # vLLM's chat echo: the prefill leads the content (its text parts one per line), whole and streamed alike
    prefill = [{"role": "user", "content": "What color?"},
               {"role": "assistant", "content": [{"type": "text", "text": "The color"}, {"type": "text", "text": "is"}]}]
    echo = dict(model=model, messages=prefill, max_tokens=6, temperature=0, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "min_tokens": 6, "echo": True})
    whole = client.chat.completions.create(**echo)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **echo)
                       if c.choices)
    assert whole.choices[0].message.content.startswith("The color\nis") and streamed == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 6
    plain = client.chat.completions.create(model=model, messages=prefill[:1], max_tokens=3, temperature=0)
    assert client.chat.completions.create(model=model, messages=prefill[:1], max_tokens=3, temperature=0,
                                          extra_body={"echo": True}).choices[0].message.content == plain.choices[0].message.content
