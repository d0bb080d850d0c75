"""Decoding under bounds: admission before any pixel is decoded, memory by bytes per pixel,
and the request's deadline over the whole of it. Used by scoring.Scorer.

  * queue: at most ``decode_queue_images`` images wait for or are in decoding, across all
    requests; a request whose images do not fit is refused at once, before anything is
    decoded (``Unavailable``, reason ``queue_full``, ``reject_status`` + ``Retry-After``).
  * memory: each image's decode cost is estimated from its header (read off the event loop,
    nothing decoded): width x height x (bytes per pixel of its mode + bytes per pixel of the
    8-bit result); JPEGs at their draft scale. Decodes start only while the sum of running
    costs stays within ``decode_memory_bytes``; an image that alone exceeds it is refused
    413. imaging.py converts 16-bit, float and alpha images strip by strip, so the estimate
    is the real footprint (no full-size float64 or RGBA copies).
  * a lane for small images: images costing more than a quarter of the budget ("large")
    use at most ``decode_threads - 1`` threads, so a normal image never waits behind them.
  * deadline: waiting for admission, for a thread and the decode itself all count against
    the request's deadline; an image not decoded by then is answered 504 ``deadline`` (its
    decode, if it started, finishes in the background and only then frees its budget).
"""

from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from .config import Settings
from .errors import ImageError, ServingError, Unavailable, deadline_exceeded
from .imaging import DRAFT_MARGIN, decode

_BPP = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "LA": 4, "PA": 4}  # else 4
_FLOOR = 64 * 1024  # the least an image is charged (headers, buffers)


def decode_cost(blob: bytes, height: int, width: int, channels: int) -> int:
    """Estimated peak bytes to decode ``blob`` (its header only is read)."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            w, h, mode = im.width, im.height, im.mode
            if im.format == "JPEG":  # imaging.decode drafts JPEGs down by up to 8
                side = DRAFT_MARGIN * max(height, width)
                scale = 1
                while scale < 8 and min(w, h) // (scale * 2) >= side:
                    scale *= 2
                w, h = -(-w // scale), -(-h // scale)
    except Exception:  # the decoder names the problem; charge the floor
        return _FLOOR
    return max(_FLOOR, w * h * (_BPP.get(mode, 4) + (1 if channels == 1 else 4)))


class DecodePool:
    def __init__(self, settings: Settings, height: int, width: int, channels: int,
                 resize: str):
        self.s, self.shape, self.resize = settings, (height, width, channels), resize
        self._pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self._large_slots = max(1, settings.decode_threads - 1)
        self.pending = 0  # images admitted and not yet decoded (or given up)
        self.memory = 0  # estimated bytes of the decodes running now
        self.large = 0  # large decodes running now
        self._changed = asyncio.Condition()

    def admit(self, n: int) -> None:
        if self.pending + n > self.s.decode_queue_images:
            raise Unavailable(self.s.reject_status, "decode queue full, retry later",
                              "queue_full", self.s.retry_after_s)
        self.pending += n

    def _fits(self, cost: int, large: bool) -> bool:
        return (self.memory + cost <= self.s.decode_memory_bytes
                and (not large or self.large < self._large_slots))

    async def _release(self, cost: int, large: bool) -> None:
        async with self._changed:
            self.memory -= cost
            self.large -= large
            self._changed.notify_all()

    def _job(self, blob: bytes, deadline: float) -> np.ndarray | ServingError:
        if time.monotonic() >= deadline:  # waited for a thread past the deadline
            return deadline_exceeded()
        h, w, c = self.shape
        try:
            return decode(blob, h, w, c, self.resize, self.s.max_pixels)
        except ImageError as e:
            return e

    async def one(self, blob: bytes, cost: int, deadline: float) -> np.ndarray | ServingError:
        """Decode one admitted image (``admit`` counted it) within ``deadline``."""
        loop = asyncio.get_running_loop()
        started = False
        try:
            if cost > self.s.decode_memory_bytes:
                return ImageError(413, f"image needs about {cost >> 20} MiB to decode; the "
                                       f"limit is {self.s.decode_memory_bytes >> 20} MiB")
            large = cost > self.s.decode_memory_bytes // 4
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait_for(
                        lambda: self._fits(cost, large)), max(deadline - time.monotonic(), 0))
                    self.memory += cost
                    self.large += large
            except asyncio.TimeoutError:
                return deadline_exceeded()
            started = True
            fut = loop.run_in_executor(self._pool, self._job, blob, deadline)

            def done(_: object) -> None:
                self.pending -= 1
                loop.create_task(self._release(cost, large))

            fut.add_done_callback(done)
            try:
                return await asyncio.wait_for(asyncio.shield(fut),
                                              max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                return deadline_exceeded()
        finally:
            if not started:
                self.pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
