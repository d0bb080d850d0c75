"""Image decoding policy: sniff, guard, decode, orient, convert, resize -- with Pillow.

Every failure is an ``ImageError`` carrying the HTTP status and a metrics reason, so one bad
image fails alone. The policy (also in docs/serving.md):

  * formats by magic bytes: PNG, JPEG, GIF, WebP, BMP, TIFF; anything else -> 415
  * empty input -> 400; undecodable or truncated -> 422
  * more than ``max_pixels`` pixels (checked from the header, before decoding) -> 413
  * animated images: the first frame is scored
  * EXIF orientation applied; 16-bit, palette, CMYK, alpha converted to L or RGB
  * resize as in training (model_export.data.resize): stretch, or centre crop then resize
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hopgate.pixels import fit

from .errors import ImageError

__all__ = ["ImageError", "decode", "set_pillow_limit", "sniff"]

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


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth: scale, don't clip
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent -> black, like the data
        img = Image.alpha_composite(bg, img)
    return img.convert("L" if channels == 1 else "RGB")


def decode(data: bytes, height: int, width: int, channels: int, resize: str = "stretch",
           max_pixels: int = 40_000_000) -> np.ndarray:
    """Encoded bytes -> uint8 ``[height, width, channels]`` as the bundle expects."""
    fmt = sniff(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=[fmt])
            if opened.width * opened.height > max_pixels:
                raise ImageError(413, f"image has {opened.width}x{opened.height} pixels; the "
                                      f"limit is {max_pixels}")
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(422, f"cannot decode {fmt} image: {e}") from None
    return fit(img, height, width, resize)


def set_pillow_limit(max_pixels: int) -> None:
    """Pillow raises DecompressionBombError above 2x this; we warn->error above 1x."""
    Image.MAX_IMAGE_PIXELS = max_pixels
