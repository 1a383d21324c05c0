"""The lora-no-adapter-index fix: rows without an adapter get exactly zero LoRA delta."""

from __future__ import annotations

import types

import pytest
import torch

from service.engine import vllm_fixes


def buggy_bgmv_shrink(inputs, lora_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    # The upstream op: weights[-1] silently selects the last adapter slot.
    selected = lora_weights[lora_indices_tensor].squeeze(1)
    output_tensor[:, : selected.shape[1]] = scaling * torch.einsum("bi,boi->bo", inputs, selected)


def buggy_bgmv_expand(inputs, lora_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    selected = lora_weights[lora_indices_tensor].squeeze(1)
    out = torch.einsum("bi,boi->bo", inputs, selected)
    if add_inputs:
        output_tensor[:, : out.shape[1]] += out
    else:
        output_tensor[:, : out.shape[1]] = out


def test_probe_detects_the_bug_and_the_fix():
    ops = types.SimpleNamespace(bgmv_shrink=buggy_bgmv_shrink)
    assert vllm_fixes.lora_no_adapter_index_bug_present(ops)
    ops.bgmv_shrink = vllm_fixes._no_adapter_rows_get_zero(buggy_bgmv_shrink)
    assert not vllm_fixes.lora_no_adapter_index_bug_present(ops)


def test_fixed_ops_leave_adapter_rows_unchanged():
    torch.manual_seed(0)
    weights = torch.randn(3, 1, 4, 8)
    x = torch.randn(5, 8)
    idx = torch.tensor([0, -1, 2, -1, 1])
    expected = torch.zeros(5, 4)
    buggy_bgmv_shrink(x, weights, expected, idx.clamp(min=0), 0.5)
    expected[idx < 0] = 0
    got = torch.zeros(5, 4)
    vllm_fixes._no_adapter_rows_get_zero(buggy_bgmv_shrink)(x, weights, got, idx, 0.5)
    torch.testing.assert_close(got, expected)

    base = torch.randn(5, 6)
    y = base.clone()
    vllm_fixes._no_adapter_rows_get_zero(buggy_bgmv_expand)(torch.randn(5, 4), torch.randn(3, 1, 6, 4), y, idx)
    torch.testing.assert_close(y[idx < 0], base[idx < 0])  # untouched
    assert not torch.allclose(y[idx >= 0], base[idx >= 0])


def test_installed_vllm_is_patched_when_needed():
    lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
    vllm_fixes.register()
    assert not vllm_fixes.lora_no_adapter_index_bug_present(lora_ops)
    vllm_fixes.register()  # idempotent
    from vllm.lora.punica_wrapper import punica_cpu

    assert punica_cpu.bgmv_shrink is lora_ops.bgmv_shrink
