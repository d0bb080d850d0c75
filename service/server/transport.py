"""The HTTP/1.1 layer: its parser and its own limits, passed to uvicorn by cli.py
(``uvicorn_options``).

uvicorn bounds open connections (``limit_concurrency``: a plain 503 beyond it) and idle
keep-alive connections (``timeout_keep_alive``), but has no timeout for the request head: a
client that opens a connection and trickles its headers (slowloris) holds it for ever.
``HeadTimeout`` closes a connection whose request line and headers have not all arrived
``header_timeout_s`` after it opened or after its previous answer.

Two parsers (``http_parser``): httptools (llhttp, in C), the default when installed, and h11
(pure Python). Measured on the default bundle (2 cores, c=32, benchmarks/versus_24.md),
httptools costs less CPU per request than h11. h11 bounds the request head itself
(``max_incomplete_event_size``, a 400 beyond ``max_header_bytes``); llhttp has no such bound,
so ``GuardedHttpTools`` counts the head's bytes as they arrive (up to the blank line that ends
it) and answers 400 and closes once a head passes ``max_header_bytes``; a head that starts
inside a read, after another request's body (pipelining), is counted from the request line
and headers the parser hands over (a header still arriving is then bounded by its reads).

One write per answer (``HeldHead``): uvicorn writes a response's head and its body with two
``transport.write`` calls, and uvloop sends each at once: two syscalls and two TCP segments
per answer. Both protocols write through ``HeldHead``, which holds a fixed-length response's
head until the body's first write and sends them together (issue 24: one syscall less per
request on both sides of the socket).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import Settings

HEAD_END = b"\r\n\r\n"


class HeldHead:
    """The connection's transport, holding a response head for the body's first write.

    What is held: a write that is a whole head (``HTTP/1.1`` and a status of 200 or above,
    ending in its blank line) with a ``content-length`` (a chunked or streaming answer is
    sent as it comes: its body may be slow). It goes out joined with the next write, or
    at ``flush`` (the protocol calls it when the response completes) or ``close``. Bytes
    never change order and every answer is whole on the wire when it completes; only a
    fixed-length head waits, until its body's first bytes (at once for the answers hopgate
    builds; a proxied answer's when the classifier sends them). Everything else is the
    transport's own (``__getattr__``)."""

    __slots__ = ("_transport", "_head")

    def __init__(self, transport: asyncio.Transport):
        self._transport, self._head = transport, b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._head:
            data, self._head = self._head + data, b""
        elif (type(data) is bytes and data.startswith(b"HTTP/1.1 ") and data[9:10] != b"1"
              and data.endswith(HEAD_END) and b"\r\ncontent-length:" in data.lower()):
            self._head = data
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HeadTimeout:
    """Mixin for uvicorn's protocols: the request head must arrive within ``head_timeout_s``;
    answers written through ``HeldHead``."""

    head_timeout_s = 10.0  # set per server by ``protocol_for``
    _head_timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(HeldHead(transport))  # type: ignore[misc, arg-type]
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._head_timer is not None and not self._waiting_for_head():
            self._disarm()

    def on_response_complete(self) -> None:
        self.transport.flush()  # type: ignore[attr-defined]  # HeldHead: nothing stays held
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and self._waiting_for_head():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]


class HeadTimeoutH11(HeadTimeout, H11Protocol):
    """h11, with the head timeout (h11 bounds the head's size itself)."""


def _httptools_protocol() -> type | None:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools not installed
        return None

    class GuardedHttpTools(HeadTimeout, HttpToolsProtocol):
        """httptools, with the head timeout and a bound on the head's size (module doc)."""

        max_head_bytes = 16 * 1024  # set per server by ``protocol_for``
        _head_open = True  # the next bytes read belong to a request head (or start one)
        _head_seen = 0  # bytes of the current head so far
        _tail = b""  # the last 3 bytes read, for a blank line split between two reads

        def data_received(self, data: bytes) -> None:
            if self._head_open:
                window = self._tail + data
                end = window.find(HEAD_END)
                if end < 0:
                    self._head_seen += len(data)
                    self._tail = window[-3:]
                else:  # the head ends in this read; what follows is its body
                    self._head_seen += end + len(HEAD_END) - len(self._tail)
                    self._head_open, self._tail = False, b""
                if self._head_seen > self.max_head_bytes:
                    self._head_open, self._head_seen = False, 0
                    return self.send_400_response("Request head too large.")
            super().data_received(data)

        def on_message_complete(self) -> None:  # the body is in: a next read starts a head
            super().on_message_complete()
            self._head_open, self._head_seen, self._tail = True, 0, b""

        # the head as the parser hands it over, for a head that starts inside a read
        # (pipelined after a body): too large, the parser stops and uvicorn answers 400
        _parsed = 0

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._parsed = 0

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count(self, n: int) -> None:
            self._parsed += n
            if self._parsed > self.max_head_bytes:
                raise ValueError("request head too large")  # -> HttpParserCallbackError

        def send_400_response(self, msg: str) -> None:
            if self._parsed > self.max_head_bytes:
                msg = "Request head too large."
            super().send_400_response(msg)

    return GuardedHttpTools


def parser_of(settings: Settings) -> str:
    """The parser this server runs: ``http_parser``, ``auto`` being httptools when installed."""
    if settings.http_parser != "auto":
        return settings.http_parser
    return "httptools" if _httptools_protocol() is not None else "h11"


def protocol_for(settings: Settings) -> type:
    if parser_of(settings) == "httptools":
        base = _httptools_protocol()
        if base is None:
            raise ValueError("http_parser is httptools but httptools is not installed "
                             "(pip install httptools, or HOPGATE_HTTP_PARSER=h11)")
        return type("HopgateHttpTools", (base,), {"head_timeout_s": settings.header_timeout_s,
                                                  "max_head_bytes": settings.max_header_bytes})
    return type("HopgateH11", (HeadTimeoutH11,), {"head_timeout_s": settings.header_timeout_s})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.Config keywords that bound connections, from the settings."""
    return {
        "http": protocol_for(settings),
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keepalive_timeout_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_graceful_shutdown": int(settings.drain_seconds) + 1,
        "loop": settings.event_loop,
    }
