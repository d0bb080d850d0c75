"""Auxiliary outliers for GReg / GReg+ training: real images kept disjoint from every test OOD set.

The evaluation's far-OOD sets (data.far_ood_sets) are sklearn's handwritten digits, patches of
the photos in data._photos (18 scikit-image images plus sklearn's two sample photos),
scikit-image's lfw_subset faces, rendered *letters*, and uniform/Gaussian-blob noise. An
auxiliary pool that overlaps them would turn the OOD benchmark into a training-set score, so
the pool here uses none of those sources:

* photo patches of images no test set uses: scikit-image ``horse``, ``clock``, ``retina``,
  ``microaneurysms``, ``logo``, ``shepp_logan_phantom`` (``cat`` is excluded: it is
  ``chelsea``, a test photo; ``stereo_motorcycle`` too: the same scene as ``motorcycle_left``)
  and matplotlib's sample images ``grace_hopper.jpg``, ``Minduka_Present_Blue_Pack.png``,
  ``logo2.png`` and the ``topobathy`` / ``jacksboro_fault_dem`` elevation rasters;
* rendered *symbols* (punctuation and math signs, never letters or digits) in the machine's
  fonts;
* structured synthetic textures (stripes, checkerboards, rings, binary blobs), never i.i.d.
  noise: the noise test set stays unseen.

Everything ships with installed packages; nothing is downloaded. A source a given release
lacks is skipped (its name is recorded in ``sources``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .sources import pick_font, resize_all

SKIMAGE_PHOTOS = ("horse", "clock", "retina", "microaneurysms", "logo", "shepp_logan_phantom")
MPL_SAMPLES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png",
               "topobathy.npz", "jacksboro_fault_dem.npz")
SYMBOLS = "!?#$%&*+-=<>/\\|@^~()[]{}§±×÷∞∑∏√∫≈≠≤≥∂∇"


def _as_uint8_rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = 255 * (a - a.min()) / max(a.max() - a.min(), 1e-12)
        a = a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    return a[..., :3]


def aux_photos() -> dict[str, np.ndarray]:
    """Photographs and rasters that no evaluation set draws from."""
    out = {}
    from skimage import data as sk

    for n in SKIMAGE_PHOTOS:
        try:
            out[f"skimage.{n}"] = _as_uint8_rgb(getattr(sk, n)())
        except Exception:  # missing in this release or needs a download
            continue
    try:
        import matplotlib

        root = Path(matplotlib.get_data_path()) / "sample_data"
        for n in MPL_SAMPLES:
            p = root / n
            if not p.exists():
                continue
            if p.suffix == ".npz":
                with np.load(p) as z:
                    key = "elevation" if "elevation" in z.files else z.files[0]
                    out[f"matplotlib.{n}"] = _as_uint8_rgb(z[key])
            else:
                out[f"matplotlib.{n}"] = _as_uint8_rgb(np.asarray(Image.open(p).convert("RGB")))
    except Exception:
        pass
    return out


def photo_patches(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    photos = list(aux_photos().values())
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        p = photos[rng.integers(len(photos))]
        s = int(rng.integers(max(min(p.shape[:2]) // 10, 8), min(p.shape[:2]) // 2 + 1))
        y, x = rng.integers(p.shape[0] - s + 1), rng.integers(p.shape[1] - s + 1)
        out[i] = np.asarray(Image.fromarray(p[y:y + s, x:x + s]).resize((size, size),
                                                                         Image.BILINEAR))
    return out


def symbols(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Punctuation and math signs (never letters or digits: those are test sets)."""
    fonts = sorted(Path("/usr/share/fonts").rglob("*.ttf"))[:20] if Path(
        "/usr/share/fonts").exists() else []
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        im = Image.new("L", (size, size), 0)
        font = pick_font(fonts, int(rng.integers(size // 2, size - 2)), rng)
        ImageDraw.Draw(im).text((size // 2, size // 2), SYMBOLS[rng.integers(len(SYMBOLS))],
                                fill=int(rng.integers(128, 256)), font=font, anchor="mm")
        out[i] = np.asarray(im)[..., None]
    return out


def textures(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Stripes, checkerboards, rings and thresholded smooth blobs at random scales/angles."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        kind, f, th = rng.integers(4), rng.uniform(2, 10), rng.uniform(0, np.pi)
        u = np.cos(th) * xx + np.sin(th) * yy
        if kind == 0:
            t = 0.5 + 0.5 * np.sin(2 * np.pi * f * u)
        elif kind == 1:
            t = ((np.floor(f * xx) + np.floor(f * yy)) % 2).astype(np.float64)
        elif kind == 2:
            cy, cx = rng.uniform(0.2, 0.8, 2)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * f * np.hypot(yy - cy, xx - cx))
        else:
            g = rng.normal(size=(4, 4))
            sm = np.asarray(Image.fromarray(g.astype(np.float32)).resize((size, size),
                                                                        Image.BICUBIC))
            t = (sm > np.median(sm)).astype(np.float64)
        lo = rng.uniform(0, 191)
        hi = rng.uniform(lo + 64, 255)
        out[i] = (lo + (hi - lo) * t).astype(np.uint8)[..., None]
    return out


def auxiliary_outliers(n: int, size: tuple[int, int], channels: int, seed: int = 0) -> dict:
    """``n`` auxiliary outlier images at the model's input: half photo patches, a quarter
    symbols, a quarter textures. Returns {"images": uint8 [n, H, W, C], "sources": [...]}."""
    rng = np.random.default_rng(seed + 7919)  # a stream of its own, apart from the test sets'
    side = max(size) * 2
    n_photo, n_sym = n // 2, n // 4
    parts = [photo_patches(n_photo, side, rng), symbols(n_sym, side, rng),
             textures(n - n_photo - n_sym, side, rng)]
    images = np.concatenate([resize_all(p, size, channels) for p in parts])
    flat = np.ptp(images.reshape(len(images), -1), axis=1) < 8  # a flat patch: no content, and
    if flat.any():  # a blank image can coincide with a test set's blank one: replace by textures
        images[flat] = resize_all(textures(int(flat.sum()), side, rng), size, channels)
    images = images[rng.permutation(len(images))]
    sources = sorted(aux_photos()) + ["rendered symbols", "synthetic textures"]
    return {"images": images, "sources": sources}


def pool_cache(n: int, size: tuple[int, int], channels: int, seed: int,
               workdir: Path) -> np.ndarray:
    """The pool, cached as an .npz in the work dir (rendering costs a few seconds)."""
    path = Path(workdir) / f"aux_outliers_{n}_{size[0]}x{size[1]}x{channels}_s{seed}.npz"
    if path.exists():
        return np.load(path)["images"]
    pool = auxiliary_outliers(n, size, channels, seed)["images"]
    os.makedirs(path.parent, exist_ok=True)
    np.savez_compressed(path, images=pool)
    return pool
