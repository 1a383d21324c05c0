"""The tiny model kit: deterministic, offline-loadable, with a usable random adapter."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.cli import main as train_cli
from trainer.tiny import SPECIAL_TOKENS, make_random_adapter, make_tiny_model, weights_digest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    a = make_tiny_model(root / "a", seed=5)
    b = make_tiny_model(root / "b", seed=5)
    c = make_tiny_model(root / "c", seed=6)
    return root, a, b, c


def test_same_seed_is_byte_identical(built):
    _, a, b, c = built
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert weights_digest(a) != weights_digest(c)


def test_loads_offline_with_auto_classes(built):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, a, _, _ = built
    processor = AutoProcessor.from_pretrained(a)
    model = AutoModelForImageTextToText.from_pretrained(a)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    tok = processor.tokenizer
    for special in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert tok.tokenize(special) == [special]
    config = json.loads((a / "config.json").read_text())
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config["text_config"]["vocab_size"] == len(tok)
    # byte-level BPE round-trips arbitrary text
    text = "Größe: 3 × ☃ — ok?"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_random_adapter_changes_outputs(built):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    root, a, _, _ = built
    out = make_random_adapter(a, root / "adapter", rank=4, seed=3)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and "q_proj" in config["target_modules"]
    base = AutoModelForImageTextToText.from_pretrained(a)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, out)
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after)
    lora_names = [n for n, _ in tuned.named_parameters() if "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)


def test_cli_refuses_to_overwrite(built, capsys):
    root, a, _, _ = built
    with pytest.raises(SystemExit) as exc:
        train_cli(["tiny-model", "--out", str(a)])
    assert "exists" in str(exc.value)
