"""Tenant isolation benchmark: a light tenant's latency while another floods, with isolation on and off; a soak.

    .venv/bin/python bench/isolation.py [--out bench/results/isolation] [--phases flood,flood-contended,...]

On this machine (127.0.0.1 only, bounded in time), the tiny model with four adapters, two tenants in a keys
file (equal priority, no limits: what protects B is fair share, not a quota):
  1. capacity: closed loop c=16 for 30 s (requests/s);
  2. isolation on (the default: fair share per tenant) and then off (`--no-fair-share`: first come, first
     served): B runs `loadtests/scenarios/tenant-light.yaml` (closed loop c=2, 3 minutes) while A runs
     `tenant-flood.yaml` (open loop at 4x capacity) for the middle minute. B's TTFT p50/p95 and throughput
     alone (first and last minute) vs during the flood, B's 429s, A's 429 share, and every other failure.
     Targets (isolation on): B's TTFT p95 during the flood <= 1.5x alone, B gets zero 429s, no request of
     either tenant fails with anything but a 429. Then the same with `--fair-share-batch 3` (the contended
     batch: while both tenants are active the engine holds B's demand plus one of A's requests), and with
     `--phases` a `max_concurrent` quota on A or a smaller engine batch for the whole server, to compare;
  3. soak: `soak-c32.yaml` (closed loop c=32 over all adapters, mixed image sizes, 5 minutes); API process
     and engine RSS sampled every 10 s from the load's first request (the load tool takes seconds to start),
     the engine's split into anonymous, file-backed and shared-memory pages. Targets: no error other than
     429; RSS growth from minute 1 to minute 5 < 5 %.
Prints (and writes) the tables last.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_bench import demo_models, start, stop  # noqa: E402

KEYS = {"A": "sk-tenant-a-flood", "B": "sk-tenant-b-light"}
SCENARIOS = ROOT / "loadtests" / "scenarios"


def keys_file(out: Path, limits: dict[str, dict] | None = None) -> Path:
    path = out / "keys.json"
    path.write_text(json.dumps({"tenants": [
        {"name": name, "keys": [key], "adapters": ["*"], "base": True, **(limits or {}).get(name, {})}
        for name, key in KEYS.items()]}))
    return path


def load(url: str, tenant: str, scenario: str, out: Path, adapters: list[str], *extra: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "loadtests", "run", "--url", url, "--api-key", KEYS[tenant], "--scenario",
           str(SCENARIOS / scenario), "--adapters", ",".join(adapters), "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out / "load.log", "wb"))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def window(rows: list[dict], lo: float, hi: float) -> dict:
    inside = [r for r in rows if lo <= r["start"] < hi]
    ok = [r for r in inside if r["status"] == 200 and not r.get("error")]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    return {"requests": len(inside), "ok": len(ok), "rps": len(ok) / (hi - lo),
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "status_429": sum(r["status"] == 429 for r in inside),
            "other_failures": sum(r["status"] not in (200, 429) or (r["status"] == 200 and bool(r.get("error")))
                                  for r in inside)}


def capacity(url: str, adapters: list[str], out: Path) -> float:
    # as tenant B, which has no limits in any phase (A may carry a quota)
    proc = load(url, "B", "tenant-light.yaml", out, adapters, "--concurrency", "16", "--duration", "30")
    proc.wait(120)
    summary = json.loads((out / "summary.json").read_text())
    return summary["requests_per_s"]


def flood_run(name: str, model: Path, adapters: dict[str, Path], out: Path, extra: tuple[str, ...],
              limits: dict[str, dict] | None = None) -> dict:
    run = out / name.replace(" ", "-").replace(":", "")  # "on + A max_concurrent: 1" -> on-+-A-max_concurrent-1
    shutil.rmtree(run, ignore_errors=True)  # no figure from an earlier run
    run.mkdir(parents=True)
    proc, url = start("vlora", model, adapters, run, ("--api-keys-file", str(keys_file(run, limits)), *extra))
    try:
        names = list(adapters)
        cap = capacity(url, names, run / "capacity")
        light = load(url, "B", "tenant-light.yaml", run / "B", names)
        time.sleep(60)
        flood = load(url, "A", "tenant-flood.yaml", run / "A", names, "--rate", f"{4 * cap:.1f}")
        flood.wait(400)
        light.wait(400)
    finally:
        stop(proc)
    b, a = records(run / "B"), records(run / "A")
    alone = window([r for r in b if r["start"] < 60 or r["start"] >= 120], 0, 180)
    alone["rps"] = alone["ok"] / 120
    during = window(b, 60, 120)
    flood_all = window(a, 0, 10_000)
    return {"isolation": name, "capacity_rps": cap, "flood_rate": 4 * cap, "B_alone": alone, "B_flood": during,
            "A": {**flood_all, "share_429": flood_all["status_429"] / max(1, flood_all["requests"])}}


RSS_KINDS = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


def rss_kinds(pid: int) -> dict[str, float]:
    """The process's resident MiB by kind (/proc/PID/status): anonymous (heap, stacks), file-backed (code and
    libraries paged in, mapped weights) and shared memory; they add up to its RSS."""
    kinds = dict.fromkeys(RSS_KINDS.values(), 0.0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in RSS_KINDS:
                kinds[RSS_KINDS[key]] = int(value.split()[0]) / 1024  # kB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return kinds


def tree_rss(pid: int) -> dict[str, float]:
    """The API process's RSS and the engine's (every process below it), with the engine's split by kind."""
    import psutil

    root = psutil.Process(pid)
    sample = {"api_mib": root.memory_info().rss / 2**20, "engine_mib": 0.0}
    for child in root.children(recursive=True):
        for kind, mib in rss_kinds(child.pid).items():  # a process that has exited reads as zero
            sample[f"engine_{kind}_mib"] = sample.get(f"engine_{kind}_mib", 0.0) + mib
            sample["engine_mib"] += mib
    return sample


