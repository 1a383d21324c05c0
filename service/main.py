"""`vlora-serve`: run the OpenAI-compatible server.

    vlora-serve                                   # the embedded tiny model + adapters under models/adapters
    vlora-serve --model Qwen/Qwen3-VL-8B-Instruct --adapter support=/adapters/support --port 8000

Flags override `VLORA_*` environment variables (see service/settings.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from service.lifecycle import configure_logging
from service.settings import DEFAULT_ADAPTER_DIR, DEFAULT_MODEL_DIR, ServiceSettings


def parse_args(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="vlora-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"model directory or hub id (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--served-model-name", help="name clients use for the base model")
    p.add_argument("--adapter", action="append", dest="adapters", metavar="NAME=PATH",
                   help="serve a LoRA adapter under NAME (repeatable)")
    p.add_argument("--adapter-dir", type=Path, help=f"adapter root: NAME/ or NAME/REV/ folders, served by name "
                   f"(default with the embedded model: {DEFAULT_ADAPTER_DIR})")
    p.add_argument("--preload", choices=["all", "none"],
                   help="load every root adapter at start (all, default) or each on its first request (none)")
    p.add_argument("--enable-tower-lora", action="store_true", default=None,
                   help="apply vision-tower/merger LoRA weights")
    p.add_argument("--max-cpu-loras", type=int, help="adapters the engine keeps in host memory")
    p.add_argument("--api-keys-file", type=Path, help="YAML/JSON tenants file: keys, adapter allowlists, admin")
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
    p.add_argument("--image-url-allowlist", action="append", metavar="HOST_OR_CIDR[:PORT]",
                   help="allow image URLs on this non-public host or network, optionally one port (repeatable)")
    p.add_argument("--max-pending-requests", type=int, help="bound on running + waiting requests (then 429)")
    p.add_argument("--drain-grace-s", type=float, help="on SIGTERM, how long requests in flight may finish")
    p.add_argument("--log-level")
    p.add_argument("--log-format", choices=["json", "text"])
    args = vars(p.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


def build_settings(argv: list[str] | None = None) -> ServiceSettings:
    overrides = parse_args(argv)
    settings = ServiceSettings(**overrides)
    embedded = Path(settings.model) == DEFAULT_MODEL_DIR
    if settings.adapter_dir is None and embedded and DEFAULT_ADAPTER_DIR.is_dir():
        settings.adapter_dir = DEFAULT_ADAPTER_DIR
    return settings


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT start a drain (see service.lifecycle.Drain); a second signal exits at once."""

        def __init__(self, config, drain):
            super().__init__(config)
            self.drain = drain

        def handle_exit(self, sig, frame):
            if self.drain.draining:
                return super().handle_exit(sig, frame)
            self._captured_signals.append(sig)
            self.drain.begin()

    return DrainingServer


def main(argv: list[str] | None = None) -> None:
    settings = build_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    import uvicorn

    DrainingServer = _draining_server_class()  # noqa: N806

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
    try:
        app = create_app(settings, engine)
    except ValueError as exc:
        sys.exit(f"vlora-serve: {exc}")
    server = DrainingServer(uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                                           log_level=settings.log_level.lower(), log_config=None,
                                           timeout_graceful_shutdown=5),
                            app.state.drain)
    app.state.server = server
    # uvicorn re-raises the captured signal after shutting down, to the handler installed before it; a
    # no-op one lets a drained server exit 0 (what Kubernetes and supervisors expect).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if app.state.engine_dead:
        sys.exit("vlora-serve: the inference engine died")


if __name__ == "__main__":
    main()
