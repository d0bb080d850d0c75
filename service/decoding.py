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
  * small images inline: an image of at most ``inline_decode_bytes`` whose decode costs at
    most ``INLINE_COST`` is decoded on the event loop itself, at once (a 224 px JPEG: ~0.2 ms),
    which saves two thread hand-offs and the header read in a thread; it is admitted like any
    other (the queue above; the memory budget must have room for it now, else it takes the
    pool's path and waits there), and is answered 504 if its deadline has already passed.
    Everything larger goes to the pool, under every bound here.
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

from hopgate.pixels import Resize

from .config import Settings
from .errors import ImageError, ServingError, Unavailable, deadline_exceeded
from .imaging import COST_FLOOR, TooCostly, cost_of, decode

_FLOOR = COST_FLOOR  # the least an image is charged (headers, buffers)
INLINE_COST = 1 << 20  # decodes estimated at most this many bytes may run on the event loop
INLINE_IMAGES = 8  # ... for at most this many images of one request (the rest: the pool)


def decode_cost(blob: bytes, height: int, width: int, channels: int) -> int:
    """Estimated peak bytes to decode ``blob`` (its header only is read)."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            return cost_of(im, height, width, channels)
    except Exception:  # the decoder names the problem; charge the floor
        return _FLOOR


class DecodePool:
    def __init__(self, settings: Settings, height: int, width: int, channels: int,
                 resize: str | Resize):
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

    def inline(self, blob: bytes, deadline: float) -> np.ndarray | ServingError | None:
        """Decode one admitted small image on the calling thread (the event loop) now; None
        when it is not small enough (then it is still admitted: hand it to ``one``). The
        header is read once: the decode itself stops before any pixel when the estimate is
        over ``INLINE_COST`` or what the memory budget has left."""
        room = min(INLINE_COST, self.s.decode_memory_bytes - self.memory)
        if len(blob) > self.s.inline_decode_bytes or room < _FLOOR:
            return None
        if time.monotonic() >= deadline:
            self.pending -= 1
            return deadline_exceeded()
        h, w, c = self.shape
        try:
            out: np.ndarray | ServingError = decode(blob, h, w, c, self.resize,
                                                    self.s.max_pixels, max_cost=room)
        except TooCostly:
            return None
        except ImageError as e:
            out = e
        self.pending -= 1
        return out

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
