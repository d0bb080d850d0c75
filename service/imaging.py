"""Image decoding policy: sniff, guard, decode, orient, convert, resize -- with Pillow.

Every failure is an ``ImageError`` carrying the HTTP status and a metrics reason, so one bad
image fails alone. The policy (also in docs/serving.md):

  * formats by magic bytes: PNG, JPEG, GIF, WebP, BMP, TIFF; anything else -> 415
  * empty input -> 400; undecodable, truncated or anything Pillow raises on it -> 422 (the
    message never carries object reprs or paths)
  * more than ``max_pixels`` pixels (checked from the header, before decoding) -> 413
  * animated images: the first frame is scored
  * EXIF orientation applied; 16-bit, palette, CMYK, alpha converted to L or RGB
  * resize as in training (model_export.data.resize) and as the bundle states
    (hopgate.pixels.Resize: stretch, centre square or shorter side; filter; centre crop)
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hopgate.pixels import Resize, fit

from .errors import ImageError

__all__ = ["ImageError", "TooCostly", "cost_of", "decode", "set_pillow_limit", "sniff"]

# Pillow's own bomb guard stays on as a second line (its limit is ours, x2 raises).
_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
]


def sniff(data: bytes) -> str:
    if not data:
        raise ImageError(400, "empty image")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    raise ImageError(415, "unsupported image format (accepted: PNG, JPEG, GIF, WebP, BMP, TIFF)")


# JPEGs are decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft) when that still leaves at least
# this many pixels per model pixel; the shared resize (hopgate.pixels.fit) does the rest.
# Measured on 1,000 Fashion-MNIST test images sent as 224 px JPEG q90 to the 28 px default
# model: decode 529 -> 296 us, accepted share and accuracy unchanged within 0.002 (margin 4);
# a margin of 1 (decode straight to 28 px) costs 0.7 points of accepted share.
DRAFT_MARGIN = 4


_BPP = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "LA": 4, "PA": 4}  # else 4
COST_FLOOR = 64 * 1024  # the least an image is charged (headers, buffers)


class TooCostly(ImageError):
    """The image's decode would cost more than the caller's ``max_cost`` (nothing decoded)."""

    def __init__(self, cost: int):
        super().__init__(413, f"image needs about {cost >> 20} MiB to decode")
        self.cost = cost


def cost_of(im: Image.Image, height: int, width: int, channels: int) -> int:
    """Estimated peak bytes to decode the opened (not loaded) ``im`` for a model of
    ``height`` x ``width`` x ``channels``: its pixels (JPEGs at their draft scale) x (bytes
    per pixel of its mode + of the 8-bit result)."""
    w, h = im.width, im.height
    if im.format == "JPEG":  # decode() drafts JPEGs down by up to 8
        side = DRAFT_MARGIN * max(height, width)
        scale = 1
        while scale < 8 and min(w, h) // (scale * 2) >= side:
            scale *= 2
        w, h = -(-w // scale), -(-h // scale)
    return max(COST_FLOOR, w * h * (_BPP.get(im.mode, 4) + (1 if channels == 1 else 4)))


STRIP_PIXELS = 1 << 20  # high-bit-depth and alpha images are converted this many pixels at a time


def _by_strips(img: Image.Image, bands: int, convert: Callable[[Image.Image], np.ndarray]
               ) -> Image.Image:
    """``convert`` applied to horizontal strips into one uint8 image: the only full-size
    arrays are the decoded image and the 8-bit result (no full-size float64 or RGBA copies;
    decode memory per pixel is the mode's own bytes plus ``bands``)."""
    w, h = img.size
    out = np.empty((h, w, bands) if bands > 1 else (h, w), np.uint8)
    step = max(1, STRIP_PIXELS // max(w, 1))
    for y in range(0, h, step):
        out[y:y + step] = convert(img.crop((0, y, w, min(h, y + step))))
    return Image.fromarray(out, "RGB" if bands == 3 else "L")


def _on_black(strip: Image.Image) -> np.ndarray:
    a = np.asarray(strip.convert("RGBA"), dtype=np.uint16)  # transparent -> black, like the data
    return ((a[..., :3] * a[..., 3:] + 127) // 255).astype(np.uint8)


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth: scale, don't clip
        hi = img.getextrema()[1]  # one band: (low, high)
        assert isinstance(hi, (int, float))
        scale = np.float32(255.0 / (65535.0 if img.mode.startswith("I;16") or hi > 255 else 255))
        img = _by_strips(img, 1, lambda s: np.clip(
            np.asarray(s, dtype=np.float32) * scale, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        if channels == 1:  # straight to grey, strip by strip, with Pillow's own RGB -> L
            img = _by_strips(img, 1, lambda s: np.asarray(
                Image.fromarray(_on_black(s)).convert("L")))
        else:
            img = _by_strips(img, 3, _on_black)
    return img.convert("L" if channels == 1 else "RGB")


def decode(data: bytes, height: int, width: int, channels: int, resize: str | Resize = "stretch",
           max_pixels: int = 40_000_000, max_cost: int | None = None) -> np.ndarray:
    """Encoded bytes -> uint8 ``[height, width, channels]`` as the bundle expects; with
    ``max_cost``, ``TooCostly`` before anything is decoded when ``cost_of`` exceeds it."""
    fmt = sniff(data)
    try:
        opened = Image.open(io.BytesIO(data), formats=[fmt])  # set_pillow_limit's filter
        if opened.width * opened.height > max_pixels:
            raise ImageError(413, f"image has {opened.width}x{opened.height} pixels; the "
                                  f"limit is {max_pixels}")
        if max_cost is not None and (cost := cost_of(opened, height, width,
                                                     channels)) > max_cost:
            raise TooCostly(cost)
        opened.seek(0)  # animated: the first frame
        if fmt == "JPEG":  # DCT-domain downscale, kept at >= DRAFT_MARGIN x the model size
            side = DRAFT_MARGIN * max(height, width)
            opened.draft(None, (side, side))
        opened.load()
        img = _to_mode(ImageOps.exif_transpose(opened), channels)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(413, f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:  # its message is "cannot identify image file <BytesIO ...>"
        raise ImageError(422, f"cannot decode {fmt} image: not a readable {fmt} file") from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow on hostile bytes: OSError, ValueError, TypeError, ...
        raise ImageError(422, f"cannot decode {fmt} image: {_clean(e)}") from None
    return fit(img, height, width, resize)


_REPR = re.compile(r"<[^<>]{0,200} at 0x[0-9a-fA-F]+>")
_PATH = re.compile(r"(?<![\w/])/(?:[\w.@+-]+/)+[\w.@+-]*")


def _clean(e: Exception) -> str:
    """An exception's message for the client: no object reprs, no file paths, bounded."""
    text = _PATH.sub("<path>", _REPR.sub("<object>", str(e)))[:200]
    return text or type(e).__name__


def set_pillow_limit(max_pixels: int) -> None:
    """Pillow raises DecompressionBombError above 2x this, and its warning above 1x is made
    an error. The filter is the process's, set once: ``warnings.catch_warnings`` around each
    decode swapped the process's filter list per image, from the loop and the decode threads
    at once (not thread-safe before Python 3.14), and cost ~3 us an image."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
