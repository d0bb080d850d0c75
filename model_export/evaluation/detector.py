"""The detector interface every OOD method of the benchmark implements (RecLag, its variants,
the eight post-hoc baselines): fitted on the training set's features, it scores features.

    det = SomeDetector(...options...).fit(train, labels, linear)   # once
    s = det.score(features)                                         # higher = more ID

as pytorch-ood's ``fit_features``/``predict_features`` and OpenOOD's postprocessors
(``setup`` then ``postprocess``) do, on cached features rather than images: every method sees
the very same penultimate features and logits. ``train``/``labels`` are the correctly
classified training samples (the ones RecLag's banks are fitted on); ``linear`` is the
classifier's last layer (ReAct and ViM need it). Methods that need none of it (MSP, Energy)
fit nothing. ``detectors.REGISTRY`` names them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


@dataclass
class Features:
    """Penultimate features and logits of one image set."""

    phi: torch.Tensor  # (N, D)
    logits: torch.Tensor  # (N, C)

    @property
    def pred(self) -> torch.Tensor:
        return self.logits.argmax(1)


class Linear(NamedTuple):
    """The classifier's last layer: logits = phi @ weight.T + bias."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)


class Detector:
    """Base class: ``fit`` returns the detector itself; ``score`` is higher for more ID.
    ``label`` names it in tables (with its options, e.g. ``KNN(k=50)``)."""

    label: str = "detector"

    def fit(self, train: Features, labels: torch.Tensor, linear: Linear) -> Detector:
        return self

    def score(self, x: Features) -> np.ndarray:
        raise NotImplementedError
