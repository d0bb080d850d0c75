"""Two ports in sidecar mode: the classifier's (data) and hopgate's own (admin).

In sidecar mode (``HOPGATE_PROXY_ROUTES`` with ``HOPGATE_UPSTREAM_URL``) the gate takes the
classifier's Service port and hides nothing, as Envoy and Istio do:

  * data port (``HOPGATE_PORT``): a request on a proxied route with a proxied method is
    scored (proxy.py); every other request goes to the classifier unchanged (``passthrough``):
    method, path, query, headers (hop-by-hop ones and ``Host`` excepted), the body streamed
    as it arrives, and the classifier's answer streamed back with its status and headers
    (``Date`` and ``Server`` are the gate's). No API key, no scoring, no buffering: memory
    stays bounded whatever the size. Counted in ``hopgate_passthrough_requests_total``.
  * admin port (``HOPGATE_ADMIN_PORT``): hopgate's own endpoints (/healthz, /livez, /readyz,
    /metrics, /docs, /, /score, /v2, /memories); the proxied routes are not there (404).

``passed_back`` hands a scored request's answer (proxy.py) back the same way, with the verdict
headers added.

One uvicorn server listens on both sockets (and with ``HOPGATE_WORKERS`` > 1 each worker
accepts on both: server/workers.py); ``Ports`` tells them apart by the local port of the connection
(``scope["server"]``). Standalone mode (no proxied routes) keeps one port for everything.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.datastructures import State
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import Settings
from ..errors import ClientError, ServingError, Unavailable, error_response
from .gate import Gate, UpstreamFailed
from .upstream import Answer, Client, UpstreamError, within

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"proxy-connection", b"te", b"trailer",
                        b"trailers", b"transfer-encoding", b"upgrade", b"host",
                        b"content-length"})
NOT_PASSED_BACK = HOP_BY_HOP | {b"date", b"server"}  # uvicorn sets its own
SCORED_NOT_PASSED_BACK = NOT_PASSED_BACK | {b"x-request-id"}  # the envelope sets hopgate's
ANSWER_INLINE_BYTES = 64 * 1024  # a scored request's answer up to this comes back in one piece


class Disconnected(Exception):
    pass


def request_headers(scope: Scope) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """The client's headers that go on, and its Content-Length (None: none or chunked)."""
    out, length = [], None
    for k, v in scope["headers"]:
        if k == b"content-length" and v.isdigit():
            length = int(v)
        if k not in HOP_BY_HOP:
            out.append((k, v))
    return out, length


def target(scope: Scope) -> bytes:
    """The request target as the client sent it: raw path and query."""
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    return path + b"?" + query if query else path


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def passthrough(client: Client, timeout_s: float, scope: Scope, receive: Receive,
                      send: Send, draining: bool = False) -> int:
    """Forward one request unchanged, stream the answer back; its status (502 / 504 when
    the classifier gave none). ``draining``: ``Connection: close`` (the pod is going)."""
    headers, length = request_headers(scope)
    has_body = length is None and any(k == b"transfer-encoding" for k, _ in scope["headers"])
    body = _body(receive) if (length or has_body) else b""
    try:
        answer = await within(timeout_s, client.request(scope["method"], target(scope),
                                                        headers, body, length))
    except (UpstreamError, Disconnected) as e:
        await error_response(ServingError(502, f"classifier unreachable: {e}", "upstream"))(
            scope, receive, send)
        return 502
    except TimeoutError:
        await error_response(ServingError(504, "classifier timed out", "upstream"))(
            scope, receive, send)
        return 504
    try:
        back = [(k.lower(), v) for k, v in answer.headers if k.lower() not in NOT_PASSED_BACK]
        if answer.status in (204, 304):
            pass  # no body, no length
        elif answer.length is not None and scope["method"] != "HEAD":
            back.append((b"content-length", str(answer.length).encode()))
        elif scope["method"] == "HEAD":
            back += [(k.lower(), v) for k, v in answer.headers
                     if k.lower() == b"content-length"]
        if draining:
            back.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": answer.status, "headers": back})
        async for data in answer.body():  # each chunk as it comes: never the whole body
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        answer.close()
    return answer.status


class Ports:
    """The outermost ASGI middleware in sidecar mode: which port, which handler."""

    def __init__(self, app: ASGIApp, app_state: State, settings: Settings):
        self.app, self.state, self.settings = app, app_state, settings
        self.admin = settings.admin_port
        self.routes = frozenset(settings.proxy_routes)
        self.methods = frozenset(settings.proxy_methods)
        self.shadow = settings.gate_mode == "shadow"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        server = scope.get("server")
        path = scope["path"]
        if server is not None and server[1] == self.admin:  # hopgate's own endpoints
            if path in self.routes:
                wrong = ClientError(404, f"{path} is the classifier's route: it answers on the "
                                         f"data port, not the admin port", "not_found")
                return await error_response(wrong)(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # websockets are not passed through
            return await send({"type": "websocket.close", "code": 1008})
        if path in self.routes and scope["method"] in self.methods:
            return await self.app(scope, receive, send)  # scored (proxy.py)
        gate = getattr(self.state, "gate", None)
        if gate is None:  # before startup
            e = Unavailable(503, "not ready", "internal", self.settings.retry_after_s)
            return await error_response(e)(scope, receive, send)
        self.state.last_request = time.monotonic()  # server/cli.py's drain waits for quiet
        status = await passthrough(gate.upstream, self.settings.upstream_timeout_s, scope,
                                   receive, send, bool(self.state.draining))
        gate.passed.labels(str(status)[0] + "xx").inc()


async def passed_back(answer: Answer, gate: Gate, verdict: dict[str, str]) -> Response:
    """A scored request's answer from the classifier (proxy.py), as it sent it, plus the
    verdict headers: a small body with a known length in one piece, any other streamed
    through as it arrives; ``UpstreamFailed`` (counted) when a small body is cut short."""
    back = [(k.lower(), v) for k, v in answer.headers
            if k.lower() not in SCORED_NOT_PASSED_BACK and not k.lower().startswith(b"x-hopgate-")]
    back += [(k.encode(), v.encode()) for k, v in verdict.items()]
    if answer.length is not None and answer.length <= ANSWER_INLINE_BYTES:
        try:
            raw = await within(gate.timeout_s, answer.read(ANSWER_INLINE_BYTES))
        except (UpstreamError, TimeoutError, OverflowError):
            answer.close()
            raise gate.failed(UpstreamFailed("unreachable", "upstream answer cut short",
                                             502)) from None
        passed = Response(raw, answer.status)
        passed.raw_headers += back
        return passed
    if answer.length is not None:
        back.append((b"content-length", str(answer.length).encode()))

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for data in answer.body():
                yield data
        finally:
            answer.close()
    passed = StreamingResponse(stream(), answer.status)
    passed.raw_headers = [*back]
    return passed
