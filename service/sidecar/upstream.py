"""A thin HTTP/1.1 client for the classifier beside the gate (proxy.py, passthrough.py).

Why not httpx here: the sidecar's added latency is the product (issue 24), and a general
client costs more per call than the whole verdict (header merging, default headers a
passthrough must not add, a response object per call). This one sends the request head and
body in one write, keeps idle keep-alive connections in a pool, and hands the answer back as
a status, the raw header list and an async iterator over the body as it arrives, so a large
answer streams through without being held.

What it does not do: HTTP/2, TLS client certificates, proxies, redirects, cookies,
decompression (the bytes go back as sent, with their Content-Encoding). An idle connection
is reused only while younger than ``IDLE_S`` (below the usual 5 s server keep-alive) and not
closed by the other side; a reused connection that fails before the status line is retried
once on a fresh one when the body can be sent again (bytes, not a stream).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

IDLE_S = 4.0  # an idle pooled connection older than this is closed, not reused
HEAD_LIMIT = 64 * 1024  # the status line and headers of an answer
CHUNK = 64 * 1024  # body reads


async def within(seconds: float, call: Awaitable[T]) -> T:
    """``call`` under a timeout (``TimeoutError``): ``asyncio.timeout`` where there is one
    (3.11+: no task per call, as ``wait_for`` makes)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await call
    try:
        return await asyncio.wait_for(call, seconds)
    except asyncio.TimeoutError:
        raise TimeoutError from None


class UpstreamError(Exception):
    """No answer (connect, send, or a malformed or cut answer)."""


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.idle_since = reader, writer, 0.0

    def usable(self) -> bool:
        return (not self.reader.at_eof() and not self.writer.is_closing()
                and time.monotonic() - self.idle_since < IDLE_S)

    def close(self) -> None:
        self.writer.close()


async def _exactly(r: asyncio.StreamReader, n: int) -> AsyncIterator[bytes]:
    """``n`` bytes of a body as they arrive (a chunk, or a Content-Length body)."""
    while n:
        data = await r.read(min(n, CHUNK))
        if not data:
            raise UpstreamError("answer cut short")
        n -= len(data)
        yield data


