"""hopgate.client against a real server on loopback (the default bundle, with an API key), a
stub server that answers 503 + Retry-After before it answers 200, and httpx mock transports
for the retry and batching rules (fast tier)."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from hopgate.client import AsyncClient, Client, Retry, ScoreError
from hopgate.client.retry import retry_after_seconds
from hopgate.service.server.local import local_server

DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "default.onnx"

KEY = "client-test-key"
MODEL = {"name": "m", "version": "v1", "provider": "CPUExecutionProvider", "threshold": -1.0,
         "target_tpr": 0.95, "classes": ["a", "b"], "hopgate_version": "0"}


def answer(n: int) -> dict:
    return {"results": [{"ood": False, "score": float(i), "threshold": -1.0, "p_value": 0.5,
                         "predicted_class": 1, "label": "b",
                         "memories": [{"index": 3, "weight": 1.0, "class_index": 1, "label": "b",
                                       "later": 1}]}
                        for i in range(n)], "model": MODEL}


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fashion_images() -> np.ndarray:
    from hopgate.model_export.data import (
        sources as data,  # numpy + Pillow; the Debian dataset files
    )

    return data.fashion_mnist("test").images[:24, ..., 0]  # [24, 28, 28] uint8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with local_server(tmp_path_factory.mktemp("client"), DEFAULT_BUNDLE, intra_op_threads=2,
                      max_images=16, api_key=KEY) as s:
        yield s


# --- a real server ---------------------------------------------------------------------

@pytest.mark.integration
def test_path_bytes_pil_and_arrays_get_the_same_verdict(server, fashion_images, tmp_path):
    a = fashion_images[0]
    path = tmp_path / "shoe.png"
    path.write_bytes(png(a))
    with Client(server.url, api_key=KEY) as c:
        results = [c.score(x) for x in (path, str(path), png(a), Image.fromarray(a), a,
                                        a[..., None])]
        rgb = c.score(np.repeat(a[..., None], 3, axis=2))
    assert all(r.ok and r.score is not None for r in results)
    assert len({r.score for r in results}) == 1, [r.score for r in results]
    first = results[0]
    assert first.ood is False and first.score > first.threshold  # an ID test image
    assert first.label == c.model.classes[first.predicted_class]
    assert first.memories and all(m.index >= 0 for m in first.memories)
    assert 0 < first.p_value <= 1
    assert rgb.ok and abs(rgb.score - first.score) < 1e-3 * (1 + abs(first.score))
    assert c.model is not None and c.model.name == "default"


@pytest.mark.integration
def test_score_many_batches_keeps_order_and_surfaces_bad_images(server, fashion_images,
                                                               tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    items = [*fashion_images[:10], b"not an image", noise, tmp_path / "missing.png",
             np.zeros((4, 4), np.float32), *fashion_images[10:20]]
    with Client(server.url, api_key=KEY) as c:
        many = c.score_many(items, batch_size=7)
        one_by_one = [c.score(x) for x in fashion_images[:20]]
    assert len(many) == len(items)
    bad, noisy, missing, floats = many[10:14]
    assert bad.error.status == 415 and bad.score is None
    assert noisy.ok and noisy.ood is True and noisy.memories == ()
    assert missing.error.status == 0 and missing.error.reason == "unreadable"
    assert floats.error.status == 0 and "uint8" in floats.error.message
    good = many[:10] + many[14:]
    assert [r.score for r in good] == pytest.approx([r.score for r in one_by_one], rel=1e-5)


@pytest.mark.integration
def test_async_client_matches_the_sync_one(server, fashion_images):
    with Client(server.url, api_key=KEY) as c:
        want = c.score_many(list(fashion_images), batch_size=5)

    async def go():
        async with AsyncClient(server.url, api_key=KEY) as ac:
            one = await ac.score(fashion_images[0])
            many = await ac.score_many(list(fashion_images), batch_size=5, concurrency=3)
            return one, many

    one, many = asyncio.run(go())
    assert [r.score for r in many] == pytest.approx([r.score for r in want], rel=1e-5)
    assert one.score == pytest.approx(want[0].score, rel=1e-5)


@pytest.mark.integration
def test_a_wrong_key_fails_the_whole_request(server, fashion_images):
    with Client(server.url, api_key="wrong") as c, pytest.raises(ScoreError) as e:
        c.score_many(list(fashion_images[:3]))
    assert e.value.status == 401 and e.value.reason == "unauthorized"


# --- a stub server: 503 + Retry-After, then 200 ------------------------------------------

class Stub(BaseHTTPRequestHandler):
    plan: list[tuple[int, dict[str, str]]] = []  # (status, headers) per request, then 200
    seen: list[float] = []

    def do_POST(self):  # noqa: N802  (http.server's name)
        self.rfile.read(int(self.headers["content-length"]))
        Stub.seen.append(time.monotonic())
        status, headers = Stub.plan.pop(0) if Stub.plan else (200, {})
        body = json.dumps(answer(1) if status == 200 else {"error": {
            "status": status, "reason": "queue_full", "message": "queue full, retry later"}})
        self.send_response(status)
        for k, v in {**headers, "content-type": "application/json"}.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    Stub.plan, Stub.seen = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.integration
def test_sync_client_waits_what_retry_after_says_then_retries(stub):
    Stub.plan = [(503, {"Retry-After": "1"})]
    with Client(stub) as c:
        t0 = time.monotonic()
        r = c.score(b"\x89PNG")
        took = time.monotonic() - t0
    assert r.ok and r.score == 0.0
    assert len(Stub.seen) == 2 and Stub.seen[1] - Stub.seen[0] >= 0.95
    assert took < 5


@pytest.mark.integration
def test_async_client_retries_429_and_gives_up_when_the_budget_is_spent(stub):
    Stub.plan = [(429, {"Retry-After": "1"})]

    async def go(retry=None):
        async with AsyncClient(stub, retry=retry) as ac:
            return await ac.score(b"\x89PNG")

    assert asyncio.run(go()).ok and Stub.seen[1] - Stub.seen[0] >= 0.95
    Stub.plan, Stub.seen = [(503, {"Retry-After": "30"})] * 3, []
    t0 = time.monotonic()
    with pytest.raises(ScoreError) as e:
        asyncio.run(go(Retry(budget_s=5)))
    assert e.value.status == 503 and e.value.reason == "queue_full"
    assert len(Stub.seen) == 1 and time.monotonic() - t0 < 5  # never waited 30 s


# --- the rules, on mock transports (fast) ------------------------------------------------

def mock(handler) -> Client:
    return Client("http://hopgate", transport=httpx.MockTransport(handler))


def count(request: httpx.Request) -> int:
    return request.content.count(b'name="images"')


def test_retries_are_bounded_and_back_off_without_retry_after(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    with mock(lambda req: httpx.Response(503, json={"error": {
            "status": 503, "reason": "shutdown", "message": "shutting down"}})) as c:
        c.retry = Retry(attempts=4, backoff_s=0.5)
        with pytest.raises(ScoreError) as e:
            c.score(b"x")
    assert waits == [0.5, 1.0, 2.0] and e.value.status == 503


def test_retry_after_as_an_http_date():
    when = time.time() + 3
    from email.utils import formatdate

    assert retry_after_seconds(formatdate(when, usegmt=True)) == pytest.approx(3, abs=1.1)
    assert retry_after_seconds("2") == 2 and retry_after_seconds("soon") is None


def test_a_body_too_large_is_split_and_each_image_fails_alone_only_if_it_must():
    def handler(req):
        n = count(req)
        if n > 2:
            return httpx.Response(413, json={"error": {
                "status": 413, "reason": "bad_input", "message": "body too large"}})
        return httpx.Response(200, json=answer(n))

    with mock(handler) as c:
        results = c.score_many([b"a"] * 7, batch_size=7)
    assert len(results) == 7 and all(r.ok for r in results)
    m = results[0].memories[0]
    assert (m.class_index, m.label, m.extra) == (1, "b", {"later": 1})  # unknown fields kept


def test_requests_stay_under_the_byte_budget():
    sizes = []

    def handler(req):
        sizes.append(len(req.content))
        return httpx.Response(200, json=answer(count(req)))

    with mock(handler) as c:
        c.max_request_bytes = 1000
        results = c.score_many([b"x" * 400] * 6, batch_size=6)
    assert len(results) == 6 and len(sizes) == 3


def test_inputs_the_client_cannot_send():
    with mock(lambda req: httpx.Response(200, json=answer(count(req)))) as c:
        with pytest.raises(TypeError):
            c.score_many([object()])
        with pytest.raises(ValueError, match="shape"):
            c.score(np.zeros((2, 2, 2), np.uint8))
        r = c.score_many([np.zeros((0, 3), np.uint8), b"ok"])
    assert r[0].error.status == 0 and r[1].ok
