"""``hopgate.client``: a Python client for a running hopgate service's ``POST /score``.

    from hopgate.client import Client
    with Client("http://127.0.0.1:8000") as c:
        r = c.score("shoe.png")                  # a path, bytes, a PIL image or a uint8 array
        print(r.ood, r.score, r.p_value, r.label)
        results = c.score_many(paths, batch_size=32)   # one Result per input, in order

``AsyncClient`` has the same methods as coroutines (``stream`` is an async iterator and keeps
``concurrency`` requests in flight). Both run on httpx and need neither torch nor the service.

* Batches: ``score_many``/``stream`` send ``batch_size`` images per multipart request, and
  split a request further so its body stays under ``max_request_bytes`` (the server refuses
  bodies over its ``max_body_bytes``, 20 MiB by default; a 413 for the whole body is split
  in halves and resent).
* Errors: an image the server could not score comes back as a ``Result`` with ``error`` set
  (its neighbours are unaffected), and so does a file the client could not read
  (``error.status`` 0). A request that fails as a whole (401, retries exhausted, server
  unreachable) raises ``ScoreError``.
* One pass: ``Client(url, top_k=3)`` asks every /score for the classifier's 3 most probable
  classes (``Result.probabilities``; ``logits=True`` adds each logit), for bundles that carry
  the classifier's logits, so no second call to the classifier is needed.
* Retries: 429 and 503 (queue full, draining) and refused connections are retried, waiting
  what ``Retry-After`` says (seconds or an HTTP date; else exponential backoff), at most
  ``Retry.attempts`` tries and ``Retry.budget_s`` seconds of waiting in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx

from .inputs import Image, by_bytes, chunks, encode, encode_all, merge
from .results import ClassProbability, ErrorInfo, Memory, ModelInfo, Result, ScoreError, Timings
from .retry import RETRY_STATUSES, Retry

__all__ = ["AsyncClient", "ClassProbability", "Client", "ErrorInfo", "Image", "Memory",
           "ModelInfo", "Result", "Retry", "ScoreError", "Timings"]

# whole-request refusals that are about the images, not the server: each image gets the error
PER_IMAGE_STATUSES = frozenset({400, 413, 415, 422})


class _Base:
    def __init__(self, url: str, api_key: str | None, retry: Retry | None,
                 max_request_bytes: int, top_k: int | None = None, logits: bool = False):
        self.url = url.rstrip("/")
        self.params: dict[str, str] = {}  # /score's query: the classifier's top-k (one pass)
        if top_k is not None:
            self.params["top_k"] = str(top_k)
        if logits:
            self.params["logits"] = "true"
        self.retry = retry or Retry()
        self.max_request_bytes = max_request_bytes
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model: ModelInfo | None = None  # from the latest answer

    def _answer(self, r: httpx.Response, n: int) -> list[Result]:
        """Results of an answered request, or ``ScoreError`` for a whole-request failure."""
        try:
            body: Any = r.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("results"), list):
            if isinstance(body.get("model"), dict):
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    self.model = ModelInfo.from_dict(body["model"])
            results = [Result.from_dict(d) for d in body["results"]]
            if len(results) != n:
                raise ScoreError(r.status_code, "bad_answer",
                                 f"{len(results)} results for {n} images")
            return results
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            raise ScoreError(r.status_code, str(err.get("reason", "")),
                             str(err.get("message", "")))
        raise ScoreError(r.status_code, "bad_answer", r.text[:200])

    def _wait(self, attempt: int, started: float, r: httpx.Response | None) -> float | None:
        """Seconds to wait before try ``attempt + 1``, or None when the retries are spent."""
        if attempt + 1 >= self.retry.attempts:
            return None
        wait = self.retry.delay(attempt, r.headers.get("retry-after") if r is not None else None)
        return None if time.monotonic() - started + wait > self.retry.budget_s else wait

    @staticmethod
    def _gave_up(r: httpx.Response | None, e: Exception | None, attempts: int) -> ScoreError:
        if r is None:
            return ScoreError(0, "unreachable", f"no answer after {attempts} tries: {e!r}")
        try:
            err = r.json().get("error") or {}
        except (ValueError, AttributeError):
            err = {}
        reason = err.get("reason", "unavailable") if isinstance(err, dict) else "unavailable"
        return ScoreError(r.status_code, reason, f"still {r.status_code} after {attempts} tries")

    @staticmethod
    def _files(parts: list[tuple[str, bytes]]) -> list[tuple[str, Any]]:
        return [("images", (name, data, "application/octet-stream")) for name, data in parts]

    @staticmethod
    def _split(e: ScoreError, n: int) -> bool | None:
        """After a whole-request ``e``: split and resend (True), fail each image (False), or
        raise (None)."""
        if e.status == 413 and n > 1:
            return True
        return False if e.status in PER_IMAGE_STATUSES else None


class Client(_Base):
    """Synchronous client. ``timeout`` is httpx's, per request (seconds; None: none)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float | None = 30.0,
                 retry: Retry | None = None, max_request_bytes: int = 8 << 20,
                 transport: httpx.BaseTransport | None = None, top_k: int | None = None,
                 logits: bool = False):
        super().__init__(url, api_key, retry, max_request_bytes, top_k, logits)
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=self.headers,
                                 transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def score(self, image: Image) -> Result:
        """One image's Result; an unreadable file or a bad array raises here."""
        return self._send([encode(image)])[0]

    def score_many(self, images: Iterable[Image], batch_size: int = 32) -> list[Result]:
        return list(self.stream(images, batch_size))

    def stream(self, images: Iterable[Image], batch_size: int = 32) -> Iterator[Result]:
        """Results in input order, a request of ``batch_size`` images at a time (lazy)."""
        for chunk in chunks(images, batch_size):
            parts = encode_all(chunk)
            sent = [p for p in parts if not isinstance(p, Result)]
            results = [r for g in by_bytes(sent, self.max_request_bytes) for r in self._send(g)]
            yield from merge(parts, results)

    def _send(self, parts: list[tuple[str, bytes]]) -> list[Result]:
        try:
            return self._post(parts)
        except ScoreError as e:
            split = self._split(e, len(parts))
            if split is None:
                raise
            if not split:
                return [Result.failed(e.status, e.reason, e.message)] * len(parts)
            half = len(parts) // 2
            return self._send(parts[:half]) + self._send(parts[half:])

    def _post(self, parts: list[tuple[str, bytes]]) -> list[Result]:
        started, attempt = time.monotonic(), 0
        while True:
            r: httpx.Response | None = None
            error: Exception | None = None
            try:
                r = self.http.post("/score", files=self._files(parts), params=self.params)
            except httpx.ConnectError as e:
                error = e
            if r is not None and r.status_code not in RETRY_STATUSES:
                return self._answer(r, len(parts))
            wait = self._wait(attempt, started, r)
            if wait is None:
                raise self._gave_up(r, error, attempt + 1)
            time.sleep(wait)
            attempt += 1


