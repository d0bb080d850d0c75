"""Bounded resources in process (fast tier): the bytes-in-flight budget, admission before
decoding, the decode memory budget, the deadline over decoding, and the decoder's own peak
memory on a 6300² 16-bit PNG (in a subprocess, so its peak RSS is its own)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import in_process
from heavy import padded_png
from PIL import Image

from hopgate.service import decoding

pytestmark = pytest.mark.anyio
PNG = {"content-type": "image/png"}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


SMALL = _png(np.full((28, 28), 128, np.uint8))


@pytest.fixture
def slow_decode(monkeypatch):
    """imaging.decode, 0.5 s slower; counts its calls."""
    calls = []
    real = decoding.decode

    def slow(*a, **k):
        calls.append(1)
        time.sleep(0.5)
        return real(*a, **k)

    monkeypatch.setattr(decoding, "decode", slow)
    return calls


async def test_bytes_in_flight_are_one_budget_across_requests(anyio_backend, slow_decode):
    body = padded_png(SMALL, 3000)
    async with in_process(max_body_bytes=4000, max_inflight_bytes=5000) as c:
        first, second = await asyncio.gather(
            c.post("/score", content=body, headers=PNG),
            c.post("/score", content=body, headers=PNG))
        after = await c.post("/score", content=body, headers=PNG)  # the budget came back
        text = (await c.get("/metrics")).text
    assert sorted([first.status_code, second.status_code]) == [200, 503]
    refused = first if first.status_code == 503 else second
    assert refused.json()["error"]["reason"] == "overloaded"
    assert refused.headers["retry-after"] == "1"
    assert after.status_code == 200
    assert 'hopgate_requests_total{reason="overloaded",status="503"} 1.0' in text


async def test_decode_queue_admits_before_decoding(anyio_backend, slow_decode):
    import base64

    doc = {"images": [base64.b64encode(SMALL).decode()] * 3}
    async with in_process(decode_queue_images=2, reject_status=429) as c:
        r = await c.post("/score", json=doc)
    assert r.status_code == 429 and r.json()["error"]["reason"] == "queue_full"
    assert slow_decode == []  # refused before anything was decoded


async def test_deadline_covers_decoding(anyio_backend, slow_decode):
    # the pool's path (a decode this slow is never inline: inline ones are small by bytes and
    # by decode cost); the inline path's deadline check is the next test
    async with in_process(inline_decode_bytes=0) as c:
        t0 = time.monotonic()
        r = await c.post("/score", content=SMALL,
                         headers={**PNG, "x-hopgate-deadline-ms": "150"})
        took = time.monotonic() - t0
    assert r.status_code == 504 and r.json()["results"][0]["error"]["reason"] == "deadline"
    assert took < 0.45  # answered at its deadline, not when the decode ended


async def test_small_images_decode_inline_large_ones_in_the_pool(anyio_backend, monkeypatch):
    """Issue 15: a small image is decoded on the event loop at once (no thread hand-off), a
    large one (bytes over inline_decode_bytes, or decode cost over INLINE_COST) in the pool
    under every bound; an inline image whose deadline has passed is 504 without decoding."""
    pooled = []
    real_one = decoding.DecodePool.one

    async def one(self, blob, cost, deadline):
        pooled.append(len(blob))
        return await real_one(self, blob, cost, deadline)

    monkeypatch.setattr(decoding.DecodePool, "one", one)
    big = padded_png(SMALL, 80_000)  # same pixels, over 64 KiB of bytes
    wide = _png(np.zeros((800, 800), np.uint8))  # few bytes, decode cost over INLINE_COST
    async with in_process() as c:
        for body in (SMALL, big, wide):
            r = await c.post("/score", content=body, headers=PNG)
            assert r.status_code == 200 and "score" in r.json()["results"][0]
        assert pooled == [len(big), len(wide)]
        scorer = c.app.state.scorer
        late = await scorer.decode_all([SMALL], time.monotonic() - 1)
        assert isinstance(late[0], Exception) and late[0].status == 504
        assert scorer.decoder.pending == 0 and scorer.decoder.memory == 0


async def test_an_image_over_the_decode_memory_budget_is_413_alone(anyio_backend):
    big = _png((np.arange(1000 * 1000, dtype=np.uint16) % 4096).reshape(1000, 1000))
    async with in_process(decode_memory_bytes=2_000_000) as c:
        r = await c.post("/score", files=[("images", ("a.png", big, "image/png")),
                                          ("images", ("b.png", SMALL, "image/png"))])
    assert r.status_code == 200
    bad, good = r.json()["results"]
    assert bad["error"]["status"] == 413 and "to decode" in bad["error"]["message"]
    assert "score" in good


def test_decode_cost_reads_the_header_only():
    big = _png(np.zeros((2000, 3000), np.uint16))
    assert decoding.decode_cost(big, 28, 28, 1) == 2000 * 3000 * (2 + 1)
    assert decoding.decode_cost(b"not an image", 28, 28, 1) == decoding._FLOOR


PEAK = """
import sys
from hopgate.service.imaging import decode, set_pillow_limit
set_pillow_limit(40_000_000)
blob = open(sys.argv[1], "rb").read()
a = decode(blob, 28, 28, 1)
hwm = [x for x in open("/proc/self/status") if x.startswith("VmHWM")][0].split()[1]
print(int(hwm) / 1024, int(a.sum()))  # VmHWM: this process's peak (ru_maxrss survives exec)
"""


def test_a_6300_16bit_png_decodes_without_a_full_size_float64_copy(tmp_path):
    # decoded I;16 (79 MB) + the 8-bit result (40 MB) + strips, over ~60 MB of interpreter;
    # the full-size float64 conversion it replaced peaked at 1,124 MB
    from heavy import png16

    path = tmp_path / "16bit.png"
    path.write_bytes(png16(6300))
    out = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True,
                         text=True, timeout=120, check=True)
    peak, _ = out.stdout.split()
    assert float(peak) < 400, out.stdout
