"""Hot reload: a new bundle served without one failed request.

Triggers: SIGHUP, a change of the bundle file (``reload_poll_s`` > 0: its size and mtime are
polled), or the V2 repository call ``POST /v2/repository/models/{name}/load`` (v2/repository.py).
Each reads the bundle at the configured path (``HOPGATE_MODEL``): replace that file (an
atomic rename), then trigger.

How: the new core (onnxruntime session, every bucket warmed, its own batcher, decoder and
``Scorer``) is built beside the old one, off the event loop, while the old one serves. Then
one assignment swaps ``app.state.scorer``: every request that arrives from then on is pinned
to the new scorer (lifecycle.Pin), every request already pinned to the old one finishes on
it (answered with the old version: the version in each answer is the one that scored it).
The old core is retired once its last pinned request has been answered (at most
``drain_seconds``): its batcher drained, its threads closed. A bundle that fails to load or
warm changes nothing: the old one keeps serving and the trigger gets the error. Once retired,
its memory goes back to the system (memory.trim: glibc keeps freed arenas otherwise).

Reloads run one at a time, and triggers coalesce: a call that arrives while a reload is under
way shares it when the bundle file is unchanged since that reload read it, else it shares the
one reload queued behind it (so 30 load calls at once build one core, or two when the file
changed meanwhile). ``hopgate_reloads_total{outcome}`` counts the reloads built, not the calls.

Kept across a reload: the metrics registry (counters go on; ``hopgate_model_info`` and the
drift reference follow the new bundle; the score histogram keeps the first bundle's edges).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from hopgate import __version__
from hopgate.bundle import BundleError

from .batcher import Batcher
from .config import Settings
from .metrics import Metrics
from .runtime.session import Runtime
from .scoring import Scorer
from .server.memory import trim
from .server.workers import usable_cores

log = logging.getLogger("hopgate.reload")


def load_runtime(settings: Settings) -> Runtime:
    """The bundle at ``settings.model`` in an onnxruntime session, every bucket warmed."""
    runtime = Runtime(settings.model, settings.providers, settings.intra_op_threads,
                      settings.inter_op_threads, settings.pad, settings.ort_spinning,
                      settings.io_binding, settings.cuda_graphs, settings.cuda_conv_algo_search,
                      settings.cuda_tf32, settings.solo_threads or usable_cores())
    runtime.warm(settings.buckets)
    return runtime


def start_core(settings: Settings, runtime: Runtime, metrics: Metrics, app_state: Any) -> Scorer:
    """A scorer over ``runtime`` with its batcher started (on the running loop)."""
    batcher = Batcher(runtime, metrics, settings.buckets, settings.queue_images,
                      settings.max_delay_ms, settings.batch_slots, settings.inline_compute_ms)
    batcher.start()
    scorer = Scorer(settings, runtime, metrics, batcher)
    scorer.app_state = app_state  # its admission (built with the middleware) says who is in
    return scorer


def describe(metrics: Metrics, runtime: Runtime) -> None:
    """``hopgate_model_info`` and the drift reference (metrics.py) for this bundle."""
    m = runtime.meta
    metrics.model.info({"name": m.name, "version": m.model_version, "provider": runtime.provider,
                        "hopgate_version": __version__, "backbone": m.backbone})
    drift = getattr(metrics, "drift", None)
    if drift is not None:
        drift.load(m.score_quantiles)


async def retire(scorer: Scorer, timeout: float) -> None:
    """Once no request is pinned to ``scorer`` (at most ``timeout`` s), drain and close it."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while scorer.users > 0 and (left := end - loop.time()) > 0:
        scorer.unused.clear()  # lifecycle.Pin sets it when the count reaches 0
        try:
            await asyncio.wait_for(scorer.unused.wait(), left)
        except asyncio.TimeoutError:
            break
    await scorer.batcher.drain(max(end - loop.time(), 0.0))
    scorer.batcher.close()
    scorer.close()
    log.info("retired %s (%d requests still pinned)", scorer.meta.model_version, scorer.users)
    del scorer  # the last reference to the old core: its session and buffers are freed now
    await asyncio.to_thread(trim)  # ... and glibc hands their pages back (server/memory.py)


