"""Fixtures of both tiers, and the images the tests send. Nothing here imports torch.

* fast tier: ``app_client`` (module scope) runs the app in process, its lifespan driven by
  ``app.router.lifespan_context`` and requests sent through ``httpx.ASGITransport``; async
  tests run on anyio's pytest plugin (``pytestmark = pytest.mark.anyio``, asyncio only).
* integration tier: ``server`` / ``serve`` start a real hopgate-serve on a loopback port.
* ``direct``: the bundle run by onnxruntime itself, the reference the service must match.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from inputs import ROOT, encode  # noqa: F401  (re-exported for the test modules)

from hopgate.bundle import INPUT_IMAGES, OUTPUTS
from hopgate.service.app import create_app
from hopgate.service.config import Settings
from hopgate.service.server.local import local_server

BUNDLE = ROOT / "models" / "default.onnx"


class Server:
    """A LocalServer with an httpx client factory."""

    def __init__(self, local):
        self.proc, self.port, self.url, self.log = local.proc, local.port, local.url, local.log
        self.admin_url = local.admin_url  # hopgate's own endpoints (sidecar mode: admin port)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)

    def admin(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.admin_url, timeout=30, **kw)


@contextmanager
def serve(tmp_path: Path, **settings):
    """A real hopgate-serve on a loopback port, with the default bundle and two threads."""
    settings.setdefault("intra_op_threads", 2)
    with local_server(tmp_path, BUNDLE, **settings) as s:
        yield Server(s)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("srv"), max_body_bytes=2_000_000, max_images=32) as s:
        yield s


def run_direct(session, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """The bundle's outputs for uint8 ``[N, H, W, C]`` images, straight from onnxruntime."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUTS}
    for i in range(0, len(images), batch_size):
        feed = {INPUT_IMAGES: np.ascontiguousarray(images[i:i + batch_size], dtype=np.uint8)}
        for k, v in zip(OUTPUTS, session.run(list(OUTPUTS), feed)):
            parts[k].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


@pytest.fixture(scope="session")
def direct() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The bundle run in-process by onnxruntime: the reference the service must match."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(BUNDLE), providers=["CPUExecutionProvider"])
    return lambda images: run_direct(sess, images)


@pytest.fixture(scope="session")
def fashion():
    """Fashion-MNIST test images (the Debian package ``dataset-fashion-mnist``)."""
    from hopgate.model_export.data import (
        sources as data,  # numpy + Pillow only; needs the dataset files
    )

    return data.fashion_mnist("test").subset(np.arange(2000))


# --- the fast tier: the app in process ---------------------------------------------------

@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


FAST_SETTINGS = {"model": BUNDLE, "buckets": [1, 2, 4, 8, 16], "intra_op_threads": 2,
                 "max_body_bytes": 2_000_000, "max_images": 32, "log_requests": False}


@asynccontextmanager
async def in_process(**settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run, and an httpx client that calls it in process."""
    app = create_app(Settings(**{**FAST_SETTINGS, **settings}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hopgate",
                                     timeout=30) as client:
            client.app = app  # type: ignore[attr-defined]  (tests reach app.state)
            yield client


@pytest.fixture(scope="module")
async def app_client(anyio_backend) -> AsyncIterator[httpx.AsyncClient]:
    async with in_process() as client:
        yield client
