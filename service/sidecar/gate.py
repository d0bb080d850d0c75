"""Gatekeeper mode: ID images go on to the upstream classifier, OOD images stop here.

With ``HOPGATE_UPSTREAM_URL`` set, /score scores every image as usual, then:
  * an ID image is POSTed (same bytes, same content type, ``traceparent``/``tracestate``
    passed through) to the upstream, and its answer is returned beside hopgate's verdict;
  * an OOD image never reaches the upstream: it is answered at once with the verdict,
    with ``HOPGATE_GATE_OOD_STATUS`` (default 422) and ``HOPGATE_GATE_OOD_BODY`` merged in;
  * an upstream that is down, answers 5xx, answers more than
    ``HOPGATE_UPSTREAM_MAX_BODY_BYTES`` or takes longer than ``HOPGATE_UPSTREAM_TIMEOUT_S``
    (the whole call) gets the policy: ``fail_closed`` answers 502 (down, 5xx, too big) / 504
    (slow); ``fail_open`` answers 200 with hopgate's verdict and the upstream's error noted.
  * forwarded headers are sanitised: a raw image body goes on with the client's
    ``image/<subtype>`` (without parameters, when well-formed); otherwise, and for a multipart
    part or JSON item (each goes on alone), with the type of its bytes (``image/png``,
    ``image/jpeg``, ``image/gif``, ``image/webp``, ``image/bmp``, ``image/tiff``, from their
    magic bytes; else ``application/octet-stream``);
    ``traceparent`` goes on only in its W3C form, ``tracestate`` only as printable ASCII of at
    most 512 characters.
A single-image request takes the status of its outcome; a multi-image request answers 200
with ``upstream`` (or ``held_back``) per result (schema.ImageResult).

In gatekeeper mode the answers carry the verdict headers too (``verdict_headers``: the 502 /
504 of a failed upstream and the OOD refusal included). The transparent sidecar (proxy.py,
passthrough.py) shares the counters and the policy, and calls the classifier with the thin
pooled client of upstream.py (``Gate.upstream``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram

from ..errors import ImageError
from ..imaging import sniff
from ..metrics import LATENCY_BUCKETS
from ..schema import ErrorInfo, ImageResult, ScoreResponse, UpstreamAnswer
from .upstream import Client

TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[\x21-\x7e]*)?")
TRACESTATE = re.compile(r"[\x20-\x7e]{1,512}")
IMAGE_TYPE = re.compile(r"image/[A-Za-z0-9][A-Za-z0-9.+-]{0,62}")


class UpstreamTooBig(Exception):
    pass


def forwarded_headers(request: Request) -> dict[str, str]:
    """The trace headers that go on, only where well-formed (never non-ASCII bytes)."""
    out = {}
    tp, ts = request.headers.get("traceparent"), request.headers.get("tracestate")
    if tp is not None and TRACEPARENT.fullmatch(tp.strip()):
        out["traceparent"] = tp.strip()
        if ts is not None and TRACESTATE.fullmatch(ts.strip()):
            out["tracestate"] = ts.strip()
    return out


def forwarded_type(request: Request) -> str | None:
    """``image/<subtype>`` as the client sent it (a raw image body), else None: each multipart
    part or JSON item goes on with the type of its own bytes (``item_type``)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return ctype if IMAGE_TYPE.fullmatch(ctype) else None


def item_type(blob: bytes) -> str:
    """The content type of one encoded image, from its magic bytes (imaging.sniff)."""
    try:
        return f"image/{sniff(blob).lower()}"
    except ImageError:
        return "application/octet-stream"


def verdict_headers(results: Sequence[ImageResult] | Sequence[Any], version: str) -> dict[str, str]:
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


class UpstreamFailed(Exception):
    """No usable answer from the upstream: ``kind`` (the errors counter's label), the status
    hopgate answers in its place (502, or 504 when slow), and why."""

    def __init__(self, kind: str, message: str, status: int):
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status


