"""`vlora-train`: the offline side of vlora.

    vlora-train validate data/train.jsonl
    vlora-train train --config trainer/configs/tiny-colors.yaml --output-dir models/adapters/colors
    vlora-train eval --adapter models/adapters/colors --data data/colors/val.jsonl
    vlora-train merge --adapter models/adapters/colors --out models/tiny-colors-merged --data data/colors/val.jsonl
    vlora-train quantize --model models/tiny-colors-merged --out models/tiny-colors-w8a8 --scheme w8a8 \
        --calibration data/colors/train.jsonl      # in .venv-quantize (make quantize-env)
    vlora-train convert simple.jsonl --out chat.jsonl
    vlora-train demo-data --task colors --out data/colors
    vlora-train tiny-model --out models/tiny-qwen3-vl --seed 0
    vlora-train random-adapter --base models/tiny-qwen3-vl --out models/adapters/demo-a --rank 8 --seed 1
    vlora-train demo-assets --out models        # tiny model + demo adapters, skipped when present
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _tiny_model(args) -> None:
    from trainer.tiny import make_tiny_model, weights_digest

    out = make_tiny_model(args.out, seed=args.seed, overwrite=args.overwrite, thinking=args.thinking)
    print(f"tiny model written to {out} (weights sha256 {weights_digest(out)[:16]})")


def _random_adapter(args) -> None:
    from trainer.tiny import make_random_adapter

    out = make_random_adapter(args.base, args.out, rank=args.rank, seed=args.seed, overwrite=args.overwrite)
    print(f"random LoRA (r={args.rank}) written to {out}")


def _demo_assets(args) -> None:
    from trainer.demo import ensure_demo_assets

    made = ensure_demo_assets(Path(args.out), args.seed)
    print("\n".join(f"made {p}" for p in made) or f"demo assets under {args.out} are up to date")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    import dataclasses
    import typing

    from trainer.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        if base is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f.metadata["help"])
        else:
            p.add_argument(flag, dest=f.name, type=base, default=None, help=f.metadata["help"])


def _train(args) -> None:
    from trainer.config import TrainConfig
    from trainer.train import train

    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    train(TrainConfig.load(args.config, overrides))


def _validate(args) -> None:
    import sys

    from trainer.data import DataError, open_source, scan

    processor = None
    if args.model:
        from transformers import AutoProcessor

        from trainer.model import resolve_base_model

        resolve_base_model(args.model)
        processor = AutoProcessor.from_pretrained(args.model)
    rows = open_source(args.data, args.split)
    max_pixels = args.max_pixels or (getattr(processor.image_processor, "size", {}).get("longest_edge")
                                     if processor is not None else None)
    found = scan(rows, args.format, processor, args.max_length, max_pixels, limit=args.limit,
                 progress=sys.stderr.isatty())
    print(found.summary(args.max_length))
    if processor is None:
        print("  (token lengths: pass --model to count them with the model's processor, images included)")
    if found.problems:
        raise DataError(args.data, found.problems)
    print("all records valid")


def _convert(args) -> None:
    import json
    import os

    from trainer.data import ChatRecords, DataError, open_source, scan

    rows = open_source(str(args.input))
    found = scan(rows, args.format, check_images=False)
    if found.problems:
        raise DataError(args.input, found.problems)

    def ref(value):  # paths relative to the output file; embedded bytes as data URIs
        if isinstance(value, bytes | bytearray):
            import base64
            import io

            from PIL import Image

            kind = (Image.open(io.BytesIO(value)).format or "png").lower()
            return f"data:image/{kind};base64," + base64.b64encode(bytes(value)).decode()
        if isinstance(value, str) and not value.startswith(("http://", "https://", "data:")):
            return os.path.relpath(value, Path(args.out).resolve().parent)
        return value

    def plain(chat: dict) -> dict:
        return {"messages": [{"role": m["role"], "content": [
            {**p, p["type"]: ref(p[p["type"]])} if p["type"] != "text" else p for p in m["content"]]}
            for m in chat["messages"]]}

    records = [plain(c) for c in ChatRecords(rows, found.format, found.indices)]
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{len(records)} records ({found.format}) written to {args.out}")


def _eval(args) -> None:
    import json

    from trainer.evaluate import evaluate_adapter

    result = evaluate_adapter(args.adapter, args.data, args.base, args.max_samples, args.max_new_tokens, args.backend)
    result.pop("records", None)
    text = json.dumps(result, indent=2)
    (Path(args.out) if args.out else Path(args.adapter) / "eval.json").write_text(text)
    for who in ("adapter", "base"):
        r = result[who]
        print(f"{who:8s} exact match {r['exact_match']:.1%}  BLEU {r['bleu']:.1f}  ROUGE-L {r['rouge_l']:.3f}  (n={r['n']}, "
              f"{result['backend']})")


def _merge(args) -> None:
    from trainer.merge import merge

    report = merge(args.adapter, args.out, args.base, args.data, args.k, args.dtype)
    print(f"merged into {args.out}: {report['samples']} samples identical, max logit diff "
          f"{report['max_logit_diff']:.3g}")


def _quantize(args) -> None:
    from trainer.quantize import quantize

    made = quantize(args.model, args.out, args.scheme, args.calibration, args.samples, args.max_length,
                    args.quantize_vision, args.quantize_lm_head, args.split, args.overwrite)
    calib = made["calibration"]
    used = f"{calib['samples']} records of {calib['source']}" if calib else "none"
    print(f"{args.scheme} ({made['method']}) written to {args.out}; kept in 16 bits: "
          f"{', '.join(made['kept_16bit']) or 'nothing'}; calibration: {used}")


def _demo_data(args) -> None:
    from trainer.demo_data import make_demo_dataset

    out = make_demo_dataset(args.task, args.out, args.seed, args.n_train, args.n_val, args.overwrite,
                            args.image_size)
    print(f"demo dataset '{args.task}' written to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlora-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA/QLoRA adapter (YAML recipe + flags)")
    p.add_argument("--config", type=Path, help="YAML recipe (see trainer/configs/); flags override it")
    _add_config_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("validate", help="check every record of a dataset, report every problem and a summary")
    p.add_argument("data", help="file, files (a,b), glob, save_to_disk folder, hub-layout folder or hub id")
    p.add_argument("--split", default="train", help="split of a folder or hub id")
    p.add_argument("--format", default="auto", choices=["auto", "messages", "llava", "sharegpt", "qa"])
    p.add_argument("--model", help="processor to count tokens with (images included), e.g. the base model")
    p.add_argument("--max-length", type=int, default=None, help="count the records longer than this")
    p.add_argument("--max-pixels", type=int, default=None, help="processor max_pixels (images far above are refused)")
    p.add_argument("--limit", type=int, default=None, help="check only the first N records (a sample)")
    p.set_defaults(func=_validate)

    p = sub.add_parser("convert", help="write any supported layout (qa, llava, sharegpt, ...) as chat-format JSONL")
    p.add_argument("input")
    p.add_argument("--format", default="auto", choices=["auto", "messages", "llava", "sharegpt", "qa"])
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=_convert)

    p = sub.add_parser("eval", help="greedy eval of an adapter and its base: exact match, BLEU, ROUGE-L")
    p.add_argument("--adapter", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--max-samples", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"],
                   help="generation through vLLM's offline engine (auto: when installed) or transformers")
    p.add_argument("--out", help="where to write eval.json (default: in the adapter directory)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("merge", help="merge_and_unload onto the 16-bit base, with a parity proof")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--data", help="validation file for the parity check (default: the training eval_data)")
    p.add_argument("-k", type=int, default=4, help="samples in the parity check")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32")
    p.set_defaults(func=_merge)

    p = sub.add_parser("quantize", help="quantize a base or merged model (llm-compressor, compressed-tensors format)")
    p.add_argument("--model", required=True, help="16-bit model directory (a base, or the output of merge)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--scheme", required=True, choices=["w4a16", "w8a8", "fp8"],
                   help="w4a16: int4 weights (groups of 128); w8a8: int8 weights and activations; fp8: fp8 both")
    p.add_argument("--calibration", help="calibration data in any trainer format (GPTQ); without it: round-to-nearest")
    p.add_argument("--samples", type=int, default=64, help="calibration records (default 64)")
    p.add_argument("--max-length", type=int, default=2048, help="calibration records longer than this are left out")
    p.add_argument("--split", default="train", help="split of a hub/parquet calibration source")
    p.add_argument("--quantize-vision", action="store_true", help="quantize the vision tower too (default: 16-bit)")
    p.add_argument("--quantize-lm-head", action="store_true", help="quantize lm_head too (default: 16-bit)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_quantize)

    p = sub.add_parser("demo-data", help="generate a synthetic demo dataset (colors or shapes)")
    p.add_argument("--task", required=True, choices=["colors", "shapes"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--image-size", type=int, default=128, help="square image side in pixels")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("tiny-model", help="build the tiny random Qwen3-VL (deterministic from --seed)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weights seed (same seed: byte-identical weights)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--thinking", action="store_true",
                   help="the reasoning variant: <think> tokens and a template that opens the reasoning")
    p.set_defaults(func=_tiny_model)

    p = sub.add_parser("random-adapter", help="write a peft LoRA with random non-zero weights on the LLM layers")
    p.add_argument("--base", required=True, type=Path, help="base model directory")
    p.add_argument("--out", required=True, type=Path, help="output adapter directory")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_random_adapter)

    p = sub.add_parser("demo-assets", help="create the embedded model, demo data and trained demo adapters if absent")
    p.add_argument("--out", type=Path, default=Path("models"), help="root directory (default: models)")
    p.add_argument("--seed", type=int, default=0, help="tiny model seed")
    p.set_defaults(func=_demo_assets)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError, MemoryError) as exc:
        sys.exit(f"vlora-train {args.command}: {exc}")


if __name__ == "__main__":
    main()