def wait_for_traffic(url: str, server: subprocess.Popen, load_proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Return once the server has a request running (its `vlora_requests_running` gauge), or the load ended;
    a server that exits meanwhile is an error naming its exit code rather than a connection error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and load_proc.poll() is None:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before the load began")
        try:
            text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEYS['B']}"}, timeout=5).text
        except httpx.HTTPError:  # busy, or exiting: the next round tells
            text = ""
        if any(line.startswith("vlora_requests_running ") and float(line.split()[1]) > 0
               for line in text.splitlines()):
            return
        time.sleep(0.5)


def soak(model: Path, adapters: dict[str, Path], out: Path, name: str = "soak", extra: tuple[str, ...] = ()) -> dict:
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    proc, url = start("vlora", model, adapters, run, ("--api-keys-file", str(keys_file(run)), *extra))
    samples: list[dict] = []
    try:
        load_proc = load(url, "B", "soak-c32.yaml", run / "load", list(adapters))
        wait_for_traffic(url, proc, load_proc)  # the load takes seconds to start: minute 1 is its first minute
        started = time.monotonic()
        while load_proc.poll() is None and time.monotonic() - started < 330:
            time.sleep(10)
            samples.append({"t": round(time.monotonic() - started), **tree_rss(proc.pid)})
        load_proc.wait(60)
    finally:
        stop(proc)
    rows = records(run / "load")
    minute = {m: [s for s in samples if 60 * (m - 1) <= s["t"] < 60 * m] for m in (1, 5)}

    def mean(m: int, key: str) -> float:
        return statistics.mean(s.get(key, 0.0) for s in minute[m])

    def growth(key: str) -> float:
        return (mean(5, key) - mean(1, key)) / mean(1, key)

    return {"server_args": list(extra), "requests": len(rows), "ok": sum(r["status"] == 200 and not r.get("error") for r in rows),
            "status_429": sum(r["status"] == 429 for r in rows),
            "other_failures": sum(r["status"] not in (200, 429) or bool(r.get("error")) and r["status"] == 200
                                  for r in rows),
            "api_growth": growth("api_mib"), "engine_growth": growth("engine_mib"),
            # where the engine's growth is: MiB added from minute 1 to minute 5 by kind of page
            "engine_growth_mib": {kind: mean(5, f"engine_{kind}_mib") - mean(1, f"engine_{kind}_mib")
                                  for kind in RSS_KINDS.values()},
            "samples": samples}


def ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f} ms"


