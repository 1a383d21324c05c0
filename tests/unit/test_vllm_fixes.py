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


def test_lora_device_of_a_layer_whose_weight_went_to_onednn():
    """vLLM's own function fails on the layer its CPU int8 kernel leaves (weight None, scales kept); after
    register() every LoRA layer module answers the scales' device, and other layers still get vLLM's answer."""
    pytest.importorskip("vllm.lora.layers")
    from vllm.lora.layers import base_linear, fused_moe, utils

    layer = torch.nn.Module()
    layer.weight = None
    layer.weight_scale = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    vllm_fixes.register()
    for module in (utils, base_linear, fused_moe):
        assert module._get_lora_device(layer) == torch.device("cpu")
    linear = torch.nn.Linear(2, 2, device="meta")
    assert base_linear._get_lora_device(linear) == torch.device("meta")  # vLLM's own path
    assert vllm_fixes.lora_prepacked_device_bug_present(utils._get_lora_device.__wrapped__)


@pytest.mark.parametrize(("env", "cores", "expected"), [
    ({}, 2, 50.0), ({}, 8, 0.0), ({"VLORA_ENGINE_SPIN_SLEEP_US": "200"}, 64, 200.0),
    ({"VLORA_ENGINE_SPIN_SLEEP_US": "0"}, 2, 0.0),
])
def test_spin_sleep_defaults_to_small_hosts_only(env, cores, expected):
    assert vllm_fixes.engine_spin_sleep_us(env, cores) == expected


def test_spin_sleep_refuses_negative_values():
    with pytest.raises(ValueError, match="VLORA_ENGINE_SPIN_SLEEP_US"):
        vllm_fixes.engine_spin_sleep_us({"VLORA_ENGINE_SPIN_SLEEP_US": "-1"}, 2)


def test_shm_queue_spin_sleeps_instead_of_yielding(monkeypatch):
    from vllm.distributed.device_communicators import shm_broadcast

    monkeypatch.setattr(shm_broadcast, "sched_yield", shm_broadcast.sched_yield)  # restored afterwards
    monkeypatch.setenv("VLORA_ENGINE_SPIN_SLEEP_US", "100")
    assert vllm_fixes.tune_shm_spin() == 100.0
    patched = shm_broadcast.sched_yield
    assert patched.__vlora_fixed__
    assert vllm_fixes.tune_shm_spin() == 100.0 and shm_broadcast.sched_yield is patched  # idempotent
    # The spin condition's wait() and the writer's acquire loop call the module-level name.
    import inspect
    assert "sched_yield()" in inspect.getsource(shm_broadcast.SpinCondition.wait)


def test_prompt_rows_get_the_base_heads_logits_and_sampled_rows_vllms_path():
    from types import SimpleNamespace

    from service.engine.vllm_fixes import _base_logits_for_prompt_rows

    calls = []
    original = lambda self, h, head, bias=None, skip=False: calls.append(("lora", h.shape[0])) or "lora"  # noqa: E731
    base = SimpleNamespace(_get_logits=lambda h, head, bias: calls.append(("base", h.shape[0], head)) or "base")
    layer = SimpleNamespace(punica_wrapper=SimpleNamespace(sampler_indices=torch.zeros(2)), base_layer=base)
    fixed = _base_logits_for_prompt_rows(original)
    head = SimpleNamespace(base_layer="the head")
    assert fixed(layer, torch.zeros(11, 4), head) == "base"  # a request's 11 prompt tokens
    assert fixed(layer, torch.zeros(2, 4), head) == "lora"  # the step's two sampled rows
    assert calls == [("base", 11, "the head"), ("lora", 2)]


def test_the_installed_lora_logits_processor_is_patched():
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    from service.engine.vllm_fixes import fix_lora_prompt_logprobs

    fix_lora_prompt_logprobs()
    assert getattr(LogitsProcessorWithLoRA._get_logits, "__vlora_fixed__", False)
    assert fix_lora_prompt_logprobs() is False  # once


@pytest.mark.parametrize(("keys", "expected"), [
    (["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"], False),
    (["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
      "base_model.model.lm_head.lora_A.weight"], True),  # LoRA on the head
    (["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
      "base_model.model.lm_head.weight"], True),  # a retrained copy of the head (modules_to_save)
])
def test_adapters_that_adapt_the_head_are_known(tmp_path, keys, expected):
    """From the adapter's weights, as the registry inspects them at load (what prompt logprobs are refused for)."""
    import json

    from safetensors.torch import save_file

    from service.adapters.store import inspect_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    save_file({k: torch.zeros(4, 8) for k in keys}, str(tmp_path / "adapter_model.safetensors"))
    meta = inspect_adapter("a", tmp_path, max_rank=64, tower_lora=False, base_fingerprint=None)
    assert meta.adapts("lm_head") is expected


def test_prompt_logprobs_are_refused_for_an_adapter_that_adapts_the_head():
    """Chat's prompt_logprobs and completions' echo with logprobs alike: a 400 naming the parameter rather than
    logprobs without the adapter's lm_head delta; the base and other adapters are served."""
    from types import SimpleNamespace

    from service.errors import BadRequest
    from service.serving.sampling import refuse_prompt_logprobs

    def revision(head: bool):
        return SimpleNamespace(meta=SimpleNamespace(adapts=lambda module: head and module == "lm_head"))

    for param in ("prompt_logprobs", "echo"):
        with pytest.raises(BadRequest) as exc:
            refuse_prompt_logprobs(revision(True), "tuned", param)
        assert exc.value.param == param and "adapts lm_head" in str(exc.value)
    refuse_prompt_logprobs(revision(False), "tuned", "prompt_logprobs")
    refuse_prompt_logprobs(None, "base", "prompt_logprobs")
