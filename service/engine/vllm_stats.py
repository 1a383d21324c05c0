"""vLLM's stat-logger interface, translated into `EngineEvents` calls (in the server process).

vLLM hands every registered stat logger its scheduler stats (running / waiting requests, KV-cache usage,
running requests per LoRA name) and iteration stats (among them each finished request's queue time) after
each engine step. The service's metrics know nothing of vLLM: they receive plain numbers through the sink.
"""

from __future__ import annotations

from collections.abc import Callable

from service.engine.base import EngineEvents


def stat_logger_factory(events: EngineEvents, adapter_of_request: Callable[[str], str | None]):
    """A vLLM `PerEngineStatLoggerFactory` reporting to `events`; `adapter_of_request` maps a request id
    (vLLM reports the id the request was submitted with) to its engine adapter name, or None (the base)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class EventsStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                events.scheduler_state(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                                       scheduler_stats.kv_cache_usage,
                                       dict(scheduler_stats.running_lora_adapters or {}))
            if iteration_stats is not None:
                for finished in iteration_stats.finished_requests:
                    events.request_queued(adapter_of_request(finished.request_id or ""), finished.queued_time)

        def log_engine_initialized(self):
            pass

    return EventsStatLogger
