"""The HTTP/1.1 layer's own limits, passed to uvicorn by cli.py (``uvicorn_options``).

uvicorn bounds open connections (``limit_concurrency``: a plain 503 beyond it), idle
keep-alive connections (``timeout_keep_alive``) and the size of a request head (h11's
``max_incomplete_event_size``: 400 beyond it), but has no timeout for the request head
itself: a client that opens a connection and trickles its headers (slowloris) holds it for
ever. ``HeadTimeoutH11`` closes a connection whose request line and headers have not all
arrived ``header_timeout_s`` after it opened or after its previous answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import Settings


class HeadTimeoutH11(H11Protocol):
    head_timeout_s = 10.0  # set per server by ``protocol_for``
    _head_timer: asyncio.TimerHandle | None = None

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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._waiting_for_head():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_head():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_for(settings: Settings) -> type[HeadTimeoutH11]:
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


def return_freed_memory(mmap_threshold: int = 1 << 20) -> bool:
    """glibc: allocations of ``mmap_threshold`` bytes or more always come from mmap, so they
    go back to the system when freed. (By default glibc raises this threshold to the size of
    the largest block freed, up to 32 MB, after which 15 MB bodies and 16 MB Pillow blocks
    live in heaps that stay at their peak: RSS does not fall back after a burst.) No-op off
    glibc; returns whether it was applied."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)
                    and libc.mallopt(m_trim_threshold, 2 * mmap_threshold))
    except (OSError, AttributeError):
        return False
