"""Request parsing: the body under a size limit, the deadline header, and the split of a
/score body into encoded images (raw ``image/*``, multipart ``images`` parts, or JSON base64).

Whole-request problems raise ``ClientError`` (the request fails); a bad base64 item becomes
an ``ImageError`` in its slot of the returned list (that image fails alone).
"""

from __future__ import annotations

import base64
import binascii
import json
import time

from fastapi import Request

from .config import Settings
from .errors import ClientError, ImageError

DEADLINE_HEADER = "x-hopgate-deadline-ms"


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body; 413 as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ClientError(413, f"body of {length} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def request_deadline(request: Request, default_ms: float) -> float:
    """The request's deadline on ``time.monotonic()``: the server's default, which the
    ``X-Hopgate-Deadline-Ms`` header may shorten but never lengthen."""
    ms, header = default_ms, request.headers.get(DEADLINE_HEADER)
    if header:
        try:
            ms = min(ms, float(header))
        except ValueError:
            raise ClientError(400, f"{DEADLINE_HEADER} must be a number of milliseconds") from None
        if ms <= 0:
            raise ClientError(400, f"{DEADLINE_HEADER} must be positive")
    return time.monotonic() + ms / 1000.0


async def split_images(request: Request, settings: Settings) -> list[bytes | ImageError]:
    """The request's encoded images, by content type."""
    body = await read_body(request, settings.max_body_bytes)
    if not body:
        raise ClientError(400, "empty body: send an image, multipart 'images' parts, or JSON")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    blobs: list[bytes | ImageError]
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        blobs = [body]
    elif ctype == "multipart/form-data":
        blobs = list(await _multipart(request, body, settings))
    elif ctype == "application/json":
        blobs = _json_base64(body)
    else:
        raise ClientError(415, f"unsupported content type {ctype or '(none)'}: use image/*, "
                               "multipart/form-data or application/json")
    if len(blobs) > settings.max_images:
        raise ClientError(413, f"{len(blobs)} images in one request; the limit is "
                               f"{settings.max_images}")
    return blobs


async def _multipart(request: Request, body: bytes, settings: Settings) -> list[bytes]:
    request._body = body  # let Starlette's form parser read what we already read
    try:
        form = await request.form(max_files=settings.max_images + 1,
                                  max_part_size=settings.max_body_bytes)
    except Exception as e:
        raise ClientError(413 if "Too many" in str(e) else 400,
                          f"bad multipart body: {e}") from None
    parts = form.getlist("images")
    if not parts:
        raise ClientError(400, "multipart body has no file parts named 'images'")
    return [await p.read() if not isinstance(p, str) else p.encode() for p in parts]


def _json_base64(body: bytes) -> list[bytes | ImageError]:
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise ClientError(400, f"body is not valid JSON: {e}") from None
    items = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise ClientError(400, 'JSON body must be {"images": ["<base64>", ...]} with at least '
                               "one item")
    blobs: list[bytes | ImageError] = []
    for i, s in enumerate(items):
        try:
            blobs.append(base64.b64decode(s.split(",", 1)[-1] if s.startswith("data:") else s,
                                          validate=True))
        except (binascii.Error, ValueError):
            blobs.append(ImageError(400, f"images[{i}] is not valid base64"))
    return blobs
