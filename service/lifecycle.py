"""The app's life: build the core at startup, say whether it is ready, drain at shutdown.

Startup (``lifespan``): load the bundle into the runtime, warm every bucket, start the
batcher, build the ``Scorer`` (and the ``Gate`` in gatekeeper mode), then mark the app ready.
Shutdown: not ready, drain the batcher (at most ``drain_seconds``), close. A hot reload
(reload.py: SIGHUP, the bundle file changing, the V2 load call) swaps ``scorer`` and
``batcher`` for new ones; ``Pin`` keeps each request on the scorer it arrived under.

What lives on ``app.state`` (server/cli.py's drain reads ``draining``, ``admission``, ``batcher``,
``last_request``): ``settings``, ``ready``, ``draining``, ``admission`` (admission.py),
``metrics``, ``batcher``, ``scorer``, ``gate`` (None unless ``upstream_url`` is set),
``reloader`` (reload.py), ``last_request``.

Readiness is decided here once: ``is_ready`` for the probes, ``require_ready`` for the
routes that score (503, reason ``shutdown`` while draining, ``internal`` before startup).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .admission import Admission
from .config import Settings
from .errors import V2_PREFIX, Unavailable
from .metrics import Metrics
from .reload import Reloader, describe, load_runtime, start_core
from .scoring import Scorer
from .sidecar.gate import Gate

VERSION_HEADER = b"x-hopgate-model-version"  # the bundle version behind an answer


def init_state(app: FastAPI, settings: Settings) -> None:
    """The state before startup: not ready, not draining, no core yet; and the admission
    middleware (admission.py: bytes in flight, who is let in while draining)."""
    app.state.settings, app.state.ready, app.state.draining = settings, False, False
    app.state.gate = None
    app.add_middleware(Admission, app_state=app.state, settings=settings)
    app.add_middleware(Pin, app_state=app.state)  # outside Admission: pinned while refused too


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
    """The scorer this request is pinned to (``Pin``): the one serving when it arrived."""
    scorer: Scorer | None = getattr(request.state, "scorer", None)
    return scorer if scorer is not None else request.app.state.scorer


class Pin:
    """ASGI middleware: pins the scorer serving now to each request for its whole life, so a
    hot reload (reload.py) never switches bundles under a request, and retires the old
    scorer only once its last pinned request has been answered. /score and /v2 answers carry
    ``X-Hopgate-Model-Version``: the version of the bundle that scored (or would score) it."""

    def __init__(self, app: ASGIApp, app_state: State):
        self.app, self.state = app, app_state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scorer: Scorer | None = getattr(self.state, "scorer", None)
        if scope["type"] != "http" or scorer is None:
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["scorer"] = scorer
        scorer.users += 1
        path: str = scope["path"]
        tagged: Send = send
        if path == "/score" or path.startswith(V2_PREFIX):
            version = (VERSION_HEADER, scorer.meta.model_version.encode("latin-1", "replace"))

            async def with_version(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), version]
                await send(message)
            tagged = with_version
        try:
            await self.app(scope, receive, tagged)
        finally:
            scorer.users -= 1
            if scorer.users == 0:
                scorer.unused.set()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    runtime = load_runtime(settings)  # every bucket warmed, before ready
    m = runtime.meta
    metrics = Metrics.for_bundle(settings, m)  # score buckets and drift from its calibration
    describe(metrics, runtime)
    scorer = start_core(settings, runtime, metrics, app.state)
    app.state.metrics, app.state.batcher, app.state.scorer = metrics, scorer.batcher, scorer
    reloader = app.state.reloader = Reloader(app.state, settings)
    reloader.on_sighup()
    watcher = (asyncio.get_running_loop().create_task(reloader.watch(settings.reload_poll_s))
               if settings.reload_poll_s > 0 else None)
    if settings.upstream_url:
        app.state.gate = Gate(settings.upstream_url, settings.upstream_timeout_s,
                              settings.upstream_policy, settings.gate_ood_status,
                              settings.gate_ood_body, metrics.registry,
                              settings.upstream_max_body_bytes)
    app.state.ready, app.state.draining = True, False
    logging.getLogger("hopgate").info("ready: %s on %s", m.model_version, runtime.provider)
    del runtime, scorer  # a reload retires them: no reference may outlive it (server/memory.py)
    yield
    app.state.ready = False
    if watcher is not None:
        watcher.cancel()
    async with reloader.lock:  # a reload under way finishes (or fails) first
        scorer = app.state.scorer  # the one serving now (reloads swap it)
    await scorer.batcher.drain(settings.drain_seconds)
    scorer.batcher.close()
    scorer.close()
    await reloader.close()
    if app.state.gate is not None:
        await app.state.gate.close()
