"""``POST /score``: the documented route over the scoring core.

Request life: readiness -> deadline -> split the body into images (parsing.py) -> score them
(scoring.Scorer: a bad image fails alone) -> in gatekeeper mode hand the response to the gate
(sidecar/gate.py) -> answer with ``schema.ScoreResponse``. The request is 200 unless every image
failed, in which case it gets the (first) image's status. ``?target_tpr=`` or
``?log_lambda=`` (or their headers) set this request's threshold (threshold.py).
``?top_k=K`` (and ``?logits=true``) add the classifier's own K most probable classes to each
result, for bundles that carry its logits (the one-pass shape: docs/deploy.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import ClientError
from ..lifecycle import require_ready, scorer_of
from ..parsing import request_deadline, split_images
from ..schema import ScoreResponse
from ..scoring import Scorer
from ..threshold import from_query

router = APIRouter()

_BINARY = {"schema": {"type": "string", "format": "binary"}}
SCORE_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "image/png": _BINARY,
    "image/jpeg": _BINARY,
    "image/webp": _BINARY,
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "byte"}}}}},
}}, "parameters": [
    {"name": "target_tpr", "in": "query", "required": False, "schema": {"type": "number"},
     "description": "This request's threshold as the share of ID images to keep, within "
                    "[1/m, 1 - 1/m] (m: the bundle's calibration size). Not with log_lambda"},
    {"name": "log_lambda", "in": "query", "required": False, "schema": {"type": "number"},
     "description": "This request's log-domain threshold, within the calibration scores' "
                    "range. Not with target_tpr"},
    {"name": "top_k", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1},
     "description": "Add the classifier's K most probable classes (softmax of its logits) "
                    "to each result; bundles with a logits output only"},
    {"name": "logits", "in": "query", "required": False, "schema": {"type": "boolean"},
     "description": "With top_k (alone: every class), each class's logit too"}]}
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {} for s in (400, 401, 413, 415, 422, 429, 503, 504)}


def probabilities_wanted(query: Mapping[str, str], scorer: Scorer) -> tuple[int | None, bool]:
    """``top_k`` (None: not asked) and ``logits`` from the query; 400 for a bad value or a
    bundle without the classifier's logits."""
    k, logits = query.get("top_k"), query.get("logits", "false").lower()
    if logits not in ("true", "false", "1", "0"):
        raise ClientError(400, "logits must be true or false")
    with_logits = logits in ("true", "1")
    if k is None and not with_logits:
        return None, False
    classes = len(scorer.meta.class_names)
    if not scorer.runtime.has_logits:
        raise ClientError(400, "top_k/logits need a bundle that carries the classifier's logits "
                               "(a 'logits' output: attached bundles, and bundles built since "
                               "hopgate added it); this one has none")
    if k is None:
        return classes, with_logits
    if not k.isdigit() or not 1 <= int(k) <= classes:
        raise ClientError(400, f"top_k must be a whole number from 1 to {classes}")
    return int(k), with_logits


@router.post("/score", response_model=ScoreResponse, openapi_extra=SCORE_BODY, responses=_ERRORS,
             summary="Score one or many images: ID or OOD, with score, p-value, class, memories")
async def score(request: Request) -> JSONResponse:
    require_ready(request)
    scorer = scorer_of(request)
    settings = scorer.settings
    deadline = request_deadline(request, settings.deadline_ms)
    log_lambda = from_query(scorer.meta, scorer.overridable, request.query_params,
                            request.headers)
    top_k, with_logits = probabilities_wanted(request.query_params, scorer)
    blobs = await split_images(request, settings)
    request.state.images = len(blobs)
    results = await scorer.score(blobs, deadline, log_lambda, top_k, with_logits)
    errors = [r.error for r in results if r.error is not None]
    status = errors[0].status if len(errors) == len(results) else 200
    if errors and status != 200:
        request.state.reason = errors[0].reason
    response = ScoreResponse(results=results, model=scorer.model_info())
    gate = request.app.state.gate
    if gate is not None and status == 200:
        return await gate(request, response, blobs)
    return response.render(status)
