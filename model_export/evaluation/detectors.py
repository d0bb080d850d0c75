"""Every OOD method of the benchmark by name: RecLag (the bundle's head, or banks refitted with
other memory settings) and the eight post-hoc baselines, all ``detector.Detector``s.

    dets = fit_detectors(["reclag", "msp", "knn"], Options(memory=cfg.memory, head=head),
                         train, labels, linear)
    for label, det in dets.items(): det.score(features)

``REGISTRY`` maps a name to a factory ``Options -> Detector``; its order is the order of the
benchmark's tables. RecLag variants (other memory settings: the ablations, the tuned row) are
``RecLag(memory)`` detectors whose memory config differs; the config -> head mapping is
``recipe``'s, the same as the build's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..config import MemoryConfig
from ..fit import fit_memory
from ..recipe import fit_settings, head_from_memory
from ..reclag import RecLagHead, prepare_features
from . import baselines as B
from .detector import Detector, Features, Linear

RECLAG = "RecLag"  # the bundle's own head, in tables and plots
# The better setting the ablations found (k-means centres, no SFNN epochs): shown next to the
# bundle's RecLag row in the main table, refitted from the cached features.
TUNED = "RecLag (k-means centres)"
TUNED_MEMORY = {"init": "kmeans", "epochs": 0}
# The two geometries side by side, whatever the bundle uses (refitted on the cached features):
# dot = the previous default bundle's memory (normalised features, k-means start, 5 SFNN
# epochs); gaussian = the whitened, lifted gate of issue 13 (k-means centres, beta 1).
DOT = "RecLag (dot, norm 10)"
DOT_MEMORY = {"geometry": "dot", "feature_norm": 10.0, "beta": 5.0, "init": "kmeans",
              "epochs": 5, "lagrangian": "lse"}
GAUSSIAN = "RecLag (gaussian, whitened)"
GAUSSIAN_MEMORY = {"geometry": "gaussian", "feature_norm": None, "beta": 1.0, "init": "kmeans",
                   "epochs": 0, "kmeans_n_init": 4, "lagrangian": "lse"}


class BundleHead(Detector):
    """A built head scored as it is (nothing to fit): the served score lse(a(phi))."""

    def __init__(self, head: RecLagHead, label: str = RECLAG):
        self.head, self.label = head, label

    def score(self, x: Features) -> np.ndarray:
        return self.head.score(x.phi, x.logits).double().numpy()


class RecLag(BundleHead):
    """Banks fitted on the training features with ``memory``'s settings, as the build's fit
    step fits them (``recipe.fit_settings``/``make_head``); ``fit_seconds`` is kept."""

    def __init__(self, memory: MemoryConfig, seed: int = 0, label: str = "RecLag (refitted)"):
        self.memory, self.seed, self.label = memory, seed, label

    def fit(self, train: Features, labels: torch.Tensor, linear: Linear) -> RecLag:
        m = self.memory
        t0 = time.time()
        mem = fit_memory(prepare_features(train.phi, m.feature_norm), labels,
                         int(linear.weight.shape[0]), fit_settings(m), self.seed,
                         shared=m.bank == "shared", progress=False)
        self.head = head_from_memory(m, mem)
        self.fit_seconds = round(time.time() - t0, 1)
        return self


@dataclass
class Options:
    """The settings the factories read (one object for all methods)."""

    memory: MemoryConfig | None = None  # RecLag variants start from these memory settings
    head: RecLagHead | None = None  # "reclag": the built bundle's head
    seed: int = 0
    he_beta: float = 0.2
    knn_k: int = 50
    knn_subset: int | None = None  # KNN's bank: this many training features (None = all)
    vim_dim: int | None = None  # None = half the feature dimension
    react_percentile: float = 90.0


def _bundle(o: Options) -> Detector:
    if o.head is None:
        raise ValueError("the reclag detector scores a built head: pass Options(head=...)")
    return BundleHead(o.head)


def _refit(update: dict, label: str) -> Callable[[Options], Detector]:
    def make(o: Options) -> Detector:
        if o.memory is None:
            raise ValueError("a refitted RecLag starts from memory settings: "
                             "pass Options(memory=...)")
        return RecLag(o.memory.model_copy(update=update), o.seed, label)
    return make


_tuned = _refit(TUNED_MEMORY, TUNED)


REGISTRY: dict[str, Callable[[Options], Detector]] = {
    "reclag": _bundle,
    "reclag-kmeans": _tuned,
    "reclag-dot": _refit(DOT_MEMORY, DOT),
    "reclag-gaussian": _refit(GAUSSIAN_MEMORY, GAUSSIAN),
    "msp": lambda o: B.MSP(),
    "energy": lambda o: B.Energy(),
    "react": lambda o: B.ReAct(o.react_percentile),
    "he": lambda o: B.HE(o.he_beta),
    "she": lambda o: B.SHE(),
    "knn": lambda o: B.KNN(o.knn_k, o.knn_subset, o.seed),
    "mahalanobis": lambda o: B.Mahalanobis(),
    "vim": lambda o: B.ViM(o.vim_dim),
}
BASELINES = ("msp", "energy", "react", "he", "she", "knn", "mahalanobis", "vim")


def fit_detectors(names: list[str] | tuple[str, ...], opts: Options, train: Features,
                  labels: torch.Tensor, linear: Linear) -> dict[str, Detector]:
    """label -> fitted detector, for each registry ``name`` in order."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise KeyError(f"unknown detectors {unknown}: use {list(REGISTRY)}")
    out = {}
    for name in names:
        det = REGISTRY[name](opts).fit(train, labels, linear)
        out[det.label] = det
    return out
