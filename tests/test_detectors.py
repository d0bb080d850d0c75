"""The detector interface and its registry: all ten methods fit on features and score features
(higher = more ID), under the labels the benchmark's tables use. Fast tier: synthetic features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hopgate.model_export.config import MemoryConfig
from hopgate.model_export.evaluation import detectors as D
from hopgate.model_export.evaluation.detector import Detector, Features, Linear
from hopgate.model_export.reclag import RecLagHead


@pytest.fixture(scope="module")
def synthetic():
    g = torch.Generator().manual_seed(0)
    c, d = 3, 8
    centres = 3 * torch.rand(c, d, generator=g)
    labels = torch.arange(300) % c
    phi = torch.relu(centres[labels] + 0.3 * torch.randn(300, d, generator=g))
    fc = Linear(torch.randn(c, d, generator=g), torch.randn(c, generator=g))
    mk = lambda x: Features(x, x @ fc.weight.T + fc.bias)  # noqa: E731
    test = torch.relu(centres[torch.arange(60) % c] + 0.3 * torch.randn(60, d, generator=g))
    return mk(phi), labels, fc, mk(test)


def test_the_registry_names_all_twelve_methods_in_table_order():
    assert list(D.REGISTRY) == ["reclag", "reclag-kmeans", "reclag-dot", "reclag-gaussian",
                                *D.BASELINES]
    assert len(D.BASELINES) == 8


def test_every_detector_fits_and_scores(synthetic):
    train, labels, fc, test = synthetic
    head = RecLagHead(torch.randn(3, 4, 8), beta=1.0)
    memory = MemoryConfig(memories=4, epochs=1, batch_size=20)
    opts = D.Options(memory=memory, head=head, he_beta=0.2, knn_k=5, vim_dim=4)
    dets = D.fit_detectors(list(D.REGISTRY), opts, train, labels, fc)
    assert list(dets) == ["RecLag", "RecLag (k-means centres)", "RecLag (dot, norm 10)",
                          "RecLag (gaussian, whitened)", "MSP", "Energy", "ReAct(p90)",
                          "HE(b=0.2)", "SHE", "KNN(k=5)", "Mahalanobis", "ViM(dim=4)"]
    for label, det in dets.items():
        assert isinstance(det, Detector)
        s = det.score(test)
        assert s.dtype == np.float64 and s.shape == (len(test.phi),), label
        assert np.isfinite(s).all(), label
    # the bundle's head is scored as it is: its served score
    np.testing.assert_allclose(dets["RecLag"].score(test),
                               head.score(test.phi, test.logits).double().numpy())
    # the tuned RecLag refits banks with k-means centres, the rest of the memory settings kept
    tuned = dets["RecLag (k-means centres)"]
    assert tuned.memory.init == "kmeans" and tuned.memory.epochs == 0
    assert tuned.head.banks.shape == (3, 4, 8)
    # both geometries side by side: the gaussian one is whitened and lifted (D + 2 columns)
    dot, gauss = dets["RecLag (dot, norm 10)"], dets["RecLag (gaussian, whitened)"]
    assert dot.head.geometry == "dot" and dot.head.banks.shape == (3, 4, 8)
    assert gauss.head.geometry == "gaussian" and gauss.head.banks.shape == (3, 4, 10)
    assert gauss.head.beta == 1.0 and gauss.head.feature_norm is None


def test_vim_defaults_to_half_the_feature_dimension(synthetic):
    train, labels, fc, _ = synthetic
    assert D.REGISTRY["vim"](D.Options()).fit(train, labels, fc).label == "ViM(dim=4)"


def test_unknown_or_unconfigured_detectors_are_named(synthetic):
    train, labels, fc, _ = synthetic
    with pytest.raises(KeyError, match="odin"):
        D.fit_detectors(["odin"], D.Options(), train, labels, fc)
    with pytest.raises(ValueError, match="head"):
        D.fit_detectors(["reclag"], D.Options(), train, labels, fc)
