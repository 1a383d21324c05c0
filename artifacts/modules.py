"""Which part of Qwen3-VL a module (or a LoRA tensor key) belongs to: language model, vision tower, merger.

vLLM applies LoRA to the language model's linear layers; vision-tower and merger weights are applied only
with tower/connector LoRA enabled. The trainer records the groups in the manifest, the service checks them
before a load: both use this one definition.
"""

from __future__ import annotations

import re

GROUPS = ("language", "vision", "merger")
VISUAL_RE = re.compile(r"(^|\.)visual\.")
MERGER_RE = re.compile(r"(^|\.)visual\.(merger|deepstack_merger_list)")


def module_group(name: str) -> str:
    """`...language_model.layers.0.self_attn.q_proj` -> language, `...visual.blocks.0.attn.qkv` -> vision,
    `...visual.merger.linear_fc1` (or `deepstack_merger_list`) -> merger; works on tensor keys too."""
    if MERGER_RE.search(name):
        return "merger"
    return "vision" if VISUAL_RE.search(name) else "language"


def split_targets(module_names: list[str]) -> dict[str, list[str]]:
    """Module names grouped by `module_group`, every group present (possibly empty)."""
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name in module_names:
        groups[module_group(name)].append(name)
    return groups


def serving_notes(groups: dict[str, list[str]]) -> list[str]:
    """What a server must enable to apply every adapted module (empty: vLLM applies all by default)."""
    return [f"{len(groups[part])} {part} module(s) are adapted; vLLM ignores these LoRA weights unless the "
            "server enables tower/connector LoRA (enable_tower_connector_lora)"
            for part in ("vision", "merger") if groups.get(part)]