class Gate:
    def __init__(self, url: str, timeout_s: float, policy: str, ood_status: int, ood_body: str,
                 registry: CollectorRegistry, max_body_bytes: int = 1024 * 1024):
        if policy not in ("fail_open", "fail_closed"):
            raise ValueError("upstream policy must be fail_open or fail_closed")
        self.url, self.policy, self.ood_status = url, policy, ood_status
        self.timeout_s, self.max_body_bytes = timeout_s, max_body_bytes
        self.ood_extra: dict[str, Any] = json.loads(ood_body) if ood_body else {}
        self.client = httpx.AsyncClient(timeout=timeout_s)  # /score's forwards
        self.upstream = Client(url)  # the sidecar's (proxy.py, passthrough.py): thin, pooled
        self.calls = Counter("hopgate_upstream_calls", "Calls to the upstream by outcome",
                             ["outcome"], registry=registry)
        self.errors = Counter("hopgate_upstream_errors", "Upstream failures by kind", ["kind"],
                              registry=registry)
        self.latency = Histogram("hopgate_upstream_seconds", "Upstream latency",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.held_back = Counter("hopgate_upstream_held_back", "OOD images never forwarded",
                                 registry=registry)
        self.proxied = Counter("hopgate_proxied_requests", "Requests on the classifier's own "
                               "routes (proxy.py) by gate mode and verdict (id, ood, unscored)",
                               ["mode", "verdict"], registry=registry)
        self.passed = Counter("hopgate_passthrough_requests", "Sidecar: requests on the "
                              "classifier's other routes, passed through unscored, by status "
                              "class", ["code"], registry=registry)

    async def _send(self, method: str, url: str, blob: bytes, headers: dict[str, str],
                    raw: bool) -> tuple[httpx.Response, bytes]:
        """The upstream's answer and its body, read up to ``max_body_bytes`` (``raw``: as
        sent, still content-encoded)."""
        async with self.client.stream(method, url, content=blob, headers=headers) as r:
            length = r.headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body_bytes:
                raise UpstreamTooBig
            chunks, size = [], 0
            async for chunk in (r.aiter_raw() if raw else r.aiter_bytes()):
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise UpstreamTooBig
                chunks.append(chunk)
            return r, b"".join(chunks)

    def failed(self, e: UpstreamFailed) -> UpstreamFailed:
        """Count a failure (the upstream's own 5xx included) and hand it back."""
        self.errors.labels(e.kind).inc()
        self.calls.labels("error").inc()
        return e

    async def fetch(self, method: str, url: str, blob: bytes, headers: dict[str, str],
                    raw: bool = False) -> tuple[httpx.Response, bytes]:
        """One call under the timeout (the whole call) and the size bound; a failure to get
        an answer raises ``UpstreamFailed`` (counted). A 5xx answer is returned: the caller
        decides (``forward``: a failure; proxy.py: the policy)."""
        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(self._send(method, url, blob, headers, raw),
                                          self.timeout_s)
        except (httpx.TimeoutException, asyncio.TimeoutError):
            raise self.failed(UpstreamFailed("timeout", "upstream timed out", 504)) from None
        except UpstreamTooBig:
            raise self.failed(UpstreamFailed(
                "too_big", f"upstream answer over {self.max_body_bytes} bytes", 502)) from None
        except httpx.HTTPError as e:
            raise self.failed(UpstreamFailed(
                "unreachable", f"upstream unreachable: {type(e).__name__}", 502)) from None
        finally:
            self.latency.observe(time.perf_counter() - t0)

    async def forward(self, blob: bytes, ctype: str, headers: dict[str, str]) -> UpstreamAnswer:
        try:
            r, raw = await self.fetch("POST", self.url, blob, {**headers, "content-type": ctype})
        except UpstreamFailed as e:
            return UpstreamAnswer(error=e.message, status=e.status)
        if r.status_code >= 500:  # the policy applies: the upstream could not classify it
            bad = self.failed(UpstreamFailed("status", f"upstream answered {r.status_code}", 502))
            return UpstreamAnswer(error=bad.message, status=bad.status)
        self.calls.labels("ok").inc()
        body: Any
        try:
            body = json.loads(raw)
        except ValueError:  # also UnicodeDecodeError; RecursionError below
            body = raw.decode("utf-8", "replace")
        except RecursionError:
            body = raw.decode("utf-8", "replace")
        return UpstreamAnswer(status=r.status_code, body=body)

    async def __call__(self, request: Request, response: ScoreResponse,
                       blobs: Sequence[bytes | Exception]) -> JSONResponse:
        answer = await self._answer(request, response, blobs)
        scored = [r for r in response.results if r.error is None]
        answer.headers.update(verdict_headers(scored, response.model.version))
        return answer

    async def _answer(self, request: Request, response: ScoreResponse,
                      blobs: Sequence[bytes | Exception]) -> JSONResponse:
        headers, raw_type = forwarded_headers(request), forwarded_type(request)
        results = response.results
        jobs = {}
        for i, r in enumerate(results):
            blob = blobs[i]
            if r.error is not None or not isinstance(blob, bytes):
                continue
            if r.ood:
                self.held_back.inc()
                r.held_back = True
            else:
                jobs[i] = self.forward(blob, raw_type or item_type(blob), headers)
        for i, answer in zip(jobs, await asyncio.gather(*jobs.values())):
            results[i].upstream = answer
        failed = [a for r in results if (a := r.upstream) is not None and a.error is not None]
        if failed and self.policy == "fail_closed":
            status = failed[0].status
            request.state.reason = "upstream"
            response.error = ErrorInfo(status=status, reason="upstream",
                                       message=failed[0].error or "upstream failed")
            return response.render(status)
        if len(results) == 1 and results[0].error is None:
            r = results[0]
            if r.ood:
                request.state.reason = "ood" if self.ood_status >= 400 else None
                return response.render(self.ood_status, self.ood_extra)
            if r.upstream is not None and r.upstream.error is None:
                return response.render(r.upstream.status)
        return response.render(200)

    async def close(self) -> None:
        await self.client.aclose()
        await self.upstream.aclose()
