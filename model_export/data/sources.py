"""Data that exists offline: ID sets (Fashion-MNIST, an image folder, .npz arrays) and OOD sources.

Every loader returns uint8 images as a numpy array ``[N, H, W, C]`` (the bundle's input layout)
plus int64 labels where there are any. Resizing happens with Pillow, as in the service, so a
model sees the same pixels in training, evaluation and serving.
"""

from __future__ import annotations

import gzip
import hashlib
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hopgate.pixels import Resize, as_policy, fit

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DataError(RuntimeError):
    """Data that is missing or malformed; the message says how to fix it."""


@dataclass
class Split:
    """Images ``[N, H, W, C]`` uint8 and labels ``[N]`` int64 of one split."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> Split:
        return Split(self.images[idx], self.labels[idx], self.class_names)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()[:16]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def fashion_mnist(split: str = "train", root: Path | None = None) -> Split:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX, gzip)."""
    root = Path(root) if root else FASHION_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    img, lab = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists() or not lab.exists():
        raise DataError(
            f"Fashion-MNIST not found under {root}. Install it with: "
            "sudo apt-get install -y dataset-fashion-mnist"
        )
    images = _read_idx(img)[..., None]  # [N, 28, 28, 1]
    return Split(images, _read_idx(lab).astype(np.int64), list(FASHION_CLASSES))


def resize(img: Image.Image, size: tuple[int, int], channels: int,
           mode: str | Resize = "stretch") -> np.ndarray:
    """Convert to L or RGB, then the service's own resize policy, so training, evaluation and
    serving see the same pixels."""
    return fit(img.convert("L" if channels == 1 else "RGB"), size[0], size[1], mode)


def resize_all(images: np.ndarray, size: tuple[int, int], channels: int,
               mode: str | Resize = "stretch") -> np.ndarray:
    """Resize a uint8 batch ``[N, H, W, C]`` to ``size`` and ``channels`` with Pillow (a
    batch already at the size is kept unless the policy crops)."""
    if (images.shape[1:3] == tuple(size) and images.shape[3] == channels
            and as_policy(mode).crop == 1):
        return images
    out = np.empty((len(images), size[0], size[1], channels), dtype=np.uint8)
    for i, a in enumerate(images):
        out[i] = resize(Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a), size,
                        channels, mode)
    return out


def image_folder(root: str | Path, size: tuple[int, int], channels: int,
                 mode: str = "stretch") -> Split:
    """A folder with one sub-folder per class (sorted names are the class names)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder:{root}: no such folder; point data.id (or data.test) at a "
                        "folder with one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"folder:{root}: no sub-folders; put each class's images in a "
                        "sub-folder named after the class")
    images, labels = [], []
    for c, name in enumerate(classes):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(p) as im:
                        images.append(resize(im, size, channels, mode))
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    raise DataError(f"{p}: not a readable image ({type(e).__name__}: {e}); "
                                    "replace or remove the file") from None
                labels.append(c)
    if not images:
        raise DataError(f"{root}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64), classes)


def npz_arrays(path: str | Path) -> Split:
    """An ``.npz`` with ``images`` (uint8 [N,H,W] or [N,H,W,C]) and ``labels``; optional
    ``class_names``."""
    if not Path(path).is_file():
        raise DataError(f"npz:{path}: no such file; point data.id (or data.test) at an .npz with "
                        "arrays images (uint8 [N,H,W] or [N,H,W,C]) and labels")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"npz:{path}: not a readable .npz ({e}); write it with numpy.savez("
                        "path, images=..., labels=...)") from None
    with z:
        missing = {"images", "labels"} - set(z.files)
        if missing:
            raise DataError(f"{path}: missing arrays {sorted(missing)} (has {z.files})")
        images, labels = z["images"], z["labels"].astype(np.int64)
        names = [str(s) for s in z["class_names"]] if "class_names" in z.files else None
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    names = names or [str(i) for i in range(int(labels.max()) + 1)]
    return Split(images, labels, names)


def split_holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Deterministic (train, held-out) split; the held-out part calibrates thresholds."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(split))
    n_hold = int(round(len(split) * fraction))
    return split.subset(np.sort(idx[n_hold:])), split.subset(np.sort(idx[:n_hold]))


# --- OOD sources: real images shipped by installed packages, plus synthetic ones -----------

def ood_digits() -> np.ndarray:
    """scikit-learn's 1,797 handwritten digits (8x8, 0..16) as uint8 grey images."""
    from sklearn.datasets import load_digits

    d = load_digits().images  # float 0..16
    return (d * (255.0 / 16.0)).round().astype(np.uint8)[..., None]


