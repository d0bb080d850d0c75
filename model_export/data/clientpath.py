"""What clients send, simulated from native images: the served path, for training and calibration.

A client rarely sends the model's native pixels. It resizes the image (a 28 px Fashion-MNIST
item shown at 56-448 px; a large photo shrunk), saves it as JPEG (quality 60-95) or PNG, grey
or RGB; the service then decodes it and fits it back to the model's input
(``hopgate.service.imaging.decode``, the service's own code, with ``hopgate.pixels.fit``).
A model trained and calibrated only on native pixels over-promises on these images (issue 13:
the shipped bundle accepted 0.919 instead of 0.95 of 224 px JPEG q90 test images).

* ``simulate``: a seeded random client path per image (training augmentation, calibration).
* ``calibration_images``: the hold-out with a share of its images sent through ``simulate``.
* ``ENCODINGS`` / ``encoding_table``: fixed client encodings and, per encoding, the share of
  unseen ID images the gate accepts and the classifier's accuracy, against the target TPR
  (``hopgate-export evaluate``, the benchmark report, tests).

Cost (2 shared cores, 28 px grey sources, random sides 28-448 px): about 1 ms per image,
most of it encoding and decoding the large sides.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hopgate.pixels import Resize
from hopgate.service.imaging import decode

MAX_SIDE = 448  # the largest side a simulated client sends (longer natives: native size)
P_NATIVE = 0.2  # share sent at the native size
P_PNG = 0.3  # share sent as PNG (the rest JPEG)
JPEG_QUALITY = (60, 95)  # inclusive range
CLIENT_FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class Encoding:
    """One way a client sends an image: longer side in px (None: native size), format, JPEG
    quality, the file's colour mode, and the client's own resize filter."""

    side: int | None = None
    fmt: str = "PNG"
    quality: int | None = None
    mode: str = "L"
    resample: Image.Resampling = Image.Resampling.BILINEAR

    @property
    def label(self) -> str:
        size = "native" if self.side is None else f"{self.side} px"
        return f"{size} {self.fmt}" + (f" q{self.quality}" if self.quality else "")


ENCODINGS = (
    Encoding(), Encoding(56), Encoding(224), Encoding(448),
    Encoding(56, "JPEG", 90), Encoding(224, "JPEG", 75), Encoding(224, "JPEG", 90),
    Encoding(448, "JPEG", 90),
)


def _image(a: np.ndarray, mode: str) -> Image.Image:
    """uint8 ``[H, W, C]`` -> a Pillow image in the client's colour ``mode`` (L or RGB)."""
    img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    return img if img.mode == mode else img.convert(mode)


def encode(a: np.ndarray, enc: Encoding) -> bytes:
    """The bytes a client sends for native image ``a`` (uint8 ``[H, W, C]``)."""
    img = _image(a, enc.mode)
    if enc.side is not None:
        scale = enc.side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        if size != img.size:
            img = img.resize(size, enc.resample)
    buf = io.BytesIO()
    if enc.fmt == "JPEG":
        img.save(buf, "JPEG", quality=enc.quality or 90)
    else:  # lossless: the fastest zlib level gives the same pixels
        img.save(buf, enc.fmt, compress_level=1)
    return buf.getvalue()


def served(blobs: list[bytes], shape: tuple[int, ...],
           resize: str | Resize = "stretch") -> np.ndarray:
    """The service's own decode and fit of each blob, stacked as ``[N, *shape]`` uint8."""
    h, w, c = shape
    out = np.empty((len(blobs), h, w, c), dtype=np.uint8)
    for i, b in enumerate(blobs):
        out[i] = decode(b, h, w, c, resize)
    return out


def random_encodings(n: int, native: tuple[int, int, int],
                     rng: np.random.Generator) -> list[Encoding]:
    """``n`` random client encodings for images of shape ``native`` (H, W, C): the native size
    (P_NATIVE) or a log-uniform longer side up to MAX_SIDE (down to half size for natives of
    64 px and more); PNG (P_PNG) or JPEG q60-95; grey or RGB files for grey natives."""
    long = max(native[:2])
    lo, hi = (long if long < 64 else long / 2), max(MAX_SIDE, long)
    keep = rng.random(n) < P_NATIVE
    sides = np.exp(rng.uniform(math.log(lo), math.log(hi), n)).round().astype(int)
    png = rng.random(n) < P_PNG
    quality = rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, n)
    rgb = (rng.random(n) < 0.5) | (native[2] == 3)
    filt = rng.integers(len(CLIENT_FILTERS), size=n)
    return [Encoding(None if keep[i] else int(sides[i]), "PNG" if png[i] else "JPEG",
                     None if png[i] else int(quality[i]), "RGB" if rgb[i] else "L",
                     CLIENT_FILTERS[filt[i]]) for i in range(n)]


def simulate(images: np.ndarray, rng: np.random.Generator,
             resize: str | Resize = "stretch") -> np.ndarray:
    """Each native uint8 image ``[N, H, W, C]`` sent along a random client path (seeded by
    ``rng``) and back through the service: same shape, the pixels the model is served."""
    encs = random_encodings(len(images), images.shape[1:], rng)
    return served([encode(a, e) for a, e in zip(images, encs)], images.shape[1:], resize)


def calibration_images(images: np.ndarray, share: float, seed: int,
                       resize: str | Resize = "stretch") -> np.ndarray:
    """The hold-out with a seeded ``share`` of its images replaced by their client-path copy
    (share 0: the native hold-out, unchanged)."""
    if share <= 0:
        return images
    rng = np.random.default_rng([seed, 13])
    pick = np.flatnonzero(rng.random(len(images)) < share)
    out = images.copy()
    out[pick] = simulate(images[pick], rng, resize)
    return out


ScoreFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def encoding_table(score_fn: ScoreFn, images: np.ndarray, labels: np.ndarray, tau: float,
                   target_tpr: float, resize: str | Resize = "stretch",
                   encodings: tuple[Encoding, ...] = ENCODINGS) -> list[dict]:
    """Per client encoding, the served images' accepted share (score >= ``tau``), accuracy,
    accuracy on the accepted ones and the gap to ``target_tpr``. ``score_fn`` maps uint8
    images to (scores, predicted classes); the images must be ID images calibration never
    saw (the test split)."""
    rows = []
    for enc in encodings:
        x = served([encode(a, enc) for a in images], images.shape[1:], resize)
        scores, pred = score_fn(x)
        ok, right = scores >= tau, pred == labels
        rows.append({"encoding": enc.label, "n": len(images), "accepted": float(ok.mean()),
                     "accuracy": float(right.mean()),
                     "accuracy_accepted": float(right[ok].mean()) if ok.any() else float("nan"),
                     "gap": float(ok.mean() - target_tpr)})
    return rows


def format_table(rows: list[dict], target_tpr: float) -> list[str]:
    """Markdown lines of an ``encoding_table``."""
    lines = [f"| client encoding | n | accepted (target {target_tpr}) | accuracy "
             "| accuracy of accepted |", "|---|---|---|---|---|"]
    lines += [f"| {r['encoding']} | {r['n']} | {r['accepted']:.4f} ({r['gap']:+.4f}) | "
              f"{r['accuracy']:.4f} | {r['accuracy_accepted']:.4f} |" for r in rows]
    return lines
