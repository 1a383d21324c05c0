"""Evaluation generation through vLLM's offline engine (`vllm.LLM`): the adapter as a `LoRARequest`, the base
without one, greedy, batched by the engine. It is the engine the service serves with, so `eval.json` measures
what will be served, and it is fast on large eval sets; `trainer/evaluate.py` falls back to transformers'
`generate` where vLLM is not installed.

The prompts are rendered with the same processor and chat template as training; the processor's image size
settings (min/max pixels) go to vLLM's processor; the context is what the longest prompt needs.
"""

from __future__ import annotations

import gc
import json
import typing
from pathlib import Path
from typing import Any


def lora_rank_limit(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds `rank`."""
    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(typing.get_args(MaxLoRARanks))
    for value in allowed:
        if value >= rank:
            return value
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's maximum {allowed[-1]}")


def generate(base_model: str, adapter_dir: str | None, processor: Any, prompts: list[tuple[str, list]],
             max_new_tokens: int, max_prompt_tokens: int) -> dict[str, list[str]]:
    """Greedy answers of the base ("base") and, with `adapter_dir`, of the adapter ("adapter"), per prompt
    (text, PIL images)."""
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; on CPU vLLM takes most of the RAM otherwise
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    size = getattr(getattr(processor, "image_processor", None), "size", {}) or {}
    mm_kwargs = {k: v for k, v in (("min_pixels", size.get("shortest_edge")),
                                   ("max_pixels", size.get("longest_edge"))) if v}
    kwargs: dict[str, Any] = {}
    if adapter_dir is not None:
        rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"]
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_limit(rank))
    images = max((len(imgs) for _, imgs in prompts), default=0)
    llm = LLM(model=base_model, seed=0, max_model_len=max(max_prompt_tokens + max_new_tokens + 16, 256),
              limit_mm_per_prompt={"image": max(images, 1), "video": 0}, mm_processor_kwargs=mm_kwargs or None,
              gpu_memory_utilization=_memory_fraction(), **kwargs)
    try:
        inputs = [{"prompt": text, "multi_modal_data": {"image": imgs}} if imgs else {"prompt": text}
                  for text, imgs in prompts]
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        out = {"base": [o.outputs[0].text for o in llm.generate(inputs, params, use_tqdm=False)]}
        if adapter_dir is not None:
            lora = LoRARequest("adapter", 1, str(adapter_dir))
            out["adapter"] = [o.outputs[0].text for o in llm.generate(inputs, params, lora_request=lora,
                                                                        use_tqdm=False)]
        return out
    finally:
        del llm
        gc.collect()


def _memory_fraction() -> float:
    """What vLLM may take of the GPU: what is free now (a training run may still hold some), with a margin."""
    import torch

    if not torch.cuda.is_available():
        return 0.9
    free, total = torch.cuda.mem_get_info()
    return max(0.1, min(0.9, free / total - 0.05))
