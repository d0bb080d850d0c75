"""``create_app``: the FastAPI app, wired. Nothing here scores or parses.

  * lifespan and readiness: lifecycle.py (the core is built at startup);
  * the envelope middleware: request id (the client's ``X-Request-ID`` when it is 1-128
    printable ASCII characters, else a fresh one), API key (``X-API-Key`` or ``Authorization:
    Bearer``, the scheme case-insensitive; constant-time compare; only health and metrics are
    exempt), ``Connection: close`` while draining, request metrics, JSON access log; an
    exception that escapes a route is answered 500 ``internal``, counted and logged with its
    traceback and request id (never its message: it may hold paths or object reprs);
  * errors: one body shape, FastAPI's own included (errors.install_handlers);
  * routes: /score (routes_score.py), health/readiness/metrics (routes_ops.py), V2 (v2.py).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from starlette.responses import Response

from hopgate import __version__

from . import routes_ops, routes_score, v2
from .config import Settings
from .errors import V2_PREFIX, ClientError, error_response, install_handlers, internal_error
from .imaging import set_pillow_limit
from .lifecycle import init_state, lifespan

log = logging.getLogger("hopgate.access")
EXEMPT = (*routes_ops.PATHS, *v2.HEALTH_PATHS)
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces, at most 128


def _given_key(request: Request) -> str:
    """``X-API-Key``, else the token of ``Authorization: Bearer <token>`` (any case of
    "Bearer"; a bare token without the scheme is no key)."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _counted(path: str) -> bool:
    """Requests that count in hopgate_requests_total and the access log."""
    return path == "/score" or path.startswith("/v2/models")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    set_pillow_limit(settings.max_pixels)
    app = FastAPI(title="hopgate", version=__version__, lifespan=lifespan,
                  description="OOD gatekeeper: RecLag modern-Hopfield memories on onnxruntime.")
    init_state(app, settings)
    api_key = settings.resolved_api_key()

    @app.middleware("http")
    async def envelope(request: Request,
                       call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        rid = _request_id(request)
        app.state.last_request = time.monotonic()
        request.state.request_id, request.state.reason, request.state.images = rid, None, 0
        t0 = time.perf_counter()
        path = request.url.path
        v2_path = path.startswith(V2_PREFIX)
        if (api_key and not path.startswith(EXEMPT)
                and not hmac.compare_digest(_given_key(request).encode(), api_key.encode())):
            request.state.reason = "unauthorized"
            response: Response = error_response(
                ClientError(401, "missing or wrong API key", "unauthorized"), v2=v2_path)
        else:
            try:
                response = await call_next(request)
            except Exception:  # a bug, not the client: counted, logged whole, answered plainly
                logging.getLogger("hopgate").error(
                    "unhandled error", exc_info=True, extra={"request_id": rid, "path": path})
                request.state.reason = "internal"
                response = error_response(internal_error(), v2=v2_path)
        elapsed = time.perf_counter() - t0
        response.headers["x-request-id"] = rid
        if app.state.draining:  # no keep-alive reuse of a connection that is about to close
            response.headers["connection"] = "close"
        if _counted(path) and hasattr(app.state, "metrics"):
            reason = request.state.reason or ("ok" if response.status_code < 400 else "internal")
            app.state.metrics.requests.labels(str(response.status_code), reason).inc()
            app.state.metrics.request_seconds.observe(elapsed)
        if settings.log_requests and _counted(path):
            log.info(json.dumps({"request_id": rid, "method": request.method, "path": path,
                                 "status": response.status_code, "reason": request.state.reason,
                                 "images": request.state.images, "ms": round(elapsed * 1e3, 3)}))
        return response

    install_handlers(app)
    app.include_router(routes_score.router)
    app.include_router(routes_ops.router)
    app.include_router(v2.router)
    return app
