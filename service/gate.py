"""Gatekeeper mode: ID images go on to the upstream classifier, OOD images stop here.

With ``HOPGATE_UPSTREAM_URL`` set, /score scores every image as usual, then:
  * an ID image is POSTed (same bytes, same content type, ``traceparent``/``tracestate``
    passed through) to the upstream, and its answer is returned beside hopgate's verdict;
  * an OOD image never reaches the upstream: it is answered at once with the verdict,
    with ``HOPGATE_GATE_OOD_STATUS`` (default 422) and ``HOPGATE_GATE_OOD_BODY`` merged in;
  * an upstream that is down, errors or exceeds ``HOPGATE_UPSTREAM_TIMEOUT_S`` gets the
    policy: ``fail_closed`` answers 502 (down) / 504 (slow) and forwards nothing;
    ``fail_open`` answers 200 with hopgate's verdict and the upstream's error noted.
A single-image request takes the status of its outcome; a multi-image request answers 200
with ``upstream`` (or ``held_back``) per result (schema.ImageResult).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram

from .metrics import LATENCY_BUCKETS
from .schema import ErrorInfo, ScoreResponse, UpstreamAnswer

TRACE_HEADERS = ("traceparent", "tracestate")


class Gate:
    def __init__(self, url: str, timeout_s: float, policy: str, ood_status: int, ood_body: str,
                 registry: CollectorRegistry):
        if policy not in ("fail_open", "fail_closed"):
            raise ValueError("upstream policy must be fail_open or fail_closed")
        self.url, self.policy, self.ood_status = url, policy, ood_status
        self.ood_extra: dict[str, Any] = json.loads(ood_body) if ood_body else {}
        self.client = httpx.AsyncClient(timeout=timeout_s)
        self.calls = Counter("hopgate_upstream_calls", "Calls to the upstream by outcome",
                             ["outcome"], registry=registry)
        self.errors = Counter("hopgate_upstream_errors", "Upstream failures by kind", ["kind"],
                              registry=registry)
        self.latency = Histogram("hopgate_upstream_seconds", "Upstream latency",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.held_back = Counter("hopgate_upstream_held_back", "OOD images never forwarded",
                                 registry=registry)

    async def forward(self, blob: bytes, ctype: str, headers: dict[str, str]) -> UpstreamAnswer:
        t0 = time.perf_counter()
        try:
            r = await self.client.post(self.url, content=blob,
                                       headers={"content-type": ctype, **headers})
        except httpx.TimeoutException:
            self.errors.labels("timeout").inc()
            self.calls.labels("error").inc()
            return UpstreamAnswer(error="upstream timed out", status=504)
        except httpx.HTTPError as e:
            self.errors.labels("unreachable").inc()
            self.calls.labels("error").inc()
            return UpstreamAnswer(error=f"upstream unreachable: {type(e).__name__}", status=502)
        finally:
            self.latency.observe(time.perf_counter() - t0)
        self.calls.labels("ok" if r.status_code < 500 else "error").inc()
        if r.status_code >= 500:
            self.errors.labels("status").inc()
        body: Any
        try:
            body = r.json()
        except ValueError:
            body = r.text
        return UpstreamAnswer(status=r.status_code, body=body)

    async def __call__(self, request: Request, response: ScoreResponse,
                       blobs: Sequence[bytes | Exception]) -> JSONResponse:
        headers = {h: request.headers[h] for h in TRACE_HEADERS if h in request.headers}
        ctype = request.headers.get("content-type", "application/octet-stream")
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
                # multipart / JSON items are forwarded as raw image bytes
                item_type = ctype if ctype.startswith("image/") else "application/octet-stream"
                jobs[i] = self.forward(blob, item_type, headers)
        for i, answer in zip(jobs, await asyncio.gather(*jobs.values())):
            results[i].upstream = answer
        failed = [a for r in results if (a := r.upstream) is not None and a.error is not None]
        if failed and self.policy == "fail_closed":
            status = failed[0].status
            response.error = ErrorInfo(status=status, reason="upstream",
                                       message=failed[0].error or "upstream failed")
            return response.render(status)
        if len(results) == 1 and results[0].error is None:
            r = results[0]
            if r.ood:
                return response.render(self.ood_status, self.ood_extra)
            if r.upstream is not None and r.upstream.error is None:
                return response.render(r.upstream.status)
        return response.render(200)

    async def close(self) -> None:
        await self.client.aclose()
