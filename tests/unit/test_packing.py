"""Packing is the unpacked computation: on the tiny model (fp32, CPU), packed rows of the same samples give the
same loss and the same LoRA gradients as one padded batch of them; positions and attention stay per sample."""

from __future__ import annotations

import pytest

from tests.images import shape_image
from trainer.data import ChatCollator, TokenCounter
from trainer.packing import PackingCollator, RopeIndex, pack


def chat(i: int, images: int, answer_words: int) -> dict:
    content = [{"type": "image", "image": shape_image(["red", "blue", "green"][(i + k) % 3], (64 + 32 * k, 64))}
               for k in range(images)]
    content.append({"type": "text", "text": f"Sample {i}: what is shown" + " please" * i + "?"})
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": " ".join(["red"] * answer_words)}]}]}


SAMPLES = [chat(0, 1, 1), chat(1, 2, 6), chat(2, 0, 3), chat(3, 1, 12), chat(4, 3, 2), chat(5, 1, 4)]


@pytest.fixture(scope="module")
def model(demo_assets):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(demo_assets["model"], dtype=torch.float32,
                                                       attn_implementation="sdpa")
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))
    return peft


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_token_counts_are_the_collators(tiny_processor):
    count = TokenCounter(tiny_processor)
    for sample in SAMPLES:
        assert count(sample) == ChatCollator(tiny_processor)([sample])["input_ids"].shape[1]


def test_packed_rows_give_the_unpacked_loss_and_gradients(model, tiny_processor):
    import torch

    count = TokenCounter(tiny_processor)
    lengths = {i: count(s) for i, s in enumerate(SAMPLES)}
    packed_length = max(lengths.values()) * 2
    rows = pack(lengths, packed_length, seed=0)
    assert sorted(i for row in rows for i in row) == list(range(len(SAMPLES)))  # every sample, once, whole
    assert len(rows) < len(SAMPLES) and all(sum(lengths[i] for i in row) <= packed_length for row in rows)
    unpacked = ChatCollator(tiny_processor)(SAMPLES)
    packed = PackingCollator(tiny_processor, RopeIndex.of(model), packed_length)(
        [[SAMPLES[i] for i in row] for row in rows])
    assert packed["input_ids"].shape == (len(rows), packed_length) and packed["position_ids"].shape[0] == 4
    assert (packed["labels"] != -100).sum() == (unpacked["labels"] != -100).sum()
    want_loss, want = loss_and_grads(model, unpacked)
    got_loss, got = loss_and_grads(model, packed)
    assert got_loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_each_sample_keeps_its_own_positions_and_sees_only_itself(model, tiny_processor):
    import torch

    rope = RopeIndex.of(model)
    collate = PackingCollator(tiny_processor, rope, 400)
    batch = collate([[SAMPLES[1], SAMPLES[3]]])
    alone = [ChatCollator(tiny_processor)([s]) for s in (SAMPLES[1], SAMPLES[3])]
    n1 = alone[0]["input_ids"].shape[1]
    first = rope(alone[0]["input_ids"], alone[0]["mm_token_type_ids"], alone[0]["image_grid_thw"])
    second = rope(alone[1]["input_ids"], alone[1]["mm_token_type_ids"], alone[1]["image_grid_thw"])
    assert torch.equal(batch["position_ids"][1:, 0, :n1], first[:, 0])  # mRoPE of sample 1 as alone
    assert torch.equal(batch["position_ids"][1:, 0, n1:n1 + second.shape[-1]], second[:, 0])  # restarts
    assert batch["position_ids"][0, 0, n1] == 0  # the text positions restart: the packed-sample boundary
    # The second sample's logits are its logits alone (attention does not reach into the first).
    with torch.no_grad():
        packed_logits = model(**batch).logits[0, n1:n1 + second.shape[-1]]
        solo_logits = model(**alone[1]).logits[0]
    torch.testing.assert_close(packed_logits, solo_logits, rtol=1e-4, atol=1e-4)


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        pack({0: 10, 1: 500}, 100, seed=0)


def _chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * (1 + (7 * i) % 40)}]}],
             "id": i} for i in range(n)]


def _tokens(chat: dict) -> int:
    return len(chat["messages"][0]["content"][0]["text"])


def test_a_stream_is_packed_window_by_window_as_pack_packs():
    from trainer.packing import PackedStream

    chats = _chats(50)
    stream = PackedStream(chats, _tokens, packed_length=64, seed=3, window=20)
    rows = [[c["id"] for c in row] for row in stream]
    expected = []
    for start in range(0, 50, 20):  # each window of the stream is packed on its own, as it arrives
        window = chats[start:start + 20]
        expected += [[window[i]["id"] for i in row]
                     for row in pack({i: _tokens(c) for i, c in enumerate(window)}, 64, 3, window=len(window))]
    assert rows == expected
    assert sorted(i for row in rows for i in row) == list(range(50))  # every record once, whole
    assert all(sum(_tokens(chats[i]) for i in row) <= 64 for row in rows)
    assert rows == [[c["id"] for c in row] for row in stream]  # the same rows again: what a resume skips over


def test_a_streamed_record_longer_than_a_row_is_dropped_or_refused():
    from trainer.packing import PackedStream

    chats = _chats(6) + [{"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 100}]}], "id": 99}]
    dropping = PackedStream(chats, _tokens, packed_length=64, seed=0, window=4)
    assert 99 not in [c["id"] for row in dropping for c in row] and dropping.dropped == 1
    with pytest.raises(ValueError, match="over the 64"):
        list(PackedStream(chats, _tokens, packed_length=64, seed=0, window=4, drop=False))
    short = PackedStream(chats, _tokens, packed_length=64, seed=0, window=4, longest=20)  # max_length 20
    assert all(_tokens(c) <= 20 for row in short for c in row) and short.dropped == 4  # 22, 29, 36, 100


def test_dataloader_workers_share_a_stream_without_repeating_a_row():
    import torch

    from trainer.packing import PackedStream

    stream = PackedStream(_chats(60), _tokens, packed_length=64, seed=1, window=25)
    alone = [[c["id"] for c in row] for row in stream]
    loader = torch.utils.data.DataLoader(stream, batch_size=1, num_workers=2, collate_fn=lambda batch: batch[0])
    assert [[c["id"] for c in row] for row in loader] == alone
