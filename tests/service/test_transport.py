"""The HTTP layer (service/server/transport.py, issue 24): httptools by default, with issue 14's
request-head bound kept (llhttp has none: ``GuardedHttpTools`` counts the head's bytes), and
POST /score handed to its handler without the router (service/routes/direct.py)."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from conftest import in_process, serve
from inputs import encode, synthetic

from hopgate.service.config import Settings
from hopgate.service.routes import score as routes_score
from hopgate.service.server import transport

PNG = encode(synthetic(1, seed=5)[0])
LIMIT = 16 * 1024


def test_auto_is_httptools_and_h11_stays_available():
    assert transport.parser_of(Settings()) == "httptools"  # installed with the serve extra
    assert transport.protocol_for(Settings()).max_head_bytes == LIMIT
    h11 = transport.protocol_for(Settings(http_parser="h11"))
    assert issubclass(h11, transport.HeadTimeoutH11)
    assert transport.uvicorn_options(Settings(http_parser="h11"))["http"].__mro__[1] is \
        transport.HeadTimeoutH11


def _exchange(port: int, data: bytes, pieces: int = 1) -> bytes:
    """Send ``data`` in ``pieces`` (a pause between them), return what comes back until the
    server closes or two answers are in."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        step = -(-len(data) // pieces)
        for i in range(0, len(data), step):
            try:
                s.sendall(data[i:i + step])
            except OSError:  # refused part-way: the server closed
                break
            time.sleep(0.02)  # pacing a slow client
        out = b""
        try:
            while out.count(b"HTTP/1.1 ") < 2 or not out.endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except OSError:
            pass
    return out


