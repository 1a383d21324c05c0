"""Load scenarios: what traffic to send, from YAML (loadtests/scenarios/*.yaml) or flags, and its plan.

A scenario is deterministic from its seed: the same file gives the same arrival times, adapter choices,
images, prompts and output lengths, so two servers can be compared on identical traffic.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MIXES = ("zipf", "uniform", "round_robin", "weights")


class ScenarioError(ValueError):
    pass


@dataclass
class ImageBucket:
    size: int = 256
    format: str = "PNG"
    weight: float = 1.0


@dataclass
class Scenario:
    name: str = "adhoc"
    mode: str = "closed"            # open: Poisson arrivals at `rate`; closed: `concurrency` workers
    rate: float = 2.0               # requests/s (open loop)
    concurrency: int = 4            # workers (closed loop)
    max_requests: int = 50          # the run stops after this many requests ...
    duration_s: float = 60.0        # ... or after this long, whichever comes first
    adapters: list[str] = field(default_factory=list)  # model names to spread over; empty: the server's list
    mix: str = "zipf"
    zipf_s: float = 1.1
    weights: list[float] = field(default_factory=list)
    cold_burst: int = 0             # first requests go to adapters not used before (cold loads)
    cold_adapters: list[str] = field(default_factory=list)
    images: list[ImageBucket] = field(default_factory=lambda: [ImageBucket()])
    images_per_request: int = 1
    prompt_words: tuple[int, int] = (4, 12)
    max_tokens: tuple[int, int] = (16, 64)
    # Output lengths to draw from instead of the max_tokens range (e.g. the lengths a constrained workload's
    # answers had: an unconstrained control with the same length distribution). Drawn from a stream of their own,
    # so the rest of the plan (models, prompts, images) is the same as without them.
    max_tokens_choices: list[int] = field(default_factory=list)
    ignore_eos: bool = True
    temperature: float = 0.0
    response_format: dict | None = None  # sent as is (e.g. a json_schema constraint); needs ignore_eos: false
    # A feature mix: each request takes one entry (by weight) and merges its `body` into the request, e.g.
    # {weight: 1, body: {logprobs: true, top_logprobs: 2}}; a body that constrains the output (response_format,
    # tool_choice) is sent without ignore_eos.
    extras: list[dict] = field(default_factory=list)
    seed: int = 0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in ("open", "closed"):
            problems.append(f"mode must be 'open' or 'closed', not {self.mode!r}")
        if self.mode == "open" and self.rate <= 0:
            problems.append("rate must be > 0 for an open-loop scenario")
        if self.concurrency < 1:
            problems.append("concurrency must be >= 1")
        if self.max_requests < 1 or self.duration_s <= 0:
            problems.append("max_requests and duration_s must be positive (a run must stop by itself)")
        if self.mix not in MIXES:
            problems.append(f"mix must be one of {', '.join(MIXES)}, not {self.mix!r}")
        if self.mix == "weights" and len(self.weights) != len(self.adapters):
            problems.append(f"mix 'weights' needs one weight per adapter ({len(self.adapters)} adapters, "
                            f"{len(self.weights)} weights)")
        if self.mix == "zipf" and self.zipf_s <= 0:
            problems.append("zipf_s must be > 0")
        self.images = [b if isinstance(b, ImageBucket) else ImageBucket(**b) for b in self.images]
        for b in self.images:
            if b.format.upper() not in ("PNG", "JPEG"):
                problems.append(f"image format must be PNG or JPEG, not {b.format!r}")
            if not 16 <= b.size <= 4096:
                problems.append(f"image size {b.size} is outside 16..4096")
        if self.response_format is not None and self.ignore_eos:
            problems.append("response_format needs ignore_eos: false (a constrained answer ends where its grammar does)")
        self.prompt_words, self.max_tokens = tuple(self.prompt_words), tuple(self.max_tokens)
        for name in ("prompt_words", "max_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                problems.append(f"{name} must be [min, max] with 1 <= min <= max")
        if any(not isinstance(n, int) or n < 1 for n in self.max_tokens_choices):
            problems.append("max_tokens_choices must be positive integers")
        for extra in self.extras:
            if not isinstance(extra, dict) or set(extra) - {"weight", "body", "name"} or \
                    not isinstance(extra.get("body"), dict) or float(extra.get("weight", 1)) <= 0:
                problems.append("each extras entry is {name?, weight > 0, body: {...}}")
        if self.cold_burst and not self.cold_adapters:
            problems.append("cold_burst needs cold_adapters (adapters the rest of the run does not use)")
        if problems:
            raise ScenarioError(f"invalid scenario '{self.name}': " + "; ".join(problems))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> Scenario:
        path = Path(path)
        if not path.is_file():
            raise ScenarioError(f"scenario file '{path}' does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ScenarioError(f"scenario file '{path}' must be a mapping")
        data.setdefault("name", path.stem)
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScenarioError(f"unknown scenario key(s) in '{path}': {', '.join(unknown)}; "
                                f"valid keys: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass
class PlannedRequest:
    index: int
    at: float | None          # seconds from start (open loop); None in closed loop
    model: str
    cold: bool
    prompt: str
    max_tokens: int
    images: list[ImageBucket]
    image_seed: int
    extra: int | None = None  # which scenario extras entry the request carries


WORDS = ("what color shape is the image describe object left right top bottom large small please tell me "
         "about this picture background center corner").split()


def adapter_weights(s: Scenario, adapters: list[str]) -> list[float]:
    n = len(adapters)
    if s.mix == "zipf":
        return [1.0 / (rank ** s.zipf_s) for rank in range(1, n + 1)]
    if s.mix == "weights":
        return list(s.weights)
    return [1.0] * n


def plan(s: Scenario, adapters: list[str]) -> list[PlannedRequest]:
    """The whole request plan, deterministic from the seed (arrival times only in open loop)."""
    if not adapters:
        raise ScenarioError("no adapters to send traffic to")
    rng = random.Random(s.seed)
    lengths = random.Random(f"{s.seed}-max-tokens-choices")
    weights = adapter_weights(s, adapters)
    t = 0.0
    out = []
    for i in range(s.max_requests):
        cold = i < s.cold_burst
        if cold:
            model = s.cold_adapters[i % len(s.cold_adapters)]
        elif s.mix == "round_robin":
            model = adapters[(i - s.cold_burst) % len(adapters)]
        else:
            model = rng.choices(adapters, weights)[0]
        if s.mode == "open":
            t += rng.expovariate(s.rate)
        n_words = rng.randint(*s.prompt_words)
        prompt = " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "?"
        buckets = rng.choices(s.images, [b.weight for b in s.images], k=s.images_per_request) if s.images else []
        extra = rng.choices(range(len(s.extras)), [float(e.get("weight", 1)) for e in s.extras])[0] \
            if s.extras else None
        max_tokens = rng.randint(*s.max_tokens)
        if s.max_tokens_choices:
            max_tokens = lengths.choice(s.max_tokens_choices)
        out.append(PlannedRequest(index=i, at=t if s.mode == "open" else None, model=model, cold=cold, prompt=prompt,
                                  max_tokens=max_tokens, images=buckets, image_seed=rng.randrange(1 << 30), extra=extra))
    return out
