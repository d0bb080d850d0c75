"""Baselines: cross-checked against independent references, and sane on real features.

pytorch-ood 0.4.0 installs with ``--no-deps`` but cannot be imported without torchvision (its
``pytorch_ood.model`` registry imports torchvision at package import), so the cross-checks use
scikit-learn's EmpiricalCovariance / NearestNeighbors / PCA and SciPy instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from hopgate.model_export.evaluation import baselines as B
from hopgate.model_export.evaluation.detector import Features, Linear
from hopgate.model_export.evaluation.detectors import BASELINES, Options, fit_detectors


def _auroc(id_s, ood_s):
    return roc_auc_score(np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))], np.r_[id_s, ood_s])


@pytest.fixture(scope="module")
def synthetic():
    """Class-clustered 'features' (ReLU'd like penultimate activations) and a linear head."""
    g = torch.Generator().manual_seed(0)
    c, d = 4, 16
    centres = 3 * torch.rand(c, d, generator=g)
    labels = torch.arange(600) % c
    train = torch.relu(centres[labels] + 0.5 * torch.randn(600, d, generator=g))
    w, b = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    test_y = torch.arange(200) % c
    test = torch.relu(centres[test_y] + 0.5 * torch.randn(200, d, generator=g))
    ood = torch.relu(1.5 + 1.5 * torch.randn(200, d, generator=g))
    mk = lambda x: Features(x, x @ w.T + b)  # noqa: E731
    return mk(train), labels, w, b, mk(test), mk(ood)


def test_msp_energy_match_scipy(synthetic):
    _, _, _, _, test, _ = synthetic
    lo = test.logits.double().numpy()
    np.testing.assert_allclose(B.msp(test), softmax(lo, 1).max(1), rtol=1e-12)
    np.testing.assert_allclose(B.energy_score(test), logsumexp(lo, 1), rtol=1e-12)


def test_mahalanobis_matches_sklearn(synthetic):
    train, labels, w, b, test, ood = synthetic
    x, y = train.phi.double().numpy(), labels.numpy()
    means = np.stack([x[y == k].mean(0) for k in range(4)])
    cov = EmpiricalCovariance(assume_centered=True).fit(x - means[y])

    def ref(c):
        q = c.phi.double().numpy()
        return -np.min([cov.mahalanobis(q - means[k]) for k in range(4)], axis=0)

    maha = B.Mahalanobis().fit(train, labels, Linear(w, b)).score
    np.testing.assert_allclose(maha(test), ref(test), rtol=1e-6)
    assert abs(_auroc(maha(test), maha(ood)) - _auroc(ref(test), ref(ood))) < 1e-3


def test_knn_matches_sklearn(synthetic):
    train, labels, w, b, test, ood = synthetic
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    nn = NearestNeighbors(n_neighbors=10).fit(unit(train.phi.double().numpy()))
    ref = lambda c: -nn.kneighbors(unit(c.phi.double().numpy()))[0][:, -1]  # noqa: E731
    knn = B.KNN(k=10).fit(train, labels, Linear(w, b)).score
    np.testing.assert_allclose(knn(test), ref(test), atol=1e-5)
    assert abs(_auroc(knn(test), knn(ood)) - _auroc(ref(test), ref(ood))) < 1e-3


def test_vim_matches_numpy_reference(synthetic):
    train, labels, w, b, test, ood = synthetic
    wn, bn = w.double().numpy(), b.double().numpy()
    u = -np.linalg.pinv(wn) @ bn
    xc = train.phi.double().numpy() - u
    _, _, vt = np.linalg.svd(xc, full_matrices=True)  # right singular vectors = eigvecs of X^T X
    null = vt[8:].T
    alpha = (train.logits.double().numpy().max(1).mean()
             / np.linalg.norm(xc @ null, axis=1).mean())

    def ref(c):
        q = c.phi.double().numpy()
        return logsumexp(q @ wn.T + bn, 1) - alpha * np.linalg.norm((q - u) @ null, axis=1)

    vim = B.ViM(dim=8).fit(train, labels, Linear(w, b)).score
    np.testing.assert_allclose(vim(test), ref(test), atol=1e-4)  # logits are float32
    assert abs(_auroc(vim(test), vim(ood)) - _auroc(ref(test), ref(ood))) < 1e-3


def test_react_he_she_definitions(synthetic):
    train, labels, w, b, test, _ = synthetic
    # no clipping at the 100th percentile -> ReAct is Energy on the train features (float32 logits)
    fc = Linear(w, b)
    np.testing.assert_allclose(B.ReAct(100.0).fit(train, labels, fc).score(train),
                               B.energy_score(train), rtol=1e-5)
    # clipping changes the logits of rows with activations above the clip
    react = B.ReAct(90.0).fit(train, labels, fc)
    clipped = (test.phi > react.clip).any(1).numpy()
    assert clipped.any()
    assert not np.allclose(react.score(test)[clipped], B.energy_score(test)[clipped])
    # HE with one stored pattern per class is beta * phi . x_c; SHE with it is phi . x_c
    one = torch.stack([train.phi[labels == k][0] for k in range(4)])
    stored = Features(one, one @ w.T + b)
    he = B.HE(beta=0.3).fit(stored, torch.arange(4), fc)
    she = B.SHE().fit(stored, torch.arange(4), fc)
    expect = (test.phi.double() * one.double()[test.pred]).sum(1).numpy()
    np.testing.assert_allclose(he.score(test), 0.3 * expect, rtol=1e-10)
    np.testing.assert_allclose(she.score(test), expect, rtol=1e-10)


@pytest.fixture(scope="module")
def real_features(quick_build):
    """Features of the quick bundle's backbone on real images: a train subset, ID test, noise
    and photo patches."""
    from hopgate.model_export.data import sources as data
    from hopgate.model_export.data.splits import id_splits, id_test
    from hopgate.model_export.recipe import load_backbone
    from hopgate.model_export.train import extract

    cfg, _ = quick_build
    net, norm, _ = load_backbone(cfg)
    train, _ = id_splits(cfg)
    ood = data.far_ood_sets(cfg.data.size, cfg.data.channels, cfg.seed)
    ex = lambda imgs: Features(*extract(net, norm, imgs))  # noqa: E731
    tr = ex(train.images[:3000])
    right = tr.pred == torch.from_numpy(train.labels[:3000])
    return (Features(tr.phi[right], tr.logits[right]), torch.from_numpy(train.labels[:3000])[right],
            net.fc.weight.detach(), net.fc.bias.detach(), ex(id_test(cfg).images[:1000]),
            {k: ex(ood[k][:300]) for k in ("noise", "photos")})


@pytest.mark.slow
def test_baselines_separate_real_ood(real_features):
    """On a real (small) backbone, the feature-space detectors tell ID test images from noise
    and photo patches; every method returns one finite score per image."""
    train, labels, w, b, test, ood = real_features
    opts = Options(he_beta=0.2, knn_k=10, vim_dim=32)
    methods = fit_detectors(BASELINES, opts, train, labels, Linear(w, b))
    assert len(methods) == 8
    for name, det in methods.items():
        s = det.score(test)
        assert s.shape == (len(test.phi),) and np.isfinite(s).all(), name
    for name in ("KNN(k=10)", "Mahalanobis", "ViM(dim=32)"):
        for k, o in ood.items():
            assert _auroc(methods[name].score(test), methods[name].score(o)) > 0.8, (name, k)
