"""Service settings: one pydantic-settings model, built once in `main()` and passed down.

Every field can be set by environment variable (`VLORA_` prefix, e.g. `VLORA_MODEL`, `VLORA_PORT`,
`VLORA_ADAPTERS='["a=/adapters/a"]'`) or by the matching `vlora-serve` flag, which pydantic-settings'
CLI source generates from the field (`max_model_len` -> `--max-model-len`; lists repeat the flag; booleans
have `--x/--no-x`); flags win. A new setting is one field here.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_DIR = Path("models/tiny-qwen3-vl")
DEFAULT_ADAPTER_DIR = Path("models/adapters")


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VLORA_", extra="ignore",
        # the `vlora-serve` command line (used when built with `_cli_parse_args`, see service/main.py)
        cli_prog_name="vlora-serve", cli_kebab_case=True, cli_implicit_flags=True, cli_avoid_json=True,
        cli_hide_none_type=True, cli_shortcuts={"adapters": "adapter", "engine-args": "engine-arg"},
    )

    # What is served
    model: str = Field(str(DEFAULT_MODEL_DIR), description="Model directory or hub id (merged models too).")
    served_model_name: str | None = Field(None, description="Name clients use for the base; default: model dir name.")
    adapters: list[str] = Field(default_factory=list,
                                description="Adapters as NAME=PATH, loaded at start (--adapter, repeatable).")
    adapter_dir: Path | None = Field(None, description="Adapter root: NAME/ or NAME/REV/ folders (see service.adapters.store).")
    adapter_url: str | None = Field(None, description="Adapter root in object storage, s3://bucket/prefix (same layout; "
                                    "boto3's AWS configuration; see service.adapters.s3store). Not with --adapter-dir.")
    adapter_cache_dir: Path = Field(Path("/tmp/vlora-adapter-cache"), description="Local cache of --adapter-url.")
    adapter_cache_bytes: int = Field(20 * 2**30, ge=1, description="Bound of the --adapter-url cache (LRU).")
    adapter_listing_ttl_s: float = Field(10.0, ge=0, description="How long an --adapter-url listing is reused.")
    preload: Literal["all", "none"] = Field(
        "all", description="Load every adapter of the root at start (all), or each on its first request (none).")
    enable_tower_lora: bool = Field(False, description="Apply vision-tower/merger LoRA weights (vLLM tower LoRA).")

    # Access control
    api_keys_file: Path | None = Field(None, description="YAML/JSON tenants file (keys, adapter allowlists, admin, "
                                       "limits); re-read when it changes (Secret rotation).")
    keys_reload_interval_s: float = Field(5.0, gt=0, description="How often the tenants file is checked for changes.")
    api_keys: list[str] = Field(default_factory=list, description="Keys with access to every adapter and the base.")
    admin_api_keys: list[str] = Field(default_factory=list, description="Keys that may also use the admin API.")
    public_paths: list[str] = Field(default_factory=lambda: ["/health", "/ready", "/metrics"],
                                    description="Paths answered without a key when keys are configured.")
    fair_share: bool = Field(True, description="With API keys: dispatch to the engine by weighted fair share per "
                                               "tenant when its batch is full, instead of first come, first served.")
    max_running_requests: int | None = Field(None, ge=1, description="Requests dispatched to the engine at once "
                                             "under fair share (default: --max-num-seqs).")
    fair_share_batch: int = Field(0, ge=0, description="Under fair share, while more than one tenant is active: "
                                  "hold the requests dispatched to the engine to this many, split by weighted "
                                  "max-min fairness over each tenant's demand, so that a flooding tenant's batch "
                                  "does not slow a light tenant's steps (a tenant alone has every slot; 0: off).")
    playground: bool = Field(True, description="Serve the playground page at /playground (its API calls still "
                                               "need a key when keys are configured).")

    # HTTP
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    log_format: Literal["json", "text"] = Field("json", description="json lines or plain text logs.")

    # Operations
    responses_store_bytes: int = Field(
        256 * 2**20, ge=0, description="Bound of the Responses API's stored responses in memory (least recently used "
        "evicted; finished background streams' events count as part of their response; 0: nothing stored, answers say "
        "store: false).")
    max_pending_requests: int = Field(64, ge=1, description="Bound on running + waiting requests; beyond: 429.")
    drain_grace_s: float = Field(30.0, ge=0, description="On SIGTERM, how long requests in flight may finish.")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 429 and 503 answers.")
    metrics_max_adapter_labels: int = Field(20, ge=1, description="Adapters named in metrics; the rest: 'other'.")
    health_check_interval_s: float = Field(2.0, gt=0, description="Engine liveness check period.")
    adapter_check_interval_s: float = Field(5.0, gt=0, description="How often loaded adapters' folders are checked "
                                            "(removed or changed files make that adapter answer 503).")

    # Engine (vLLM)
    dtype: str = Field("auto", description="Weights dtype (auto, bfloat16, float16, float32).")
    max_model_len: int | None = Field(4096, ge=64, description="Context length (prompt, images and completion).")
    max_num_seqs: int = Field(16, ge=1, description="Requests the engine runs in one batch.")
    max_num_batched_tokens: int | None = Field(None, description="Tokens per engine step (default: engine's).")
    max_loras: int = Field(4, ge=1, description="Adapters resident in one batch.")
    max_cpu_loras: int | None = Field(None, description="Adapters cached in host memory (default: engine's).")
    max_lora_rank: int | None = Field(None, description="Default: the largest rank among the start adapters.")
    quantization: str | None = Field(None, description="vLLM quantization method, e.g. 'bitsandbytes', 'awq', 'fp8'.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model is split over.")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="Pipeline stages the model's layers are split into (GPUs of this node, or nodes with "
                             "the ray executor or --engine-arg nnodes).")
    data_parallel_size: int = Field(
        1, ge=1, description="Engine replicas in this server, each with the whole model and every loaded adapter; "
                             "requests are balanced between them, adapter loads go to all.")
    distributed_executor_backend: str | None = Field(
        None, description="How parallel workers run: mp (processes of this node), ray (a Ray cluster: several nodes), "
                          "uni (one process); default: vLLM's choice.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="Fraction of GPU memory vLLM may use.")
    cpu_kvcache_space_gib: int = Field(1, ge=1, description="KV cache of the CPU backend (VLLM_CPU_KVCACHE_SPACE).")
    cpu_memory_bounds: bool = Field(
        False, description="On the CPU backend, start the engine's processes with a bounded oneDNN kernel cache "
                           "(ONEDNN_PRIMITIVE_CACHE_CAPACITY=16) and a fixed glibc mmap threshold "
                           "(MALLOC_MMAP_THRESHOLD_=131072): their memory grows less under varied batch and image "
                           "shapes, at a cost in throughput (bench/results/cpu-memory-bounds/). A variable already "
                           "in the environment wins.")
    cpu_allocator: Literal["system", "tcmalloc"] = Field(
        "system", description="On the CPU backend, the engine processes' memory allocator: tcmalloc is preloaded "
                              "into them (LD_PRELOAD), as vLLM does when its CPU wheel bundles one, from the "
                              "system's libtcmalloc_minimal (Debian: libtcmalloc-minimal4; missing: a start-up "
                              "error); system keeps glibc's. An LD_PRELOAD that already names tcmalloc wins.")
    api_cpus: str = Field(
        "auto", description="CPUs the API process runs on: auto keeps it off the cores the engine's CPU workers "
                            "are bound to (vLLM's CPU backend binds them, and leaves a core for other processes), "
                            "so that it never stalls an engine step; all leaves it unbound; or a CPU list (1, 0,2-3).")
    structured_outputs_backend: str = Field(
        "xgrammar", description="vLLM structured-output backend (xgrammar, guidance, outlines, lm-format-enforcer, auto).")
    structured_outputs_any_whitespace: bool = Field(
        False, description="Let constrained JSON put any whitespace between tokens (off: compact JSON, which cannot "
                           "ramble in whitespace until max_tokens).")
    tool_call_parser: str = Field(
        "hermes", description="vLLM tool-call parser of the model's format (hermes: Qwen3 / Qwen3-VL <tool_call>).")
    reasoning_parser: str | None = Field(
        None, description="vLLM reasoning parser of a thinking model's format (qwen3: <think>...</think>), which "
                          "splits the reasoning into reasoning_content; constrained output then starts after it. "
                          "Off by default.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM engine argument, --engine-arg KEY=VALUE (repeatable; VALUE parsed as JSON when "
                    "it is JSON) or VLORA_ENGINE_ARGS='{...}'. Arguments vlora sets from its own settings are refused.")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of shared prompt prefixes.")
    prefix_cache_per_tenant: bool = Field(True, description="Each tenant reuses only its own cached prefixes (vLLM's "
                                          "cache_salt, the tenant's name): how fast another tenant's prompt starts says "
                                          "nothing about what a tenant sent. Off: tenants share cached prefixes.")
    enforce_eager: bool = Field(False, description="No CUDA graphs in the engine (slower; starts faster).")
    seed: int = Field(0, description="Engine seed (requests may pass their own).")

    # Request limits
    max_images_per_request: int = Field(4, ge=0, description="Images one request may carry.")
    max_videos_per_request: int = Field(1, ge=0, description="Videos one request may carry (0: no video input).")
    max_video_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Bytes of one video (encoded).")
    video_fps: float = Field(2.0, gt=0, description="Frames sampled per second of video.")
    video_max_frames: int = Field(32, ge=2, description="Frames sampled from one video at most.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Bytes of one image (encoded).")
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, description="Pixels of one image (decoded).")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Bytes of one request body; beyond: 413.")

    # Image URLs
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="Time to fetch one image URL.")
    image_fetch_max_redirects: int = Field(3, ge=0, description="Redirects followed per image URL.")
    image_url_allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs[:PORT] that may be fetched although not public (e.g. '127.0.0.1/32' for "
                    "tests; repeatable).",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, v):
        return v.lower() if isinstance(v, str) else v

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in v.items():
            if isinstance(value, str):  # from the command line: "512" -> 512, "true" -> True, '{"a": 1}' -> dict
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            out[key.replace("-", "_")] = value
        return out

    @field_validator("api_cpus")
    @classmethod
    def _api_cpus(cls, v: str) -> str:
        from service.cpus import check_setting

        return check_setting(v)

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, v: list[str]) -> list[str]:
        for item in v:
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"adapter '{item}' must look like NAME=PATH")
        return v

    @field_validator("image_url_allowlist")
    @classmethod
    def _allowlist(cls, v: list[str]) -> list[str]:
        from service.media import parse_allowlist_entry

        for item in v:
            host, _ = parse_allowlist_entry(item)  # ValueError on a bad port
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                if not host or "/" in host:
                    raise ValueError(f"allowlist entry '{item}' is neither a CIDR nor a host name") from None
        return v

    @property
    def base_name(self) -> str:
        return self.served_model_name or Path(self.model.rstrip("/")).name
