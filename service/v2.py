"""Open Inference Protocol V2 (KServe / Triton HTTP), so their clients work unchanged.

Inputs of /v2/models/{name}/infer (one of):
  * a BYTES tensor [N] of encoded images (PNG, JPEG, ...), decoded like /score;
  * a UINT8 tensor [N, H, W, C] at the bundle's size.
Both JSON and the binary tensor extension (``Inference-Header-Content-Length``) are read;
outputs are returned as JSON data, or binary where the request asks for it (tritonclient's
default). Outputs: the bundle's outputs plus ``p_value``. V2 has no per-item errors, so one
bad image fails the request (400 / 413 / 415 / 422, with the image's index in the message).
Errors are raised as ``errors.ServingError`` like everywhere else; under ``/v2`` they are
answered in the protocol's ``{"error": "<message>"}`` shape (errors.respond).
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hopgate import __version__
from hopgate.bundle import OUTPUTS

from .errors import ClientError, ImageError, ServingError
from .lifecycle import is_ready, require_ready, scorer_of
from .parsing import read_body, request_deadline

router = APIRouter(prefix="/v2", tags=["v2"])
HEADER_LEN = "inference-header-content-length"
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT64": np.int64, "FP32": np.float32,
          "FP64": np.float64, "INT32": np.int32}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "hopgate", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    ok = is_ready(request.app.state)
    return JSONResponse({"ready": ok}, 200 if ok else 503)


def _check_model(request: Request, name: str) -> None:
    meta = scorer_of(request).meta
    if name != meta.name:
        raise ClientError(404, f"unknown model {name!r}; this server serves {meta.name!r}")


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str,
                         version: str | None = None) -> dict[str, Any]:
    _check_model(request, name)
    m = scorer_of(request).meta
    k = m.top_k
    outputs = [("score", "FP32", [-1]), ("is_ood", "BOOL", [-1]), ("pred_class", "INT64", [-1]),
               ("memory_index", "INT64", [-1, k]), ("memory_weight", "FP32", [-1, k]),
               ("energy", "FP32", [-1]), ("msp", "FP32", [-1]), ("energy_score", "FP32", [-1]),
               ("p_value", "FP32", [-1])]
    return {"name": m.name, "versions": [m.model_version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "images", "datatype": "UINT8",
                        "shape": [-1, m.height, m.width, m.channels]},
                       {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs]}


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
    _check_model(request, name)
    ok = is_ready(request.app.state)
    return JSONResponse({"name": name, "ready": ok}, 200 if ok else 503)


def _parse_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES serialisation: 4-byte little-endian length + bytes, repeated."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ValueError("truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise ValueError("truncated BYTES element")
        out.append(raw[i:i + n])
        i += n
    return out


def _tensor(inp: dict[str, Any], binary: bytes | None) -> list[bytes] | np.ndarray:
    dtype, shape = inp.get("datatype"), inp.get("shape") or []
    if dtype == "BYTES":
        if binary is not None:
            return _parse_bytes(binary)
        data = inp.get("data")
        if not isinstance(data, list):
            raise ValueError("BYTES input needs a data list")
        flat = np.asarray(data, dtype=object).reshape(-1).tolist()
        return [base64.b64decode(s) if inp.get("parameters", {}).get("base64") else
                (s.encode("latin-1") if isinstance(s, str) else bytes(s)) for s in flat]
    if dtype != "UINT8":
        raise ValueError(f"input datatype {dtype} not supported: send BYTES (encoded images) "
                         "or UINT8")
    if binary is not None:
        arr = np.frombuffer(binary, dtype=np.uint8)
    else:
        arr = np.asarray(inp.get("data"), dtype=np.uint8)
    return arr.reshape(shape)


async def _read_request(request: Request, max_body_bytes: int
                        ) -> tuple[dict[str, Any], list[bytes] | np.ndarray]:
    """The JSON header and the one input tensor (JSON data or the binary extension)."""
    body = await read_body(request, max_body_bytes)
    try:
        hlen = request.headers.get(HEADER_LEN)
        header_bytes, rest = (body[:int(hlen)], body[int(hlen):]) if hlen else (body, b"")
        doc = json.loads(header_bytes)
        inputs = doc["inputs"]
        if len(inputs) != 1:
            raise ValueError("send exactly one input tensor")
        inp = inputs[0]
        size = inp.get("parameters", {}).get("binary_data_size")
        return doc, _tensor(inp, rest[:size] if size is not None else None)
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ClientError(400, f"bad V2 request: {e}") from None


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    _check_model(request, name)
    require_ready(request)
    scorer = scorer_of(request)
    settings = scorer.settings
    doc, tensor = await _read_request(request, settings.max_body_bytes)
    m = scorer.meta
    images: list[np.ndarray] = []
    if isinstance(tensor, list):
        if len(tensor) > settings.max_images:
            raise ClientError(413, f"{len(tensor)} images; the limit is {settings.max_images}")
        for i, d in enumerate(await scorer.decode_all(tensor)):
            if isinstance(d, ImageError):
                raise ClientError(d.status, f"image {i}: {d.message}")
            images.append(d)
    else:
        if tensor.ndim != 4 or tensor.shape[1:] != (m.height, m.width, m.channels):
            raise ClientError(400, f"UINT8 input must be [N, {m.height}, {m.width}, "
                                   f"{m.channels}], got {list(tensor.shape)}")
        if len(tensor) > settings.max_images:
            raise ClientError(413, f"{len(tensor)} images; the limit is {settings.max_images}")
        images = list(tensor)
    request.state.images = len(images)
    rows = []
    for r in await scorer.run(images, request_deadline(request, settings.deadline_ms)):
        if isinstance(r, ServingError):  # V2 has no per-item errors: the request fails
            raise ServingError(r.status, r.message, r.reason)
        rows.append(r)
    for r in rows:
        scorer.metrics.verdict(bool(r["is_ood"]), float(r["score"]))
    columns = {k: np.stack([r[k] for r in rows]) for k in OUTPUTS}
    columns["p_value"] = np.asarray([m.p_value(float(s)) for s in columns["score"]], np.float32)
    return _encode(doc, columns, m.name, m.model_version)


def _encode(doc: dict[str, Any], columns: dict[str, np.ndarray], name: str,
            version: str) -> Response:
    """The requested outputs, as JSON data or binary tensors (as each output asks)."""
    wanted = doc.get("outputs") or [{"name": k} for k in columns]
    binary_default = bool(doc.get("parameters", {}).get("binary_data_output", False))
    out_meta: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for o in wanted:
        k = o.get("name")
        if k not in columns:
            raise ClientError(400, f"unknown output {k!r}; outputs: {sorted(columns)}")
        arr = columns[k]
        entry: dict[str, Any] = {"name": k, "datatype": NAMES[arr.dtype],
                                 "shape": list(arr.shape)}
        if o.get("parameters", {}).get("binary_data", binary_default):
            raw = np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        out_meta.append(entry)
    header = json.dumps({"model_name": name, "model_version": version,
                         "id": doc.get("id", ""), "outputs": out_meta}).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})
