"""``hopgate-export openset -c configs/openset.yaml``: the near-OOD open-set benchmark's model.

Writes the 6-known-class data (a seeded training subset and the test images of those classes,
labels remapped to 0..5) to the config's ``npz:`` paths, and the 4 held-out classes' test
images to ``<workdir>/near_ood.npz`` (``splits.Sets.ood`` adds them as the near-OOD set), then
runs train, fit and calibrate for whatever step's artifact is still missing. The benchmark
report (``evaluate --report DIR --with configs/openset.yaml``) reads the result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import pipeline
from ..config import BuildConfig
from ..data import sources as data
from ..data.splits import NEAR_OOD, Sets

KNOWN = (0, 1, 2, 3, 4, 5)  # T-shirt, Trouser, Pullover, Dress, Coat, Sandal
TRAIN_IMAGES = 12000
ARTIFACTS = {"train": "backbone.pt", "fit": "memory.pt", "calibrate": "calibration.json"}


def write_data(cfg: BuildConfig) -> None:
    """The npz files of the known classes and the near-OOD images, where missing."""
    for spec in (cfg.data.id, cfg.data.test):
        if spec is None or not spec.startswith("npz:"):
            raise ValueError(f"an open-set config reads its data from npz:PATH, got {spec!r}")
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    known = np.asarray(KNOWN)
    names = data.fashion_mnist("train").class_names
    for split in ("train", "test"):
        path = Path(cfg.data.id[len("npz:"):] if split == "train" else cfg.data.test[len("npz:"):])
        if path.exists():
            continue
        s = data.fashion_mnist(split)
        keep = np.isin(s.labels, known)
        imgs, labs = s.images[keep], s.labels[keep]
        if split == "train":
            idx = np.sort(np.random.default_rng(cfg.seed).permutation(len(imgs))[:TRAIN_IMAGES])
            imgs, labs = imgs[idx], labs[idx]
        remap = {int(c): i for i, c in enumerate(known)}
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, images=imgs, labels=np.array([remap[int(x)] for x in labs]),
                            class_names=np.array([names[c] for c in known]))
        if split == "test":
            np.savez_compressed(cfg.workdir / NEAR_OOD, images=s.images[~keep])


def prepare(cfg: BuildConfig, progress: bool = True) -> dict:
    """Write the data, then train/fit/calibrate what is not built yet; returns the steps run."""
    write_data(cfg)
    sets = Sets(cfg)  # after the npz files exist: loaded on first use
    return {step: pipeline.STEPS[step](cfg, progress, sets)
            for step, artifact in ARTIFACTS.items() if not (cfg.workdir / artifact).exists()}
