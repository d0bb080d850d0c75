"""``create_app``: the FastAPI app, wired. Nothing here scores or parses.

  * lifespan and readiness: lifecycle.py (the core is built at startup);
  * the envelope middleware: request id (the client's ``X-Request-ID`` when it is 1-128
    printable ASCII characters, else a fresh one), API key (``X-API-Key`` or ``Authorization:
    Bearer``, the scheme case-insensitive; constant-time compare; only health and metrics are
    exempt), ``Connection: close`` while draining, request metrics, JSON access log; an
    exception that escapes a route is answered 500 ``internal``, counted and logged with its
    traceback and request id (never its message: it may hold paths or object reprs);
  * errors: one body shape, FastAPI's own included (errors.install_handlers);
  * routes: /score (routes/score.py; a POST reaches it without the router: routes/direct.py),
    health/readiness/metrics (routes/ops.py), V2 (v2/routes.py),
    /memories (routes/memories.py), the web page and offline /docs (routes/page.py: the page and
    its files need no API key),
    the classifier's own routes in sidecar mode (sidecar/proxy.py, ``HOPGATE_PROXY_ROUTES``),
    where every other request on the data port passes to the classifier and hopgate's own
    answer on the admin port (sidecar/passthrough.py, ``Ports``);
  * counted (``hopgate_requests_total``, the access log): /score, V2 models, proxied routes;
    404 and 405 are always ``not_found`` / ``method_not_allowed``, an answer with no reason
    recorded is ``ok`` below 400, ``bad_input`` for another 4xx, ``internal`` for a 5xx. The
    access log line carries the request's verdict (``ood``, ``id``, ``mixed`` or null when no
    image was scored) with its ``ood_images`` and the bundle's ``model_version``.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import re
import secrets
import time
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import State
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hopgate import __version__

from .config import Settings
from .errors import V2_PREFIX, ClientError, error_response, install_handlers, internal_error
from .imaging import set_pillow_limit
from .lifecycle import init_state, lifespan
from .metrics import request_verdicts
from .routes import direct, page
from .routes import memories as routes_memories
from .routes import ops as routes_ops
from .routes import score as routes_score
from .sidecar import passthrough, proxy
from .v2 import routes as v2

log = logging.getLogger("hopgate.access")
EXEMPT = (*routes_ops.PATHS, *v2.HEALTH_PATHS)
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces, at most 128
_ID_PREFIX = secrets.token_hex(8)  # random per process
_ids = itertools.count(1)
_WANTED = (b"x-request-id", b"x-api-key", b"authorization")


def new_request_id() -> str:
    """32 hex characters like uuid4().hex, unique per process: a random prefix drawn once and
    a counter (no 16 bytes of os.urandom per request)."""
    return f"{_ID_PREFIX}{next(_ids):016x}"


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The first value of each header the envelope reads (as ``request.headers.get``)."""
    found: dict[bytes, bytes] = {}
    for k, v in scope["headers"]:
        if k in _WANTED and k not in found:
            found[k] = v
    return found


def _given_key(headers: dict[bytes, bytes]) -> str:
    """``X-API-Key``, else the token of ``Authorization: Bearer <token>`` (any case of
    "Bearer"; a bare token without the scheme is no key)."""
    key = headers.get(b"x-api-key", b"").decode("latin-1")
    if key:
        return key
    auth = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = auth.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _request_id(headers: dict[bytes, bytes]) -> str:
    given = headers.get(b"x-request-id", b"").decode("latin-1")
    return given if REQUEST_ID.fullmatch(given) else new_request_id()


def _counted(path: str, proxied: frozenset[str] = frozenset()) -> bool:
    """Requests that count in hopgate_requests_total and the access log."""
    return path == "/score" or path.startswith("/v2/models") or path in proxied


_BY_STATUS = {404: "not_found", 405: "method_not_allowed"}


