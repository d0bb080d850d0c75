"""Operations routes: liveness, readiness, Prometheus metrics (exempt from the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..lifecycle import is_ready

router = APIRouter()
PATHS = ("/healthz", "/livez", "/readyz", "/metrics")


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/livez", summary="Liveness, under the Kubernetes name: the process answers")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: bundle loaded, buckets warmed, not draining",
            responses={503: {"description": "not ready, or draining"}})
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    ok = is_ready(state)
    return JSONResponse({"ready": ok, "draining": state.draining}, 200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    registry = getattr(request.app.state, "metrics", None)
    if registry is None:
        return Response(b"", media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
