"""Evaluation: greedy generation on validation records for the base and the adapter.

Metrics: exact match after normalisation (case, surrounding punctuation and whitespace), BLEU and ROUGE-L F1
(rouge-score). BLEU is sacrebleu's sentence BLEU with effective order, averaged over the samples: corpus BLEU
is 0.0 for answers of one or two words that match exactly (there are no 3- and 4-grams to count), which is
what adapters for short answers produce; effective order scores each answer on the n-grams it has.

    vlora-train eval --adapter out/colors --data data/colors/val.jsonl [--backend auto|vllm|transformers]

Generation runs through vLLM's offline engine where vLLM is installed (`trainer/vllm_eval.py`: the engine the
service serves with), else through transformers' `generate`; `eval.json` records which (`backend`).
"""

from __future__ import annotations

import re
import string

_PUNCT = re.compile(f"^[{re.escape(string.punctuation)}\\s]+|[{re.escape(string.punctuation)}\\s]+$")


def normalise(text: str) -> str:
    return _PUNCT.sub("", " ".join(text.lower().split()))


def scores(predictions: list[str], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    exact = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    bleu = [sacrebleu.sentence_bleu(p, [r], use_effective_order=True).score
            for p, r in zip(predictions, references, strict=True)]
    n = max(len(predictions), 1)
    return {"n": len(predictions), "exact_match": exact / n, "bleu": sum(bleu) / n, "rouge_l": sum(rouge) / n,
            "bleu_kind": "sentence BLEU, effective order, mean over samples"}


def generate(model, processor, records: list[dict], max_new_tokens: int = 32, batch_size: int = 8) -> list[str]:
    """Greedy answers to each record's last assistant turn (the conversation before it is the prompt)."""
    import torch

    from trainer.data import message_images, open_image, prompt_and_answer

    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    model.eval()
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts, images = [], []
        for record in chunk:
            messages, _ = prompt_and_answer(record)
            prompts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            images.extend(open_image(ref) for ref in message_images(messages))
        inputs = processor(text=prompts, images=images or None, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers.extend(tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def resolve_backend(name: str) -> str:
    """`auto`: vLLM's offline engine when vLLM is installed, else transformers."""
    import importlib.util

    installed = importlib.util.find_spec("vllm") is not None
    if name == "auto":
        return "vllm" if installed else "transformers"
    if name == "vllm" and not installed:
        raise ValueError("eval_backend vllm: vLLM is not installed here (the cpu or gpu extra); use transformers")
    if name not in ("vllm", "transformers"):
        raise ValueError(f"eval_backend must be auto, vllm or transformers, not {name!r}")
    return name


def _vllm_answers(base_model: str, adapter_dir: str, processor, records: list[dict],
                  max_new_tokens: int) -> dict[str, list[str]]:
    from trainer.data import TokenCounter, message_images, open_image, prompt_and_answer
    from trainer.vllm_eval import generate as vllm_generate

    prompts, longest = [], 0
    count = TokenCounter(processor)
    for record in records:
        messages, _ = prompt_and_answer(record)
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append((text, [open_image(ref) for ref in message_images(messages)]))
        longest = max(longest, count({"messages": messages}) + 8)
    return vllm_generate(base_model, adapter_dir, processor, prompts, max_new_tokens, longest)


def evaluate_records(model, processor, records: list[dict], max_new_tokens: int = 32, batch_size: int = 8,
                     backend: str = "transformers", base_model: str | None = None,
                     adapter_dir: str | None = None) -> dict:
    """Scores of the adapter and of the base: with transformers, the same peft model with its adapter
    disabled; with vLLM, the saved adapter (`adapter_dir`) as a LoRARequest on `base_model`."""
    from trainer.data import prompt_and_answer

    references = [prompt_and_answer(r)[1] for r in records]
    if backend == "vllm":
        answers = _vllm_answers(base_model, adapter_dir, processor, records, max_new_tokens)
        tuned, base = answers["adapter"], answers["base"]
    else:
        tuned = generate(model, processor, records, max_new_tokens, batch_size)
        with model.disable_adapter():
            base = generate(model, processor, records, max_new_tokens, batch_size)
    return {
        "adapter": scores(tuned, references),
        "base": scores(base, references),
        "backend": backend,
        "samples": [{"reference": r, "adapter": t, "base": b} for r, t, b in zip(references, tuned, base, strict=True)],
        "records": records,
    }


def evaluate_adapter(adapter_dir: str, data: str, base_model: str | None = None, max_samples: int = 200,
                     max_new_tokens: int = 32, backend: str = "auto") -> dict:
    from pathlib import Path

    from trainer.config import TrainConfig
    from trainer.data import load_dataset_file
    from trainer.model import load_processor

    adapter = Path(adapter_dir)
    saved = TrainConfig.saved_with(adapter)
    config = TrainConfig(**{**saved, "base_model": base_model or saved.get("base_model", ""), "resume": False})
    processor = load_processor(config)
    records = load_dataset_file(data)[:max_samples]  # any source and format the trainer reads
    backend = resolve_backend(backend)
    if backend == "vllm":  # the engine loads the base and the adapter itself
        return evaluate_records(None, processor, records, max_new_tokens, backend="vllm",
                                base_model=config.base_model, adapter_dir=str(adapter))
    from peft import PeftModel

    from trainer.model import load_base

    model = PeftModel.from_pretrained(load_base(config), adapter)
    return evaluate_records(model, processor, records, max_new_tokens)
