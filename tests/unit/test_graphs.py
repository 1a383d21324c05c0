"""CUDA graphs for the decoder layers (trainer/graphs.py): when a layer may replay a capture, and that a
graphed training step equals the eager one (on CUDA; the CPU checks cover the dispatcher's fallbacks)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainer.config import TrainConfig


@pytest.mark.parametrize("kw,needle", [({"cuda_graphs": True, "gradient_checkpointing": True, "lora_dropout": 0.05},
                                        "lora_dropout"),
                                       ({"checkpoint_layers": -1}, "checkpoint_layers"),
                                       ({"cuda_graphs": True, "gradient_checkpointing": False, "torch_compile": True},
                                        "torch_compile"),
                                       ({"cuda_graph_shapes": 0}, "cuda_graph_shapes"),
                                       ({"fsdp": True, "cuda_graphs": True, "gradient_checkpointing": False}, "fsdp"),
                                       ({"fsdp": True, "quantization": "4bit"}, "fsdp"),
                                       ({"fsdp": True, "optim": "adamw_bnb_8bit"}, "bitsandbytes"),
                                       ({"pad_to_multiple_of": 0}, "pad_to_multiple_of")])
def test_invalid_combinations(kw, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**kw)


def test_what_runs_eagerly():
    import torch

    from trainer.graphs import LayerGraphs

    layer = SimpleNamespace(training=True)
    cuda = SimpleNamespace(is_cuda=True)
    pe = (object(), object())
    why = LayerGraphs._ineligible
    assert why(layer, cuda, pe, None, {"num_items_in_batch": 7}) == ""
    assert why(SimpleNamespace(training=False), cuda, pe, None, {}) == "not training"
    with torch.no_grad():
        assert why(layer, cuda, pe, None, {}) == "not training"
    assert why(layer, SimpleNamespace(is_cuda=False), pe, None, {}) == "not on a CUDA device"
    assert "KV cache" in why(layer, cuda, pe, object(), {})
    assert "position embeddings" in why(layer, cuda, None, None, {})
    # flash-attention's packed-sequence lengths change what the layer computes: never baked into a graph
    assert "cu_seq_lens_q" in why(layer, cuda, pe, None, {"cu_seq_lens_q": object(), "num_items_in_batch": 1})


def _batch(processor, n: int = 2, pad_to: int | None = None, seed: int = 0):
    from tests.images import shape_image
    from trainer.data import ChatCollator

    records = []
    for i in range(n):
        color = ("red", "blue", "green")[(i + seed) % 3]
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Color?" * (i + 1)}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"a {color} circle"}]}]})
    images = iter([shape_image(("red", "blue", "green")[(i + seed) % 3], (64, 64)) for i in range(n)])
    collator = ChatCollator(processor, pad_to_multiple_of=pad_to)
    import trainer.data as data

    original = data.open_image
    data.open_image = lambda ref: next(images)
    try:
        return collator(records)
    finally:
        data.open_image = original


def test_pad_to_multiple_of(tiny_processor):
    plain = _batch(tiny_processor)
    padded = _batch(tiny_processor, pad_to=64)
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] >= plain["input_ids"].shape[1]
    # padding adds no supervised tokens
    assert (padded["labels"] != -100).sum() == (plain["labels"] != -100).sum()


def _model(demo_assets, cuda_graphs: bool, device: str, with_speedups: bool = False, **overrides):
    import torch

    from trainer.train import prepare_model

    config = TrainConfig(base_model=str(demo_assets["model"]), lora_dropout=0.0, cuda_graphs=cuda_graphs,
                         kernels="auto", **{"gradient_checkpointing": False, **overrides})
    torch.manual_seed(0)
    model, _, speedups = prepare_model(config)
    with torch.no_grad():  # non-zero B, so that the adapters change the loss and get input gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model = model.to(device).train()
    return (model, speedups) if with_speedups else model


def test_cpu_runs_every_layer_eagerly_with_the_same_loss(demo_assets, tiny_processor, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also where a GPU is present

    from trainer.graphs import LayerGraphs
    from trainer.layers import decoder_layers

    eager = _model(demo_assets, False, "cpu")
    graphed, speedups = _model(demo_assets, True, "cpu", with_speedups=True)  # no CUDA: layers left alone
    assert speedups.graphs is None
    graphs = LayerGraphs(decoder_layers(graphed))  # installed anyway: every call must fall back
    batch = _batch(tiny_processor)
    a, b = eager(**batch).loss, graphed(**batch).loss
    assert torch.equal(a, b)
    n = len(decoder_layers(graphed))
    assert graphs.stats() == {"shapes": 0, "replays": 0, "eager_calls": n, "capture_seconds": 0.0}
    assert graphs._told == {"not on a CUDA device"}


def test_stand_in_parameters_compute_the_same_and_take_the_gradients(demo_assets, tiny_processor, monkeypatch):
    import torch

    from trainer.graphs import _Captured
    from trainer.layers import decoder_layers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _model(demo_assets, False, "cpu")
    layer = decoder_layers(model)[0]
    captured = _Captured(layer, has_mask=False, has_pos=False)
    assert captured.params and len(captured.proxies) == len(captured.params)
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(captured.params, captured.proxies.values(), strict=True))
    hidden = torch.randn(2, 5, 128)
    cos, sin = torch.ones(2, 5, 64), torch.zeros(2, 5, 64)  # head_dim 64
    out = captured.run(hidden, cos, sin)
    assert torch.equal(out, type(layer).forward(layer, hidden, (cos, sin)))
    grads = torch.autograd.grad(out.sum(), list(captured.proxies.values()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in captured.params)  # the real parameters' accumulators never ran
    assert all(getattr(layer.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) is p
               for n, p in zip(captured.proxies, captured.params, strict=True))  # parameters put back


def test_checkpointed_capture_function_computes_the_same_values_and_gradients(demo_assets, monkeypatch):
    """What a checkpointed capture records (trainer.graphs._Captured.run with checkpoint): the same output and
    stand-in gradients as the plain layer, with only the input saved for the backward."""
    import torch

    from trainer.graphs import _Captured
    from trainer.layers import decoder_layers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    layer = decoder_layers(_model(demo_assets, False, "cpu"))[0]
    hidden = torch.randn(2, 5, 128, requires_grad=True)
    cos, sin = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    results = []
    for checkpoint in (False, True):
        captured = _Captured(layer, has_mask=False, has_pos=False, checkpoint=checkpoint)
        saved: list = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, into=saved: into.append(t) or t,
                                                      lambda t: t):
            out = captured.run(hidden, cos, sin)
        grads = torch.autograd.grad(out.square().sum(), [hidden, *captured.proxies.values()], allow_unused=True)
        results.append((out.detach(), grads, len(saved)))
    (plain, plain_grads, plain_saved), (ckpt, ckpt_grads, ckpt_saved) = results
    assert torch.allclose(plain, ckpt)
    assert all((a is None and b is None) or torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, ckpt_grads,
                                                                                              strict=True))
    assert ckpt_saved < plain_saved / 4, (ckpt_saved, plain_saved)  # the checkpoint keeps its inputs, not the layer's


def test_partial_checkpointing_keeps_the_loss_and_gradients(demo_assets, tiny_processor, monkeypatch):
    """checkpoint_layers: N checkpoints the first N decoder layers only; the step's numbers do not change."""
    import torch

    from trainer.layers import decoder_layers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    batch = _batch(tiny_processor)
    results = []
    for overrides in ({"gradient_checkpointing": False}, {"gradient_checkpointing": True, "checkpoint_layers": 1}):
        model = _model(demo_assets, False, "cpu", **overrides)
        flags = [layer.gradient_checkpointing for layer in decoder_layers(model)]
        loss = model(**batch).loss
        loss.backward()
        results.append((flags, loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (plain_flags, plain_loss, plain_grads), (flags, loss, grads) = results
    assert plain_flags == [False, False] and flags == [True, False]
    assert torch.allclose(plain_loss, loss)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, grads, strict=True))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_graphed_steps_equal_eager_steps(demo_assets, tiny_processor, checkpointed):
    import torch

    eager = _model(demo_assets, False, "cuda", gradient_checkpointing=checkpointed)
    graphed, speedups = _model(demo_assets, True, "cuda", with_speedups=True, gradient_checkpointing=checkpointed)
    graphs = speedups.graphs
    assert graphs.checkpoint == (len(graphs.layers) if checkpointed else 0)
    layers = len(graphs.layers)
    results = {}
    for name, model in (("eager", eager), ("graphed", graphed)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        losses, grads = [], None
        for step in range(4):
            for micro in range(2):  # gradient accumulation: the second backward adds to the first
                batch = {k: v.to("cuda") for k, v in _batch(tiny_processor, n=2 + step % 2, seed=micro).items()}
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**batch).loss
                loss.backward()
                losses.append(loss.item())
            grads = [p.grad.detach().clone() for p in params]
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[name] = (losses, grads)
        model.eval()
        with torch.no_grad():  # evaluation runs eagerly
            model(**{k: v.to("cuda") for k, v in _batch(tiny_processor).items()})
    (el, eg), (gl, gg) = results["eager"], results["graphed"]
    # the same kernels on the same inputs: bit for bit the same losses and adapter gradients
    assert el == gl, (el, gl)
    assert all(torch.equal(a, b) for a, b in zip(eg, gg, strict=True))
    stats = graphs.stats()
    # two batch shapes (2 and 3 samples) captured, each replayed on the steps that had it; eval was eager
    assert stats["shapes"] == 2 and stats["replays"] == 8 * layers and stats["eager_calls"] == layers


def test_fsdp_arguments_shard_by_layer(demo_assets, monkeypatch):
    import torch

    from trainer.model import fsdp_arguments, load_base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = TrainConfig(base_model=str(demo_assets["model"]), fsdp=True, gradient_checkpointing=True)
    model = load_base(config)
    assert fsdp_arguments(model, TrainConfig()) == {}
    args = fsdp_arguments(model, config)
    assert args["fsdp"] == "full_shard auto_wrap"
    assert args["fsdp_config"] == {"version": 2, "activation_checkpointing": True,
                                   "transformer_layer_cls_to_wrap": ["Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"]}
