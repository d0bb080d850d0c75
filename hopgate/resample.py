"""Pillow's antialiased resize, bit for bit, as two matrix products with cached weights.

Pillow (``Image.resize`` with BOX, BILINEAR, BICUBIC or LANCZOS on an 8-bit image) computes
each output pixel as a fixed-point sum over its source pixels: weights from the filter, scaled
by 2**22 and rounded to integers, a pass along one axis rounded to 8 bits, then a pass along
the other. It recomputes those weights, with two ``sin`` calls per tap for LANCZOS, on every
call: for the default model's 112 -> 28 px resize that is most of its 81 us.

Here the integer weights of a geometry (source size, output size, filter) are computed once,
with the same double arithmetic as Pillow's ``precompute_coeffs`` and ``normalize_coeffs_8bpc``
(Resample.c), and kept as a float64 matrix. A pass is then one BLAS product: every product and
partial sum is an integer below 2**37, exact in float64, so the floor-and-clip after it gives
Pillow's bytes exactly. Pillow 13 runs the vertical pass first when the height shrinks by more
than twice as many pixels as the width; before 13 it always ran the horizontal pass first.

``tests/test_resample.py`` compares it with the installed Pillow on random geometries, images
and filters; ``resize`` also checks itself against Pillow on a geometry's second image (the
first is Pillow's alone: a size seen once is not worth its weights) and hands that geometry
back to Pillow for good if they differ. Used by ``hopgate.pixels.fit`` for images and outputs
of at most ``MAX_SIDE`` pixels a side; larger ones and other filters go to Pillow.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import PIL
from PIL import Image

__all__ = ["MAX_SIDE", "resize"]

log = logging.getLogger("hopgate.resample")

PRECISION_BITS = 22  # Resample.c: 32 - 8 - 2
# larger images or outputs go to Pillow: a pass is a dense product (its cost and its weight
# matrix grow with source x output side), the float64 copies cost 8 bytes a pixel, and the
# cache holds at most WEIGHTS matrices of at most MAX_SIDE^2 (512 KB) each
MAX_SIDE = 256
WEIGHTS = 32
MAX_GEOMETRIES = 4096
_VERTICAL_FIRST_RULE = int(PIL.__version__.split(".")[0]) >= 13


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float) -> float:
    a = -0.5
    x = -x if x < 0.0 else x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


# filter -> (function, support), as Resample.c's filter structs
FILTERS = {Image.Resampling.BOX: (_box, 0.5), Image.Resampling.BILINEAR: (_bilinear, 1.0),
           Image.Resampling.BICUBIC: (_bicubic, 2.0), Image.Resampling.LANCZOS: (_lanczos, 3.0)}


@functools.lru_cache(maxsize=WEIGHTS)
def weights(in_size: int, out_size: int, resample: Image.Resampling) -> np.ndarray:
    """``[in_size, out_size]``: Pillow's fixed-point weights of one axis (column j holds
    output pixel j's taps), as float64 integers times 2**-22 (a power of two: still exact, and
    a pass's sums come out already shifted)."""
    f, support = FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    inv = 1.0 / filterscale
    one = 1 << PRECISION_BITS
    m = np.zeros((in_size, out_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        taps = min(int(center + support + 0.5), in_size) - xmin
        k = [f((x + xmin - center + 0.5) * inv) for x in range(taps)]
        ww = 0.0
        for w in k:  # summed in Pillow's order: the rounding below depends on it
            ww += w
        for x, w in enumerate(k):
            w = w / ww if ww != 0.0 else w
            m[xmin + x, xx] = int(-0.5 + w * one) if w < 0 else int(0.5 + w * one)
    m *= 1.0 / one
    m.flags.writeable = False
    return m


def _to_8bit(v: np.ndarray) -> np.ndarray:
    """Resample.c's clip8 of a pass's sums (already shifted): round half up, clip to 0..255."""
    v += 0.5
    np.floor(v, out=v)
    return np.clip(v, 0.0, 255.0, out=v)


def _passes(x: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """``x``: float64 ``[bands, h, w]`` -> ``[bands, H, W]`` in Pillow's pass order."""
    (W, H), (h, w) = size, x.shape[1:]

    def horizontal(x: np.ndarray) -> np.ndarray:
        return x if w == W else _to_8bit(x @ weights(w, W, resample))

    def vertical(x: np.ndarray) -> np.ndarray:
        return x if h == H else _to_8bit(weights(h, H, resample).T @ x)

    vertical_first = _VERTICAL_FIRST_RULE and h - H > 0 and h - H > (w - W) * 2
    return horizontal(vertical(x)) if vertical_first else vertical(horizontal(x))


SEEN, AGREES, DIFFERS = 1, 2, 0
_geometries: dict[tuple, int] = {}  # (mode, size in, size out, filter) -> SEEN/AGREES/DIFFERS


def _eligible(img: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> bool:
    return (img.mode in ("L", "RGB") and resample in FILTERS
            and max(*img.size, *size) <= MAX_SIDE)


def computed(img: Image.Image, size: tuple[int, int], resample: Image.Resampling
             ) -> np.ndarray:
    """The matrix passes alone, as ``resize`` serves them (no comparison with Pillow)."""
    a = np.asarray(img)
    x = a[None] if a.ndim == 2 else np.moveaxis(a, 2, 0)
    out = _passes(x.astype(np.float64), size, resample).astype(np.uint8)
    return out[0] if a.ndim == 2 else np.ascontiguousarray(np.moveaxis(out, 0, 2))


def resize(img: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """``img.resize(size, resample)`` as a uint8 array (``[H, W]`` or ``[H, W, 3]``).

    A geometry's first image is Pillow's (a size seen once is not worth computing weights
    for, in Python: clients that send every size keep Pillow's speed); its second is computed
    both ways and compared; from then on the matrices serve it, or Pillow for good if the
    two ever differed."""
    if not _eligible(img, size, resample):
        return np.asarray(img.resize(size, resample))
    key = (img.mode, img.size, size, resample)
    state = _geometries.get(key)
    if state is None:
        if len(_geometries) >= MAX_GEOMETRIES:  # bounded: old ones are just seen again
            _geometries.clear()
        _geometries[key] = SEEN
    if state is None or state == DIFFERS:
        return np.asarray(img.resize(size, resample))
    out = computed(img, size, resample)
    if state == SEEN:
        ref = np.asarray(img.resize(size, resample))
        _geometries[key] = AGREES if np.array_equal(ref, out) else DIFFERS
        if _geometries[key] == DIFFERS:
            log.warning("resize %s %s -> %s (%s) differs from Pillow %s's: Pillow resizes it",
                        img.mode, img.size, size, resample.name, PIL.__version__)
            return ref
    return out