def _reason(recorded: str | None, status: int) -> str:
    """The reason label: 404/405 by their status, else what the route recorded, else by the
    status class (an unrecorded 4xx is the client's, not ``internal``)."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if recorded:
        return recorded
    return "ok" if status < 400 else "bad_input" if status < 500 else "internal"


def _verdict(tally: list[bool]) -> str | None:
    if not tally:
        return None
    return "ood" if all(tally) else "mixed" if any(tally) else "id"


def _model_version(app_state: State, state: dict[str, Any]) -> str | None:
    """The version of the bundle this request was pinned to (lifecycle.Pin), else serving."""
    scorer = state.get("scorer") or getattr(app_state, "scorer", None)
    return getattr(getattr(scorer, "meta", None), "model_version", None)


class Envelope:
    """The envelope as a pure ASGI middleware (no BaseHTTPMiddleware: no task group, no
    stream pair, no re-wrapped response per request). Request state goes through
    ``scope["state"]`` (what ``request.state`` reads): ``request_id``, ``reason``, ``images``.
    """

    def __init__(self, app: ASGIApp, app_state: State, settings: Settings):
        self.app, self.state, self.settings = app, app_state, settings
        self.api_key = (settings.resolved_api_key() or "").encode()
        self.proxied = frozenset(settings.proxy_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        rid = _request_id(headers)
        app_state = self.state
        app_state.last_request = time.monotonic()
        state = scope.setdefault("state", {})
        state["request_id"], state["reason"], state["images"] = rid, None, 0
        t0 = time.perf_counter()
        path: str = scope["path"]
        v2_path = path.startswith(V2_PREFIX)
        status = 500
        started = False
        tally: list[bool] = []
        verdicts = request_verdicts.set(tally)  # Metrics.verdict appends this request's

        async def wrapped(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                extra = [(b"x-request-id", rid.encode())]
                if app_state.draining:  # no keep-alive reuse of a connection about to close
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        if (self.api_key and not path.startswith(EXEMPT) and not page.public(path)
                and not hmac.compare_digest(_given_key(headers).encode(), self.api_key)):
            state["reason"] = "unauthorized"
            await error_response(ClientError(401, "missing or wrong API key", "unauthorized"),
                                 v2=v2_path)(scope, receive, wrapped)
        else:
            try:
                await self.app(scope, receive, wrapped)
            except Exception:  # a bug, not the client: counted, logged whole, answered plainly
                logging.getLogger("hopgate").error(
                    "unhandled error", exc_info=True, extra={"request_id": rid, "path": path})
                state["reason"] = "internal"
                if started:  # too late for an answer: the server closes the connection
                    raise
                await error_response(internal_error(), v2=v2_path)(scope, receive, wrapped)
        request_verdicts.reset(verdicts)
        if _counted(path, self.proxied):
            elapsed = time.perf_counter() - t0
            reason = _reason(state["reason"], status)
            metrics = getattr(app_state, "metrics", None)
            if metrics is not None:
                metrics.requests.labels(str(status), reason).inc()
                metrics.request_seconds.observe(elapsed)
            if self.settings.log_requests:
                log.info("access", extra={"access": {
                    "request_id": rid, "method": scope["method"], "path": path,
                    "status": status, "reason": reason, "images": state["images"],
                    "verdict": _verdict(tally), "ood_images": sum(tally),
                    "model_version": _model_version(app_state, state),
                    "ms": round(elapsed * 1e3, 3)}})


def fastapi_telemetry() -> dict[str, bool]:
    """FastAPI's own OpenTelemetry spans, metrics and logs: kept when the process already has
    a tracer provider (``opentelemetry-instrument hopgate-serve``), else off. Left on with no
    provider, FastAPI asks on every request whether one has appeared since: ~10 us, 0.8 % of
    a /score request's CPU at c=32 (py-spy, issue 24). hopgate's own telemetry is /metrics
    and the JSON access log, whatever this says."""
    from opentelemetry import trace

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):  # none set
        return {"tracing": False, "metrics": False, "logs": False}
    return {}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    set_pillow_limit(settings.max_pixels)
    app = FastAPI(title="hopgate", version=__version__, lifespan=lifespan,
                  telemetry=fastapi_telemetry(),  # type: ignore[arg-type]
                  docs_url=None, redoc_url=None,  # page.py serves /docs offline
                  description="OOD gatekeeper: RecLag modern-Hopfield memories on onnxruntime.")
    proxied = {(m, path): proxy.proxy for path in settings.proxy_routes
               for m in settings.proxy_methods}
    app.add_middleware(direct.Direct, routes=proxied)  # innermost: the hot routes, no router
    init_state(app, settings)
    app.add_middleware(Envelope, app_state=app.state, settings=settings)  # outside Admission
    install_handlers(app)
    app.include_router(routes_score.router)
    app.include_router(routes_ops.router)
    app.include_router(v2.router)
    app.include_router(routes_memories.router)
    page.install(app)  # /, /docs (offline), /static
    own = {getattr(r, "path", None) for r in app.routes}
    for path in settings.proxy_routes:  # the classifier's own routes (sidecar mode)
        if path in own:
            raise ValueError(f"proxy route {path} is one of hopgate's own routes")
        # a plain Starlette route, matched first: no FastAPI parameter machinery per request
        app.router.routes.insert(0, Route(path, proxy.proxy, methods=settings.proxy_methods,
                                          include_in_schema=False))
    if settings.proxy_routes:  # outermost: the data port passes the rest to the classifier
        app.add_middleware(passthrough.Ports, app_state=app.state, settings=settings)
    return app
