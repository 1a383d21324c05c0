"""Which CPUs the API process runs on (`--api-cpus`): off the cores the engine's CPU workers are bound to.

vLLM's CPU backend binds each model worker's threads to a set of cores (`VLLM_CPU_OMP_THREADS_BIND`; by default
every core of its NUMA node but one, which it reserves for other processes) and leaves the API process free to
run anywhere. The kernel's scheduler then also places the API process's event loop and input-processing threads
on the workers' cores, and every time it does, a bound worker thread waits: an engine step is as slow as its
slowest thread. This module puts the API process on the cores vLLM left free. vLLM's server does not (its API
process stays unbound) and no library does it, so it is done here: the pure choice (`api_cpus`) apart from the
two process operations (`engine_bound_cpus` reads the engine's processes, `pin_process` applies the choice to
every thread of a process). Measured on 2 cores (bench/api_cpus.py, bench/results/api-cpus/: one server,
pinned and unbound in alternating rounds): 0.98x to 1.10x output tokens/s at c=8 over five runs, about 1.04x
on average, and no cost one request at a time, all within that machine's round-to-round spread.

`auto` (the default) keeps the API process off every core an engine process is bound to, when at least one core
is left (none bound, e.g. a GPU engine, or every core bound: it stays where it is); `all` leaves it unbound; a
list (`1`, `0,2-3`) pins it there.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vlora.cpus")

KEYWORDS = ("auto", "all")


def parse_cpu_list(text: str) -> set[int]:
    """CPU ids from the kernel's list syntax ("0,2-3" -> {0, 2, 3}); ValueError for anything else."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"'{text}' is not a CPU list (e.g. 1 or 0,2-3)")
        first, last = int(low), int(high) if sep else int(low)
        if last < first:
            raise ValueError(f"'{part}' in '{text}' is an empty CPU range")
        cpus.update(range(first, last + 1))
    return cpus


def check_setting(value: str) -> str:
    """`--api-cpus` as given, once it is known to be auto, all or a CPU list."""
    value = value.strip()
    if value not in KEYWORDS:
        parse_cpu_list(value)
    return value


def api_cpus(setting: str, allowed: set[int], engine_bound: set[int]) -> set[int] | None:
    """The CPUs to pin the API process to (None: leave it as it is). `allowed` is where it may run now,
    `engine_bound` the cores the engine's processes are bound to."""
    if setting == "all":
        return None
    if setting != "auto":
        wanted = parse_cpu_list(setting)
        if not wanted <= allowed:
            raise ValueError(f"--api-cpus {setting}: CPU(s) {sorted(wanted - allowed)} are not available to this "
                             f"process (it may use {format_cpus(allowed)})")
        return wanted
    free = allowed - engine_bound
    if not engine_bound or not free:
        return None
    return free


def format_cpus(cpus: set[int]) -> str:
    """{0, 2, 3} -> "0,2-3" (the kernel's syntax)."""
    ordered, parts = sorted(cpus), []
    start = prev = None
    for cpu in [*ordered, None]:
        if cpu is not None and prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    return ",".join(parts)


def engine_bound_cpus(pid: int | None = None, allowed: set[int] | None = None) -> set[int]:
    """The union of the CPU sets of every process under `pid` (this one by default) that is bound more narrowly
    than `allowed` (default: where `pid` itself may run): the cores the engine's workers have taken."""
    import psutil

    pid = os.getpid() if pid is None else pid
    allowed = os.sched_getaffinity(pid) if allowed is None else allowed
    bound: set[int] = set()
    for child in psutil.Process(pid).children(recursive=True):
        try:
            mine = os.sched_getaffinity(child.pid)
        except OSError:  # a short-lived helper that has exited
            continue
        if mine < allowed:
            bound |= mine
    return bound


def pin_process(cpus: set[int], pid: int | None = None) -> None:
    """Pin every thread of process `pid` (this one by default) to `cpus`; threads started later inherit their
    creator's set."""
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid or 'self'}/task")):
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that has just exited
            continue


def keep_off_engine_cpus(setting: str) -> set[int] | None:
    """Apply `--api-cpus` once the engine has started (its workers bind their cores while it starts); returns
    the CPUs the API process was pinned to, or None where it was left as it was."""
    allowed = os.sched_getaffinity(0)
    bound = engine_bound_cpus() if setting == "auto" else set()
    cpus = api_cpus(setting, allowed, bound)
    if cpus is None:
        return None
    pin_process(cpus)
    logger.info("API process on CPU(s) %s (the engine's workers are bound to %s)", format_cpus(cpus),
                format_cpus(bound) if bound else "no particular CPUs")
    return cpus
