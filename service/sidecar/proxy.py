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
  * ``shadow`` mode (``HOPGATE_GATE_MODE=shadow``): everything is forwarded while it is
    scored, OOD too, and only labelled (headers) and counted
    (``hopgate_proxied_requests_total{mode,verdict}``); the classifier's answer is never
    changed (its 5xx too, whatever the policy); a request hopgate could not score (queue
    full, a broken image) goes on unscored;
  * ``speculative`` (``HOPGATE_SPECULATIVE``, enforce mode): forwarded while it is scored;
    the classifier's answer is released only for an ID verdict, else dropped (the
    connection closed) and the refusal sent: the classifier does see OOD images.

Where the images are (``find_images``, by magic bytes, never by the declared type, so a
mislabelled image is still scored): the whole body; each part of a multipart body (form fields
that are not images pass along with it); each string of a JSON document that is base64 of an
image or a ``data:`` URL of one, anywhere in the document. A body with no image in it is
``unscored``: refused with 415 (``HOPGATE_PROXY_UNSCORED=refuse``, the default: a gate that
forwards what it cannot read is a bypass) or forwarded with ``X-Hopgate-OOD: unscored``
(``pass``). In enforce mode a broken image or a busy scorer gets hopgate's own error answer.

Upstream failures follow gate.py's counters and policy: unreachable or slow (to the answer's
head) get 502 / 504 (reason ``upstream``) under either policy (there is no answer to pass
on); an upstream 5xx is replaced by 502 under ``fail_closed`` and passed on as is under
``fail_open`` and in shadow mode. Every answer to a scored request carries the verdict
headers, refusals and hopgate's 502 / 504 included.

The thin path (issue 24): the classifier is called with upstream.py's pooled keep-alive
client (no headers added, head and body in one write); a small answer with a length comes
back in one piece, any other is streamed through as it arrives (never held whole).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from typing import Any, NamedTuple

from fastapi import Request
from fastapi.responses import Response

from ..config import Settings
from ..errors import ClientError, ImageError, ServingError, error_response
from ..imaging import sniff
from ..lifecycle import require_ready, scorer_of
from ..parsing import multipart_parts, read_body, request_deadline
from ..schema import ScoreResponse
from ..scoring import Row
from .gate import Gate, UpstreamFailed, verdict_headers
from .passthrough import HOP_BY_HOP, passed_back, target
from .upstream import Answer, UpstreamError, within

HOP_BY_HOP_RAW = HOP_BY_HOP
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


def forwarded_request_headers(request: Request) -> list[tuple[bytes, bytes]]:
    """The client's headers as sent, but hop-by-hop ones and ``Host``; ``X-Request-ID`` is
    the id hopgate logs the request under (one id in both services' logs)."""
    headers = [(k, v) for k, v in request.scope["headers"]
               if k not in HOP_BY_HOP_RAW and k != b"x-request-id"]
    headers.append((b"x-request-id", request.state.request_id.encode()))
    return headers


class Verdict(NamedTuple):
    """What the verdict headers need of one image (no ``ImageResult`` on the ID path)."""

    ood: bool
    score: float
    p_value: float


async def _score(request: Request, body: bytes, settings: Settings, beside: bool
                 ) -> list[Row | ServingError]:
    """The raw rows of the body's images ([] when it has none); whole-request errors raise.
    ``beside``: the classifier is computing meanwhile (speculative and shadow mode)."""
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
    return await scorer_of(request).rows(blobs, request_deadline(request, settings.deadline_ms),
                                         beside=beside)


async def _call(request: Request, gate: Gate, body: bytes) -> Answer:
    """The classifier's status and headers (its body still to read); ``UpstreamFailed``
    (counted) when there is none in time."""
    t0 = time.perf_counter()
    try:
        return await within(gate.timeout_s, gate.upstream.request(
            request.method, target(request.scope), forwarded_request_headers(request), body))
    except TimeoutError:
        raise gate.failed(UpstreamFailed("timeout", "upstream timed out", 504)) from None
    except UpstreamError as e:
        raise gate.failed(UpstreamFailed("unreachable", f"upstream unreachable: {e}",
                                         502)) from None
    finally:
        gate.latency.observe(time.perf_counter() - t0)


