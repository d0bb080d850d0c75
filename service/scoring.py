"""The scoring core (data plane) that /score, V2 and the gate all use: decode -> batcher ->
results. One ``Scorer`` per app, built at startup (lifecycle.py).

  * ``decode_all``: encoded bytes -> uint8 ``[H, W, C]`` arrays, admitted before decoding and
    decoded under the request's deadline, small ones on the loop, others in a thread pool
    (decoding.py); a bad or late image
    becomes its own error, its neighbours go on.
  * ``run``: queue decoded images in the batcher under the request's deadline; one raw output
    row per image (the bundle's outputs plus timings) or the ``ServingError`` of that image.
    A full queue or a shutdown fails the whole request at once (``Unavailable``).
  * ``result``: a raw row -> ``schema.ImageResult`` (the documented /score result).
  * ``score``: the three in a row for /score, one ``ImageResult`` per input in order.

``run`` and ``score`` take the request's threshold (``log_lambda``, threshold.py; None: the
bundle's). A ``Scorer`` is one loaded bundle: a reload (reload.py) builds a new one beside
it; ``users`` counts the requests pinned to it, ``stats`` feeds V2 statistics (v2/repository.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from hopgate import __version__
from hopgate.bundle import LOGITS

from .batcher import Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from .config import Settings
from .decoding import INLINE_IMAGES, DecodePool, decode_cost
from .errors import ImageError, ServingError, Unavailable, deadline_exceeded, internal_error
from .metrics import Metrics
from .runtime.session import Runtime
from .schema import ClassProbability, ErrorInfo, ImageResult, ModelInfo, Timings, named_memory

Row = dict[str, Any]  # the bundle's outputs for one image, plus queue_s, compute_s, batch


@dataclass
class Stats:
    """Since this bundle was loaded: requests that reached the batcher, and their images."""

    success: int = 0
    failed: int = 0
    images: int = 0
    batches: float = 0.0  # each image counts 1/(its batch's size)
    success_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    last_ms: int = 0  # wall clock of the last inference, ms since the epoch


class Scorer:
    """Decode -> batch -> results."""

    def __init__(self, settings: Settings, runtime: Runtime, metrics: Metrics, batcher: Batcher):
        self.settings, self.runtime = settings, runtime
        self.metrics, self.batcher = metrics, batcher
        self.meta = runtime.meta
        m = runtime.meta
        self.decoder = DecodePool(settings, m.height, m.width, m.channels, m.pixels)
        self._model_info = ModelInfo(  # the same for every answer: built once
            name=m.name, version=m.model_version, provider=runtime.provider,
            threshold=m.threshold, target_tpr=m.target_tpr, classes=m.class_names,
            hopgate_version=__version__)
        self.app_state: Any = None  # lifecycle.py sets it (its ``admission``: admission.py)
        self.overridable = runtime.has_log_lambda  # the threshold can be set per request
        self.users = 0  # requests pinned to this scorer (lifecycle.Pin), for a reload's drain
        self.unused = asyncio.Event()  # set by lifecycle.Pin when ``users`` falls to 0
        self.stats = Stats()

    def alone(self) -> bool:
        """No other scoring request is in flight on the machine (admission.Admission.alone)."""
        admission = getattr(self.app_state, "admission", None)
        return admission is not None and admission.alone()

    def model_info(self) -> ModelInfo:
        return self._model_info

    def _queue_full(self) -> Unavailable:
        return Unavailable(self.settings.reject_status, "queue full, retry later", "queue_full",
                           self.settings.retry_after_s)

    async def decode_all(self, blobs: list[bytes], deadline: float | None = None
                         ) -> list[np.ndarray | ServingError]:
        """Decode under decoding.DecodePool's bounds. Admission comes first, before any pixel
        is decoded: the batcher's queue must have room for the images and the decode queue
        must take them (else ``Unavailable``, the whole request). Small images are decoded
        on the event loop at once (``DecodePool.inline``), the others in the pool. Each entry
        is the image or its own error (``ImageError``, or 504 ``deadline`` when it was not
        decoded in time; ``deadline`` defaults to the server's)."""
        if not blobs:
            return []
        if deadline is None:
            deadline = time.monotonic() + self.settings.deadline_ms / 1000.0
        b = self.batcher
        if len(b.queue) + len(blobs) > b.capacity:
            raise self._queue_full()
        self.decoder.admit(len(blobs))
        out: list[np.ndarray | ServingError | None] = [
            self.decoder.inline(x, deadline) if i < INLINE_IMAGES else None
            for i, x in enumerate(blobs)]
        rest = [i for i, o in enumerate(out) if o is None]
        if rest:
            m = self.meta
            try:
                costs = await asyncio.to_thread(
                    lambda: [decode_cost(blobs[i], m.height, m.width, m.channels) for i in rest])
            except BaseException:
                self.decoder.pending -= len(rest)
                raise
            decoded = await asyncio.gather(*(self.decoder.one(blobs[i], c, deadline)
                                             for i, c in zip(rest, costs)))
            for i, d in zip(rest, decoded):
                out[i] = d
        return [o for o in out if o is not None]

    async def run(self, images: list[np.ndarray], deadline: float,
                  log_lambda: float | None = None, beside: bool = False
                  ) -> list[Row | ServingError]:
        """Queue decoded images; each entry is the raw output row (+timings) or an error.
        ``beside``: something else computes on the machine meanwhile (the classifier, in
        speculative and shadow mode), so a lone image does not take every core (no solo)."""
        if not images:
            return []
        retry = self.settings.retry_after_s
        t0 = time.perf_counter_ns()
        try:
            futures = self.batcher.submit(images, deadline, alone=not beside and self.alone(),
                                          log_lambda=log_lambda)
        except QueueFull:
            raise self._queue_full() from None
        except ShuttingDown:
            raise Unavailable(503, "shutting down", "shutdown", retry) from None
        await asyncio.wait(futures, timeout=max(deadline - time.monotonic(), 0))
        out: list[Row | ServingError] = []
        for f in futures:
            if not f.done():
                f.cancel()  # the batcher skips it if it has not been taken yet
                out.append(deadline_exceeded())
            elif isinstance(f.exception(), DeadlineExceeded):
                out.append(deadline_exceeded())
            elif f.exception() is not None:
                logging.getLogger("hopgate").error("runtime failure: %r", f.exception())
                out.append(internal_error("internal error while scoring"))
            else:
                row, queued, compute, batch = f.result()
                out.append({**row, "queue_s": queued, "compute_s": compute, "batch": batch})
        self._count(out, time.perf_counter_ns() - t0)
        return out

    def _count(self, rows: list[Row | ServingError], ns: int) -> None:
        st, ok = self.stats, [r for r in rows if isinstance(r, dict)]
        if len(ok) < len(rows):
            st.failed += 1
        else:
            st.success += 1
            st.success_ns += ns
        st.images += len(ok)
        st.batches += sum(1.0 / r["batch"] for r in ok)
        st.queue_ns += int(sum(r["queue_s"] for r in ok) * 1e9)
        st.compute_ns += int(sum(r["compute_s"] / r["batch"] for r in ok) * 1e9)
        st.last_ms = int(time.time() * 1000)

    def top_k(self, logits: np.ndarray, k: int, with_logits: bool) -> list[ClassProbability]:
        """The classifier's ``k`` most probable classes: softmax of its own logits (float64,
        so equal to the classifier's softmax to float32 precision)."""
        z = logits.astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        names = self.meta.class_names
        return [ClassProbability(class_index=int(c), label=names[c] if c < len(names) else str(c),
                                 probability=float(p[c]),
                                 **({"logit": float(z[c])} if with_logits else {}))
                for c in np.argsort(-p, kind="stable")[:k]]

    def result(self, row: Row, threshold: float | None = None, top_k: int | None = None,
               with_logits: bool = False) -> ImageResult:
        """``threshold``: the one the row was computed with (None: the bundle's); ``top_k``:
        the classifier's probabilities too (bundles with a ``logits`` output)."""
        m = self.meta
        ood, score = bool(row["is_ood"]), float(row["score"])
        self.metrics.verdict(ood, score)
        pred = int(row["pred_class"])
        memories = [] if ood else [
            named_memory(m, int(i), float(w))
            for i, w in zip(row["memory_index"], row["memory_weight"]) if i >= 0 and w > 1e-6]
        label = m.class_names[pred] if pred < len(m.class_names) else str(pred)
        return ImageResult(
            ood=ood, score=score, threshold=m.threshold if threshold is None else threshold,
            p_value=m.p_value(score),
            predicted_class=pred, label=label, memories=memories, energy=float(row["energy"]),
            baselines={"msp": float(row["msp"]), "energy": float(row["energy_score"])},
            model_version=m.model_version,
            timings=Timings(queue_ms=round(row["queue_s"] * 1e3, 3),
                            compute_ms=round(row["compute_s"] * 1e3, 3),
                            batch_size=row["batch"]),
            **({"probabilities": self.top_k(row[LOGITS], top_k, with_logits)}
               if top_k else {}),
        )

    def failed(self, e: ServingError) -> ImageResult:
        self.metrics.images.labels("error").inc()
        return ImageResult(error=ErrorInfo(status=e.status, reason=e.reason, message=e.message))

    async def score(self, blobs: list[bytes | ImageError], deadline: float,
                    log_lambda: float | None = None, top_k: int | None = None,
                    with_logits: bool = False) -> list[ImageResult]:
        """One result per input, in order; a bad input fails alone."""
        return [self.failed(r) if isinstance(r, ServingError)
                else self.result(r, log_lambda, top_k, with_logits)
                for r in await self.rows(blobs, deadline, log_lambda)]

    async def rows(self, blobs: list[bytes | ImageError], deadline: float,
                   log_lambda: float | None = None, beside: bool = False
                   ) -> list[Row | ServingError]:
        """Decode and run: one raw output row (or its error) per input, in order (the
        sidecar's ID path needs no ``ImageResult``: sidecar/proxy.py); ``beside`` as ``run``'s."""
        todo = [i for i, b in enumerate(blobs) if not isinstance(b, ImageError)]
        decoded: dict[int, np.ndarray | ServingError] = {
            i: b for i, b in enumerate(blobs) if isinstance(b, ImageError)}
        decoded.update(zip(todo, await self.decode_all([b for b in blobs
                                                    if not isinstance(b, ImageError)], deadline)))
        good = [i for i in range(len(blobs)) if isinstance(decoded[i], np.ndarray)]
        images = [d for i in good if isinstance(d := decoded[i], np.ndarray)]
        rows: dict[int, Row | ServingError] = dict(zip(good, await self.run(
            images, deadline, log_lambda, beside)))
        out: list[Row | ServingError] = []
        for i in range(len(blobs)):
            r = rows.get(i, decoded[i])
            out.append(r if isinstance(r, (dict, ServingError)) else internal_error())
        return out

    def close(self) -> None:
        self.decoder.close()
