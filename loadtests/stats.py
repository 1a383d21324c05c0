"""Summary statistics of a load run: latency percentiles, throughput, errors, goodput — overall and per adapter.

Per request: TTFT (start to first content token), inter-token latencies (gaps between token arrivals),
TPOT ((end - first token) / (output tokens - 1)) and end-to-end latency.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2e")


@dataclass
class RequestRecord:
    index: int
    model: str
    cold: bool
    start: float                    # seconds since the run started
    status: int = 0                 # HTTP status (0: no response)
    error: str | None = None        # error type, None when successful
    ttft: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each content chunk, seconds since start
    end: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    extra: str | None = None        # the name of the scenario extras entry it carried

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.end is None or self.output_tokens < 2:
            return None
        return (self.end - (self.start + self.ttft)) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    def to_json(self) -> dict:
        return asdict(self)


def percentile(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def distribution(values: list[float]) -> dict:
    out = {f"p{p}": percentile(values, p) for p in PERCENTILES}
    out["mean"] = sum(values) / len(values) if values else None
    out["n"] = len(values)
    return out


def meets_slo(r: RequestRecord, slo: dict[str, float]) -> bool:
    if not r.ok:
        return False
    for key, limit in slo.items():
        value = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}[key]
        if value is not None and value > limit:
            return False
        if value is None and key != "tpot":
            return False
    return True


def summarize(records: list[RequestRecord], wall_s: float, slo: dict[str, float] | None = None) -> dict:
    slo = slo or {}
    ok = [r for r in records if r.ok]
    wall_s = max(wall_s, 1e-9)
    summary = {
        "requests": len(records),
        "successful": len(ok),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / wall_s,
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "errors": dict(Counter(r.error or f"http_{r.status}" for r in records if not r.ok)),
        "ttft": distribution([r.ttft for r in ok if r.ttft is not None]),
        "itl": distribution([g for r in ok for g in r.itls]),
        "tpot": distribution([r.tpot for r in ok if r.tpot is not None]),
        "e2e": distribution([r.e2e for r in ok if r.e2e is not None]),
        "cold_ttft": distribution([r.ttft for r in ok if r.cold and r.ttft is not None]),
    }
    if slo:
        good = [r for r in records if meets_slo(r, slo)]
        summary["slo"] = slo
        summary["goodput_requests_per_s"] = len(good) / wall_s
        summary["slo_attainment"] = len(good) / len(records) if records else 0.0
    return summary


def summarize_all(records: list[RequestRecord], wall_s: float, slo: dict[str, float] | None = None) -> dict:
    out = summarize(records, wall_s, slo)
    out["per_adapter"] = {
        model: summarize([r for r in records if r.model == model], wall_s, slo)
        for model in sorted({r.model for r in records})
    }
    kinds = sorted({r.extra for r in records if r.extra is not None})
    if kinds:  # servers may stream some kinds differently (a held-back tool call): each is summarized alone
        out["per_extra"] = {kind: summarize([r for r in records if r.extra == kind], wall_s, slo) for kind in kinds}
    return out


def parse_slo(items: list[str] | None) -> dict[str, float]:
    """`["ttft=0.5", "tpot=0.05"]` -> {"ttft": 0.5, "tpot": 0.05} (seconds)."""
    slo = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--slo takes KEY=SECONDS with KEY one of {', '.join(SLO_KEYS)}, not {item!r}")
        slo[key] = float(value)
    return slo