def _request(pad: int, body: bytes = PNG) -> bytes:
    head = (f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n").encode()
    if pad:
        head += b"X-Pad: " + b"a" * pad + b"\r\n"
    return head + b"\r\n" + body


@pytest.mark.integration
def test_httptools_bounds_the_head_in_one_piece_and_in_many(tmp_path):
    big_body = b"\x89PNG" + b"z" * (4 * LIMIT)  # no blank line in it: not a head
    with serve(tmp_path) as s:
        assert '"http_parser"' not in s.log.read_text()  # the default, not set
        for pieces in (1, 7):
            over = _exchange(s.port, _request(LIMIT + 100), pieces)
            assert over.startswith(b"HTTP/1.1 400 ") and b"head too large" in over, over[:80]
            under = _exchange(s.port, _request(LIMIT - 500), pieces)
            assert under.startswith(b"HTTP/1.1 200 "), under[:80]
        # a body far over the head bound is a body: counted by max_body_bytes, not here
        bad_png = _exchange(s.port, _request(0, big_body), 5)
        assert bad_png.startswith((b"HTTP/1.1 415 ", b"HTTP/1.1 422 ")), bad_png[:80]
        # keep-alive and pipelining: the second head is counted afresh, both answered
        both = _exchange(s.port, _request(LIMIT - 500) + _request(LIMIT - 500))
        assert both.count(b"HTTP/1.1 200 ") == 2, both[:200]
        # ... and a second head over the bound: pipelined (in the read that ends the first
        # body, or in pieces), or sent after the first answer on the same connection
        for pieces in (1, 9):
            then = _exchange(s.port, _request(0) + _request(LIMIT + 100), pieces)
            assert b"HTTP/1.1 400 " in then and b"head too large" in then, then[:80]
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(_request(0))
            first = b""
            while not first.endswith(b"}"):  # the whole first answer
                first += sock.recv(65536)
            endless = _request(4 * LIMIT).split(b"\r\n\r\n")[0]  # a head that never ends
            for k in range(8):  # refused while it is still arriving (not at the head timeout)
                try:
                    sock.sendall(endless[k * len(endless) // 8:(k + 1) * len(endless) // 8])
                except OSError:
                    break
                time.sleep(0.02)  # pacing a slow client
            second = b""
            while chunk := sock.recv(65536):
                second += chunk
        assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 400 ")
        with httpx.Client(base_url=s.url) as c:  # one connection, many requests
            for _ in range(5):
                r = c.post("/score", content=PNG, headers={"x-pad": "b" * (LIMIT // 2),
                                                            "content-type": "image/png"})
                assert r.status_code == 200


@pytest.mark.anyio
async def test_post_score_skips_the_router_and_answers_as_routed(anyio_backend, monkeypatch):
    """Direct answers POST /score itself (it calls the handler by its module name; the router
    holds its own reference), errors in the app's one shape; other methods on /score still
    get the router's 405."""
    direct_calls = []
    handler = routes_score.score

    async def counted(request):
        direct_calls.append(request.url.path)
        return await handler(request)

    monkeypatch.setattr(routes_score, "score", counted)
    async with in_process() as c:
        ok = await c.post("/score", content=PNG, headers={"content-type": "image/png"})
        assert ok.status_code == 200 and ok.json()["results"][0]["score"] is not None
        assert len(ok.headers["x-request-id"]) == 32
        bad = await c.post("/score", content=b"not an image",
                           headers={"content-type": "text/plain"})
        assert bad.status_code == 415 and bad.json()["error"]["status"] == 415
        assert direct_calls == ["/score", "/score"]
        wrong = await c.get("/score")  # the router's 405, in the app's error shape
        assert wrong.status_code == 405 and wrong.json()["error"]["reason"] == \
            "method_not_allowed"


class Recording:
    """A transport that records what the protocol writes (one entry per write call; an empty
    write, h11's end of message, sends nothing and is left out)."""

    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data):
        if data:
            self.writes.append(bytes(data))

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


async def _asgi(scope, receive, send):
    """Fixed length on /fixed, chunked (no content-length) on /stream; reads the body."""
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one", b"two"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": memoryview(b"hello")})


@pytest.mark.parametrize("parser", ["httptools", "h11"])
@pytest.mark.anyio
async def test_one_write_per_fixed_length_answer(parser, anyio_backend):
    """HeldHead: a fixed-length answer leaves in one write (head and body together, so one
    syscall and one TCP segment); a HEAD answer, with no body write, still leaves when it
    completes; a chunked answer's head is not held back; 100 Continue is not held back."""
    import asyncio

    import uvicorn
    from uvicorn.server import ServerState

    settings = Settings(http_parser=parser)
    config = uvicorn.Config(_asgi, log_config=None, access_log=False,
                            **{**transport.uvicorn_options(settings), "loop": "asyncio"})
    config.load()
    proto = transport.protocol_for(settings)(config=config, server_state=ServerState(),
                                             app_state={})
    wire = Recording()
    proto.connection_made(wire)

    async def exchange(request: bytes) -> list[bytes]:
        start = len(wire.writes)
        proto.data_received(request)
        for _ in range(100):
            await asyncio.sleep(0.005)
            if proto.cycle is not None and proto.cycle.response_complete:
                break
        return wire.writes[start:]

    fixed = await exchange(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(fixed) == 1 and fixed[0].startswith(b"HTTP/1.1 200 "), fixed
    assert fixed[0].endswith(b"\r\n\r\nhello")
    head = await exchange(b"HEAD /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(head) == 1 and head[0].endswith(b"\r\n\r\n"), head
    stream = await exchange(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert stream[0].endswith(b"\r\n\r\n") and b"transfer-encoding: chunked" in stream[0].lower()
    assert len(stream) >= 3, stream  # the head alone, then the chunks as they come
    if parser == "httptools":  # uvicorn's h11 protocol writes 100 Continue itself too
        cont = await exchange(b"POST /fixed HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                              b"Content-Length: 2\r\n\r\n")
        assert cont == [b"HTTP/1.1 100 Continue\r\n\r\n"], cont
        rest = await exchange(b"ok")
        assert len(rest) == 1 and rest[0].endswith(b"hello"), rest
    proto.connection_lost(None)


@pytest.mark.parametrize("provider", [False, True])
@pytest.mark.anyio
async def test_fastapi_telemetry_is_asked_only_when_a_tracer_provider_is_set(
        provider, anyio_backend, monkeypatch):
    """With no OpenTelemetry tracer provider, FastAPI's telemetry is off (app.fastapi_telemetry)
    and it no longer looks up the providers on every request; with one set before the app is
    made, FastAPI keeps its telemetry."""
    from fastapi.telemetry import _asgi
    from opentelemetry import trace

    if provider:
        monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.NoOpTracerProvider())
    asked = []
    real = _asgi._unconfigured

    def counted(p):
        asked.append(p)
        return real(p)

    monkeypatch.setattr(_asgi, "_unconfigured", counted)
    async with in_process() as c:
        r = await c.post("/score", content=PNG, headers={"content-type": "image/png"})
        assert r.status_code == 200
    assert bool(asked) is provider, len(asked)
