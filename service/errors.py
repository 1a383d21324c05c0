"""Typed service errors and their one mapping to OpenAI-shaped JSON responses.

Everything that can go wrong with a request is raised as an `APIError` subclass below the routes; the
handlers installed by `install_error_handlers` turn those, FastAPI validation errors (a capped 400, never
a raw 422), unknown routes and unexpected exceptions (a 500 without internals) into
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.protocol.models import ErrorInfo, ErrorResponse

logger = logging.getLogger("vlora.errors")

MAX_MESSAGE_CHARS = 1000


class APIError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"

    @classmethod
    def named(cls, model: str, param: str = "model") -> ModelNotFound:
        """OpenAI's answer for a model that does not exist, or that the caller may not use (the same 404, so
        that tenants learn nothing about each other)."""
        return cls(f"The model '{model}' does not exist", param=param)


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(APIError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class RateLimited(APIError):
    """A tenant's or adapter's limit (service/limits.py), shaped as OpenAI's rate-limit errors."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    @classmethod
    def of(cls, exc) -> RateLimited:
        error = cls(str(exc), headers={"Retry-After": str(max(1, -int(-exc.retry_after // 1))), **exc.headers})
        error.type = "tokens" if exc.limit == "tokens_per_minute" else "requests"
        return error


class NotReady(APIError):
    status = 503
    type = "service_unavailable"
    code = "not_ready"


class AdapterUnavailable(NotReady):
    """One adapter cannot be served right now (its files are gone or changed); the others can."""

    code = "adapter_unavailable"


class EngineRestarting(NotReady):
    """The engine died: the process is exiting so that it is restarted (a 503 with Retry-After, not a 500:
    the request may be retried on this replica once it is back, or on another)."""

    code = "engine_restarting"


class ClientGone(APIError):
    """The client went away while its request waited for an engine slot: the request never reaches the engine
    (nobody is there to read this answer; it is logged and counted)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class EngineFailure(APIError):
    status = 500
    type = "internal_error"
    code = "engine_error"


def error_body(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()


def internal_error_body() -> dict:
    """What an unexpected exception becomes: a 500 without internals (they go to the log)."""
    return error_body(500, "internal server error", "internal_error", None, "internal_error")


def api_error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.status, exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
        headers=exc.headers,
    )


def body_message(err: dict) -> str | None:
    """What is wrong with the request body as a whole (not JSON, not an object, missing), if that is the error."""
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"the request body is not valid JSON ({(err.get('ctx') or {}).get('error', 'decode error')}{where})"
    if loc != ("body",) or isinstance(err.get("input"), dict):  # an object: a check across its fields failed
        return None
    if err.get("type") == "missing":
        return "the request body is empty: send a JSON object with Content-Type: application/json"
    if isinstance(err.get("input"), bytes):  # a body FastAPI did not parse: not sent as JSON
        return "the request body must be a JSON object sent with Content-Type: application/json"
    kind = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(err.get("input")), "not an object")
    return f"the request body must be a JSON object, not {kind}"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """First few pydantic errors as one readable line, plus the dotted path of the first as `param` (no
    `param` when the body as a whole is wrong)."""
    for err in exc.errors():
        if (whole := body_message(err)) is not None:
            return whole, None
    parts, param = [], None
    # Union branches each report an error; the deepest location is the one that names the real problem.
    errors = sorted(exc.errors(), key=lambda e: -len(e.get("loc", ())))
    for err in errors[:3]:
        loc: list[str] = []
        where_from = tuple(err.get("loc", ()))
        if where_from and where_from[0] in ("body", "query", "path"):  # OpenAI names the parameter alone
            where_from = where_from[1:]
        for part in (str(p) for p in where_from):
            # Drop pydantic's union-branch labels and tags (ours in angle brackets) and collapse discriminator
            # tags (`image_url.image_url`).
            if part == "str" or part.startswith(("list[", "function-", "tagged-union[", "<")):
                continue
            if not loc or loc[-1] != part:
                loc.append(part)
        where = ".".join(loc)
        param = param or where or None
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    if not parts:
        parts = ["invalid request"]
    return "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return JSONResponse(error_body(400, message, "invalid_request_error", param, "invalid_request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(exc.status_code, str(exc.detail), "invalid_request_error", None, code),
                            exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(internal_error_body(), 500)
