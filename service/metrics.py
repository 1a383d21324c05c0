"""Prometheus metrics on an explicit registry (one per app), exposed at `GET /metrics`.

Every series carries the `vlora_` prefix and base units. Per-adapter series use a bounded `adapter` label:
the base is `base`, the first `max_adapter_labels` adapters keep their names, later ones share `other`,
and names that do not exist are `unknown`, so a client cannot blow up the series count.

Engine-side figures (requests waiting, KV-cache usage, queue wait, requests running per adapter) arrive
through the engine protocol's events sink (`Metrics` implements `EngineEvents`); the engine's count of
unfinished requests is read at each scrape.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.engine.base import AdapterEvent, adapter_of

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class AdapterLabels:
    """Bounded label values for adapter names (first come, first named; then 'other')."""

    def __init__(self, max_named: int):
        self.max_named = max_named
        self._named: list[str] = []

    def register(self, name: str) -> str:
        if name in self._named:
            return name
        if len(self._named) < self.max_named:
            self._named.append(name)
            return name
        return "other"

    def __call__(self, adapter: str | None) -> str:
        if adapter is None:
            return "base"
        return adapter if adapter in self._named else "other"


class Metrics:
    def __init__(self, max_adapter_labels: int = 20):
        disable_created_metrics()  # `_created` series only add noise to dashboards and alerts
        self.labels = AdapterLabels(max_adapter_labels)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("vlora_requests", "Chat completion requests by adapter, status and finish reason.",
                                ["adapter", "status", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("vlora_prompt_tokens", "Prompt tokens processed (image tokens included).",
                                     ["adapter"], registry=r)
        self.image_tokens = Counter("vlora_image_tokens", "Prompt tokens that stand for images.", ["adapter"],
                                    registry=r)
        self.video_tokens = Counter("vlora_video_tokens", "Prompt tokens that stand for videos.", ["adapter"],
                                    registry=r)
        self.generation_tokens = Counter("vlora_generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.ttft = Histogram("vlora_time_to_first_token_seconds", "Request arrival to its first token.",
                              ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vlora_inter_token_latency_seconds", "Time between consecutive output tokens.",
                             ["adapter"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vlora_request_duration_seconds", "Request arrival to its last token.",
                             ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("vlora_queue_wait_seconds", "Time a request waited in the engine queue.",
                               ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.image_seconds = Histogram("vlora_image_load_seconds", "Time to fetch and decode a request's images.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.running_requests = Gauge("vlora_requests_running", "Requests admitted and not finished (server side).",
                                      registry=r)
        self.engine_running = Gauge("vlora_engine_requests_running", "Requests the engine is running.", registry=r)
        self.engine_waiting = Gauge("vlora_engine_requests_waiting", "Requests waiting to run: in the engine's queue "
                                    "and, under fair share, for an engine slot in front of it (what autoscaling "
                                    "reads).", registry=r)
        self._engine_waiting = 0
        self.engine_adapter_running = Gauge("vlora_engine_adapter_requests_running",
                                            "Requests the engine is running per adapter.", ["adapter"], registry=r)
        self.kv_cache_usage = Gauge("vlora_engine_kv_cache_usage_ratio", "Fraction of the KV cache in use.",
                                    registry=r)
        self.engine_unfinished = Gauge("vlora_engine_requests_unfinished",
                                       "Requests the engine holds (running or waiting).", registry=r)
        self.adapters_loaded = Gauge("vlora_adapters_loaded", "Adapters loaded in the engine.", registry=r)
        self.adapter_loads = Counter("vlora_adapter_loads", "Adapter loads.", ["adapter"], registry=r)
        self.adapter_unloads = Counter("vlora_adapter_unloads", "Adapter unloads.", ["adapter"], registry=r)
        self.adapter_load_failures = Counter("vlora_adapter_load_failures", "Adapter loads that failed.",
                                             ["adapter"], registry=r)
        self.adapter_load_seconds = Histogram("vlora_adapter_load_seconds", "Time to load an adapter.",
                                              ["adapter"], buckets=LOAD_BUCKETS, registry=r)
        self.rejected = Counter("vlora_requests_rejected", "Requests refused before admission, by reason.",
                                ["reason"], registry=r)
        # Per tenant (the keys file's names; bounded like adapters: later ones share 'other').
        self.tenants = AdapterLabels(max_adapter_labels)
        self.tenant_requests = Counter("vlora_tenant_requests", "Requests that reached the engine, by tenant and "
                                       "status.", ["tenant", "status"], registry=r)
        self.tenant_tokens = Counter("vlora_tenant_tokens", "Tokens by tenant and kind (prompt, completion).",
                                     ["tenant", "kind"], registry=r)
        self.tenant_rejections = Counter("vlora_tenant_rejections", "Requests refused by a limit, by tenant and "
                                         "limit (max_concurrent, requests_per_minute, tokens_per_minute, overloaded).",
                                         ["tenant", "limit"], registry=r)
        self.tenant_queue = Histogram("vlora_tenant_queue_wait_seconds", "Time a request waited for a fair-share "
                                      "engine slot, by tenant.", ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        # What an adapter-affinity router needs and vLLM lacks: which adapters a pod has loaded (not only those
        # running), one series in vLLM's lora_requests_info style (the list capped like adapter labels).
        self.lora_loaded = Gauge("vlora_lora_loaded_info", "Adapters loaded on this server (comma-separated, as "
                                 "clients name them) and the engine's adapter slots.",
                                 ["max_lora", "loaded_lora_adapters"], registry=r)
        self.fair_waiting = Gauge("vlora_fair_share_waiting", "Requests waiting for a fair-share engine slot "
                                  "(in front of the engine's own queue).", registry=r)
        self.responses_stored = Gauge("vlora_responses_stored", "Responses API answers held in the response store.",
                                      registry=r)
        self.responses_stored_bytes = Gauge("vlora_responses_stored_bytes", "Bytes the response store holds "
                                            "(bounded by --responses-store-bytes).", registry=r)

    def observe_request(self, *, adapter: str, status: str, finish_reason: str, prompt_tokens: int,
                        image_tokens: int, completion_tokens: int, ttft: float | None, e2e: float,
                        video_tokens: int = 0) -> None:
        self.requests.labels(adapter, status, finish_reason).inc()
        self.prompt_tokens.labels(adapter).inc(prompt_tokens)
        self.image_tokens.labels(adapter).inc(image_tokens)
        self.video_tokens.labels(adapter).inc(video_tokens)
        self.generation_tokens.labels(adapter).inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(adapter).observe(ttft)
        if status == "2xx":
            self.e2e.labels(adapter).observe(e2e)

    def count_refusal(self, adapter: str, status: int) -> None:
        self.requests.labels(adapter, f"{status // 100}xx", "none").inc()

    # EngineEvents: what the engine reports (adapters as engine names NAME@REV, labelled by NAME) ----------

    def adapter_event(self, event: AdapterEvent, adapter: str, seconds: float | None) -> None:
        name = adapter_of(adapter)
        if event == "load":
            label = self.labels.register(name)
            self.adapter_loads.labels(label).inc()
            self.adapter_load_seconds.labels(label).observe(seconds or 0.0)
            self.adapters_loaded.inc()
        elif event == "unload":
            self.adapter_unloads.labels(self.labels(name)).inc()
            self.adapters_loaded.dec()
        else:
            self.adapter_load_failures.labels(self.labels(name)).inc()

    def scheduler_state(self, running: int, waiting: int, kv_cache_usage: float,
                        running_by_adapter: dict[str, int]) -> None:
        self.engine_running.set(running)
        self._engine_waiting = waiting
        self.engine_waiting.set(waiting)
        self.kv_cache_usage.set(kv_cache_usage)
        per_label: dict[str, int] = {}
        for adapter, count in running_by_adapter.items():
            label = self.labels(adapter_of(adapter))
            per_label[label] = per_label.get(label, 0) + count
        self.engine_adapter_running.clear()
        for label, count in per_label.items():
            self.engine_adapter_running.labels(label).set(count)

    def request_queued(self, adapter: str | None, seconds: float) -> None:
        self.queue.labels(self.labels(adapter_of(adapter) if adapter else None)).observe(seconds)

    def _tenant(self, tenant: str) -> str:
        return self.tenants.register(tenant)

    def tenant_request(self, tenant: str, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        label = self._tenant(tenant)
        self.tenant_requests.labels(label, status).inc()
        self.tenant_tokens.labels(label, "prompt").inc(prompt_tokens)
        self.tenant_tokens.labels(label, "completion").inc(completion_tokens)

    def tenant_rejected(self, tenant: str, limit: str) -> None:
        self.tenant_rejections.labels(self._tenant(tenant), limit).inc()

    def tenant_queue_wait(self, tenant: str, seconds: float) -> None:
        self.tenant_queue.labels(self._tenant(tenant)).observe(seconds)

    def adapter_summary(self, adapter: str | None) -> dict:
        """One adapter's figures since start, from its series (the playground's console): requests answered,
        and TTFT p50/p95 estimated from the histogram buckets as PromQL's histogram_quantile does."""
        label = self.labels(adapter)
        requests = sum(s.value for metric in self.requests.collect() for s in metric.samples
                       if s.name == "vlora_requests_total" and s.labels.get("adapter") == label)
        buckets = sorted((float(s.labels["le"]), s.value) for metric in self.ttft.collect() for s in metric.samples
                         if s.name.endswith("_bucket") and s.labels.get("adapter") == label)
        return {"label": label, "requests": int(requests),
                "ttft_p50_s": _quantile(0.5, buckets), "ttft_p95_s": _quantile(0.95, buckets)}

    def exposition(self, engine_unfinished: int, fair_waiting: int = 0, loaded: list[str] | None = None,
                   max_lora: int = 0, stored: tuple[int, int] = (0, 0)) -> bytes:
        self.engine_unfinished.set(engine_unfinished)
        self.responses_stored.set(stored[0])
        self.responses_stored_bytes.set(stored[1])
        self.lora_loaded.clear()
        self.lora_loaded.labels(str(max_lora), ",".join(sorted(loaded or [])[: self.labels.max_named])).set(1)
        self.fair_waiting.set(fair_waiting)
        self.engine_waiting.set(self._engine_waiting + fair_waiting)
        return generate_latest(self.registry)


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """histogram_quantile over cumulative (upper bound, count) buckets: linear inside the bucket."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank, lower, below = q * buckets[-1][1], 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = upper, count
    return lower
