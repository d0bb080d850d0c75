"""One error hierarchy and one error body for the whole service.

Every failure the service answers is a ``ServingError`` carrying an HTTP ``status``, a
metrics ``reason`` (the ``reason`` label of ``hopgate_requests_total``) and a ``message``;
optional ``headers`` go out with it (``Retry-After``). Its body is always::

    {"error": {"status": 413, "reason": "bad_input", "message": "..."}}

for the service's own errors and FastAPI's alike (404, 405, request validation 422, and
unhandled exceptions as 500), except under ``/v2``, where the Open Inference Protocol
mandates ``{"error": "<message>"}``. One image that fails inside a multi-image /score
request gets the inner object as its result's ``error`` (schema.ErrorInfo).

    ServingError            status, reason, message, headers
    +-- ClientError         the request is at fault (4xx; reason ``bad_input`` unless said)
    |   +-- ImageError      one image is at fault: it fails alone (also a ValueError)
    +-- Unavailable         come back later: queue full, not ready, shutting down (+Retry-After)
    +-- ScoringError        accepted, then not scored: deadline (504) or runtime failure (500)
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

V2_PREFIX = "/v2"


class ServingError(Exception):
    def __init__(self, status: int, message: str, reason: str = "bad_input",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.reason, self.headers = status, message, reason, headers

    def body(self) -> dict[str, int | str]:
        """The inner error object: ``{"status", "reason", "message"}``."""
        return {"status": self.status, "reason": self.reason, "message": self.message}


class ClientError(ServingError):
    """The request is at fault (4xx)."""


class ImageError(ClientError, ValueError):
    """One image is at fault (empty, unknown format, corrupt, too many pixels)."""


class Unavailable(ServingError):
    """Not now: queue full (503 or 429), not ready or shutting down (503)."""

    def __init__(self, status: int, message: str, reason: str, retry_after_s: int):
        super().__init__(status, message, reason, {"Retry-After": str(retry_after_s)})


class ScoringError(ServingError):
    """Accepted, but not scored: the deadline passed (504) or the runtime failed (500)."""


def deadline_exceeded() -> ScoringError:
    return ScoringError(504, "deadline exceeded before the image was scored", "deadline")


def internal_error(message: str = "internal error") -> ScoringError:
    return ScoringError(500, message, "internal")


def error_response(e: ServingError, v2: bool = False) -> JSONResponse:
    """The one error body (or V2's ``{"error": message}`` where ``v2``)."""
    body = {"error": e.message} if v2 else {"error": e.body()}
    return JSONResponse(body, e.status, headers=e.headers)


def respond(request: Request, e: ServingError) -> JSONResponse:
    """Record the reason for the access log and metrics, and answer in the path's shape."""
    request.state.reason = e.reason
    return error_response(e, v2=request.url.path.startswith(V2_PREFIX))


_HTTP_REASONS = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}


def install_handlers(app: FastAPI) -> None:
    """Route every error, FastAPI's own included, through ``respond``."""

    async def serving_error(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, ServingError)
        return respond(request, e)

    async def http_error(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, HTTPException)
        status = e.status_code
        reason = _HTTP_REASONS.get(status, "bad_input" if status < 500 else "internal")
        headers = dict(e.headers) if e.headers else None
        return respond(request, ServingError(status, str(e.detail), reason, headers))

    async def validation_error(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestValidationError)
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
                 for err in e.errors()]
        return respond(request, ClientError(422, "; ".join(parts) or "invalid request"))

    async def unhandled(request: Request, e: Exception) -> JSONResponse:
        logging.getLogger("hopgate").exception("unhandled error")
        return respond(request, internal_error())

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unhandled)