def tables(flood: list[dict], soaked: list[dict]) -> str:
    lines = ["| isolation | B TTFT p50 alone / flood | B TTFT p95 alone / flood | p95 ratio | B req/s alone / flood | "
             "B 429s | A 429 share | other failures (A+B) |", "|---|---|---|---|---|---|---|---|"]
    for r in flood:
        alone, during, a = r["B_alone"], r["B_flood"], r["A"]
        ratio = during["ttft_p95"] / alone["ttft_p95"] if during["ttft_p95"] and alone["ttft_p95"] else float("nan")
        lines.append(f"| {r['isolation']} | {ms(alone['ttft_p50'])} / {ms(during['ttft_p50'])} | "
                     f"{ms(alone['ttft_p95'])} / {ms(during['ttft_p95'])} | {ratio:.2f}x | "
                     f"{alone['rps']:.2f} / {during['rps']:.2f} | {alone['status_429'] + during['status_429']} | "
                     f"{a['share_429']:.1%} of {a['requests']} | "
                     f"{a['other_failures'] + alone['other_failures'] + during['other_failures']} |")
    lines.append("")
    lines += [f"{r['isolation']}: capacity {r['capacity_rps']:.1f} req/s (closed loop c=16); flood at "
              f"{r['flood_rate']:.1f} req/s for 60 s" for r in flood]
    if soaked:
        lines += ["", "| soak (c=32, 5 min, all adapters, mixed images) | requests | ok | 429 | other failures | "
                  "API RSS growth m1->m5 | engine RSS growth m1->m5 | engine growth anon / file / shm |",
                  "|---|---|---|---|---|---|---|---|"]
        for soak_run in soaked:
            kinds = soak_run.get("engine_growth_mib")  # runs before the split by kind have none
            split = " / ".join(f"{kinds[k]:+.0f}" for k in RSS_KINDS.values()) + " MiB" if kinds else "–"
            lines.append(f"| {' '.join(soak_run.get('server_args') or []) or 'defaults'} | {soak_run['requests']} | "
                         f"{soak_run['ok']} | {soak_run['status_429']} | {soak_run['other_failures']} | "
                         f"{soak_run['api_growth']:+.2%} | {soak_run['engine_growth']:+.2%} | {split} |")
        for soak_run in soaked:
            lines += ["", f"RSS every 10 s, {' '.join(soak_run.get('server_args') or []) or 'defaults'} "
                      "(t s: API MiB / engine MiB): " + ", ".join(
                          f"{x['t']}: {x['api_mib']:.0f}/{x['engine_mib']:.0f}" for x in soak_run["samples"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "isolation")
    parser.add_argument("--phases", default="flood,flood-contended,soak,soak-no-mm-cache",
                        help="flood (isolation on and off), flood-quota (on, with a max_concurrent quota on A), "
                             "flood-batch (on, a smaller engine batch), flood-contended (on, with "
                             "--fair-share-batch), soak (defaults), soak-no-mm-cache (vLLM's multimodal "
                             "processor cache off: what the engine's RSS growth in the soak is); earlier phases' "
                             "results are kept in results.json")
    parser.add_argument("--flood-quota", default="1,2",
                        help="max_concurrent of tenant A in the flood-quota phase (a comma-separated list: a run each)")
    parser.add_argument("--flood-batch", default="4",
                        help="--max-running-requests of the server in the flood-batch phase (fair share, no quota; "
                             "a comma-separated list: a run each)")
    parser.add_argument("--flood-contended", default="3",
                        help="--fair-share-batch of the server in the flood-contended phase (fair share, no quota; "
                             "a comma-separated list: a run each)")
    parser.add_argument("--soak-args", default="",
                        help="more server arguments for the soak-no-mm-cache phase (space-separated)")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    model, adapters = demo_models()
    work = args.out / "scratch"
    work.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if "flood" in phases:
        results["flood"] = [flood_run("on", model, adapters, work, ()),
                            flood_run("off", model, adapters, work, ("--no-fair-share",))]
    if "flood-quota" in phases:  # fair share plus a concurrency quota on the flooding tenant (its keys-file entry)
        results["flood"] = [r for r in results.get("flood", []) if not r["isolation"].startswith("on + A")]
        for quota in (int(q) for q in args.flood_quota.split(",")):
            results["flood"].append(flood_run(f"on + A max_concurrent: {quota}", model, adapters, work, (),
                                              {"A": {"max_concurrent": quota}}))
    if "flood-batch" in phases:  # fair share alone (no quota) with a smaller engine batch for the whole server
        results["flood"] = [r for r in results.get("flood", []) if not r["isolation"].startswith("on, engine batch")]
        for batch in (int(b) for b in args.flood_batch.split(",")):
            results["flood"].append(flood_run(f"on, engine batch {batch}", model, adapters, work,
                                              ("--max-running-requests", str(batch))))
    if "flood-contended" in phases:  # fair share alone (no quota), the batch held while tenants compete
        results["flood"] = [r for r in results.get("flood", []) if not r["isolation"].startswith("on, contended")]
        for batch in (int(b) for b in args.flood_contended.split(",")):
            results["flood"].append(flood_run(f"on, contended batch {batch}", model, adapters, work,
                                              ("--fair-share-batch", str(batch))))
    if "soak" in phases:
        results["soak"] = soak(model, adapters, work)
    if "soak-no-mm-cache" in phases:
        results["soak_no_mm_cache"] = soak(model, adapters, work, "soak-no-mm-cache",
                                           ("--engine-arg", "mm_processor_cache_gb=0", *args.soak_args.split()))
    path.write_text(json.dumps(results, indent=2))
    text = tables(results["flood"], [r for r in (results.get("soak"), results.get("soak_no_mm_cache")) if r])
    shown = [a for i, a in enumerate(sys.argv[1:]) if a != "--out" and sys.argv[i] != "--out"
             and not a.startswith("--out=")]  # where it was written says nothing about the run
    command = " ".join([".venv/bin/python bench/isolation.py", *map(shlex.quote, shown)])
    (args.out / "results.md").write_text(f"Command: `{command}`\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
