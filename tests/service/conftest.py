"""A real hopgate-serve process on a loopback port, and the images the tests send."""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.local import local_server

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "default.onnx"


class Server:
    """A LocalServer with an httpx client factory."""

    def __init__(self, local):
        self.proc, self.port, self.url, self.log = local.proc, local.port, local.url, local.log

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)


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


# --- images ---------------------------------------------------------------------------

def encode(arr: np.ndarray, fmt: str = "PNG", size: int | None = None, mode: str | None = None,
           **save) -> bytes:
    img = Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    if size:
        img = img.resize((size, size), Image.BILINEAR)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.fixture(scope="session")
def direct():
    """The bundle run in-process by onnxruntime: the reference the service must match."""
    from model_export.export import ort_session, run_ort

    sess = ort_session(BUNDLE)
    return lambda images: run_ort(sess, images)


@pytest.fixture(scope="session")
def fashion():
    from model_export import data

    return data.fashion_mnist("test").subset(np.arange(2000))
