"""Admission: which requests the service takes on, decided before any route runs.

One pure ASGI middleware (installed by lifecycle.init_state, inside app.py's envelope, so its
answers are counted and logged like any other) in front of the scoring routes (``POST
/score``, ``POST /v2/models/...`` and the sidecar's proxied routes, ``proxy_routes``):

  * draining (after SIGTERM): a new request is answered 503 ``shutdown`` at once (the
    envelope adds ``Connection: close``); a request admitted before the signal is marked
    ``request.state.admitted`` and runs to its normal answer (lifecycle.require_ready lets it
    through), and ``Admission.idle`` is what the drain in server/cli.py waits on;
  * bytes in flight: one budget across all requests (``max_inflight_bytes``). A request's
    ``Content-Length`` is reserved when it arrives (a chunked body is charged chunk by chunk)
    and released when its answer has been sent. A request that does not fit is answered at
    once with ``reject_status`` (503 or 429), reason ``overloaded`` and ``Retry-After``; its
    body is read and dropped first (never held), so the client reads the answer instead of a
    reset connection. The per-request cap (``max_body_bytes``, 413) stays in parsing.py.
"""

from __future__ import annotations

import asyncio
import re

from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings
from .errors import V2_PREFIX, ServingError, Unavailable, error_response
from .server.board import Board

SCORED = re.compile(r"^(/score|/v2/models/.+/infer)$")


class ByteBudget:
    """Bytes held by request bodies across the whole process."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if n > 0 and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class Admission:
    """The ASGI middleware; ``app_state`` is the FastAPI app's state (``draining``)."""

    def __init__(self, app: ASGIApp, app_state: State, settings: Settings):
        self.app, self.app_state, self.settings = app, app_state, settings
        self.budget = ByteBudget(settings.max_inflight_bytes)
        self.active = 0  # admitted scoring requests not yet answered
        self.board = Board.inherited()  # ... and the other workers' (server/board.py)
        self.idle = asyncio.Event()
        self.idle.set()
        self.proxied = frozenset(settings.proxy_routes)
        app_state.admission = self

    def _busy(self) -> Unavailable:
        s = self.settings
        return Unavailable(s.reject_status, f"too many bytes in flight (limit "
                           f"{s.max_inflight_bytes}), retry later", "overloaded",
                           s.retry_after_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (
                (scope.get("method") == "POST" and SCORED.match(scope.get("path", "")))
                or scope.get("path") in self.proxied):
            return await self.app(scope, receive, send)
        if self.app_state.draining:
            s = self.settings
            return await self._refuse(scope, receive, send, Unavailable(
                503, "shutting down", "shutdown", s.retry_after_s))
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        reserved = int(length) if length.isdigit() else 0
        if reserved > self.settings.max_body_bytes:
            reserved = 0  # parsing.read_body answers 413 without reading it
        if not self.budget.take(reserved):
            return await self._refuse(scope, receive, send, self._busy())
        held = reserved
        received = 0

        async def counted() -> Message:
            nonlocal held, received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > held:  # chunked, or more than announced: charge the excess
                    if not self.budget.take(received - held):
                        raise self._busy()
                    held = received
            return message

        scope.setdefault("state", {})["admitted"] = True
        self.active += 1
        self.idle.clear()
        if self.board is not None:
            self.board.set(self.active)
        try:
            await self.app(scope, counted, send)
        finally:
            self.budget.give(held)
            self.active -= 1
            if self.board is not None:
                self.board.set(self.active)
            if self.active == 0:
                self.idle.set()

    def alone(self) -> bool:
        """No other scoring request is in flight: here (admitted, not yet answered) or in
        another worker of the machine."""
        return self.active <= 1 and not (self.board is not None and self.board.others_busy())

    async def _refuse(self, scope: Scope, receive: Receive, send: Send,
                      e: ServingError) -> None:
        """Read and drop the body (bounded by ``max_body_bytes``), then answer ``e``."""
        dropped, more = 0, True
        while more and dropped <= self.settings.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":
                break
            dropped += len(message.get("body", b""))
            more = message.get("more_body", False)
        scope.setdefault("state", {})["reason"] = e.reason
        response = error_response(e, v2=scope.get("path", "").startswith(V2_PREFIX))
        await response(scope, receive, send)

    async def drain(self, timeout: float) -> bool:
        """Wait until every admitted request has been answered (at most ``timeout`` s)."""
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
