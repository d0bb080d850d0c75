"""hopgate-screen's in-process mode, and the console script's entry point.

``--bundle`` runs the service's own app inside the screening process: its lifespan loads and
warms the bundle, and ``hopgate.client.AsyncClient`` calls ``POST /score`` through httpx's
ASGI transport (no socket, no server). So an in-process screen decodes, batches and scores
exactly as the service does (imaging.py, batcher.py, runtime/session.py, scoring.py), and its
results are the service's results. The rest of the tool (inputs, resume, outputs, summary) is
``hopgate.screen``; it lives in the shared package, which must not import the service, so the
entry point is here and hands it this mode.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from hopgate import screen
from hopgate.client import AsyncClient

from .app import create_app
from .config import Settings
from .runtime.session import check_bundle


def settings_for(bundle: Path, batch_size: int) -> Settings:
    """The app's settings for one screening process: no key, no gate, no access log, limits
    sized for the screen's requests, and a deadline no local queue can reach."""
    buckets = [b for b in (1, 2, 4, 8, 16, 32, 64) if b < batch_size] + [batch_size]
    body = 64 << 20  # the client keeps requests under 8 MiB; room for a few in flight
    return Settings(model=bundle, buckets=buckets, max_images=batch_size, max_body_bytes=body,
                    max_inflight_bytes=4 * body, queue_images=max(512, 4 * batch_size),
                    deadline_ms=3_600_000, api_key=None, api_key_file=None, upstream_url=None,
                    log_requests=False, workers=1)


@asynccontextmanager
async def in_process(bundle: Path, batch_size: int) -> AsyncIterator[AsyncClient]:
    app = create_app(settings_for(bundle, batch_size))
    transport = httpx.ASGITransport(app=app)
    async with (app.router.lifespan_context(app),
                AsyncClient("http://hopgate.local", transport=transport, timeout=None) as client):
        yield client


def main(argv: list[str] | None = None) -> int:
    return screen.main(argv, in_process=in_process, check_bundle=check_bundle)


if __name__ == "__main__":
    sys.exit(main())
