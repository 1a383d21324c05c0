"""Runtime fixes for the pinned vLLM, applied by a `vllm.general_plugins` entry point in every vLLM process.

vLLM loads general plugins in the API process and in each engine-core process, so a fix registered here
reaches the code that actually runs the model. Each fix probes for its bug first and patches only when the
bug shows, so upgrading to a vLLM that fixed it retires the patch by itself.

`lora-no-adapter-index` — in `vllm/lora/ops/torch_ops/lora_ops.py` (the PyTorch punica ops used by the
CPU backend) a token with no adapter has index -1, and `weights[-1]` silently selects the *last* adapter
slot: a base-model request batched with adapter requests receives an adapter's delta (upstream PRs
#48421 / #49656). The fix zeroes the inputs of rows with index -1 (the LoRA delta is linear in them, so
their contribution becomes exactly zero) and clamps the index, for every bgmv op (the sgmv ops call them).

`lora-prompt-logprobs` — with LoRA enabled, vLLM computes a request's prompt logprobs (`prompt_logprobs`,
completions' echo with logprobs) through the LoRA logits processor with the LoRA indices of the step's
*sampled* rows, one per request, while the hidden states are the prompt's tokens: a batch of more than one
request crashes the engine in the punica ops (shape mismatch; upstream issues #16668, #29955), one request
alone broadcasts. When the rows differ from the sampler's indices, the fix computes the base head's logits
only, which is exact for adapters that do not adapt `lm_head` (the server refuses prompt logprobs for those
that do: their delta would be missing, upstream issue #51594). When the rows match, vLLM's own path runs.

`lora-prepacked-int8-device` — vLLM's CPU int8 kernel (w8a8 compressed-tensors checkpoints) hands the
weight to oneDNN as a prepacked matrix and sets the layer's `weight` to None when the CPU has no AMX (with AMX
it keeps a packed int8 weight). The LoRA wrappers then ask `base_layer.weight.device` for the device of the
adapter tensors and the engine fails to start on every such CPU (AttributeError on None). The fix answers
the device of the layer's remaining tensors (its scales) for a layer whose `weight` is None; any other layer
gets vLLM's own answer.

`shm-spin` (a tuning, not a bug) — the readers of vLLM's shared-memory message queues (the worker waiting
for the scheduler, the engine core waiting for the worker) spin on `sched_yield` for 1 s after every read
before they sleep on a notify socket. That assumes dedicated cores: on a small CPU host the spinning
processes take the cores from the API process, whose event loop then answers health checks, new requests
and stream chunks seconds late, and an idle server burns a whole core. Shortening the spin window is no
cure (the socket path then loses wake-ups and stalls for seconds); instead each turn of the spin sleeps a
few microseconds. `VLORA_ENGINE_SPIN_SLEEP_US` sets that sleep (default: 50 µs when the host has fewer than
8 cores, else vLLM's own `sched_yield` is kept; 0 keeps it too).
"""

from __future__ import annotations

import functools
import logging
import os
import sys

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


def _base_logits_for_prompt_rows(original):
    @functools.wraps(original)
    def fixed(self, hidden_states, lm_head, embedding_bias=None, skip_gather=False):
        sampler = getattr(self.punica_wrapper, "sampler_indices", None)
        if sampler is not None and hidden_states.shape[0] != sampler.shape[0]:
            head = lm_head.base_layer if hasattr(lm_head, "base_layer") else lm_head
            return self.base_layer._get_logits(hidden_states, head, embedding_bias)
        return original(self, hidden_states, lm_head, embedding_bias, skip_gather)

    fixed.__vlora_fixed__ = True
    return fixed


def fix_lora_prompt_logprobs() -> bool:
    """Patch the LoRA logits processor (see the module docstring); a no-op where its rows match."""
    try:
        from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
    except ImportError:
        return False
    if getattr(LogitsProcessorWithLoRA._get_logits, "__vlora_fixed__", False):
        return False
    LogitsProcessorWithLoRA._get_logits = _base_logits_for_prompt_rows(LogitsProcessorWithLoRA._get_logits)
    logger.info("vlora fix applied: lora-prompt-logprobs")
    return True


def _device_of_prepacked_layers(original):
    @functools.wraps(original)
    def fixed(base_layer):
        if getattr(base_layer, "weight", False) is None and not hasattr(base_layer, "routed_experts"):
            for tensor in (*base_layer.parameters(recurse=False), *base_layer.buffers(recurse=False)):
                return tensor.device
        return original(base_layer)

    fixed.__vlora_fixed__ = True
    return fixed


def lora_prepacked_device_bug_present(get_lora_device) -> bool:
    """Whether `get_lora_device` fails on a layer whose weight was released to a prepacked kernel."""
    import torch

    layer = torch.nn.Module()
    layer.weight = None
    layer.weight_scale = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    try:
        return get_lora_device(layer) != layer.weight_scale.device
    except (AttributeError, ValueError):
        return True


def fix_lora_prepacked_int8_device() -> bool:
    """Patch every LoRA module's `_get_lora_device` (see the module docstring); a no-op once vLLM handles it."""
    try:
        import vllm.lora.layers  # noqa: F401  (imports the layer modules that hold the function)
        from vllm.lora.layers import utils
    except ImportError:
        return False
    original = utils._get_lora_device
    if getattr(original, "__vlora_fixed__", False) or not lora_prepacked_device_bug_present(original):
        return False
    fixed = _device_of_prepacked_layers(original)
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm.lora") and getattr(module, "_get_lora_device", None) is original:
            module._get_lora_device = fixed
    if lora_prepacked_device_bug_present(utils._get_lora_device):
        raise RuntimeError("vlora fix lora-prepacked-int8-device did not take effect")
    logger.info("vlora fix applied: lora-prepacked-int8-device")
    return True


def engine_spin_sleep_us(env: dict | None = None, cpu_count: int | None = None) -> float:
    """Microseconds each spin turn of an shm queue reader sleeps; 0 keeps vLLM's `sched_yield`."""
    env = os.environ if env is None else env
    raw = env.get("VLORA_ENGINE_SPIN_SLEEP_US", "").strip()
    if raw:
        value = float(raw)
        if value < 0:
            raise ValueError(f"VLORA_ENGINE_SPIN_SLEEP_US must be >= 0, got {raw!r}")
        return value
    cores = cpu_count if cpu_count is not None else len(os.sched_getaffinity(0))
    return 50.0 if cores < 8 else 0.0


def tune_shm_spin() -> float:
    """Make the spin turns of vLLM's shm message queues sleep briefly (see the module docstring)."""
    sleep_us = engine_spin_sleep_us()
    if sleep_us <= 0:
        return 0.0
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return 0.0
    current = getattr(shm_broadcast, "sched_yield", None)
    if current is None or getattr(current, "__vlora_fixed__", False):
        return sleep_us
    import time

    seconds = sleep_us / 1e6

    def brief_sleep() -> None:
        time.sleep(seconds)

    brief_sleep.__vlora_fixed__ = True
    shm_broadcast.sched_yield = brief_sleep
    logger.info("vlora tuning applied: shm-spin sleep %.0f us", sleep_us)
    return sleep_us


def register() -> None:
    """Entry point of `vllm.general_plugins` (see pyproject.toml); safe to call many times."""
    fix_lora_no_adapter_index()
    fix_lora_prompt_logprobs()
    fix_lora_prepacked_int8_device()
    tune_shm_spin()
