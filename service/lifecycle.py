"""The app's life: build the core at startup, say whether it is ready, drain at shutdown.

Startup (``lifespan``): load the bundle into the runtime, warm every bucket, start the
batcher, build the ``Scorer`` (and the ``Gate`` in gatekeeper mode), then mark the app ready.
Shutdown: not ready, drain the batcher (at most ``drain_seconds``), close.

What lives on ``app.state`` (cli.py's drain reads ``draining``, ``admission``, ``batcher``,
``last_request``): ``settings``, ``ready``, ``draining``, ``admission`` (admission.py),
``metrics``, ``batcher``, ``scorer``, ``gate`` (None unless ``upstream_url`` is set),
``last_request``.

Readiness is decided here once: ``is_ready`` for the probes, ``require_ready`` for the
routes that score (503, reason ``shutdown`` while draining, ``internal`` before startup).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.datastructures import State

from hopgate import __version__

from .admission import Admission
from .batcher import Batcher
from .config import Settings
from .errors import Unavailable
from .gate import Gate
from .metrics import Metrics
from .runtime import Runtime
from .scoring import Scorer


def init_state(app: FastAPI, settings: Settings) -> None:
    """The state before startup: not ready, not draining, no core yet; and the admission
    middleware (admission.py: bytes in flight, who is let in while draining)."""
    app.state.settings, app.state.ready, app.state.draining = settings, False, False
    app.state.gate = None
    app.add_middleware(Admission, app_state=app.state, settings=settings)


def is_ready(state: State) -> bool:
    return bool(state.ready) and not state.draining


def require_ready(request: Request) -> None:
    """Raise 503 unless the app takes new work, or took this request before draining began
    (admission.py marks it ``admitted``: it is answered normally)."""
    state = request.app.state
    admitted = bool(getattr(request.state, "admitted", False))
    if not (is_ready(state) or (state.ready and admitted)):
        draining = bool(state.draining)
        raise Unavailable(503, "shutting down" if draining else "not ready",
                          "shutdown" if draining else "internal", state.settings.retry_after_s)


def scorer_of(request: Request) -> Scorer:
    scorer: Scorer = request.app.state.scorer
    return scorer


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    runtime = Runtime(settings.model, settings.providers, settings.intra_op_threads,
                      settings.inter_op_threads, settings.pad, settings.ort_spinning)
    m = runtime.meta
    metrics = Metrics(settings.buckets, Metrics.score_buckets(m.score_quantiles, m.threshold))
    metrics.model.info({"name": m.name, "version": m.model_version, "provider": runtime.provider,
                        "hopgate_version": __version__, "backbone": m.backbone})
    runtime.warm(settings.buckets)  # every bucket, before ready
    batcher = Batcher(runtime, metrics, settings.buckets, settings.queue_images,
                      settings.max_delay_ms, settings.batch_slots, settings.inline_compute_ms)
    batcher.start()
    scorer = Scorer(settings, runtime, metrics, batcher)
    scorer.app_state = app.state  # its admission (built with the middleware) says who is in
    app.state.metrics, app.state.batcher, app.state.scorer = metrics, batcher, scorer
    if settings.upstream_url:
        app.state.gate = Gate(settings.upstream_url, settings.upstream_timeout_s,
                              settings.upstream_policy, settings.gate_ood_status,
                              settings.gate_ood_body, metrics.registry,
                              settings.upstream_max_body_bytes)
    app.state.ready, app.state.draining = True, False
    logging.getLogger("hopgate").info("ready: %s on %s", m.model_version, runtime.provider)
    yield
    app.state.ready = False
    await batcher.drain(settings.drain_seconds)
    batcher.close()
    scorer.close()
    if app.state.gate is not None:
        await app.state.gate.close()
