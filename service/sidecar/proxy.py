"""The transparent sidecar: the classifier's own routes, proxied through the gate.

With ``HOPGATE_PROXY_ROUTES`` (exact paths, e.g. ``["/predict"]``) and
``HOPGATE_UPSTREAM_URL`` set, a request on one of those paths (methods
``HOPGATE_PROXY_METHODS``, default POST) is what the client would have sent the classifier.
hopgate finds the images in its body, scores them, and then:

  * every image ID: the request goes on to the upstream's origin (scheme, host and port of
    ``HOPGATE_UPSTREAM_URL``) at the same path and query, with the same method, body bytes and
    headers (hop-by-hop headers and ``Host`` excepted; ``Accept-Encoding`` is the client's or
    ``identity``; ``X-Request-ID`` is the request id hopgate logs it under); the upstream's
    answer comes back unchanged (status, body as sent, headers but hop-by-hop, ``Date``,
    ``Server``, ``X-Request-ID`` and any ``X-Hopgate-*``), plus the verdict headers
    (``verdict_headers``);
  * any image OOD (``enforce`` mode): the upstream never sees the request; the answer is the
    configured refusal, as /score's (``HOPGATE_GATE_OOD_STATUS`` with the verdicts and
    ``HOPGATE_GATE_OOD_BODY`` merged in), with the verdict headers;
  * ``shadow`` mode (``HOPGATE_GATE_MODE=shadow``): everything is forwarded, OOD too, and only
    labelled (headers) and counted (``hopgate_proxied_requests_total{mode,verdict}``); a
    request hopgate could not score (queue full, a broken image) goes on unscored.

Where the images are (``find_images``, by magic bytes, never by the declared type, so a
mislabelled image is still scored): the whole body; each part of a multipart body (form fields
that are not images pass along with it); each string of a JSON document that is base64 of an
image or a ``data:`` URL of one, anywhere in the document. A body with no image in it is
``unscored``: refused with 415 (``HOPGATE_PROXY_UNSCORED=refuse``, the default: a gate that
forwards what it cannot read is a bypass) or forwarded with ``X-Hopgate-OOD: unscored``
(``pass``). In enforce mode a broken image or a busy scorer gets hopgate's own error answer.

Upstream failures follow gate.py's counters and policy: unreachable, slow or oversized answers
get 502 / 504 (reason ``upstream``) under either policy (there is no answer to pass on); an
upstream 5xx is replaced by 502 under ``fail_closed`` and passed on as is under ``fail_open``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response

from ..config import Settings
from ..errors import ClientError, ImageError, ServingError
from ..imaging import sniff
from ..lifecycle import require_ready, scorer_of
from ..parsing import multipart_parts, read_body, request_deadline
from ..schema import ImageResult, ScoreResponse
from .gate import Gate, UpstreamFailed

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade", "host", "content-length"})
NOT_PASSED_BACK = HOP_BY_HOP | {"date", "server", "x-request-id"}  # uvicorn / the envelope's
INLINE_BYTES = 64 * 1024  # smaller bodies are searched on the event loop


def _is_image(blob: bytes) -> bool:
    try:
        sniff(blob)
        return True
    except ImageError:
        return False


def _json_strings(doc: Any) -> list[str]:
    """Every string value in a JSON document (iteratively: no recursion limit to hit)."""
    out, stack = [], [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
        elif isinstance(x, list):
            stack.extend(reversed(x))
    return out


def _base64_image(s: str) -> bytes | ImageError | None:
    """The image a string encodes (base64, or a base64 ``data:`` URL), None if it is none.
    A string whose first bytes are an image's but whose rest does not decode is a broken
    image (it fails, rather than slipping past unscored)."""
    if s.startswith("data:"):
        head, _, s = s.partition(",")
        if not head.endswith(";base64"):
            return None
    if len(s) < 16:
        return None
    try:
        if not _is_image(base64.b64decode(s[:16])):
            return None
    except (binascii.Error, ValueError):
        return None
    try:
        return base64.b64decode(s)
    except (binascii.Error, ValueError):
        return ImageError(400, "a base64 image in the JSON body does not decode")


def find_images(body: bytes, content_type: str, max_parts: int) -> list[bytes | ImageError]:
    """The encoded images in a request body (see the module docstring), in body order."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return [p for p in multipart_parts(body, content_type, max_parts) if _is_image(p)]
    if kind == "application/json" or kind.endswith("+json"):
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            return []  # not JSON after all: no image found (the classifier will say so)
        found = (_base64_image(s) for s in _json_strings(doc))
        return [b for b in found if b is not None]
    return [body] if _is_image(body) else []


