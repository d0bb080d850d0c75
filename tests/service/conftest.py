"""A real hopgate-serve process on a loopback port, and the images the tests send."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "default.onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)


@contextmanager
def serve(tmp_path: Path, **settings):
    """Start ``hopgate-serve`` with HOPGATE_* settings; yields once /readyz answers 200."""
    port = free_port()
    env = {**os.environ, "HOPGATE_PORT": str(port), "HOPGATE_HOST": "127.0.0.1",
           "HOPGATE_MODEL": str(BUNDLE), "HOPGATE_INTRA_OP_THREADS": "2"}
    env.update({f"HOPGATE_{k.upper()}": str(v) for k, v in settings.items()})
    log = tmp_path / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()}")
            try:
                if httpx.get(server.url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in 60 s: {log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


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
