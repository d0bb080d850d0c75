"""The V2 model as Triton and KServe clients ask about it: name and version checks, the model
config (class names in its ``parameters``), the model repository (index, load = hot reload,
unload refused) and statistics. Every error is V2-shaped (``{"error": "<message>"}``:
errors.respond, for every path under ``/v2``). v2.py includes this router first, so
``/v2/models/stats`` is not taken for a model named "stats".

One model is served: the repository index lists it, ``load`` reloads it from its configured
path (reload.py: built and warmed beside the old one, no request fails; a bundle that does
not load is a 400 naming the problem, and the old one keeps serving), ``unload`` is a 400
(nothing would be left to serve). ``load`` takes no ``config`` or ``file:`` parameters: the
bundle is the file at ``HOPGATE_MODEL``; replace it, then call ``load`` (or send SIGHUP).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request

from hopgate.bundle import BundleError, BundleMeta

from ..errors import ClientError
from ..lifecycle import is_ready, scorer_of
from ..parsing import read_body
from ..reload import Reloader
from ..scoring import Scorer
from ..threshold import log_lambda_range, tpr_range

router = APIRouter()
LOAD_BODY_BYTES = 64 * 1024
ERRORS: dict[int | str, dict[str, Any]] = {  # what every V2 route documents
    s: {"description": "`{\"error\": \"<message>\"}`", "content": {"application/json": {
        "schema": {"type": "object", "required": ["error"],
                   "properties": {"error": {"type": "string"}}}}}}
    for s in (400, 401, 404, 413, 415, 422, 429, 500, 503, 504)}


def check_model(request: Request, name: str, version: str | None = None) -> None:
    """404 unless ``name`` (and ``version``, when given) is the bundle this request is
    pinned to."""
    meta = scorer_of(request).meta
    if name != meta.name:
        raise ClientError(404, f"unknown model {name[:64]!r}; this server serves {meta.name!r}",
                          "not_found")
    if version is not None and version != meta.model_version:
        raise ClientError(404, f"unknown version {version[:64]!r} of model {name[:64]!r}; "
                               f"this server serves version {meta.model_version!r}", "not_found")


def inputs_of(m: BundleMeta) -> list[dict[str, Any]]:
    """Either or both may be sent (v2.py): encoded images, or pixels at the bundle's size."""
    return [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
            {"name": "images", "datatype": "UINT8", "shape": [-1, m.height, m.width, m.channels]}]


def outputs_of(m: BundleMeta, logits: bool = False) -> list[dict[str, Any]]:
    """The outputs; with ``logits`` (a bundle carrying the classifier's), its softmax
    ``probabilities`` and ``logits`` too, [-1, classes], sent only when asked for."""
    k, c = m.top_k, len(m.class_names)
    one_pass = [{"name": n, "datatype": "FP32", "shape": [-1, c]}
                for n in ("probabilities", "logits")] if logits else []
    return [{"name": n, "datatype": d, "shape": s} for n, d, s in (
        ("score", "FP32", [-1]), ("is_ood", "BOOL", [-1]), ("pred_class", "INT64", [-1]),
        ("memory_index", "INT64", [-1, k]), ("memory_weight", "FP32", [-1, k]),
        ("energy", "FP32", [-1]), ("msp", "FP32", [-1]), ("energy_score", "FP32", [-1]),
        ("p_value", "FP32", [-1]), ("class_name", "BYTES", [-1]))] + one_pass


def _triton_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


@router.get("/models/{name}/config", responses=ERRORS)
@router.get("/models/{name}/versions/{version}/config", responses=ERRORS)
async def model_config(request: Request, name: str, version: str | None = None
                       ) -> dict[str, Any]:
    """Triton's model configuration: both inputs optional; the class names, the calibrated
    threshold and the bounds of a per-request threshold in ``parameters``."""
    check_model(request, name, version)
    m = scorer_of(request).meta
    lo, hi = log_lambda_range(m)
    tlo, thi = tpr_range(m)
    params = {"class_names": json.dumps(m.class_names), "threshold": m.threshold,
              "target_tpr": m.target_tpr, "log_lambda_range": [lo, hi],
              "target_tpr_range": [tlo, thi], "model_version": m.model_version}
    return {"name": m.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
            "max_batch_size": 0,  # dims below include the batch axis (-1)
            "input": [{"name": t["name"], "data_type": _triton_type(t["datatype"]),
                       "dims": t["shape"], "optional": True} for t in inputs_of(m)],
            "output": [{"name": t["name"], "data_type": _triton_type(t["datatype"]),
                        "dims": t["shape"]} for t in outputs_of(m)],
            "parameters": {k: {"string_value": v if isinstance(v, str) else json.dumps(v)}
                           for k, v in params.items()}}


@router.post("/repository/index", responses=ERRORS)
async def repository_index(request: Request) -> list[dict[str, str]]:
    m = scorer_of(request).meta
    ready = is_ready(request.app.state)
    return [{"name": m.name, "version": m.model_version,
             "state": "READY" if ready else "UNAVAILABLE",
             "reason": "" if ready else "starting or shutting down"}]


@router.post("/repository/models/{name}/load", responses=ERRORS)
async def load(request: Request, name: str) -> dict[str, Any]:
    """Reload the bundle from its configured path (hot: reload.py)."""
    check_model(request, name)
    body = await read_body(request, LOAD_BODY_BYTES)
    try:
        params = json.loads(body).get("parameters") if body.strip() else None
    except (ValueError, AttributeError):
        raise ClientError(400, "load: the body must be a JSON object") from None
    if params:
        raise ClientError(400, f"load takes no parameters (got {sorted(params)[:4]}): it "
                               "reloads the bundle file the server was started with")
    reloader: Reloader = request.app.state.reloader
    try:
        new = await reloader.reload()
    except BundleError as e:
        raise ClientError(400, f"load failed, still serving {scorer_of(request).meta.model_version}"
                               f": {e}") from None
    return {"name": new.meta.name, "version": new.meta.model_version}


@router.post("/repository/models/{name}/unload", responses=ERRORS)
async def unload(request: Request, name: str) -> None:
    check_model(request, name)
    raise ClientError(400, "unload is not supported: hopgate serves one model; replace its "
                           "bundle file and call load to serve another")


def _stats(s: Scorer) -> dict[str, Any]:
    st, m = s.stats, s.meta
    zero = {"count": 0, "ns": 0}
    return {"name": m.name, "version": m.model_version, "last_inference": st.last_ms,
            "inference_count": st.images, "execution_count": round(st.batches),
            "inference_stats": {
                "success": {"count": st.success, "ns": st.success_ns},
                "fail": {"count": st.failed, "ns": 0},
                "queue": {"count": st.success, "ns": st.queue_ns},
                "compute_input": zero,
                "compute_infer": {"count": st.success, "ns": st.compute_ns},
                "compute_output": zero, "cache_hit": zero, "cache_miss": zero},
            "batch_stats": []}


@router.get("/models/stats", responses=ERRORS)
async def all_statistics(request: Request) -> dict[str, Any]:
    """Triton's statistics of the bundle serving now, since it was loaded."""
    return {"model_stats": [_stats(scorer_of(request))]}


@router.get("/models/{name}/stats", responses=ERRORS)
@router.get("/models/{name}/versions/{version}/stats", responses=ERRORS)
async def statistics(request: Request, name: str, version: str | None = None
                     ) -> dict[str, Any]:
    check_model(request, name, version)
    return {"model_stats": [_stats(scorer_of(request))]}
