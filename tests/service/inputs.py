"""The images and malformed inputs the service tests send (both tiers; no torch)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def encode(arr: np.ndarray, fmt: str = "PNG", size: int | None = None, mode: str | None = None,
           **save) -> bytes:
    img = Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    if size:
        img = img.resize((size, size), Image.BILINEAR)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def synthetic(n: int, seed: int = 0, size: int = 28) -> np.ndarray:
    """Grey uint8 ``[n, size, size, 1]`` images with structure (blobs on a dark ground), for
    tests about the serving path that need no particular verdict and no dataset."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size, 1), np.uint8)
    for k in range(n):
        cy, cx = rng.uniform(6, size - 6, 2)
        ry, rx = rng.uniform(3, 10, 2)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        out[k, ..., 0] = np.where(blob, rng.integers(120, 256), rng.integers(0, 40))
    return out


def _png(arr, **kw):
    return encode(arr, "PNG", **kw)


def _bomb() -> bytes:
    img = Image.new("L", (12000, 12000))  # 144 Mpx of zeros: compresses to ~150 kB
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def _sixteen_bit() -> bytes:
    a = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")  # uint16 -> mode I;16
    return buf.getvalue()


def _animated() -> bytes:
    frames = [Image.fromarray(np.full((28, 28), v, np.uint8)) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _exif_rotated(arr) -> bytes:
    img = Image.fromarray(arr.squeeze(-1)).rotate(90, expand=True)  # stored rotated ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with "rotate 90 CW to display" in its EXIF orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def corpus(img):
    png = _png(img)
    jpg = encode(img, "JPEG")
    big_noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    return [
        # name, content-type, body (bytes or dict for JSON), expected status
        ("zero bytes", "image/png", b"", 400),
        ("truncated png", "image/png", png[: len(png) // 2], 422),
        ("truncated jpeg", "image/jpeg", jpg[: len(jpg) // 2], 422),
        ("png header only", "image/png", png[:8], 422),
        ("gif magic, garbage", "image/gif", b"GIF89a" + b"\x00" * 40, 422),
        ("text", "image/png", b"hello, I am not an image", 415),
        ("html", "image/png", b"<!doctype html><html><body>hi</body></html>", 415),
        ("pdf", "image/png", b"%PDF-1.4\n%...", 415),
        ("decompression bomb", "image/png", _bomb(), 413),
        ("oversized body", "image/png", _png(big_noise), 413),
        ("wrong content type", "text/plain", png, 415),
        ("no content type", "", png, 415),
        ("bad base64", "application/json", {"images": ["!!!not base64!!!"]}, 400),
        ("not json", "application/json", b"{images: nope", 400),
        ("json without images", "application/json", {"pictures": []}, 400),
        ("json empty list", "application/json", {"images": []}, 400),
        ("too many images", "application/json",
         {"images": [base64.b64encode(png).decode()] * 33}, 413),
        ("multipart without images part", "multipart", {"other": png}, 400),
        ("16-bit png", "image/png", _sixteen_bit(), 200),
        ("palette png", "image/png", _png(img, mode="P"), 200),
        ("cmyk jpeg", "image/jpeg", encode(img, "JPEG", mode="CMYK"), 200),
        ("rgba png", "image/png", _png(img, mode="RGBA"), 200),
        ("animated gif", "image/gif", _animated(), 200),
        ("exif-rotated jpeg", "image/jpeg", _exif_rotated(img), 200),
        ("webp", "image/webp", encode(img, "WEBP"), 200),
        ("bmp", "image/bmp", encode(img, "BMP"), 200),
        ("tiff", "image/tiff", encode(img, "TIFF"), 200),
        ("jpeg sent as image/png", "image/png", jpg, 200),
    ]


def send(c, ctype, body):
    if ctype == "multipart":
        return c.post("/score", files={k: ("x.png", v, "image/png") for k, v in body.items()})
    if isinstance(body, dict):
        return c.post("/score", json=body)
    headers = {"content-type": ctype} if ctype else {}
    if not ctype:  # httpx would add none; make sure none is sent
        return c.post("/score", content=body, headers={"content-type": ""})
    return c.post("/score", content=body, headers=headers)


def documented_statuses() -> dict[str, int]:
    """The case table of docs/serving.md: the documented status of each malformed input."""
    text = (ROOT / "docs" / "serving.md").read_text()
    lines = text.split("### The malformed-input corpus", 1)[1].split("| case | status |", 1)[1]
    table = []
    for line in lines.splitlines()[2:]:  # skip the rest of the header line and the |---| rule
        if not line.startswith("| "):
            break
        name, status = line.strip().strip("|").split("|")
        table.append((name.strip(), int(status)))
    return dict(table)


