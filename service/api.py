"""The FastAPI app: POST /score, health, readiness, metrics; the V2 protocol lives in v2.py.

Request life: read the body under a size limit -> split into images (raw / multipart / JSON
base64) -> decode each off the event loop (imaging.decode; a bad image fails alone) -> queue
the good ones in the batcher under the request's deadline -> build one result per image.

Gatekeeper hook: when ``app.state.gate`` is set (service/gate.py), /score hands it the
request and the per-image results; it may forward ID images upstream and returns the response.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from . import __version__
from .batcher import Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from .config import Settings
from .imaging import ImageError, decode, set_pillow_limit
from .metrics import Metrics
from .runtime import Runtime

log = logging.getLogger("hopgate.access")
EXEMPT = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")
DEADLINE_HEADER = "x-hopgate-deadline-ms"


# --- response schema (OpenAPI) ----------------------------------------------------------

class Memory(BaseModel):
    index: int
    weight: float


class ErrorInfo(BaseModel):
    status: int
    reason: str
    message: str


class Timings(BaseModel):
    queue_ms: float
    compute_ms: float
    batch_size: int


class ImageResult(BaseModel):
    ood: bool | None = None
    score: float | None = None
    threshold: float | None = None
    p_value: float | None = None
    predicted_class: int | None = None
    label: str | None = None
    memories: list[Memory] | None = None
    energy: float | None = None
    baselines: dict[str, float] | None = None
    model_version: str | None = None
    timings: Timings | None = None
    error: ErrorInfo | None = None


class ModelInfo(BaseModel):
    name: str
    version: str
    provider: str
    threshold: float
    target_tpr: float
    classes: list[str]
    hopgate_version: str


class ScoreResponse(BaseModel):
    results: list[ImageResult]
    model: ModelInfo


class ClientError(Exception):
    def __init__(self, status: int, message: str, reason: str = "bad_input", headers=None):
        super().__init__(message)
        self.status, self.message, self.reason, self.headers = status, message, reason, headers


SCORE_BODY = {"requestBody": {"required": True, "content": {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/webp": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "byte"}}}}},
}}}


# --- the scoring core, shared with v2 ----------------------------------------------------

class Scorer:
    """Decode -> batch -> results. One per app."""

    def __init__(self, settings: Settings, runtime: Runtime, metrics: Metrics, batcher: Batcher):
        self.settings, self.runtime, self.metrics, self.batcher = settings, runtime, metrics, batcher
        self.meta = runtime.meta
        self._decoders = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")

    def model_info(self) -> dict:
        m = self.meta
        return {"name": m.name, "version": m.model_version, "provider": self.runtime.provider,
                "threshold": m.threshold, "target_tpr": m.target_tpr,
                "classes": m.class_names, "hopgate_version": __version__}

    async def decode_all(self, blobs: list[bytes]) -> list[np.ndarray | ImageError]:
        m, loop = self.meta, asyncio.get_running_loop()

        def one(b: bytes):
            try:
                return decode(b, m.height, m.width, m.channels, m.resize, self.settings.max_pixels)
            except ImageError as e:
                return e

        return list(await asyncio.gather(*(loop.run_in_executor(self._decoders, one, b)
                                           for b in blobs)))

    def deadline(self, header: str | None) -> float:
        ms = self.settings.deadline_ms
        if header:
            try:
                ms = min(ms, float(header))  # may shorten the server's default, never lengthen
            except ValueError:
                raise ClientError(400, f"{DEADLINE_HEADER} must be a number of milliseconds") from None
            if ms <= 0:
                raise ClientError(400, f"{DEADLINE_HEADER} must be positive")
        return time.monotonic() + ms / 1000.0

    async def run(self, images: list[np.ndarray], deadline: float) -> list[dict | ClientError]:
        """Queue decoded images; each entry is the raw output row (+timings) or an error."""
        if not images:
            return []
        try:
            futures = self.batcher.submit(images, deadline)
        except QueueFull:
            raise ClientError(self.settings.reject_status, "queue full, retry later", "queue_full",
                              {"Retry-After": str(self.settings.retry_after_s)}) from None
        except ShuttingDown:
            raise ClientError(503, "shutting down", "shutdown",
                              {"Retry-After": str(self.settings.retry_after_s)}) from None
        await asyncio.wait(futures, timeout=max(deadline - time.monotonic(), 0))
        out: list[dict | ClientError] = []
        for f in futures:
            if not f.done():
                f.cancel()  # the batcher skips it if it has not been taken yet
                out.append(ClientError(504, "deadline exceeded before the image was scored", "deadline"))
            elif isinstance(f.exception(), DeadlineExceeded):
                out.append(ClientError(504, "deadline exceeded before the image was scored", "deadline"))
            elif f.exception() is not None:
                logging.getLogger("hopgate").error("runtime failure: %r", f.exception())
                out.append(ClientError(500, "internal error while scoring", "internal"))
            else:
                row, queued, compute, batch = f.result()
                out.append({**row, "queue_s": queued, "compute_s": compute, "batch": batch})
        return out

    def result(self, row: dict) -> dict:
        m = self.meta
        ood, score = bool(row["is_ood"]), float(row["score"])
        self.metrics.verdict(ood, score)
        pred = int(row["pred_class"])
        memories = [] if ood else [
            {"index": int(i), "weight": float(w)}
            for i, w in zip(row["memory_index"], row["memory_weight"]) if i >= 0 and w > 1e-6]
        return {
            "ood": ood, "score": score, "threshold": m.threshold, "p_value": m.p_value(score),
            "predicted_class": pred, "label": m.class_names[pred] if pred < len(m.class_names) else str(pred),
            "memories": memories, "energy": float(row["energy"]),
            "baselines": {"msp": float(row["msp"]), "energy": float(row["energy_score"])},
            "model_version": m.model_version,
            "timings": {"queue_ms": round(row["queue_s"] * 1e3, 3),
                        "compute_ms": round(row["compute_s"] * 1e3, 3), "batch_size": row["batch"]},
        }


def error_body(e: ClientError | ImageError) -> dict:
    return {"status": e.status, "reason": e.reason, "message": e.message}


# --- request parsing ---------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ClientError(413, f"body of {length} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def split_images(request: Request, settings: Settings) -> list[bytes]:
    """The request's encoded images, by content type."""
    body = await read_body(request, settings.max_body_bytes)
    if not body:
        raise ClientError(400, "empty body: send an image, multipart 'images' parts, or JSON")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        blobs = [body]
    elif ctype == "multipart/form-data":
        request._body = body  # let Starlette's form parser read what we already read
        try:
            form = await request.form(max_files=settings.max_images + 1,
                                      max_part_size=settings.max_body_bytes)
        except Exception as e:
            raise ClientError(413 if "Too many" in str(e) else 400, f"bad multipart body: {e}") from None
        parts = form.getlist("images")
        if not parts:
            raise ClientError(400, "multipart body has no file parts named 'images'")
        blobs = [await p.read() if hasattr(p, "read") else str(p).encode() for p in parts]
    elif ctype == "application/json":
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise ClientError(400, f"body is not valid JSON: {e}") from None
        items = doc.get("images") if isinstance(doc, dict) else None
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise ClientError(400, 'JSON body must be {"images": ["<base64>", ...]} with at least one item')
        blobs = []
        for i, s in enumerate(items):
            try:
                blobs.append(base64.b64decode(s.split(",", 1)[-1] if s.startswith("data:") else s,
                                              validate=True))
            except (binascii.Error, ValueError):
                blobs.append(ImageError(400, f"images[{i}] is not valid base64"))
    else:
        raise ClientError(415, f"unsupported content type {ctype or '(none)'}: use image/*, "
                               "multipart/form-data or application/json")
    if len(blobs) > settings.max_images:
        raise ClientError(413, f"{len(blobs)} images in one request; the limit is {settings.max_images}")
    return blobs


