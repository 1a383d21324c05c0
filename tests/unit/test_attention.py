"""`attn_implementation: varlen` (trainer/attention.py): each packed sample attends causally to itself only.
On CPU it is SDPA with the block-diagonal mask built from the positions (the same loss and gradients as
transformers' own SDPA path); on CUDA the FlashAttention-2 variable-length kernel, which the GPU tests hold
against SDPA and inside CUDA graphs."""

from __future__ import annotations

import pytest

from tests.unit.test_packing import SAMPLES, loss_and_grads
from trainer.attention import _cu_seqlens, block_causal_mask, register, varlen_mask
from trainer.data import TokenCounter
from trainer.packing import MAX_SAMPLES_PER_ROW, PackingCollator, RopeIndex, pack

needs_cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the varlen kernel needs CUDA")


def test_sample_boundaries_come_from_restarting_positions():
    import torch

    one = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]])
    assert _cu_seqlens(one, 5).tolist() == [0, 3, 5, 9, 10, 10]  # unused entries: empty sequences at the end
    two = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])  # a row's start is a boundary whatever its position
    assert _cu_seqlens(two, 3).tolist() == [0, 3, 5, 7, 10, 10, 10]
    assert _cu_seqlens(torch.tensor([[5, 6, 7, 8]]), 2).tolist() == [0, 4, 4]  # one sequence, not from 0


def test_the_mask_is_causal_within_each_sample_only():
    import torch

    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = block_causal_mask(positions)[0, 0]
    sample = [0, 0, 0, 1, 1, 2]
    want = torch.tensor([[sample[q] == sample[k] and k <= q for k in range(6)] for q in range(6)])
    assert torch.equal(mask, want)


def test_transformers_hands_no_mask_only_where_the_positions_decide():
    import torch

    common = {"batch_size": 1, "q_length": 4, "kv_length": 4, "device": torch.device("cpu"),
              "mask_function": lambda b, h, q, k: k <= q, "dtype": torch.float32}
    assert varlen_mask(**common) is None  # packed or plain training rows: the positions say it all
    padded = varlen_mask(**{**common, "attention_mask": torch.tensor([[True, True, True, False]]),
                            "allow_is_causal_skip": False})
    assert padded is not None and padded.shape == (1, 1, 4, 4)  # a padding mask: SDPA's own mask
    cached = varlen_mask(**{**common, "q_length": 1, "kv_offset": 0, "q_offset": 3, "allow_is_causal_skip": False})
    assert cached is not None  # a KV cache offset (generation): SDPA's own mask


def test_rows_never_hold_more_samples_than_the_boundaries_do():
    lengths = {i: 3 for i in range(500)}
    rows = pack(lengths, packed_length=4096, seed=0)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert max(len(row) for row in rows) == MAX_SAMPLES_PER_ROW
    assert max(len(row) for row in pack(lengths, 4096, seed=0, max_samples=7)) == 7


def _models(demo_assets, device: str, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    register()
    out = {}
    for attn in ("sdpa", "varlen"):
        torch.manual_seed(0)
        base = AutoModelForImageTextToText.from_pretrained(demo_assets["model"], dtype=dtype, attn_implementation=attn)
        out[attn] = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).to(device)
    return out


def _packed(model, processor, device: str) -> dict:
    count = TokenCounter(processor)
    lengths = {i: count(s) for i, s in enumerate(SAMPLES)}
    packed_length = max(lengths.values()) * 2
    rows = pack(lengths, packed_length, seed=0)
    batch = PackingCollator(processor, RopeIndex.of(model), packed_length)([[SAMPLES[i] for i in row] for row in rows])
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def _both(demo_assets, processor, device: str, dtype) -> tuple:
    """(sdpa loss, sdpa grads, varlen loss, varlen grads) on the same packed rows."""
    models = _models(demo_assets, device, dtype)
    batch = _packed(models["sdpa"], processor, device)
    return (*loss_and_grads(models["sdpa"], batch), *loss_and_grads(models["varlen"], batch))


def test_packed_rows_on_cpu_give_sdpas_loss_and_gradients(demo_assets, tiny_processor):
    import torch

    want_loss, want, got_loss, got = _both(demo_assets, tiny_processor, "cpu", torch.float32)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@needs_cuda
def test_the_varlen_kernel_gives_sdpas_loss_and_gradients_on_cuda(demo_assets, tiny_processor):
    import torch

    want_loss, want, got_loss, got = _both(demo_assets, tiny_processor, "cuda", torch.bfloat16)
    assert got_loss == pytest.approx(want_loss, rel=2e-2)
    for name, grad in want.items():  # bf16: the two kernels sum in different orders
        assert (got[name].float() - grad.float()).norm() <= 0.05 * grad.float().norm() + 1e-6, name


@needs_cuda
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_graphed_varlen_steps_equal_eager_ones(demo_assets, tiny_processor, checkpointed):
    import torch

    from tests.unit.test_graphs import _model

    results = {}
    for graphs in (False, True):
        model = _model(demo_assets, graphs, "cuda", attn_implementation="varlen", packing=True,
                       gradient_checkpointing=checkpointed)
        batch = _packed(model, tiny_processor, "cuda")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        losses = []
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            losses.append(loss.item())
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[graphs] = (losses, [p.detach().clone() for p in params])
    (el, ew), (gl, gw) = results[False], results[True]
    assert el == gl, (el, gl)
    assert all(torch.equal(a, b) for a, b in zip(ew, gw, strict=True))
