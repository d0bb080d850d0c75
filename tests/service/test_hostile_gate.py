"""Issue 14, the gate (fast tier, the upstream answered in process by httpx.MockTransport):
the fail policy covers upstream 5xx and oversized answers as well as refusals and timeouts;
forwarded headers are sanitised; the upstream's body is capped."""

from __future__ import annotations

from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from conftest import in_process
from inputs import encode, synthetic

from hopgate.service.imaging import decode

pytestmark = pytest.mark.anyio
PNGS = [encode(a) for a in synthetic(16, seed=1)]


@pytest.fixture(scope="module")
def id_png(direct) -> bytes:
    ref = direct(np.stack([decode(b, 28, 28, 1) for b in PNGS]))
    return PNGS[int(np.flatnonzero(~ref["is_ood"])[0])]


@asynccontextmanager
async def gated(answer, **settings):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)

    async with in_process(upstream_url="http://upstream/predict", **settings) as c:
        gate = c.app.state.gate
        await gate.client.aclose()
        gate.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        c.seen = seen  # type: ignore[attr-defined]
        yield c


@pytest.mark.parametrize("policy,status", [("fail_closed", 502), ("fail_open", 200)])
@pytest.mark.parametrize("upstream_status", [500, 503])
async def test_upstream_5xx_gets_the_policy(anyio_backend, id_png, policy, status,
                                            upstream_status):
    async with gated(lambda r: httpx.Response(upstream_status, json={"oops": 1}),
                     upstream_policy=policy) as c:
        r = await c.post("/score", content=id_png, headers={"content-type": "image/png"})
        metrics = (await c.get("/metrics")).text
    assert r.status_code == status, r.text
    doc = r.json()
    up = doc["results"][0]["upstream"]
    assert up["status"] == 502 and f"answered {upstream_status}" in up["error"]
    assert ("error" in doc) is (policy == "fail_closed")
    assert 'hopgate_upstream_errors_total{kind="status"} 1.0' in metrics


class Chunks(httpx.AsyncByteStream):
    """An answer without Content-Length: the cap must hold while it streams."""

    async def __aiter__(self):
        for _ in range(5):
            yield b"x" * 1000


@pytest.mark.parametrize("policy,status", [("fail_closed", 502), ("fail_open", 200)])
@pytest.mark.parametrize("streamed", [False, True])
async def test_oversized_upstream_body_gets_the_policy(anyio_backend, id_png, policy, status,
                                                       streamed):
    def answer(r: httpx.Request) -> httpx.Response:
        if streamed:
            return httpx.Response(200, stream=Chunks())
        return httpx.Response(200, content=b"x" * 5000)

    async with gated(answer, upstream_policy=policy, upstream_max_body_bytes=4096) as c:
        r = await c.post("/score", content=id_png, headers={"content-type": "image/png"})
    assert r.status_code == status
    assert "over 4096 bytes" in r.json()["results"][0]["upstream"]["error"]


async def test_upstream_body_under_the_cap_is_passed_on(anyio_backend, id_png):
    async with gated(lambda r: httpx.Response(200, content=b"y" * 4000),
                     upstream_max_body_bytes=4096) as c:
        r = await c.post("/score", content=id_png, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["results"][0]["upstream"]["body"] == "y" * 4000


async def test_non_ascii_headers_are_sanitised_not_a_500(anyio_backend, id_png):
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with gated(lambda r: httpx.Response(200, json={"ok": True})) as c:
        bad_type = await c.post("/score", content=id_png,
                                headers={"content-type": "image/p\xe9ng".encode("latin-1")})
        bad_trace = await c.post("/score", content=id_png, headers={
            "content-type": "image/png", "traceparent": "00-\xff\xfe".encode("latin-1"),
            "tracestate": "a=\xff".encode("latin-1")})
        good = await c.post("/score", content=id_png, headers={
            "content-type": "image/png; q=1", "traceparent": tp, "tracestate": "k=v"})
        seen = c.seen  # type: ignore[attr-defined]
    assert bad_type.status_code == bad_trace.status_code == good.status_code == 200
    assert seen[0].headers["content-type"] == "image/png"  # not the client's: its bytes' type
    assert "traceparent" not in seen[1].headers and "tracestate" not in seen[1].headers
    assert seen[2].headers["content-type"] == "image/png"
    assert seen[2].headers["traceparent"] == tp and seen[2].headers["tracestate"] == "k=v"
