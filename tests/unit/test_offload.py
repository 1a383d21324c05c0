"""`offload_checkpoints: true` (trainer/offload.py): checkpointed layers keep their inputs in CPU memory and
train exactly as torch's checkpoint does (CPU here: fp32, the same loss and LoRA gradients; on CUDA the GPU
test holds it against the plain checkpoint under bf16 autocast)."""

from __future__ import annotations

import pytest

from tests.unit.test_graphs import _batch, _model
from trainer.config import TrainConfig


@pytest.mark.parametrize("kw,needle", [({"offload_checkpoints": True, "gradient_checkpointing": False}, "needs gradient_checkpointing"),
                                       ({"offload_checkpoints": True, "cuda_graphs": True}, "cuda_graphs: false"),
                                       ({"offload_checkpoints": True, "cuda_graphs": False, "lora_dropout": 0.1}, "lora_dropout: 0")])
def test_what_offloading_refuses(kw, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**{"lora_dropout": 0.0, "gradient_checkpointing": True, **kw})


def _steps(model, processor, device: str, autocast: bool) -> tuple[list[float], list]:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(3):
        batch = {k: v.to(device) for k, v in _batch(processor, n=2 + step % 2, seed=step).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, [p.detach().clone() for p in params]


def test_offloaded_checkpoints_train_as_the_plain_checkpoint(demo_assets, tiny_processor, monkeypatch):
    import torch

    import trainer.offload as offload

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    original = offload._OffloadedCheckpoint.apply
    monkeypatch.setattr(offload._OffloadedCheckpoint, "apply", lambda *a: calls.append(1) or original(*a))
    plain = _model(demo_assets, False, "cpu", gradient_checkpointing=True)
    offloaded = _model(demo_assets, False, "cpu", gradient_checkpointing=True, offload_checkpoints=True)
    want_losses, want = _steps(plain, tiny_processor, "cpu", autocast=False)
    got_losses, got = _steps(offloaded, tiny_processor, "cpu", autocast=False)
    layers = len(__import__("trainer.layers", fromlist=["decoder_layers"]).decoder_layers(offloaded))
    assert len(calls) == 3 * layers  # every checkpointed layer, every step
    assert got_losses == pytest.approx(want_losses, rel=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="pinned memory and autocast on CUDA")
def test_offloaded_checkpoints_on_cuda_under_autocast(demo_assets, tiny_processor):

    plain = _model(demo_assets, False, "cuda", gradient_checkpointing=True)
    offloaded = _model(demo_assets, False, "cuda", gradient_checkpointing=True, offload_checkpoints=True)
    want_losses, want = _steps(plain, tiny_processor, "cuda", autocast=True)
    got_losses, got = _steps(offloaded, tiny_processor, "cuda", autocast=True)
    # bf16 autocast in both; the forward pass without grad may pick another attention kernel than with grad
    assert got_losses == pytest.approx(want_losses, rel=5e-3)
    for a, b in zip(got, want, strict=True):
        assert (a.float() - b.float()).norm() <= 1e-2 * b.float().norm() + 1e-6
