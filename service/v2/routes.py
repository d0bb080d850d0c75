"""Open Inference Protocol V2 (KServe / Triton HTTP), so their clients work unchanged.

Inputs of /v2/models/{name}/infer (either or both, scored in the order sent):
  * ``image_bytes``: a BYTES tensor [N] of encoded images (PNG, JPEG, ...), decoded like
    /score; in JSON each element is the image in base64 (v2/request.py);
  * ``images``: a UINT8 tensor [N, H, W, C] at the bundle's size.
Both JSON and the binary tensor extension (``Inference-Header-Content-Length``) are read;
outputs are returned as JSON data, or binary where the request asks for it (tritonclient's
default). Outputs: the bundle's outputs plus ``p_value`` and ``class_name`` (BYTES, the
predicted class's name). Request ``parameters`` ``target_tpr`` or ``log_lambda`` set this
request's threshold (threshold.py). V2 has no per-item errors, so one bad image fails the
request (400 / 413 / 415 / 422, with the image's index in the message). A version in the
path must be the served bundle's ``model_version`` (else 404). The repository and statistics
routes are in v2/repository.py.
The body is parsed and checked by v2/request.py (its pydantic model is the request body in
/openapi.json), shape x datatype x data before anything is allocated, off the event loop.
Errors are raised as ``errors.ServingError`` like everywhere else; under ``/v2`` they are
answered in the protocol's ``{"error": "<message>"}`` shape (errors.respond).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hopgate import __version__
from hopgate.bundle import LOGITS, OUTPUTS

from ..errors import ClientError, ImageError, ServingError
from ..lifecycle import is_ready, require_ready, scorer_of
from ..parsing import read_body, request_deadline
from ..threshold import resolve
from .repository import ERRORS, check_model, inputs_of, outputs_of
from .repository import router as repository
from .request import INFER_BODY, InferOutput, InferRequest, Tensor, parse_infer

router = APIRouter(prefix="/v2", tags=["v2"])
router.include_router(repository)  # first: /v2/models/stats before /v2/models/{name}
HEADER_LEN = "inference-header-content-length"
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT64": np.int64, "FP32": np.float32,
          "FP64": np.float64, "INT32": np.int32}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]
EXTRA_OUTPUTS = ("p_value", "class_name")
ONE_PASS = ("probabilities", "logits")  # bundles with the classifier's logits, when asked


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "hopgate", "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", responses={503: ERRORS[503]})
async def ready(request: Request) -> JSONResponse:
    ok = is_ready(request.app.state)
    return JSONResponse({"ready": ok}, 200 if ok else 503)


@router.get("/models/{name}", responses=ERRORS)
@router.get("/models/{name}/versions/{version}", responses=ERRORS)
async def model_metadata(request: Request, name: str,
                         version: str | None = None) -> dict[str, Any]:
    """Both inputs may be sent, alone or together (their images are scored in order)."""
    check_model(request, name, version)
    m = scorer_of(request).meta
    return {"name": m.name, "versions": [m.model_version], "platform": "onnxruntime_onnx",
            "inputs": inputs_of(m),
            "outputs": outputs_of(m, scorer_of(request).runtime.has_logits)}


@router.get("/models/{name}/ready", responses=ERRORS)
@router.get("/models/{name}/versions/{version}/ready", responses=ERRORS)
async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
    check_model(request, name, version)
    ok = is_ready(request.app.state)
    return JSONResponse({"name": name, "ready": ok}, 200 if ok else 503)


def _parse(body: bytes, header_length: str | None, image: tuple[int, int, int],
           max_images: int, outputs: list[str]) -> tuple[InferRequest, list[Tensor]]:
    req, tensors = parse_infer(body, header_length, image, max_images)
    for o in req.outputs or []:  # before any image is decoded or scored
        if o.name not in outputs:
            raise ClientError(400, f"bad V2 request: unknown output {o.name[:64]!r}; "
                                   f"outputs: {sorted(outputs)}")
    return req, tensors


@router.post("/models/{name}/infer", openapi_extra=INFER_BODY, responses=ERRORS)
@router.post("/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY,
             responses=ERRORS)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    check_model(request, name, version)
    require_ready(request)
    scorer = scorer_of(request)
    settings = scorer.settings
    m = scorer.meta
    body = await read_body(request, settings.max_body_bytes)
    deadline = request_deadline(request, settings.deadline_ms)
    # JSON and the data checks run off the event loop (a 20 MB body takes a while)
    doc, tensors = await asyncio.to_thread(_parse, body, request.headers.get(HEADER_LEN),
                                           (m.height, m.width, m.channels), settings.max_images,
                                           [*OUTPUTS, *EXTRA_OUTPUTS, *(
                                               ONE_PASS if scorer.runtime.has_logits else ())])
    del body
    params = doc.parameters
    log_lambda = resolve(m, scorer.overridable, params and params.target_tpr,
                         params and params.log_lambda)
    images: list[np.ndarray] = []
    for tensor in tensors:
        if not isinstance(tensor, list):
            images.extend(tensor)
            continue
        first = len(images)
        for i, d in enumerate(await scorer.decode_all(tensor, deadline), first):
            if isinstance(d, ImageError):
                raise ClientError(d.status, f"image {i}: {d.message}")
            if isinstance(d, ServingError):  # not decoded before the deadline (504)
                raise ServingError(d.status, f"image {i}: {d.message}", d.reason)
            images.append(d)
    request.state.images = len(images)
    rows = []
    for r in await scorer.run(images, deadline, log_lambda):
        if isinstance(r, ServingError):  # V2 has no per-item errors: the request fails
            raise ServingError(r.status, r.message, r.reason)
        rows.append(r)
    for r in rows:
        scorer.metrics.verdict(bool(r["is_ood"]), float(r["score"]))
    columns = {k: np.stack([r[k] for r in rows]) for k in OUTPUTS}
    columns["p_value"] = np.asarray([m.p_value(float(s)) for s in columns["score"]], np.float32)
    names = m.class_names
    columns["class_name"] = np.asarray(
        [names[c] if 0 <= c < len(names) else str(c) for c in columns["pred_class"].tolist()],
        dtype=np.object_)
    asked = {o.name for o in doc.outputs or ()}
    if asked & set(ONE_PASS):  # the classifier's own answer (the one-pass shape)
        z = np.stack([r[LOGITS] for r in rows]).astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        columns["probabilities"] = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
        columns["logits"] = z.astype(np.float32)
    return _encode(doc, columns, m.name, m.model_version)


def _bytes_tensor(values: np.ndarray) -> bytes:
    """Triton's BYTES serialisation: each element's 4-byte little-endian length, then it."""
    parts = []
    for v in values.reshape(-1).tolist():
        b = v.encode() if isinstance(v, str) else bytes(v)
        parts += [len(b).to_bytes(4, "little"), b]
    return b"".join(parts)


def _encode(req: InferRequest, columns: dict[str, np.ndarray], name: str,
            version: str) -> Response:
    """The requested outputs, as JSON data or binary tensors (as each output asks)."""
    wanted = req.outputs or [InferOutput(name=k) for k in columns]
    binary_default = bool(req.parameters and req.parameters.binary_data_output)
    out_meta: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for o in wanted:
        arr = columns[o.name]
        text = arr.dtype == np.object_  # class names: BYTES
        entry: dict[str, Any] = {"name": o.name, "datatype": "BYTES" if text else NAMES[arr.dtype],
                                 "shape": list(arr.shape)}
        binary = o.parameters.binary_data if o.parameters else None
        if binary if binary is not None else binary_default:
            raw = _bytes_tensor(arr) if text else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        out_meta.append(entry)
    header = json.dumps({"model_name": name, "model_version": version,
                         "id": req.id or "", "outputs": out_meta}).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})
