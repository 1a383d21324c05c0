"""`vlora-serve`: run the OpenAI-compatible server.

    vlora-serve                                   # the embedded tiny model + adapters under models/adapters
    vlora-serve --model Qwen/Qwen3-VL-8B-Instruct --adapter support=/adapters/support --port 8000
    vlora-serve --help                            # every setting of service/settings.py, as a flag

Flags override `VLORA_*` environment variables. Everything is built here in dependency order and handed
down: settings -> metrics -> engine (reporting to the metrics) -> chat renderer -> app.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from artifacts.logs import quiet_optional_kernels
from service.cpus import api_cpus
from service.lifecycle import configure_logging
from service.settings import DEFAULT_ADAPTER_DIR, DEFAULT_MODEL_DIR, ServiceSettings


def build_settings(argv: list[str] | None = None) -> ServiceSettings:
    """Settings from the environment and the command line (`argv`, default sys.argv[1:])."""
    try:
        settings = ServiceSettings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                             for e in exc.errors())
        sys.exit(f"vlora-serve: {problems}")
    embedded = Path(settings.model) == DEFAULT_MODEL_DIR
    if settings.adapter_dir is None and not settings.adapter_url and embedded and DEFAULT_ADAPTER_DIR.is_dir():
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
    quiet_optional_kernels()
    settings = build_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    import uvicorn

    DrainingServer = _draining_server_class()  # noqa: N806

    from service.adapters.registry import collect_adapters
    from service.app import create_app
    from service.auth import KeyRing
    from service.engine.vllm_engine import VLLMEngine
    from service.metrics import Metrics
    from service.serving.render import ChatRenderer

    try:
        adapters = collect_adapters(settings.adapters, settings.adapter_dir)
    except ValueError as exc:
        sys.exit(f"vlora-serve: {exc}")
    if settings.base_name in adapters:
        sys.exit(f"vlora-serve: adapter name '{settings.base_name}' collides with the base model's name")
    try:
        ring = KeyRing.from_settings(settings.api_keys, settings.admin_api_keys, settings.api_keys_file)
    except ValueError as exc:
        sys.exit(f"vlora-serve: {exc}")
    metrics = Metrics(settings.metrics_max_adapter_labels)
    engine = VLLMEngine(settings, adapters, enable_lora=bool(adapters) or settings.adapter_dir is not None
                        or bool(settings.adapter_url),
                        events=metrics, priority_scheduling=ring.prioritised)
    try:
        engine.engine_args()  # refuse conflicting or unknown --engine-arg before anything starts
        api_cpus(settings.api_cpus, os.sched_getaffinity(0), set())  # and CPUs this process may not use
    except ValueError as exc:
        sys.exit(f"vlora-serve: {exc}")
    try:
        renderer = ChatRenderer.from_pretrained(settings.model, settings.engine_args.get("mm_processor_kwargs"))
    except (OSError, ValueError) as exc:
        sys.exit(f"vlora-serve: the model's processor could not be loaded from '{settings.model}': {exc}")
    try:
        app = create_app(settings, engine, metrics=metrics, renderer=renderer, keyring=ring)
    except ValueError as exc:
        sys.exit(f"vlora-serve: {exc}")
    server = DrainingServer(uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                                           log_level=settings.log_level, log_config=None,
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