# --- the app -----------------------------------------------------------------------------

def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    set_pillow_limit(settings.max_pixels)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime = Runtime(settings.model, settings.providers, settings.intra_op_threads,
                          settings.inter_op_threads)
        m = runtime.meta
        metrics = Metrics(settings.buckets, Metrics.score_buckets(m.score_quantiles, m.threshold))
        metrics.model.info({"name": m.name, "version": m.model_version, "provider": runtime.provider,
                            "hopgate_version": __version__, "backbone": m.backbone})
        runtime.warm(settings.buckets)  # every bucket, before ready
        batcher = Batcher(runtime, metrics, settings.buckets, settings.queue_images,
                          settings.max_delay_ms, settings.batch_slots)
        batcher.start()
        app.state.metrics, app.state.batcher = metrics, batcher
        app.state.scorer = Scorer(settings, runtime, metrics, batcher)
        if settings.upstream_url:
            from .gate import Gate

            app.state.gate = Gate(settings.upstream_url, settings.upstream_timeout_s,
                                  settings.upstream_policy, settings.gate_ood_status,
                                  settings.gate_ood_body, metrics.registry)
        app.state.ready, app.state.draining = True, False
        logging.getLogger("hopgate").info("ready: %s on %s", m.model_version, runtime.provider)
        yield
        app.state.ready = False
        await batcher.drain(settings.drain_seconds)
        batcher.close()
        if app.state.gate is not None:
            await app.state.gate.close()

    app = FastAPI(title="hopgate", version=__version__, lifespan=lifespan,
                  description="OOD gatekeeper: RecLag modern-Hopfield memories on onnxruntime.")
    app.state.settings, app.state.ready, app.state.draining = settings, False, False
    app.state.gate = None
    api_key = settings.resolved_api_key()

    @app.middleware("http")
    async def envelope(request: Request, call_next):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        app.state.last_request = time.monotonic()
        request.state.request_id, request.state.reason, request.state.images = rid, None, 0
        t0 = time.perf_counter()
        path = request.url.path
        if api_key and not path.startswith(EXEMPT) and path not in ("/docs", "/openapi.json"):
            given = request.headers.get("x-api-key") or request.headers.get(
                "authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                request.state.reason = "unauthorized"
                response = JSONResponse({"error": {"status": 401, "reason": "unauthorized",
                                                   "message": "missing or wrong API key"}}, 401)
            else:
                response = await call_next(request)
        else:
            response = await call_next(request)
        elapsed = time.perf_counter() - t0
        response.headers["x-request-id"] = rid
        if app.state.draining:  # no keep-alive reuse of a connection that is about to close
            response.headers["connection"] = "close"
        counted = path == "/score" or path.startswith("/v2/models")
        if counted and hasattr(app.state, "metrics"):
            reason = request.state.reason or ("ok" if response.status_code < 400 else "internal")
            app.state.metrics.requests.labels(str(response.status_code), reason).inc()
            app.state.metrics.request_seconds.observe(elapsed)
        if settings.log_requests and counted:
            log.info(json.dumps({"request_id": rid, "method": request.method, "path": path,
                                 "status": response.status_code, "reason": request.state.reason,
                                 "images": request.state.images, "ms": round(elapsed * 1e3, 3)}))
        return response

    @app.exception_handler(ClientError)
    async def client_error(request: Request, e: ClientError):
        request.state.reason = e.reason
        return JSONResponse({"error": error_body(e)}, e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logging.getLogger("hopgate").exception("unhandled error")
        request.state.reason = "internal"
        return JSONResponse({"error": {"status": 500, "reason": "internal",
                                       "message": "internal error"}}, 500)

    @app.post("/score", response_model=ScoreResponse, openapi_extra=SCORE_BODY,
              responses={400: {}, 401: {}, 413: {}, 415: {}, 422: {}, 429: {}, 503: {}, 504: {}},
              summary="Score one or many images: ID or OOD, with score, p-value, class, memories")
    async def score(request: Request):
        if not app.state.ready or app.state.draining:
            raise ClientError(503, "not ready" if not app.state.draining else "shutting down",
                              "shutdown" if app.state.draining else "internal",
                              {"Retry-After": str(settings.retry_after_s)})
        scorer: Scorer = app.state.scorer
        deadline = scorer.deadline(request.headers.get(DEADLINE_HEADER))
        blobs = await split_images(request, settings)
        request.state.images = len(blobs)
        decoded = [b if isinstance(b, ImageError) else None for b in blobs]
        todo = [i for i, b in enumerate(blobs) if not isinstance(b, ImageError)]
        for i, d in zip(todo, await scorer.decode_all([blobs[i] for i in todo])):
            decoded[i] = d
        good = [i for i, d in enumerate(decoded) if not isinstance(d, ImageError)]
        rows = await scorer.run([decoded[i] for i in good], deadline)
        results: list[dict] = []
        by_index = dict(zip(good, rows))
        for i, d in enumerate(decoded):
            r = by_index.get(i, d)
            if isinstance(r, (ImageError, ClientError)):
                scorer.metrics.images.labels("error").inc()
                results.append({"error": error_body(r)})
            else:
                results.append(scorer.result(r))
        errors = [r for r in results if "error" in r]
        status = errors[0]["error"]["status"] if len(errors) == len(results) else 200
        if errors:
            request.state.reason = errors[0]["error"]["reason"] if status != 200 else None
        body = {"results": results, "model": scorer.model_info()}
        if app.state.gate is not None and status == 200:
            return await app.state.gate(request, body, blobs)
        return JSONResponse(body, status)

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: bundle loaded, buckets warmed, not draining")
    async def readyz():
        ok = app.state.ready and not app.state.draining
        return JSONResponse({"ready": ok, "draining": app.state.draining}, 200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        if not hasattr(app.state, "metrics"):
            return Response(b"", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from .v2 import router as v2_router

    app.include_router(v2_router)
    return app
