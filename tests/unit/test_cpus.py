"""--api-cpus: the choice of the API process's CPUs (pure), and the two process operations on real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from service.cpus import api_cpus, check_setting, format_cpus, parse_cpu_list
from service.main import build_settings


def test_cpu_lists_parse_and_format_as_the_kernel_writes_them():
    assert parse_cpu_list("1") == {1}
    assert parse_cpu_list("0,2-3") == {0, 2, 3}
    assert parse_cpu_list(" 4-6, 1 ") == {1, 4, 5, 6}
    for bad in ("", "a", "1-", "-1", "3-1", "1,,2", "1.5"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)
    assert format_cpus({0, 2, 3}) == "0,2-3"
    assert format_cpus({5}) == "5"
    assert format_cpus({0, 1, 2, 7, 9, 10}) == "0-2,7,9-10"
    assert parse_cpu_list(format_cpus({3, 4, 8, 12, 13, 14})) == {3, 4, 8, 12, 13, 14}


def test_auto_keeps_the_api_process_off_the_engines_cores_when_one_is_left():
    assert api_cpus("auto", {0, 1}, {0}) == {1}  # vLLM's default on 2 cores: worker on 0, 1 left
    assert api_cpus("auto", set(range(8)), {0, 1, 2, 3, 4, 5, 6}) == {7}
    assert api_cpus("auto", {0, 1}, set()) is None  # nothing bound (a GPU engine): left where it is
    assert api_cpus("auto", {0, 1}, {0, 1}) is None  # every core bound: no core to move to
    assert api_cpus("all", {0, 1}, {0}) is None
    assert api_cpus("1", {0, 1}, {0}) == {1}
    assert api_cpus("0-1", {0, 1}, {0}) == {0, 1}  # an explicit list is taken as it is
    with pytest.raises(ValueError, match="not available"):
        api_cpus("2-3", {0, 1}, set())


def test_the_setting_is_checked_when_the_server_is_configured(tmp_path):
    assert check_setting(" auto ") == "auto"
    assert build_settings(["--model", str(tmp_path)]).api_cpus == "auto"
    assert build_settings(["--model", str(tmp_path), "--api-cpus", "0,2-3"]).api_cpus == "0,2-3"
    with pytest.raises(SystemExit, match="--api-cpus.*not a CPU list"):
        build_settings(["--model", str(tmp_path), "--api-cpus", "some"])


BOUND_CHILDREN = """
import json, os, subprocess, sys
from service.cpus import engine_bound_cpus
first = min(os.sched_getaffinity(0))
code = "import os, time; os.sched_setaffinity(0, {%d}); print('bound', flush=True); time.sleep(60)" % first
bound = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
free = subprocess.Popen([sys.executable, "-c", "import time; print('free', flush=True); time.sleep(60)"],
                        stdout=subprocess.PIPE, text=True)
try:
    assert bound.stdout.readline().strip() == "bound" and free.stdout.readline().strip() == "free"
    print(json.dumps({"first": first, "bound": sorted(engine_bound_cpus()),
                      "as_first": sorted(engine_bound_cpus(allowed={first}))}))
finally:
    for child in (bound, free):
        child.kill()
        child.wait()
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to bind a child to one of them")
def test_engine_bound_cpus_are_those_of_children_bound_narrower_than_their_parent():
    # In a process of its own: the test runner's other children (a test server's pinned API process) would count.
    out = subprocess.run([sys.executable, "-c", BOUND_CHILDREN], capture_output=True, text=True, timeout=60,
                         cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["bound"] == [result["first"]]
    assert result["as_first"] == []  # bound no narrower than what the reference may use
    allowed = os.sched_getaffinity(0)
    assert api_cpus("auto", allowed, set(result["bound"])) == allowed - {result["first"]}


PINNED = """
import json, os, threading, time
from service.cpus import pin_process
started = threading.Event()
def before():
    started.set(); time.sleep(1)
threading.Thread(target=before).start(); started.wait()
pin_process({%d})
later = {}
def after():
    later["cpus"] = sorted(os.sched_getaffinity(0))
t = threading.Thread(target=after); t.start(); t.join()
tasks = {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
print(json.dumps({"tasks": list(tasks.values()), "later": later["cpus"]}))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to tell a pinned process apart")
def test_pinning_covers_every_thread_and_the_threads_started_after_it():
    last = max(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", PINNED % last], capture_output=True, text=True, timeout=60,
                         cwd=os.getcwd(), check=True)
    result = json.loads(out.stdout)
    assert len(result["tasks"]) >= 2, result  # the main thread and the one started before the pin
    assert all(cpus == [last] for cpus in result["tasks"]), result
    assert result["later"] == [last], result


def test_threads_exiting_while_the_process_is_pinned_are_skipped():
    # pin_process lists the threads, then pins each: one that exits in between is no error.
    code = ("import threading, time, os; from service.cpus import pin_process\n"
            "ts = [threading.Thread(target=time.sleep, args=(0.0005 * i,)) for i in range(40)]\n"
            "[t.start() for t in ts]\n"
            "for _ in range(20): pin_process(os.sched_getaffinity(0))\n"
            "[t.join() for t in ts]; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
