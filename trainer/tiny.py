"""Tiny model kit: a real Qwen3-VL with tiny dimensions, built offline and deterministically.

The embedded default of the project: tests, `make serve` and the demo adapters all run on it, so the
same code path that serves Qwen3-VL-8B is exercised on a 2-core CPU with no model hub.

    vlora-train tiny-model --out models/tiny-qwen3-vl --seed 0
    vlora-train random-adapter --base models/tiny-qwen3-vl --out models/adapters/a --rank 8 --seed 1

What is built:
- a byte-level BPE tokenizer trained with `tokenizers` on a generated corpus, using Qwen's
  pre-tokenizer, wrapped as `Qwen2Tokenizer`, with the Qwen special tokens;
- `Qwen3VLConfig` (text hidden 128, 2 layers, 2 heads of 64, 1 KV head, interleaved mrope
  [12, 10, 10]; vision depth 2, hidden 64, patch 16, merge 2, temporal patch 2);
- a `Qwen3VLProcessor` (image + video processors) with a chat template that accepts `image` and
  `image_url` parts;
- fp32 safetensors weights from `torch.manual_seed(seed)`: the same seed gives byte-identical files.
  `lm_head` is initialised with a larger std (like a confident pretrained head) so that LoRA adapters on
  the language model can actually teach the model: with the default std 0.02 the frozen head only emits weak
  logits (|logit| < 3) and a language-only LoRA plateaus near 80 % on the shapes task; with 0.2 it reaches
  over 90 % in minutes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from artifacts.atomic import atomic_dir

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen's pre-tokenizer split (the same regex the Qwen2 tokenizer uses).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen-style chat template: string or list content; `image` / `image_url` parts become vision tokens. Tools are
# rendered the way Qwen3-VL's own template renders them: function signatures in the system turn within
# <tools></tools>, the assistant's calls as <tool_call>{"name", "arguments"}</tool_call>, and tool results as
# <tool_response> blocks in one user turn, so that tool calling runs the real path on the tiny model.
_CONTENT = (
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] in ('video', 'video_url') -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
)
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set message = messages[0] -%}" + _CONTENT + "{{- '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' -}}{{- tool | tojson -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' -}}" + _CONTENT + "{{- '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}" + _CONTENT +
    "{%- if message['role'] == 'assistant' and message['tool_calls'] -%}"
    "{%- for tool_call in message['tool_calls'] -%}"
    "{%- if (loop.first and message['content']) or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- if tool_call['function'] is defined -%}{%- set tool_call = tool_call['function'] -%}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call['name'] + '\", \"arguments\": ' -}}"
    "{%- if tool_call['arguments'] is string -%}{{- tool_call['arguments'] -}}"
    "{%- else -%}{{- tool_call['arguments'] | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# The thinking variant (as Qwen3-VL-*-Thinking next to -Instruct): `<think>` / `</think>` in the vocabulary as
# Qwen3 has them (added, not special, so they stay in the decoded text), the generation prompt opening the
# reasoning (`<think>\n`), or closing it at once when `enable_thinking` is false (Qwen3's switch), and earlier
# assistant turns rendered without their reasoning, as the official templates do.
THINK_TOKENS = ["<think>", "</think>"]
THINKING_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}{%- endif -%}",
).replace(
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}" + _CONTENT,
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' and message['content'] is string -%}"
    "{{- message['content'].split('</think>')[-1].lstrip('\\n') -}}{%- else -%}" + _CONTENT + "{%- endif -%}",
)


def chat_template(thinking: bool = False) -> str:
    return THINKING_CHAT_TEMPLATE if thinking else CHAT_TEMPLATE

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "pink"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "ring", "rectangle"]

# Small processor limits keep image token counts low on CPU: at most 128 merged tokens per image.
MIN_PIXELS = 32 * 32 * 4
MAX_PIXELS = 32 * 32 * 128


def _corpus() -> list[str]:
    """A deterministic English-ish corpus: enough to give the BPE useful merges for prompts and answers."""
    words = (
        "what which color colour shape is the a an of in on this that image picture photo describe answer "
        "question yes no left right top bottom small large big there one two three four how many please "
        "tell me you are assistant user system hello world thanks object background center corner and or "
        "with it its not".split()
    )
    lines = []
    for c in COLORS:
        for s in SHAPES:
            lines.append(f"What color is the shape? {c}. What shape is it? {s}. A {c} {s} on a background.")
    for i in range(len(words)):
        lines.append(" ".join(words[i:] + words[:i]))
    lines.append("0123456789 .,;:!?-'\"()[]{}<>/\\@#$%^&*+=_~`|")
    return lines * 4


def build_tokenizer(vocab_size: int = 1024, thinking: bool = False):
    """Train a byte-level BPE with Qwen's pre-tokenizer and wrap it as a `Qwen2Tokenizer` (with the reasoning
    tokens for the thinking variant)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for tok in SPECIAL_TOKENS:
        vocab.setdefault(tok, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    if thinking:
        tokenizer.add_tokens(THINK_TOKENS, special_tokens=False)
    tokenizer.chat_template = chat_template(thinking)
    tokenizer.model_max_length = 4096
    return tokenizer


def build_config(tokenizer):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [12, 10, 10],
            "mrope_interleaved": True,
        },
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 128,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": [0],
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    return config, ids