class AsyncClient(_Base):
    """The same client for asyncio. ``transport`` may be ``httpx.ASGITransport(app)``:
    hopgate-screen's in-process mode calls the service's app that way."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float | None = 30.0,
                 retry: Retry | None = None, max_request_bytes: int = 8 << 20,
                 transport: httpx.AsyncBaseTransport | None = None, top_k: int | None = None,
                 logits: bool = False):
        super().__init__(url, api_key, retry, max_request_bytes, top_k, logits)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=self.headers,
                                      transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def ready(self) -> bool:
        try:
            return (await self.http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def score(self, image: Image) -> Result:
        return (await self._send([await asyncio.to_thread(encode, image)]))[0]

    async def score_many(self, images: Iterable[Image], batch_size: int = 32,
                         concurrency: int = 2) -> list[Result]:
        return [r async for r in self.stream(images, batch_size, concurrency)]

    async def stream(self, images: Iterable[Image], batch_size: int = 32,
                     concurrency: int = 2) -> AsyncIterator[Result]:
        """Results in input order; ``concurrency`` requests in flight (files are read in a
        thread, so the event loop, and an in-process app on it, never waits on the disk)."""
        pending: deque[asyncio.Task[list[Result]]] = deque()
        try:
            for chunk in chunks(images, batch_size):
                pending.append(asyncio.create_task(self._chunk(chunk)))
                if len(pending) >= max(1, concurrency):
                    for r in await pending.popleft():
                        yield r
            while pending:
                for r in await pending.popleft():
                    yield r
        finally:
            for t in pending:
                t.cancel()

    async def _chunk(self, chunk: list[Image]) -> list[Result]:
        parts = await asyncio.to_thread(encode_all, chunk)
        sent = [p for p in parts if not isinstance(p, Result)]
        results = [r for g in by_bytes(sent, self.max_request_bytes) for r in await self._send(g)]
        return merge(parts, results)

    async def _send(self, parts: list[tuple[str, bytes]]) -> list[Result]:
        try:
            return await self._post(parts)
        except ScoreError as e:
            split = self._split(e, len(parts))
            if split is None:
                raise
            if not split:
                return [Result.failed(e.status, e.reason, e.message)] * len(parts)
            half = len(parts) // 2
            return await self._send(parts[:half]) + await self._send(parts[half:])

    async def _post(self, parts: list[tuple[str, bytes]]) -> list[Result]:
        started, attempt = time.monotonic(), 0
        while True:
            r: httpx.Response | None = None
            error: Exception | None = None
            try:
                r = await self.http.post("/score", files=self._files(parts),
                                         params=self.params)
            except httpx.ConnectError as e:
                error = e
            if r is not None and r.status_code not in RETRY_STATUSES:
                return self._answer(r, len(parts))
            wait = self._wait(attempt, started, r)
            if wait is None:
                raise self._gave_up(r, error, attempt + 1)
            await asyncio.sleep(wait)
            attempt += 1
