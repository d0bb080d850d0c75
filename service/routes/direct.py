"""The hot routes straight to their handlers: ``POST /score`` and, in sidecar mode, the
classifier's proxied routes, without the framework's per-request machinery (issue 24).

Every request otherwise crosses Starlette's exception middleware, FastAPI's exit-stack
middleware, the router's match over every route, and (for /score) FastAPI's endpoint wrapper
(dependency solving, telemetry, the response check): ~5 % of the server's CPU per /score
request at c=32 (py-spy, benchmarks/versus_24.md). ``Direct`` sits innermost among the
middlewares (inside the envelope, Pin and Admission, so ids, pinning, the byte budget,
metrics and the access log are unchanged) and hands each of its routes (method and exact
path) to its handler itself. The routes stay registered: /openapi.json documents /score, and
other methods get the router's 405.

Errors are answered as the framework would: a ``ServingError`` or ``HTTPException`` by the
app's own handlers (errors.install_handlers), anything else propagates to the envelope (500,
logged with its request id), exactly as from a routed request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fastapi import Request, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ServingError
from . import score as routes_score

Endpoint = Callable[[Request], Awaitable[Response]]


class Direct:
    def __init__(self, app: ASGIApp, routes: Mapping[tuple[str, str], Endpoint] | None = None):
        self.app = app
        self.routes = {("POST", "/score"): routes_score.score, **(routes or {})}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = (self.routes.get((scope["method"], scope["path"]))
                    if scope["type"] == "http" else None)
        if endpoint is None:
            return await self.app(scope, receive, send)
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except (ServingError, HTTPException) as e:
            handlers = scope["app"].exception_handlers
            handler = next(handlers[c] for c in type(e).__mro__ if c in handlers)
            response = await handler(request, e)
        await response(scope, receive, send)
