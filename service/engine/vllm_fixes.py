"""Runtime fixes for the pinned vLLM, applied by a `vllm.general_plugins` entry point in every vLLM process.

vLLM loads general plugins in the API process and in each engine-core process, so a fix registered here
reaches the code that actually runs the model. Each fix probes for its bug first and patches only when the
bug shows, so upgrading to a vLLM that fixed it retires the patch by itself.

`lora-no-adapter-index` — in `vllm/lora/ops/torch_ops/lora_ops.py` (the PyTorch punica ops used by the
CPU backend) a token with no adapter has index -1, and `weights[-1]` silently selects the *last* adapter
slot: a base-model request batched with adapter requests receives an adapter's delta (upstream PRs
#48421 / #49656). The fix zeroes the inputs of rows with index -1 (the LoRA delta is linear in them, so
their contribution becomes exactly zero) and clamps the index, for every bgmv op (the sgmv ops call them).
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("vlora.vllm_fixes")

_BGMV_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _no_adapter_rows_get_zero(op):
    @functools.wraps(op)
    def fixed(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        no_adapter = lora_indices_tensor < 0
        if inputs.shape[0] == lora_indices_tensor.shape[0] and bool(no_adapter.any()):
            inputs = inputs.masked_fill(no_adapter.unsqueeze(-1), 0)
            lora_indices_tensor = lora_indices_tensor.clamp(min=0)
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    fixed.__vlora_fixed__ = True
    return fixed


def lora_no_adapter_index_bug_present(lora_ops) -> bool:
    """Run the shrink op on one token with no adapter (index -1) beside a non-zero adapter slot."""
    import torch

    weights = torch.zeros(2, 1, 2, 4)
    weights[-1] = 1.0  # the last slot: what index -1 wraps to
    out = torch.zeros(1, 2)
    lora_ops.bgmv_shrink(torch.ones(1, 4), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def fix_lora_no_adapter_index() -> bool:
    """Patch the torch punica ops (and the names the CPU wrapper imported) if the bug is present."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:  # a vLLM without these ops has nothing to fix
        return False
    if getattr(lora_ops.bgmv_shrink, "__vlora_fixed__", False) or not lora_no_adapter_index_bug_present(lora_ops):
        return False
    import importlib

    modules = [lora_ops]
    for name in ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            pass
    for op_name in _BGMV_OPS:
        fixed = _no_adapter_rows_get_zero(getattr(lora_ops, op_name))
        for module in modules:
            if hasattr(module, op_name):
                setattr(module, op_name, fixed)
    if lora_no_adapter_index_bug_present(lora_ops):
        raise RuntimeError("vlora fix lora-no-adapter-index did not take effect")
    logger.info("vlora fix applied: lora-no-adapter-index")
    return True


def register() -> None:
    """Entry point of `vllm.general_plugins` (see pyproject.toml); safe to call many times."""
    fix_lora_no_adapter_index()
