"""The images a config names, loaded once per command: ``Sets(cfg)``.

ID data (``data.id``/``data.test``: fashion_mnist, folder:PATH or npz:PATH) is resized to the
model's input, subset and split exactly as the build has always done (seeded), so every step
sees the same images; far-OOD sets come from ``data.far_ood_sets``, plus the near-OOD images of
an open-set work dir (``near_ood.npz``, written by ``openset``) when there are any. Each set is
loaded on first use and kept, so one command loads each at most once.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import DATA_SOURCES, BuildConfig
from . import sources as data

MIN_HOLDOUT = 200
NEAR_OOD = "near_ood.npz"  # in the work dir: an open-set split's held-out classes


def _load(spec: str, split: str, cfg: BuildConfig) -> data.Split:
    d = cfg.data
    if spec == "fashion_mnist":
        s = data.fashion_mnist(split)
    elif spec.startswith("folder:"):
        s = data.image_folder(spec[len("folder:"):], d.size, d.channels, d.resize)
    elif spec.startswith("npz:"):
        s = data.npz_arrays(spec[len("npz:"):])
    else:  # config.py refuses these first; a config made in code may still carry one
        raise data.DataError(f"unknown data source {spec!r}: use {DATA_SOURCES}")
    return data.Split(data.resize_all(s.images, d.size, d.channels, d.resize), s.labels,
                      s.class_names)


def id_splits(cfg: BuildConfig) -> tuple[data.Split, data.Split]:
    """(train, holdout): the ID training split and the calibration hold-out, disjoint."""
    full = _load(cfg.data.id, "train", cfg)
    if cfg.data.train_subset and cfg.data.train_subset < len(full):
        idx = np.random.default_rng(cfg.seed).permutation(len(full))[:cfg.data.train_subset]
        full = full.subset(np.sort(idx))
    return data.split_holdout(full, holdout_share(cfg, len(full)), cfg.seed)


def holdout_share(cfg: BuildConfig, n: int) -> float:
    """``data.holdout_fraction``, or when it is None 10 % of ``n`` raised (to at most 30 %) to
    reach MIN_HOLDOUT images: 18 calibration images could not set a 95 % threshold."""
    if cfg.data.holdout_fraction is not None:
        return cfg.data.holdout_fraction
    return min(max(0.1, MIN_HOLDOUT / max(n, 1)), 0.3)


def id_test(cfg: BuildConfig) -> data.Split | None:
    if cfg.data.test is None:
        return None
    s = _load(cfg.data.test, "test", cfg)
    if cfg.data.test_subset and cfg.data.test_subset < len(s):
        s = s.subset(np.arange(cfg.data.test_subset))
    return s


def same_domain(train: data.Split, test: data.Split, cfg: BuildConfig) -> None:
    """Refuse an ID test set of other classes (Fashion-MNIST's for a folder of shapes scored
    10 % accuracy without a word: issue 16)."""
    if test.class_names != train.class_names:
        show = ", ".join(test.class_names[:5]) + (", ..." if len(test.class_names) > 5 else "")
        raise data.DataError(
            f"data.test {cfg.data.test} has classes [{show}], not data.id's "
            f"[{', '.join(train.class_names)}]: give a test set of the same classes, or "
            "data.test: null")


class Sets:
    """The ID splits and OOD sets of one config, each loaded on first use and kept."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg

    @cached_property
    def _splits(self) -> tuple[data.Split, data.Split]:
        return id_splits(self.cfg)

    @property
    def train(self) -> data.Split:
        return self._splits[0]

    @property
    def holdout(self) -> data.Split:
        return self._splits[1]

    @cached_property
    def test(self) -> data.Split | None:
        test = id_test(self.cfg)
        if test is not None:
            same_domain(self.train, test, self.cfg)
        return test

    @cached_property
    def far_ood(self) -> dict[str, np.ndarray]:
        """The built-in sets ``data.ood_sets`` names, then each ``data.ood_folders`` DIR."""
        d = self.cfg.data
        sets = data.far_ood_sets(d.size, d.channels, self.cfg.seed, d.ood_sets)
        for spec in d.ood_folders:
            root = Path(spec.removeprefix("folder:"))
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in
                           data.IMAGE_SUFFIXES) if root.is_dir() else []
            if not files:
                raise data.DataError(f"data.ood_folders {spec}: no images under it")
            sets[f"folder:{root.name}"] = np.stack([data.resize(
                Image.open(f), d.size, d.channels, d.resize) for f in files])
        return sets

    def ood(self, limit: int | None = None) -> dict[str, np.ndarray]:
        """Near-OOD (an open-set work dir's held-out classes) then far-OOD, each set cut to
        ``limit`` images (a seeded random subset, in order) when given."""
        c = self.cfg
        sets = dict(self.far_ood)
        near = c.workdir / NEAR_OOD
        if near.exists():
            with np.load(near) as z:
                sets = {"near: held-out classes": data.resize_all(
                    z["images"], c.data.size, c.data.channels), **sets}
        if limit:
            rng = np.random.default_rng(c.seed)
            sets = {k: v[np.sort(rng.permutation(len(v))[:limit])] if len(v) > limit else v
                    for k, v in sets.items()}
        return sets