def _photos() -> list[np.ndarray]:
    """Colour and grey photographs bundled with scikit-image and scikit-learn."""
    from skimage import data as sk

    names = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field",
             "immunohistochemistry", "camera", "coins", "moon", "page", "text", "grass",
             "gravel", "brick", "rough_wall", "cell", "colorwheel"]
    out = []
    for n in names:
        try:
            out.append(np.asarray(getattr(sk, n)()))
        except Exception:  # an image a given scikit-image release lacks or must download
            continue
    try:
        from sklearn.datasets import load_sample_images

        out += list(load_sample_images().images)
    except Exception:
        pass
    return out


def ood_photo_patches(n: int = 2000, size: int = 64, seed: int = 0) -> np.ndarray:
    """Random square patches of the bundled photos (RGB uint8, ``size`` px)."""
    rng = np.random.default_rng(seed)
    photos = [p if p.ndim == 3 else np.repeat(p[..., None], 3, -1) for p in _photos()]
    photos = [p[..., :3].astype(np.uint8) if p.dtype == np.uint8 else
              (255 * (p[..., :3] / max(p.max(), 1))).astype(np.uint8) for p in photos]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        p = photos[rng.integers(len(photos))]
        s = int(rng.integers(min(p.shape[:2]) // 8, min(p.shape[:2]) // 2 + 1))
        y, x = rng.integers(p.shape[0] - s + 1), rng.integers(p.shape[1] - s + 1)
        patch = Image.fromarray(p[y:y + s, x:x + s]).resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(patch)
    return out


def ood_faces() -> np.ndarray:
    """scikit-image's ``lfw_subset``: 200 small grey face / non-face crops (25x25)."""
    from skimage import data as sk

    f = sk.lfw_subset()  # float 0..1, (200, 25, 25)
    return (f * 255).round().astype(np.uint8)[..., None]


def pick_font(fonts: list[Path], px: int, rng: np.random.Generator):
    """A random machine font at ``px`` pixels, or Pillow's default where there is none."""
    try:
        return ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), px) if fonts else \
            ImageFont.load_default(px)
    except Exception:
        return ImageFont.load_default()


def ood_glyphs(n: int = 1000, size: int = 28, seed: int = 0) -> np.ndarray:
    """Letters rendered with the machine's fonts (DejaVu when present, else Pillow's default)."""
    rng = np.random.default_rng(seed)
    fonts = [p for p in Path("/usr/share/fonts").rglob("*.ttf")][:20] if Path(
        "/usr/share/fonts").exists() else []
    letters = string.ascii_letters
    out = np.zeros((n, size, size, 1), dtype=np.uint8)
    for i in range(n):
        im = Image.new("L", (size, size), 0)
        d = ImageDraw.Draw(im)
        font = pick_font(fonts, int(rng.integers(size // 2, size - 2)), rng)
        d.text((size // 2, size // 2), letters[rng.integers(len(letters))], fill=255,
               font=font, anchor="mm")
        out[i, ..., 0] = np.asarray(im)
    return out


def ood_noise(n: int = 1000, size: int = 28, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Synthetic noise: half uniform, half Gaussian blobs (smoothed)."""
    rng = np.random.default_rng(seed)
    uni = rng.integers(0, 256, size=(n // 2, size, size, channels), dtype=np.uint8)
    g = rng.normal(128, 64, size=(n - n // 2, size // 4, size // 4, channels)).clip(0, 255)
    blobs = np.stack([
        np.asarray(Image.fromarray(b.astype(np.uint8).squeeze(-1) if channels == 1 else
                                   b.astype(np.uint8)).resize((size, size), Image.BICUBIC))
        for b in g]).reshape(n - n // 2, size, size, channels)
    return np.concatenate([uni, blobs])


def far_ood_sets(size: tuple[int, int], channels: int, seed: int = 0,
                 names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The far-OOD evaluation sets (those ``names`` names, default all), resized to a model's
    input."""
    make = {
        "digits": ood_digits,
        "photos": lambda: ood_photo_patches(seed=seed),
        "faces": ood_faces,
        "glyphs": lambda: ood_glyphs(seed=seed),
        "noise": lambda: ood_noise(seed=seed),
    }
    return {k: resize_all(f(), size, channels) for k, f in make.items()
            if names is None or k in names}