async def _drop(call: asyncio.Task[Answer]) -> None:
    """A speculative call whose answer is not wanted: cancelled, its connection closed."""
    call.cancel()
    try:
        answer = await call
    except BaseException:  # noqa: BLE001  (cancelled, or it had failed: nothing to close)
        return
    answer.close()


def _failure(e: UpstreamFailed, verdict: dict[str, str]) -> Response:
    """hopgate's 502 / 504 for a scored request: the verdict headers included."""
    answer = error_response(ServingError(e.status, e.message, "upstream"))
    answer.headers.update(verdict)
    return answer


async def proxy(request: Request) -> Response:
    """The route handler of every proxied path (app.py registers it). Enforce mode scores,
    then forwards an ID request (``speculative``: forwards while scoring, and drops the
    classifier's answer to an OOD request); shadow mode forwards while scoring, always, and
    passes the classifier's answer on whatever it is."""
    require_ready(request)
    settings: Settings = request.app.state.settings
    gate: Gate = request.app.state.gate
    scorer = scorer_of(request)
    shadow = settings.gate_mode == "shadow"
    body = await read_body(request, settings.max_body_bytes)
    call = (asyncio.ensure_future(_call(request, gate, body))
            if shadow or settings.speculative else None)
    if call is not None:
        await asyncio.sleep(0)  # the call starts (on a pooled connection: the request is sent)
    try:
        # with the classifier at work meanwhile, often on the same node's cores (a sidecar),
        # a lone image keeps to its worker's thread: spinning every core under the
        # classifier's feet delayed its answer to the gate by 0.4 ms at p50 (sidecar.py)
        rows = await _score(request, body, settings, beside=call is not None)
    except ServingError:
        if not shadow:
            if call is not None:
                await _drop(call)
            raise
        rows = []  # shadow mode never costs the classifier a request
    failed = [scorer.failed(r).error for r in rows if isinstance(r, ServingError)]
    if failed and not shadow:
        if call is not None:
            await _drop(call)
        e = failed[0]
        assert e is not None
        raise ServingError(e.status, e.message, e.reason)
    meta = scorer.meta
    verdicts = [] if failed else [
        Verdict(bool(r["is_ood"]), float(r["score"]), meta.p_value(float(r["score"])))
        for r in rows if isinstance(r, dict)]
    headers = verdict_headers(verdicts, meta.model_version)
    verdict = {"true": "ood", "false": "id"}.get(headers["x-hopgate-ood"], "unscored")
    gate.proxied.labels(settings.gate_mode, verdict).inc()
    if not shadow and verdict == "unscored" and settings.proxy_unscored == "refuse":
        if call is not None:
            await _drop(call)
        raise ClientError(415, "no image found in the body (raw image, multipart parts, or "
                               "base64 strings in JSON): refused unscored")
    if not shadow and verdict == "ood":
        if call is not None:
            await _drop(call)  # the classifier saw it (speculative), its answer goes nowhere
        results = [scorer.result(r) for r in rows if isinstance(r, dict)]  # counts them too
        for r in results:
            if r.ood:
                r.held_back = True
        gate.held_back.inc(sum(bool(r.ood) for r in results))
        request.state.reason = "ood" if gate.ood_status >= 400 else None
        refusal = ScoreResponse(results=results, model=scorer.model_info())
        answer = refusal.render(gate.ood_status, gate.ood_extra)
        answer.headers.update(headers)
        return answer
    for v in verdicts:  # the OOD rate and drift (scorer.result counts the refused ones)
        scorer.metrics.verdict(v.ood, v.score)
    try:
        up = await (call if call is not None else _call(request, gate, body))
    except UpstreamFailed as e:
        request.state.reason = "upstream"
        return _failure(e, headers)
    if up.status >= 500:
        failure = gate.failed(UpstreamFailed("status", f"upstream answered {up.status}", 502))
        request.state.reason = "upstream"
        if gate.policy == "fail_closed" and not shadow:  # shadow never changes the answer
            up.close()
            return _failure(failure, headers)
    else:
        gate.calls.labels("ok").inc()
        if up.status >= 400:
            request.state.reason = "bad_input"  # the classifier's own refusal, passed on
    try:
        return await passed_back(up, gate, headers)
    except UpstreamFailed as e:
        return _failure(e, headers)