def build_processor(tokenizer, thinking: bool = False):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    common = dict(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor = Qwen2VLImageProcessor(size=size, **common)
    video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS * 2}, **common)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=chat_template(thinking),
    )


def build_model(config, seed: int):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        # A confident output head, so that language-model LoRA can move the argmax (see the docstring).
        model.lm_head.weight.normal_(mean=0.0, std=0.2)
    return model


def make_tiny_model(out: str | Path, seed: int = 0, overwrite: bool = False, thinking: bool = False) -> Path:
    """Build and save the tiny model, tokenizer and processor to `out`; atomic (built in `out.partial`, then renamed).
    `thinking`: the reasoning variant (see THINKING_CHAT_TEMPLATE)."""
    from transformers import GenerationConfig

    with atomic_dir(out, overwrite) as tmp:
        tokenizer = build_tokenizer(thinking=thinking)
        config, ids = build_config(tokenizer)
        model = build_model(config, seed)
        model.generation_config = GenerationConfig(
            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
            pad_token_id=ids["<|endoftext|>"],
            do_sample=False,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        build_processor(tokenizer, thinking).save_pretrained(tmp)
        kind = "tiny-qwen3-vl-thinking" if thinking else "tiny-qwen3-vl"
        (tmp / "vlora_tiny.json").write_text(json.dumps({"seed": seed, "kind": kind}, indent=2))
    return Path(out)


def weights_digest(model_dir: str | Path) -> str:
    """sha256 over the safetensors files of a model directory (sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# Language-model linear layers of Qwen3-VL (attention + MLP). The vision tower and merger name their
# layers differently (qkv, proj, linear_fc1/2), so these names select the language model only.
LLM_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_random_adapter(base: str | Path, out: str | Path, rank: int = 8, seed: int = 0, alpha: int | None = None,
                        scale: float = 0.5, overwrite: bool = False, target_modules=None) -> Path:
    """Write a peft LoRA on the language model's linear layers with non-zero random A and B.

    With B non-zero (peft initialises it to zero) the adapter changes outputs, so the serving path can be
    tested before any training. `scale` is the std of B; large enough to move the tiny model's argmax.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    with atomic_dir(out, overwrite) as tmp:
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                            target_modules=target_modules or LLM_TARGET_MODULES, bias="none")
        peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in sorted(peft_model.named_parameters()):
                if "lora_A" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale / rank ** 0.5)
        peft_model.save_pretrained(tmp, safe_serialization=True)
    return Path(out)
