"""The images ``attach`` works on: the user's folder decoded as the service decodes, its labels
in the classifier's class indices, and a small far-OOD set for the build's report.

Labels (the folder's class sub-folders -> the classifier's class indices), first that applies:
  1. ``labels:`` in the config, a mapping folder name -> class index;
  2. folders named exactly like the classifier's ``class_names``: mapped by name;
  3. otherwise the classifier's own predictions are the labels ("pseudo-labels"): every
     image then counts as correctly classified, and the gate learns what the classifier does
     on this folder. The build says which one it used.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from hopgate.service.imaging import ImageError, decode

from ..data import sources as data
from ..data.sources import DataError, Split
from .config import AttachConfig, AttachError


def load_folder(spec: str, cfg: AttachConfig) -> Split:
    """``folder:DIR`` with one sub-folder per class, every image decoded and fitted to the
    classifier's size by the service's own decode (hopgate.service.imaging.decode). Labels
    are the sorted folder indices here; ``folder_labels`` maps them to the classifier's."""
    if not spec.startswith("folder:"):
        raise AttachError(f"--data {spec!r}: give folder:DIR (one sub-folder per class)")
    root = Path(spec[len("folder:"):])
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: expected one sub-folder per class with images inside")
    pre = cfg.preprocess
    images, labels = [], []
    for c, name in enumerate(classes):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() not in data.IMAGE_SUFFIXES:
                continue
            try:
                images.append(decode(p.read_bytes(), *pre.size, pre.channels, pre.resize))
            except ImageError as e:
                raise DataError(f"{p}: {e.message}") from None
            labels.append(c)
    if not images:
        raise DataError(f"{root}: no images found (suffixes {sorted(data.IMAGE_SUFFIXES)})")
    return Split(np.stack(images), np.asarray(labels, np.int64), classes)


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
    else:
        return None, ("pseudo-labels: no labels mapping and the folder names are not "
                      "class_names, so the classifier's own predictions are the labels")
    bad = index[(index < 0) | (index >= num_classes)]
    if len(bad):
        raise AttachError(f"labels: class index {int(bad[0])} outside the classifier's "
                          f"{num_classes} classes")
    return index, how


def far_ood(cfg: AttachConfig) -> dict[str, np.ndarray]:
    """A small far-OOD set at the classifier's size: uniform and blob noise, handwritten
    digits, rendered letters, face crops and Fashion-MNIST (when installed), ``ood_images``
    of each. Photos are left out: they may be the user's own domain."""
    n, pre = cfg.ood_images, cfg.preprocess
    raw = {"noise": data.ood_noise(n, 64, pre.channels, cfg.seed),
           "digits": data.ood_digits()[:n], "glyphs": data.ood_glyphs(n, 64, cfg.seed),
           "faces": data.ood_faces()[:n]}
    with contextlib.suppress(DataError):  # an optional package
        raw["fashion_mnist"] = data.fashion_mnist("test").images[:n]
    return {k: data.resize_all(v, pre.size, pre.channels, pre.resize) for k, v in raw.items()}
