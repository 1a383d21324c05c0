"""A real `vlora-serve` process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# The shared demo server's input caps (conftest.demo_server; test_chat proves them): small enough to test, above
# what every other test sends.
MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_PIXELS = 1024 * 1024
MAX_IMAGES_PER_REQUEST = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
        )

    def wait_healthy(self, timeout: float = 240.0, path: str = "/ready") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 wait_path: str = "/ready", attempts: int = 3) -> ServerProcess:
    """Start a server and wait until it is ready. The port is picked free, but the server binds it only after
    its engine has loaded, and in that window another process (another test server's engine, which takes
    ephemeral ports of its own) may take it: a start that fails on a port in use is retried on a new port."""
    for attempt in range(attempts):
        server = ServerProcess(args, log_path, env)
        try:
            server.wait_healthy(path=wait_path)
            return server
        except RuntimeError:
            server.stop()
            if attempt + 1 < attempts and "address already in use" in server.log_tail(200).lower():
                continue
            raise
        except BaseException:
            server.stop()
            raise
    raise AssertionError("unreachable")


def start_failure(args: list[str], log_path: Path, timeout: float = 180.0) -> str:
    """Start a server that must refuse to start: it exits non-zero before it is ready; returns its log."""
    server = ServerProcess(args, log_path)
    try:
        code = server.proc.wait(timeout)
    finally:
        server.stop()
    assert code != 0, f"the server started:\n{server.log_tail()}"
    return log_path.read_text(errors="replace")



def engine_environments(pid: int) -> dict[int, dict[str, str]]:
    """The environment of each vLLM process (engine core, workers: `VLLM::` process titles) under a server."""
    import psutil

    engine = {}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.name().startswith("VLLM::"):
                # Read raw: setting the process title zeroes the start of the environment block, and psutil's
                # environ() stops at the first empty entry that leaves.
                environ = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
                engine[child.pid] = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):  # a short-lived helper that has exited
            continue
    return engine
