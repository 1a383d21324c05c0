"""Request lifecycle around the routes: request ids, structured logs, graceful drain.

- Every response carries `X-Request-ID` (the client's, if it sent a sane one); the id is in every log
  line written while the request runs.
- Logs are JSON lines (`configure_logging(fmt="json")`): time, level, logger, message, request id and
  whatever structured fields the caller passed in `extra`.
- Drain: `Drain.begin()` (on SIGTERM) turns readiness false and answers new API requests 503 with
  `Retry-After`, while requests in flight (streams included) run to completion; `Drain.wait_and_stop`
  tells the HTTP server to exit once they are done or the grace period is over.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
import uuid

from service.errors import NotReady, api_error_response
from service.limits import answer_headers

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class Drain:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.started_at: float | None = None
        self.in_flight = 0

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()
            logging.getLogger("vlora.lifecycle").info(
                "draining", extra={"in_flight": self.in_flight, "grace_s": self.grace_s})

    async def wait_and_stop(self, server) -> None:
        """Poll until drained (or the grace period ran out), then ask uvicorn to exit."""
        while True:
            await asyncio.sleep(0.1)
            if self.started_at is None:
                continue
            over = time.monotonic() - self.started_at > self.grace_s
            if self.in_flight == 0 or over:
                logging.getLogger("vlora.lifecycle").info(
                    "drained" if not over else "grace period over", extra={"in_flight": self.in_flight})
                server.should_exit = True
                return


class RequestLifecycle:
    """ASGI middleware: request id, one JSON access-log line per request, drain refusals, in-flight count."""

    def __init__(self, app, drain: Drain, retry_after_s: int = 5):
        self.app = app
        self.drain = drain
        self.retry_after = str(retry_after_s)
        self.log = logging.getLogger("vlora.access")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        path = scope.get("path", "")
        api = path.startswith("/v1/")
        status = {"code": 500}
        started = time.perf_counter()

        extra: dict[str, str] = {}  # the answer's rate-limit headers (service.limits), streamed or not
        extra_token = answer_headers.set(extra)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                present = {k.lower() for k, _ in message["headers"]}
                added = [(k.encode(), v.encode()) for k, v in extra.items() if k.encode() not in present]
                message["headers"] = [*message["headers"], *added, (b"x-request-id", rid.encode())]
            await send(message)

        try:
            if api and self.drain.draining:
                refusal = NotReady("the server is shutting down; retry on another replica",
                                   headers={"Retry-After": self.retry_after})
                refusal.code = "shutting_down"
                return await api_error_response(refusal)(scope, receive, send_with_id)
            if api:
                self.drain.in_flight += 1
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                if api:
                    self.drain.in_flight -= 1
        finally:
            if path not in ("/health", "/ready", "/metrics"):
                self.log.info("http request", extra={
                    "method": scope.get("method"), "path": path, "status": status["code"],
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1)})
            request_id_var.reset(token)
            answer_headers.reset(extra_token)


class ShedLoad:
    """ASGI middleware (inside authentication): a generating request the server would refuse as overloaded is
    answered 429 before its body is read, so a flooding client's refusals cost no JSON parsing."""

    PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")

    def __init__(self, app, refusal):
        self.app = app
        self.refusal = refusal  # (tenant) -> APIError | None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in self.PATHS:
            tenant = (scope.get("state") or {}).get("tenant")
            if tenant is not None and (error := self.refusal(tenant)) is not None:
                return await api_error_response(error)(scope, receive, send)
        return await self.app(scope, receive, send)

