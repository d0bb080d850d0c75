"""Open Inference Protocol V2 (KServe / Triton HTTP), so their clients work unchanged.

Inputs of /v2/models/{name}/infer (one of):
  * a BYTES tensor [N] of encoded images (PNG, JPEG, ...), decoded like /score;
  * a UINT8 tensor [N, H, W, C] at the bundle's size.
Both JSON and the binary tensor extension (``Inference-Header-Content-Length``) are read;
outputs are returned as JSON data, or binary where the request asks for it (tritonclient's
default). Outputs: the bundle's outputs plus ``p_value``. V2 has no per-item errors, so one
bad image fails the request (400 / 413 / 415 / 422, with the image's index in the message).
"""

from __future__ import annotations

import json
import struct

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .bundle import OUTPUTS
from .imaging import ImageError

router = APIRouter(prefix="/v2", tags=["v2"])
HEADER_LEN = "inference-header-content-length"
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT64": np.int64, "FP32": np.float32,
          "FP64": np.float64, "INT32": np.int32}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def _scorer(request: Request):
    return request.app.state.scorer


def _error(request: Request, status: int, message: str, reason: str = "bad_input"):
    request.state.reason = reason
    return JSONResponse({"error": message}, status)


@router.get("")
async def server_metadata(request: Request):
    from . import __version__

    return {"name": "hopgate", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live():
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request):
    ok = request.app.state.ready and not request.app.state.draining
    return JSONResponse({"ready": ok}, 200 if ok else 503)


def _check_model(request: Request, name: str, version: str | None = None):
    meta = _scorer(request).meta
    if name != meta.name:
        return _error(request, 404, f"unknown model {name!r}; this server serves {meta.name!r}")
    return None


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None):
    if (err := _check_model(request, name)) is not None:
        return err
    m = _scorer(request).meta
    k = m.top_k
    outputs = [("score", "FP32", [-1]), ("is_ood", "BOOL", [-1]), ("pred_class", "INT64", [-1]),
               ("memory_index", "INT64", [-1, k]), ("memory_weight", "FP32", [-1, k]),
               ("energy", "FP32", [-1]), ("msp", "FP32", [-1]), ("energy_score", "FP32", [-1]),
               ("p_value", "FP32", [-1])]
    return {"name": m.name, "versions": [m.model_version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, m.height, m.width, m.channels]},
                       {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs]}


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None):
    if (err := _check_model(request, name)) is not None:
        return err
    ok = request.app.state.ready and not request.app.state.draining
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


def _tensor(inp: dict, binary: bytes | None):
    dtype, shape = inp.get("datatype"), inp.get("shape") or []
    if dtype == "BYTES":
        if binary is not None:
            return _parse_bytes(binary)
        data = inp.get("data")
        if not isinstance(data, list):
            raise ValueError("BYTES input needs a data list")
        import base64

        flat = np.asarray(data, dtype=object).reshape(-1).tolist()
        return [base64.b64decode(s) if inp.get("parameters", {}).get("base64") else
                (s.encode("latin-1") if isinstance(s, str) else bytes(s)) for s in flat]
    if dtype != "UINT8":
        raise ValueError(f"input datatype {dtype} not supported: send BYTES (encoded images) or UINT8")
    if binary is not None:
        arr = np.frombuffer(binary, dtype=np.uint8)
    else:
        arr = np.asarray(inp.get("data"), dtype=np.uint8)
    return arr.reshape(shape)


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(request: Request, name: str, version: str | None = None):
    from .api import ClientError, read_body

    app = request.app
    if (err := _check_model(request, name)) is not None:
        return err
    if not app.state.ready or app.state.draining:
        return _error(request, 503, "shutting down" if app.state.draining else "not ready",
                      "shutdown" if app.state.draining else "internal")
    scorer = _scorer(request)
    settings = app.state.settings
    try:
        body = await read_body(request, settings.max_body_bytes)
        hlen = request.headers.get(HEADER_LEN)
        header_bytes, rest = (body[:int(hlen)], body[int(hlen):]) if hlen else (body, b"")
        doc = json.loads(header_bytes)
        inputs = doc["inputs"]
        if len(inputs) != 1:
            raise ValueError("send exactly one input tensor")
        inp = inputs[0]
        size = inp.get("parameters", {}).get("binary_data_size")
        tensor = _tensor(inp, rest[:size] if size is not None else None)
    except ClientError as e:
        return _error(request, e.status, e.message)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        return _error(request, 400, f"bad V2 request: {e}")
    m = scorer.meta
    if isinstance(tensor, list):
        if len(tensor) > settings.max_images:
            return _error(request, 413, f"{len(tensor)} images; the limit is {settings.max_images}")
        decoded = await scorer.decode_all(tensor)
        for i, d in enumerate(decoded):
            if isinstance(d, ImageError):
                return _error(request, d.status, f"image {i}: {d.message}")
        images = decoded
    else:
        if tensor.ndim != 4 or tensor.shape[1:] != (m.height, m.width, m.channels):
            return _error(request, 400, f"UINT8 input must be [N, {m.height}, {m.width}, {m.channels}], "
                                        f"got {list(tensor.shape)}")
        if len(tensor) > settings.max_images:
            return _error(request, 413, f"{len(tensor)} images; the limit is {settings.max_images}")
        images = list(tensor)
    request.state.images = len(images)
    try:
        rows = await scorer.run(images, scorer.deadline(request.headers.get("x-hopgate-deadline-ms")))
    except ClientError as e:
        request.state.reason = e.reason
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)
    for r in rows:
        if isinstance(r, ClientError):
            return _error(request, r.status, r.message, r.reason)
    for r in rows:
        scorer.metrics.verdict(bool(r["is_ood"]), float(r["score"]))
    columns = {k: np.stack([r[k] for r in rows]) for k in OUTPUTS}
    columns["p_value"] = np.asarray([m.p_value(float(s)) for s in columns["score"]], np.float32)
    wanted = doc.get("outputs") or [{"name": k} for k in columns]
    binary_default = bool(doc.get("parameters", {}).get("binary_data_output", False))
    out_meta, blobs = [], []
    for o in wanted:
        k = o.get("name")
        if k not in columns:
            return _error(request, 400, f"unknown output {k!r}; outputs: {sorted(columns)}")
        arr = columns[k]
        entry = {"name": k, "datatype": NAMES[arr.dtype], "shape": list(arr.shape)}
        if o.get("parameters", {}).get("binary_data", binary_default):
            raw = np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        out_meta.append(entry)
    header = json.dumps({"model_name": m.name, "model_version": m.model_version,
                         "id": doc.get("id", ""), "outputs": out_meta}).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})
