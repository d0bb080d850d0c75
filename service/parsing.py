"""Request parsing: the body under a size limit, the deadline header, and the split of a
/score body into encoded images (raw ``image/*``, multipart ``images`` parts, or JSON base64).

Whole-request problems raise ``ClientError`` (the request fails); a bad base64 item becomes
an ``ImageError`` in its slot of the returned list (that image fails alone).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

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
    elif ctype == "multipart/form-data":  # parsed off the event loop: /healthz never stalls
        blobs = list(await asyncio.to_thread(
            _multipart, body, request.headers.get("content-type", ""), settings))
    elif ctype == "application/json":
        blobs = await asyncio.to_thread(_json_base64, body, settings.max_images)
    else:
        raise ClientError(415, f"unsupported content type {ctype or '(none)'}: use image/*, "
                               "multipart/form-data or application/json")
    if len(blobs) > settings.max_images:
        raise ClientError(413, f"{len(blobs)} images in one request; the limit is "
                               f"{settings.max_images}")
    return blobs


def _multipart(body: bytes, content_type: str, settings: Settings) -> list[bytes]:
    """The ``images`` parts of a /score multipart body. Runs off the event loop."""
    parts = multipart_parts(body, content_type, settings.max_images + 16, b"images")
    if not parts:
        raise ClientError(400, "multipart body has no file parts named 'images'")
    return parts


def multipart_parts(body: bytes, content_type: str, max_parts: int,
                    field: bytes | None = None) -> list[bytes]:
    """The bytes of the parts named ``field`` (None: every part), parsed in memory (no
    temporary files; the body is already bounded by ``max_body_bytes``). More than
    ``max_parts`` parts of any name is 413; a body the parser refuses is 400."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise ClientError(400, "bad multipart body: no boundary in Content-Type")
    parts: list[bytes] = []
    count = 0
    name, header_field, header, data = b"", b"", b"", bytearray()

    def on_part_begin() -> None:
        nonlocal name, data
        name, data = b"", bytearray()

    def on_header_field(b: bytes, start: int, end: int) -> None:
        nonlocal header_field
        header_field += b[start:end]

    def on_header_value(b: bytes, start: int, end: int) -> None:
        nonlocal header
        header += b[start:end]

    def on_header_end() -> None:
        nonlocal name, header_field, header
        if header_field.lower() == b"content-disposition":
            name = parse_options_header(header)[1].get(b"name", b"")
        header_field, header = b"", b""

    def on_part_data(b: bytes, start: int, end: int) -> None:
        if field is None or name == field:
            data.extend(b[start:end])

    def on_part_end() -> None:
        nonlocal count
        count += 1
        if count > max_parts:
            raise ClientError(413, f"multipart body has more than {max_parts} parts")
        if field is None or name == field:
            parts.append(bytes(data))

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except ClientError:
        raise
    except Exception as e:
        raise ClientError(400, f"bad multipart body: {type(e).__name__}") from None
    return parts


def _json_base64(body: bytes, max_images: int) -> list[bytes | ImageError]:
    """Runs off the event loop. json.loads holds the GIL for the whole document, so a body of
    millions of tiny values would still stall the loop: a document with more separators than
    ``{"images": [...]}`` of ``max_images`` items can have is refused before it is parsed."""
    separators = body.count(b",") + body.count(b":")
    if separators > 3 * max_images + 64:  # a data: URL item has one ":" and two ","
        raise ClientError(400, 'JSON body must be {"images": ["<base64>", ...]}: it has '
                               f"{separators} separators, more than {max_images} images need")
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise ClientError(400, f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise ClientError(400, "body is not valid JSON: nested too deeply") from None
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
