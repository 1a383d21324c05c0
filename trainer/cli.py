"""`vlora-train`: the offline side of vlora.

    vlora-train tiny-model --out models/tiny-qwen3-vl --seed 0
    vlora-train random-adapter --base models/tiny-qwen3-vl --out models/adapters/demo-a --rank 8 --seed 1
    vlora-train demo-assets --out models        # tiny model + demo adapters, skipped when present
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_ADAPTERS = {"demo-a": 1, "demo-b": 2}


def _tiny_model(args) -> None:
    from trainer.tiny import make_tiny_model, weights_digest

    out = make_tiny_model(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny model written to {out} (weights sha256 {weights_digest(out)[:16]})")


def _random_adapter(args) -> None:
    from trainer.tiny import make_random_adapter

    out = make_random_adapter(args.base, args.out, rank=args.rank, seed=args.seed, overwrite=args.overwrite)
    print(f"random LoRA (r={args.rank}) written to {out}")


def ensure_demo_assets(root: Path, seed: int = 0) -> list[Path]:
    """Create the embedded default model and demo adapters under `root` if absent; return what was made."""
    from trainer.tiny import make_random_adapter, make_tiny_model

    made = []
    model = root / "tiny-qwen3-vl"
    if not (model / "config.json").is_file():
        made.append(make_tiny_model(model, seed=seed, overwrite=model.exists()))
    for name, adapter_seed in DEMO_ADAPTERS.items():
        out = root / "adapters" / name
        if not (out / "adapter_config.json").is_file():
            made.append(make_random_adapter(model, out, rank=8, seed=adapter_seed, overwrite=out.exists()))
    return made


def _demo_assets(args) -> None:
    made = ensure_demo_assets(Path(args.out), args.seed)
    print("\n".join(f"made {p}" for p in made) or f"demo assets under {args.out} are up to date")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlora-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="build the tiny random Qwen3-VL (deterministic from --seed)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weights seed (same seed: byte-identical weights)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_tiny_model)

    p = sub.add_parser("random-adapter", help="write a peft LoRA with random non-zero weights on the LLM layers")
    p.add_argument("--base", required=True, type=Path, help="base model directory")
    p.add_argument("--out", required=True, type=Path, help="output adapter directory")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_random_adapter)

    p = sub.add_parser("demo-assets", help="create the embedded default model and demo adapters if absent")
    p.add_argument("--out", type=Path, default=Path("models"), help="root directory (default: models)")
    p.add_argument("--seed", type=int, default=0, help="tiny model seed")
    p.set_defaults(func=_demo_assets)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        sys.exit(f"vlora-train {args.command}: {exc}")


if __name__ == "__main__":
    main()
