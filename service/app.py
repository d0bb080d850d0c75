"""``create_app``: the FastAPI app, wired. Nothing here scores or parses.

  * lifespan and readiness: lifecycle.py (the core is built at startup);
  * the envelope middleware: request id, API key (constant-time compare; health, metrics and
    the docs are exempt), ``Connection: close`` while draining, request metrics, JSON access log;
  * errors: one body shape, FastAPI's own included (errors.install_handlers);
  * routes: /score (routes_score.py), health/readiness/metrics (routes_ops.py), V2 (v2.py).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from starlette.responses import Response

from hopgate import __version__

from . import routes_ops, routes_score, v2
from .config import Settings
from .errors import V2_PREFIX, ClientError, error_response, install_handlers
from .imaging import set_pillow_limit
from .lifecycle import init_state, lifespan

log = logging.getLogger("hopgate.access")
EXEMPT = (*routes_ops.PATHS, *v2.HEALTH_PATHS)
DOCS = ("/docs", "/openapi.json")


def _given_key(request: Request) -> str:
    return request.headers.get("x-api-key") or request.headers.get(
        "authorization", "").removeprefix("Bearer ").strip()


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
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        app.state.last_request = time.monotonic()
        request.state.request_id, request.state.reason, request.state.images = rid, None, 0
        t0 = time.perf_counter()
        path = request.url.path
        if (api_key and not path.startswith(EXEMPT) and path not in DOCS
                and not hmac.compare_digest(_given_key(request).encode(), api_key.encode())):
            request.state.reason = "unauthorized"
            response: Response = error_response(
                ClientError(401, "missing or wrong API key", "unauthorized"),
                v2=path.startswith(V2_PREFIX))
        else:
            response = await call_next(request)
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
