"""Heavy inputs and process measurements for the bounded-resources tests and benchmarks/soak.py
(numpy + Pillow + /proc only)."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
from PIL import Image


def png16(side: int = 6300) -> bytes:
    """A ``side``² 16-bit greyscale PNG (a gradient: ~0.5 MB on disk, 79 MB decoded)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.uint32)
    img = Image.fromarray(((x * 7 + y * 3) % 65536).astype(np.uint16))
    del x, y
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def padded_png(small: bytes, size: int) -> bytes:
    """A valid PNG padded with trailing bytes to ``size`` (decoders ignore the tail)."""
    return small + b"\x00" * (size - len(small))


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak since start) of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def raw_request(port: int, head: str, timeout: float = 30) -> socket.socket:
    """A loopback socket with ``head`` (request line and headers, CRLF-joined) sent."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(head.encode("latin-1"))
    return s


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (status, lower-cased headers, body) from ``s``."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if status == 100:  # an interim answer: the caller reads the final one later
        return status, headers, body
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body