def verdict_headers(results: list[ImageResult], version: str) -> dict[str, str]:
    """``X-Hopgate-OOD`` (true when any image is OOD, ``unscored`` without a verdict),
    ``X-Hopgate-Score`` and ``X-Hopgate-P-Value`` (one value per image, in body order,
    comma-separated), ``X-Hopgate-Model-Version``."""
    headers = {"x-hopgate-model-version": version}
    if not results or any(r.ood is None for r in results):
        headers["x-hopgate-ood"] = "unscored"
        return headers
    headers["x-hopgate-ood"] = "true" if any(r.ood for r in results) else "false"
    headers["x-hopgate-score"] = ",".join(repr(r.score) for r in results)
    headers["x-hopgate-p-value"] = ",".join(repr(r.p_value) for r in results)
    return headers


def upstream_url(settings: Settings, request: Request) -> str:
    """The upstream's origin, the request's own path and query."""
    base = httpx.URL(settings.upstream_url or "")
    query = request.url.query.encode() or None  # b"" would send "/predict?"
    return str(base.copy_with(path=request.url.path, query=query))


def forwarded_request_headers(request: Request) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
    headers.setdefault("accept-encoding", "identity")  # else httpx asks for gzip itself
    headers["x-request-id"] = request.state.request_id  # one id in both services' logs
    return headers


async def _score(request: Request, body: bytes, settings: Settings) -> list[ImageResult]:
    """The verdicts of the body's images ([] when it has none); whole-request errors raise."""
    ctype = request.headers.get("content-type", "")
    max_parts = 4 * settings.max_images + 64
    if len(body) <= INLINE_BYTES:
        blobs = find_images(body, ctype, max_parts)
    else:
        blobs = await asyncio.to_thread(find_images, body, ctype, max_parts)
    if len(blobs) > settings.max_images:
        raise ClientError(413, f"{len(blobs)} images in one request; the limit is "
                               f"{settings.max_images}")
    request.state.images = len(blobs)
    if not blobs:
        return []
    return await scorer_of(request).score(blobs, request_deadline(request, settings.deadline_ms))


async def proxy(request: Request) -> Response:
    """The route handler of every proxied path (app.py registers it)."""
    require_ready(request)
    settings: Settings = request.app.state.settings
    gate: Gate = request.app.state.gate
    scorer = scorer_of(request)
    shadow = settings.gate_mode == "shadow"
    body = await read_body(request, settings.max_body_bytes)
    try:
        results = await _score(request, body, settings)
    except ServingError:
        if not shadow:
            raise
        results = []  # shadow mode never costs the classifier a request
    failed = [r.error for r in results if r.error is not None]
    if failed and not shadow:
        e = failed[0]
        raise ServingError(e.status, e.message, e.reason)
    headers = verdict_headers([] if failed else results, scorer.model_info().version)
    verdict = {"true": "ood", "false": "id"}.get(headers["x-hopgate-ood"], "unscored")
    gate.proxied.labels(settings.gate_mode, verdict).inc()
    if not shadow and verdict == "unscored" and settings.proxy_unscored == "refuse":
        raise ClientError(415, "no image found in the body (raw image, multipart parts, or "
                               "base64 strings in JSON): refused unscored")
    if not shadow and verdict == "ood":
        for r in results:
            if r.ood:
                r.held_back = True
        gate.held_back.inc(sum(bool(r.ood) for r in results))
        request.state.reason = "ood" if gate.ood_status >= 400 else None
        refusal = ScoreResponse(results=results, model=scorer.model_info())
        answer = refusal.render(gate.ood_status, gate.ood_extra)
        answer.headers.update(headers)
        return answer
    try:
        up, raw = await gate.fetch(request.method, upstream_url(settings, request), body,
                                  forwarded_request_headers(request), raw=True)
    except UpstreamFailed as e:
        raise ServingError(e.status, e.message, "upstream") from None
    if up.status_code >= 500:
        gate.failed(UpstreamFailed("status", f"upstream answered {up.status_code}", 502))
        if gate.policy == "fail_closed":
            raise ServingError(502, f"upstream answered {up.status_code}", "upstream")
        request.state.reason = "upstream"
    else:
        gate.calls.labels("ok").inc()
        if up.status_code >= 400:
            request.state.reason = "bad_input"  # the classifier's own refusal, passed on
    passed = Response(raw, up.status_code)
    passed.raw_headers += [
        (k, v) for k, v in up.headers.raw
        if k.lower().decode("latin-1") not in NOT_PASSED_BACK
        and not k.lower().startswith(b"x-hopgate-")]
    passed.raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
    return passed