class Answer:
    """The upstream's status and headers; ``body()`` yields the body (de-chunked) as it
    arrives; the connection goes back to the pool when the body has been read whole."""

    def __init__(self, client: Client, conn: Connection, status: int,
                 headers: list[tuple[bytes, bytes]], length: int | None, chunked: bool,
                 reusable: bool):
        self.client, self.conn, self.status, self.headers = client, conn, status, headers
        self.length, self.chunked, self.reusable = length, chunked, reusable
        self._done = False

    async def body(self) -> AsyncIterator[bytes]:
        r = self.conn.reader
        try:
            if self.chunked:
                while True:
                    size = int((await r.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                    if size == 0:
                        while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers: dropped
                            pass
                        break
                    async for data in _exactly(r, size):
                        yield data
                    await r.readexactly(2)
            elif self.length is not None:
                async for data in _exactly(r, self.length):
                    yield data
            else:  # no framing: the body runs to the close
                while data := await r.read(CHUNK):
                    yield data
                self.reusable = False
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                ConnectionError) as e:
            self.reusable = False
            raise UpstreamError(f"answer cut short: {type(e).__name__}") from None
        self._done = True
        self.release()

    async def read(self, limit: int) -> bytes:
        """The whole body; ``UpstreamError`` beyond ``limit`` bytes."""
        if self.length is not None and self.length > limit:
            self.close()
            raise OverflowError
        parts, size = [], 0
        async for data in self.body():
            size += len(data)
            if size > limit:
                self.close()
                raise OverflowError
            parts.append(data)
        return b"".join(parts)

    def release(self) -> None:
        if self._done and self.reusable:
            self.client.give(self.conn)
        else:
            self.conn.close()

    def close(self) -> None:
        """Done with the answer: a body not read whole closes its connection."""
        if not self._done:
            self.conn.close()


class Client:
    def __init__(self, url: str, pool: int = 64):
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port]/..., not {url!r}")
        self.host = u.hostname
        self.tls = ssl.create_default_context() if u.scheme == "https" else None
        self.port = u.port or (443 if self.tls else 80)
        default = (self.port == 443) if self.tls else (self.port == 80)
        self.authority = (u.netloc.rpartition("@")[2] if not default else self.host).encode()
        self.idle: list[Connection] = []
        self.pool = pool

    async def _connect(self) -> Connection:
        try:
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.tls, limit=HEAD_LIMIT)
        except OSError as e:
            raise UpstreamError(f"connect: {type(e).__name__}") from None
        return Connection(reader, writer)

    def _pooled(self) -> Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    def give(self, conn: Connection) -> None:
        if len(self.idle) < self.pool and not conn.writer.is_closing():
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            conn.close()

    async def request(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes | AsyncIterator[bytes] = b"",
                      length: int | None = None) -> Answer:
        """Send one request (``headers`` without Host and framing headers: they are set
        here; a streamed body goes with ``length`` as Content-Length, else chunked)."""
        head = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", self.authority, b"\r\n"]
        for k, v in headers:
            head += [k, b": ", v, b"\r\n"]
        streamed = not isinstance(body, bytes)
        if isinstance(body, bytes):
            if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
                head += [b"content-length: ", str(len(body)).encode(), b"\r\n"]
        elif length is not None:
            head += [b"content-length: ", str(length).encode(), b"\r\n"]
        else:
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        raw_head = b"".join(head)
        conn = self._pooled()
        if conn is not None and not streamed:
            try:
                return await self._exchange(conn, method, raw_head, body, length)
            except UpstreamError:
                pass  # a stale keep-alive connection: once more on a fresh one
        elif conn is not None:
            return await self._exchange(conn, method, raw_head, body, length)
        return await self._exchange(await self._connect(), method, raw_head, body, length)

    async def _exchange(self, conn: Connection, method: str, head: bytes,
                        body: bytes | AsyncIterator[bytes], length: int | None) -> Answer:
        w = conn.writer
        try:
            if isinstance(body, bytes):
                w.write(head + body if len(body) < CHUNK else head)
                if len(body) >= CHUNK:
                    w.write(body)
            else:
                w.write(head)
                async for data in body:
                    if data:
                        w.write(data if length is not None
                                else b"%x\r\n%b\r\n" % (len(data), data))
                        await w.drain()
                if length is None:
                    w.write(b"0\r\n\r\n")
            await w.drain()
            return await self._answer(conn, method)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, IndexError) as e:
            conn.close()
            raise UpstreamError(f"no answer: {type(e).__name__}") from None
        except BaseException:  # cancelled (speculative mode, a timeout): the connection goes
            conn.close()
            raise

    async def _answer(self, conn: Connection, method: str) -> Answer:
        while True:
            raw = await conn.reader.readuntil(b"\r\n\r\n")
            lines = raw[:-4].split(b"\r\n")
            version, _, rest = lines[0].partition(b" ")
            status = int(rest[:3])
            if not 100 <= status < 200 or status == 101:
                break  # 1xx interim answers (100 Continue) are skipped
        headers, length, chunked, close = [], None, False, version == b"HTTP/1.0"
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            k, v = k.strip(), v.strip()
            lk = k.lower()
            if lk == b"content-length":
                length = int(v)
            elif lk == b"transfer-encoding":
                chunked = v.lower().endswith(b"chunked")
            elif lk == b"connection":
                close = b"close" in v.lower()
            headers.append((k, v))
        if method == "HEAD" or status in (204, 304):
            length, chunked = 0, False
        if chunked:
            length = None
        reusable = not close and (chunked or length is not None)
        return Answer(self, conn, status, headers, length, chunked, reusable)

    async def aclose(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()
