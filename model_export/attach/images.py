"""The images ``attach`` works on: the user's folder decoded as the service decodes, its labels
in the classifier's class indices, and a small far-OOD set for the build's report.

Labels (the folder's class sub-folders -> the classifier's class indices), first that applies:
  1. ``labels:`` in the config, a mapping folder name -> class index;
  2. folders named exactly like the classifier's ``class_names``: mapped by name;
  3. folders whose names are all whole numbers (digits only: 0, 1, ..., 07) below the
     classifier's class count: folder ``k`` is class index ``int(k)``, with or without
     ``class_names``;
  4. otherwise the classifier's own predictions are the labels ("pseudo-labels"): every
     image then counts as correctly classified, and the gate learns what the classifier does
     on this folder. The build says which one it used.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from hopgate.bundle import load_meta
from hopgate.service.imaging import ImageError, decode

from ..data import sources as data
from ..data.sources import DataError, Split
from .config import AttachConfig, AttachError, Preprocess


def list_folder(spec: str) -> tuple[list[str], list[Path], np.ndarray]:
    """``folder:DIR``'s class sub-folders (sorted), its image files and their folder index."""
    if not spec.startswith("folder:"):
        raise AttachError(f"--data {spec!r}: give folder:DIR (one sub-folder per class)")
    root = Path(spec[len("folder:"):])
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: expected one sub-folder per class with images inside")
    files, labels = [], []
    for c, name in enumerate(classes):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() in data.IMAGE_SUFFIXES:
                files.append(p)
                labels.append(c)
    if not files:
        raise DataError(f"{root}: no images found (suffixes {sorted(data.IMAGE_SUFFIXES)})")
    return classes, files, np.asarray(labels, np.int64)


def decode_files(files: list[Path], pre: Preprocess) -> np.ndarray:
    """Each file decoded and fitted to the classifier's input by the service's own decode
    (hopgate.service.imaging.decode) with the classifier's resize policy."""
    images = []
    for p in files:
        try:
            images.append(decode(p.read_bytes(), *pre.size, pre.channels, pre.pixels))
        except ImageError as e:
            raise DataError(f"{p}: {e.message}") from None
    return np.stack(images)


def load_folder(spec: str, cfg: AttachConfig) -> Split:
    """``folder:DIR`` with one sub-folder per class, every image decoded as the service
    decodes (``decode_files``). Labels are the sorted folder indices here; ``folder_labels``
    maps them to the classifier's."""
    classes, files, labels = list_folder(spec)
    return Split(decode_files(files, cfg.preprocess), labels, classes)


def folder_labels(folders: list[str], cfg: AttachConfig, num_classes: int
                  ) -> tuple[np.ndarray | None, str]:
    """The classifier's class index of each folder (None: use pseudo-labels) and a sentence
    saying which rule applied (module docstring)."""
    if cfg.labels is not None:
        missing = [f for f in folders if f not in cfg.labels]
        if missing:
            raise AttachError(f"labels: no class index for folders {missing}")
        index = np.asarray([cfg.labels[f] for f in folders], np.int64)
        how = "folder -> class index from the config's labels"
    elif cfg.class_names and all(f in cfg.class_names for f in folders):
        index = np.asarray([cfg.class_names.index(f) for f in folders], np.int64)
        how = "folders matched to the classifier's class_names by name"
    elif all(f.isdigit() and int(f) < num_classes for f in folders):
        index = np.asarray([int(f) for f in folders], np.int64)
        how = "folders named like class indices (folder k is class k)"
    else:
        return None, ("pseudo-labels: no labels mapping, and the folder names are neither "
                      "class_names nor class indices, so the classifier's own predictions "
                      "are the labels")
    bad = index[(index < 0) | (index >= num_classes)]
    if len(bad):
        raise AttachError(f"labels: class index {int(bad[0])} outside the classifier's "
                          f"{num_classes} classes")
    return index, how


BUILTIN_OOD = ("noise", "digits", "glyphs", "faces", "fashion_mnist")


def far_ood(cfg: AttachConfig) -> dict[str, np.ndarray]:
    """The far-OOD sets of the build's report, at the classifier's size: the built-in ones
    ``ood_sets`` names (uniform and blob noise, handwritten digits, rendered letters, face
    crops, Fashion-MNIST when installed; ``ood_images`` of each; photos are never among them:
    they may be the user's own domain), then every image under each ``ood_folders`` DIR."""
    n, pre = cfg.ood_images, cfg.preprocess
    make = {"noise": lambda: data.ood_noise(n, 64, pre.channels, cfg.seed),
            "digits": lambda: data.ood_digits()[:n],
            "glyphs": lambda: data.ood_glyphs(n, 64, cfg.seed),
            "faces": lambda: data.ood_faces()[:n],
            "fashion_mnist": lambda: data.fashion_mnist("test").images[:n]}
    out = {}
    for k in cfg.ood_sets:
        with contextlib.suppress(DataError):  # Fashion-MNIST is an optional package
            out[k] = data.resize_all(make[k](), pre.size, pre.channels, pre.pixels)
    for spec in cfg.ood_folders:
        root = Path(spec.removeprefix("folder:"))
        if not root.is_dir():
            raise AttachError(f"--ood {spec}: no such folder")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES)
        if not files:
            raise AttachError(f"--ood {spec}: no images under it")
        out[f"folder:{root.name}"] = decode_files(files, pre)
    return out


def served_parity(path: Path, files: list[Path], pixels: np.ndarray, cfg: AttachConfig,
                  n: int = 16) -> str:
    """The service decodes with what the written bundle states (hopgate.bundle's resize,
    filter and crop): the first ``n`` folder files through it must give the very pixels the
    gate was fitted on."""
    meta = load_meta(path)  # what the service reads first
    for f, want in zip(files[:n], pixels[:n]):
        got = decode(f.read_bytes(), meta.height, meta.width, meta.channels, meta.pixels)
        if not np.array_equal(got, want):
            raise AttachError(f"{f.name}: the service's decode with the bundle's resize "
                              f"policy ({meta.pixels}) differs from the build's pixels")
    return (f"served pixels = fitted pixels on {min(n, len(files))} files "
        f"(resize {meta.resize}, filter {meta.resize_filter}, crop {meta.crop})")
