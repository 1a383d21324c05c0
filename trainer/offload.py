"""`offload_checkpoints: true`: gradient checkpointing whose saved layer inputs wait in CPU memory.

With gradient checkpointing a step keeps one tensor per checkpointed decoder layer until the backward pass: the
layer's input (a 4096-token row of an 8B model: 32 MiB per layer, 1.1 GiB over 36 layers). Here each
checkpointed layer's input is copied to pinned CPU memory as the forward pass leaves the layer and copied back
when the backward pass reaches it, so the device holds one layer's input at a time. The copies run on the
compute stream (ordered with the kernels around them, no synchronisation); at PCIe speed they cost a few
milliseconds per layer against a layer's recompute and backward.

Written here because neither of torch's tools does it: its checkpoint keeps the layer's inputs on the device
(its recompute holds them), and `torch.autograd.graph.save_on_cpu` moves every activation autograd saves (the
whole step's, the loss's and the vision tower's too), not the checkpoints' inputs. The recompute is the
classic re-entrant one: the layer runs without grad in the forward pass and again with grad in the backward
pass, under the forward pass's autocast state. It needs `lora_dropout: 0` (the recompute does not replay the
forward's random masks) and eager layers (a CUDA-graph capture owns its inputs' memory).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, hidden):
        ctx.run, ctx.device = run, hidden.device
        ctx.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")) if hidden.is_cuda else None
        out = run(hidden)  # autograd.Function.forward runs without grad: nothing of the layer is saved
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"offload_checkpoints: a decoder layer returned {type(out).__name__}, not a tensor")
        saved = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
        saved.copy_(hidden.detach(), non_blocking=True)
        ctx.saved = saved
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden = ctx.saved.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.saved = None
        enabled, dtype = ctx.autocast or (False, None)
        with torch.enable_grad(), torch.autocast("cuda", dtype=dtype, enabled=enabled) if ctx.autocast else nullcontext():
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        return None, hidden.grad


def offloaded_checkpoint(run, hidden, *args):
    """A `_gradient_checkpointing_func` for transformers' checkpointed layers: `run(hidden)` is the layer with its
    keyword arguments bound (transformers passes everything but the hidden states by keyword)."""
    if args:
        raise TypeError("offload_checkpoints: a decoder layer was called with more than its hidden states by position")
    return _OffloadedCheckpoint.apply(run, hidden)


def offload_checkpoints(layers) -> int:
    """Make these (checkpointed) decoder layers keep their inputs in CPU memory; returns how many."""
    count = 0
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = offloaded_checkpoint
            count += 1
    return count
