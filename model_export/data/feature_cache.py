"""The benchmark's feature cache: features and logits of every image set, extracted once.

Every training image, the calibration hold-out, the ID test split and every OOD set go
through the built backbone once; the result is saved under the config's work dir
(``<workdir>/eval/cache.pt``, never relative to the current directory), and every method,
ablation and plot of the report reads it from there.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import BuildConfig
from ..evaluation.detector import Features, Linear
from ..recipe import load_backbone
from ..train import extract
from .splits import Sets


def cache_path(cfg: BuildConfig) -> Path:
    return cfg.workdir / "eval" / "cache.pt"


def build_cache(cfg: BuildConfig, sets: Sets, ood_limit: int | None = None,
                progress: bool = True) -> dict:
    """Extract (or load) features/logits of every set the benchmark needs."""
    path = cache_path(cfg)
    if path.exists():
        return torch.load(path, weights_only=False)
    net, norm, ckpt = load_backbone(cfg)
    t0 = time.time()

    def ex(images, desc):
        phi, logits = extract(net, norm, images, progress=progress, desc=desc)
        return {"phi": phi, "logits": logits}

    cache = {"train": ex(sets.train.images, "train features"), "train_labels": sets.train.labels,
             "holdout": ex(sets.holdout.images, "hold-out features"),
             "test": ex(sets.test.images, "test features"), "test_labels": sets.test.labels,
             "ood": {k: ex(v, k) for k, v in sets.ood(ood_limit).items()},
             "class_names": ckpt["class_names"],
             "fc": {"weight": net.fc.weight.detach().clone(), "bias": net.fc.bias.detach().clone()}}
    cache["extract_seconds"] = round(time.time() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cache, path)
    return cache


def features(d: dict) -> Features:
    """One cached set (``cache["test"]``, ``cache["ood"][name]``, ...) as Features."""
    return Features(d["phi"], d["logits"])


def linear(cache: dict) -> Linear:
    return Linear(cache["fc"]["weight"], cache["fc"]["bias"])


def correct_train(cache: dict) -> tuple[Features, torch.Tensor]:
    """The correctly classified training features and their labels: what every method fits on."""
    labels = torch.as_tensor(cache["train_labels"])
    right = cache["train"]["logits"].argmax(1) == labels
    return Features(cache["train"]["phi"][right], cache["train"]["logits"][right]), labels[right]
