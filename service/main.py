"""`vlora-serve`: run the OpenAI-compatible server.

    vlora-serve                                   # the embedded tiny model + adapters under models/adapters
    vlora-serve --model Qwen/Qwen3-VL-8B-Instruct --adapter support=/adapters/support --port 8000

Flags override `VLORA_*` environment variables (see service/settings.py).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from service.settings import DEFAULT_ADAPTER_DIR, DEFAULT_MODEL_DIR, ServiceSettings


def parse_args(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="vlora-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"model directory or hub id (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--served-model-name", help="name clients use for the base model")
    p.add_argument("--adapter", action="append", dest="adapters", metavar="NAME=PATH",
                   help="serve a LoRA adapter under NAME (repeatable)")
    p.add_argument("--adapter-dir", type=Path, help=f"serve every adapter subfolder (default with the embedded "
                   f"model: {DEFAULT_ADAPTER_DIR})")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--dtype")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-loras", type=int)
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--quantization", help="vLLM quantization method (e.g. bitsandbytes, awq, fp8)")
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--image-url-allowlist", action="append", metavar="HOST_OR_CIDR",
                   help="allow image URLs on this non-public host or network (repeatable)")
    p.add_argument("--log-level")
    args = vars(p.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


def build_settings(argv: list[str] | None = None) -> ServiceSettings:
    overrides = parse_args(argv)
    settings = ServiceSettings(**overrides)
    embedded = Path(settings.model) == DEFAULT_MODEL_DIR
    if settings.adapter_dir is None and embedded and DEFAULT_ADAPTER_DIR.is_dir():
        settings.adapter_dir = DEFAULT_ADAPTER_DIR
    return settings


def main(argv: list[str] | None = None) -> None:
    settings = build_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from service.adapters.registry import collect_adapters
    from service.app import create_app
    from service.engine.vllm_engine import VLLMEngine

    try:
        adapters = collect_adapters(settings.adapters, settings.adapter_dir)
    except ValueError as exc:
        sys.exit(f"vlora-serve: {exc}")
    if settings.base_name in adapters:
        sys.exit(f"vlora-serve: adapter name '{settings.base_name}' collides with the base model's name")
    engine = VLLMEngine(settings, adapters, enable_lora=bool(adapters) or settings.adapter_dir is not None)
    app = create_app(settings, engine)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was installed before
    # it; a no-op one lets a drained server exit 0 (what Kubernetes and supervisors expect).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
