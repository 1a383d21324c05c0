"""Run outputs: results.jsonl (raw), summary.json, report.md and PNG plots; and the A/B ratio table."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.stats import RequestRecord

METRICS = ("ttft", "itl", "tpot", "e2e", "cold_ttft")


def write_outputs(out: Path, records: list[RequestRecord], summary: dict, meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    (out / "summary.json").write_text(json.dumps({"meta": meta, **summary}, indent=2))
    plots = plot(out, records, summary)
    (out / "report.md").write_text(markdown(summary, meta, plots))
    return [out / "results.jsonl", out / "summary.json", out / "report.md", *plots]


def _fmt(v, scale: float = 1000.0, unit: str = "ms") -> str:
    return "–" if v is None else f"{v * scale:.1f} {unit}"


def markdown(summary: dict, meta: dict, plots: list[Path]) -> str:
    lines = [f"# Load test: {meta.get('scenario', '')}", "",
             f"Target `{meta.get('url')}`, {meta.get('mode')} loop, seed {meta.get('seed')}; "
             f"{summary['requests']} requests in {summary['wall_s']:.1f} s.", "",
             "| | requests/s | output tok/s | errors | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | TPOT p50 | E2E p50 | E2E p99 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, s: dict) -> str:
        return (f"| {name} | {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | {s['error_rate']:.1%} | "
                f"{_fmt(s['ttft']['p50'])} | {_fmt(s['ttft']['p90'])} | {_fmt(s['ttft']['p99'])} | "
                f"{_fmt(s['itl']['p50'])} | {_fmt(s['tpot']['p50'])} | {_fmt(s['e2e']['p50'])} | {_fmt(s['e2e']['p99'])} |")

    lines.append(row("**all**", summary))
    for name, s in summary.get("per_adapter", {}).items():
        lines.append(row(f"`{name}`", s))
    for name, s in summary.get("per_extra", {}).items():
        lines.append(row(f"extra `{name}`", s))
    lines += ["", f"Cold-adapter TTFT p50 {_fmt(summary['cold_ttft']['p50'])} "
              f"(n={summary['cold_ttft']['n']}); warm TTFT p50 {_fmt(summary['ttft']['p50'])}."]
    if summary.get("slo"):
        lines += ["", f"Goodput under SLO {summary['slo']}: {summary['goodput_requests_per_s']:.2f} requests/s "
                  f"({summary['slo_attainment']:.1%} of requests)."]
    if summary["errors"]:
        lines += ["", "Errors: " + ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors"].items()))]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(out: Path, records: list[RequestRecord], summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok]
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (name, values) in zip(axes, [("TTFT", [r.ttft for r in ok if r.ttft is not None]),
                                         ("TPOT", [r.tpot for r in ok if r.tpot is not None]),
                                         ("end-to-end", [r.e2e for r in ok if r.e2e is not None])], strict=True):
        xs = sorted(values)
        if xs:
            ax.plot([x * 1000 for x in xs], [(i + 1) / len(xs) for i in range(len(xs))])
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.scatter([r.start for r in ok if r.ttft is not None], [r.ttft * 1000 for r in ok if r.ttft is not None], s=8,
               label="TTFT (ms)")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("TTFT ms")
    if records:
        ax2 = ax.twinx()
        horizon = max(r.start for r in records) + 1
        bins = max(1, int(horizon))
        ax2.hist([r.start for r in records], bins=bins, range=(0, horizon), alpha=0.25, color="gray")
        ax2.set_ylabel("arrivals / s")
    ax.set_title("TTFT over time, with the arrival rate")
    fig.tight_layout()
    paths.append(out / "ttft_over_time.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    per = summary.get("per_adapter", {})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = list(per)
    axes[0].bar(names, [per[n]["requests"] for n in names])
    axes[0].set_title("requests per adapter")
    axes[1].bar(names, [(per[n]["ttft"]["p50"] or 0) * 1000 for n in names])
    axes[1].set_title("TTFT p50 per adapter (ms)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(out / "per_adapter.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def _flatten(summary: dict) -> dict[str, float]:
    flat = {}
    for key in ("requests_per_s", "output_tokens_per_s", "error_rate", "goodput_requests_per_s"):
        if summary.get(key) is not None:
            flat[key] = summary[key]
    for metric in METRICS:
        for stat, value in (summary.get(metric) or {}).items():
            if stat != "n" and value is not None:
                flat[f"{metric}.{stat}"] = value
    return flat


def compare(a: dict, b: dict) -> list[tuple[str, float, float, float | None]]:
    """(figure, A, B, B/A) for every figure both summaries have, overall, per adapter and per extras entry."""
    rows = []
    fa, fb = _flatten(a), _flatten(b)
    for key in fa:
        if key in fb:
            rows.append((key, fa[key], fb[key], fb[key] / fa[key] if fa[key] else None))
    for part, prefix in (("per_adapter", ""), ("per_extra", "extra:")):
        for name in sorted(set(a.get(part, {})) & set(b.get(part, {}))):
            pa, pb = _flatten(a[part][name]), _flatten(b[part][name])
            for key in pa:
                if key in pb:
                    rows.append((f"{prefix}{name}/{key}", pa[key], pb[key], pb[key] / pa[key] if pa[key] else None))
    return rows


def compare_table(rows: list[tuple[str, float, float, float | None]]) -> str:
    width = max((len(r[0]) for r in rows), default=10)
    lines = [f"{'figure':<{width}}  {'A':>12}  {'B':>12}  {'B/A':>7}"]
    for name, va, vb, ratio in rows:
        shown = f"{ratio:.3f}" if ratio is not None else "–"
        lines.append(f"{name:<{width}}  {va:>12.4g}  {vb:>12.4g}  {shown:>7}")
    return "\n".join(lines)