def _shared(task: asyncio.Task[Scorer]) -> asyncio.Task[Scorer]:
    """A reload that callers share: its error is theirs (each gets it), and no warning when
    every caller has gone away before it ended."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


class Reloader:
    """Swaps ``app_state.scorer`` for a freshly built one (``reload``); ``watch`` and
    ``on_sighup`` are its triggers besides the V2 load call."""

    def __init__(self, app_state: Any, settings: Settings):
        self.state, self.settings = app_state, settings
        self.lock = asyncio.Lock()
        self.retiring: set[asyncio.Task] = set()
        self._stamp = self._file_stamp()
        self._running: asyncio.Task[Scorer] | None = None  # the reload under way
        self._running_stamp: tuple[int, int] | None = None  # the file as it read it
        self._queued: asyncio.Task[Scorer] | None = None  # the one reload behind it
        self.built = 0  # reloads built (and failed): not the calls, which coalesce

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.settings.model)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    async def reload(self) -> Scorer:
        """Load, warm, swap, retire the old one; ``BundleError`` leaves everything as it was.
        Coalesced (module docstring): the caller may share a reload another trigger started."""
        loop = asyncio.get_running_loop()
        running = self._running
        if running is not None and not running.done():
            if self._file_stamp() == self._running_stamp:  # the same file: share it
                return await asyncio.shield(running)
            if self._queued is None:
                self._queued = _shared(loop.create_task(self._after(running)))
            return await asyncio.shield(self._queued)
        self._running_stamp = self._file_stamp()  # (read again when the reload starts)
        self._running = task = _shared(loop.create_task(self._reload()))
        return await asyncio.shield(task)  # a caller that goes away leaves the reload be

    async def _after(self, running: asyncio.Task[Scorer]) -> Scorer:
        """The queued reload: starts once ``running`` has ended, however it ended."""
        with contextlib.suppress(Exception):
            await asyncio.shield(running)
        self._queued = None
        self._running, self._running_stamp = asyncio.current_task(), self._file_stamp()
        return await self._reload()

    async def _reload(self) -> Scorer:
        async with self.lock:
            state, settings = self.state, self.settings
            self._stamp = self._running_stamp = self._file_stamp()
            self.built += 1
            try:
                runtime = await asyncio.to_thread(load_runtime, settings)
                if state.draining:
                    raise BundleError("shutting down: the new bundle is not swapped in")
            except BaseException:
                self._count("failed")
                raise
            new = start_core(settings, runtime, state.metrics, state)
            old: Scorer = state.scorer
            state.scorer, state.batcher = new, new.batcher  # the swap: one step on the loop
            describe(state.metrics, runtime)
            self._count("loaded")
            task = asyncio.get_running_loop().create_task(
                retire(old, settings.drain_seconds))
            self.retiring.add(task)
            task.add_done_callback(self.retiring.discard)
            log.info("reloaded: %s -> %s", old.meta.model_version, new.meta.model_version)
            return new

    def _count(self, outcome: str) -> None:
        reloads = getattr(self.state.metrics, "reloads", None)
        if reloads is not None:
            reloads.labels(outcome).inc()

    async def reload_logged(self, trigger: str) -> None:
        try:
            await self.reload()
        except BundleError as e:
            log.error("reload on %s failed, still serving the old bundle: %s", trigger, e)
        except Exception:  # a bug: logged whole; the old bundle keeps serving, the watch goes on
            log.exception("reload on %s failed, still serving the old bundle", trigger)

    async def watch(self, every_s: float) -> None:
        """Reload when the bundle file's size or mtime changes (checked every ``every_s``)."""
        while True:
            await asyncio.sleep(every_s)
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp and not self.lock.locked():
                await self.reload_logged("file change")

    def on_sighup(self) -> bool:
        """Reload on SIGHUP; False where the loop cannot take signal handlers (not in the
        main thread, or no SIGHUP on this platform)."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(
                self.reload_logged("SIGHUP")))
        except (AttributeError, NotImplementedError, RuntimeError, ValueError):
            return False
        return True

    async def close(self) -> None:
        """Stop listening for SIGHUP; let retiring scorers finish (their own bound)."""
        with contextlib.suppress(AttributeError, NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self.retiring:
            await asyncio.gather(*self.retiring, return_exceptions=True)
