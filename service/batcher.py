"""Dynamic batcher: counts images, not requests.

Semantics (in the spirit of Triton's dynamic batcher, stated plainly):
  * Each image is one queue item with its own deadline. A request with more images than the
    largest bucket is simply several items: batches never exceed the largest bucket.
  * A lone request never waits: when a batch slot is free and nothing is in flight, the
    queue is flushed at once. When it is the only request in the server and one image costs
    at most ``inline_ms`` (measured at warm-up), a single image is computed on the event loop
    itself (nothing else is there to wait behind it): no thread hand-off at concurrency 1.
  * Images accumulate only while the runtime is busy. With more than one batch slot, a free
    slot waits for a full largest bucket, the in-flight batch to finish, or the oldest
    image to reach ``max_delay_ms``, whichever comes first (a hard ceiling).
  * ``slots`` 0 (the default of each of several CPU workers, server/workers.py): no runtime
    thread; the batcher's own task computes each batch on the event loop, after the requests
    already read have queued their images and while more keep arriving (a loop pass at a
    time, at most ``GATHER_PASSES``: at c=16 the mean batch went from 4 to 8 images and
    req/s up 2-7 %). A worker of several has about one core: a thread
    beside its loop buys no overlap there, only hand-offs (measured in benchmarks/versus_24.md).
    A lone cheap image goes to the solo session only if it is still alone after those
    passes: under load the first request read after a batch is alone for a moment (at c=32,
    42 % of the batches were that one image, on the solo session's threads beside the other
    worker's batch; now batches of ~16).
  * A batch is padded to the smallest bucket that holds it (all buckets are warmed).
  * The queue is bounded in images: a request that does not fit is rejected at once
    (``QueueFull``), never parked.
  * Expired items are dropped when a batch is formed: they never reach the runtime.
  * A batch holds one threshold (``log_lambda``, a scalar graph input: threshold.py): it takes
    the queued items of its first item's threshold, the others keep their place.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .metrics import Metrics
from .runtime.session import Runtime

GATHER_PASSES = 4  # slots 0: loop passes a batch may wait for arriving requests (_gather)


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Item:
    image: np.ndarray
    deadline: float  # time.monotonic()
    future: asyncio.Future
    log_lambda: float | None = None  # the request's threshold; None: the bundle's
    enqueued: float = field(default_factory=time.monotonic)
    solo: bool = False  # the only image of the only request in the server, and cheap


class Batcher:
    def __init__(self, runtime: Runtime, metrics: Metrics, buckets: list[int], queue_images: int,
                 max_delay_ms: float, slots: int = 1, inline_ms: float = 0.0):
        self.runtime, self.metrics = runtime, metrics
        self.buckets, self.max_batch = sorted(buckets), max(buckets)
        self.capacity, self.max_delay = queue_images, max_delay_ms / 1000.0
        # slots 0: every batch on the event loop (CPU only: a GPU wants the loop free meanwhile)
        self.on_loop = slots == 0 and getattr(runtime, "provider", "") == "CPUExecutionProvider"
        self.slots = max(slots, 1)
        self.inline_s = inline_ms / 1000.0
        self.queue: deque[Item] = deque()
        self.inflight = 0  # batches being computed
        self.inflight_images = 0
        self.closed = False
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="hopgate-runtime")
        self._task: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, images: list[np.ndarray], deadline: float, alone: bool = False,
               log_lambda: float | None = None) -> list[asyncio.Future]:
        """Queue images (all or none); returns one future per image. ``alone``: no other
        request is in the server, so a single cheap image may be computed right here."""
        if self.closed:
            raise ShuttingDown()
        if len(self.queue) + len(images) > self.capacity:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        items = [Item(img, deadline, loop.create_future(), log_lambda) for img in images]
        self.queue.extend(items)
        self._idle.clear()
        if (self.inflight == 0 and alone and len(items) == 1 and len(self.queue) == 1
                and getattr(self.runtime, "single_s", float("inf")) <= self.inline_s):
            items[0].solo = True
        if self.on_loop:  # _loop computes once the requests already read have queued too
            pass
        elif items[0].solo:
            self._here(self._take(), solo=True)
        elif self.inflight == 0:  # a lone request never waits: straight to the runtime thread
            self._start(self._take())
        else:
            self.metrics.queue_depth.set(len(self.queue))
        self._wake.set()
        return [i.future for i in items]

    def _bucket(self, n: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    def _take(self) -> list[Item]:
        now = time.monotonic()
        batch: list[Item] = []
        other: list[Item] = []  # another threshold: stays queued, in order
        while self.queue and len(batch) < self.max_batch:
            item = self.queue.popleft()
            if item.future.done():  # the request went away (deadline reached while queued)
                continue
            if item.deadline <= now:
                item.future.set_exception(DeadlineExceeded())
                continue
            if batch and item.log_lambda != batch[0].log_lambda:
                other.append(item)
                continue
            batch.append(item)
        self.queue.extendleft(reversed(other))
        self.metrics.queue_depth.set(len(self.queue))
        return batch

    async def _loop(self) -> None:
        while True:
            if not self.queue:
                if self.inflight == 0:
                    self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.inflight >= self.slots:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.inflight > 0 and len(self.queue) < self.max_batch:
                # busy with a free slot: linger for a fuller batch, at most max_delay
                wait = self.queue[0].enqueued + self.max_delay - time.monotonic()
                if wait > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                    else:
                        continue
            if self.on_loop:
                await self._gather()
                if len(self.queue) == 1 and self.queue[0].solo:  # still the only one
                    self._here(self._take(), solo=True)
                    continue
            self._start(self._take())

    async def _gather(self) -> None:
        """On the loop (``slots`` 0), before a batch: let the loop read the requests that are
        arriving, one pass at a time while the queue still grows (at most ``GATHER_PASSES``).
        Under load the clients answered by the last batch send their next requests within
        microseconds; without this the first of them made a batch of its own."""
        n = len(self.queue)
        for _ in range(GATHER_PASSES):
            await asyncio.sleep(0)
            if len(self.queue) == n:
                return
            n = len(self.queue)

    def _begin(self, batch: list[Item]) -> float:
        """A batch goes in flight: counted (``hopgate_inflight``, queue waits, batch size);
        returns its start, which ``_finish`` reads."""
        self.inflight += 1
        started = time.monotonic()
        for item in batch:
            self.metrics.queue_wait.observe(started - item.enqueued)
        self.inflight_images += len(batch)
        self.metrics.inflight.set(self.inflight_images)
        self.metrics.batch_size.observe(len(batch))
        return started

    def _images(self, batch: list[Item]) -> list[np.ndarray] | np.ndarray:
        rows = [i.image for i in batch]  # the binding stacks them into its own buffer
        return rows if getattr(self.runtime, "binding", None) else np.stack(rows)

    def _here(self, batch: list[Item], solo: bool = False) -> None:
        """Compute ``batch`` on the event loop itself: a lone cheap image (``solo``, on the
        runtime's solo session: the only request in the server, costing at most ``inline_ms``
        as measured at warm-up, so nothing waits behind it; no hand-off to the runtime
        thread and back), or every batch with ``slots`` 0 (see the module docstring)."""
        if not batch:
            return
        started = self._begin(batch)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            if solo:
                out = self.runtime.run_solo(batch[0].image, batch[0].log_lambda)
            else:
                out = self.runtime.run(self._images(batch), self._bucket(len(batch)),
                                       batch[0].log_lambda)
            fut.set_result(out)
        except Exception as e:
            fut.set_exception(e)
        self._finish(fut, batch, started)

    def _start(self, batch: list[Item]) -> None:
        """Hand ``batch`` to the runtime thread now; ``_finish`` runs on the loop after it (no
        task per batch: one hop there, one back)."""
        if not batch:
            return
        if self.on_loop:
            return self._here(batch)
        started = self._begin(batch)
        try:
            fut = asyncio.get_running_loop().run_in_executor(
                self._pool, self.runtime.run, self._images(batch), self._bucket(len(batch)),
                batch[0].log_lambda)
        except Exception as e:  # e.g. the pool is shut down: the batch fails, the loop goes on
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            done.set_exception(e)
            fut = done
        fut.add_done_callback(lambda f: self._finish(f, batch, started))

    def _finish(self, fut: asyncio.Future, batch: list[Item], started: float) -> None:
        n = len(batch)
        try:
            e = ShuttingDown() if fut.cancelled() else fut.exception()
            if e is not None:  # the runtime failed: every image of the batch gets the error
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
            else:
                out = fut.result()
                compute = time.monotonic() - started
                self.metrics.compute.observe(compute)
                for j, item in enumerate(batch):
                    if not item.future.done():
                        row = {k: v[j] for k, v in out.items()}
                        item.future.set_result((row, started - item.enqueued, compute, n))
        finally:
            self.inflight -= 1
            self.inflight_images -= n
            self.metrics.inflight.set(self.inflight_images)
            self._wake.set()

    async def drain(self, timeout: float) -> bool:
        """Stop taking new work; wait until everything accepted has been computed."""
        self.closed = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        if self._task:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
