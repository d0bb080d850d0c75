"""Memory fitting (model_export/fit.py) does something, and something good: the SFNN objective
falls, fitted banks beat their initialisation on held-out features of their class, and the
gaussian geometry's whitening whitens. A fit that returns its initial memories fails here."""

from __future__ import annotations

import torch

from hopgate.model_export.fit import FitConfig, encoder_logits, fit_bank, fit_memory, fit_whitener
from hopgate.model_export.reclag import whiten


def _class_features(seed: int, n: int = 1200, d: int = 16, k: int = 6) -> torch.Tensor:
    """One class: k clusters on the norm-10 sphere, shuffled (features as the fit sees them)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    x = centres[torch.randint(0, k, (n,), generator=g)] + 0.35 * torch.randn(n, d, generator=g)
    return 10 * x / x.norm(dim=1, keepdim=True)


def expected_objective(xi: torch.Tensor, x: torch.Tensor, cfg: FitConfig) -> float:
    """The SFNN objective without sampling noise: E_{mu ~ p(mu|x)} [MSE(x, xi_mu) - log p]."""
    p = torch.softmax(encoder_logits(x, xi, cfg), dim=1)
    mse = torch.cdist(x, xi).pow(2) / x.shape[1]
    return float((p * (mse - torch.log(p + 1e-12))).sum(1).mean())


def _fit(x, cfg, seed=0):
    return fit_bank(x, cfg, torch.Generator().manual_seed(seed), progress=False)


def test_the_objective_falls_and_fitted_banks_beat_their_init_on_held_out_features():
    x = _class_features(0)
    train, held = x[:900], x[900:]
    cfg = FitConfig(memories=6, beta=5.0, epochs=15, lr=1e-2, batch_size=50, geometry="dot",
                    init="sample", kmeans_n_init=1)  # the dot geometry's SFNN fit
    init = _fit(train, FitConfig(**{**cfg.__dict__, "epochs": 0}))  # same seed: the init
    fitted = _fit(train, cfg)
    assert not torch.equal(init, fitted), "the fit left its initial memories unchanged"
    before, after = expected_objective(init, train, cfg), expected_objective(fitted, train, cfg)
    assert after < 0.9 * before, (before, after)  # the objective falls on the training data
    held_before = expected_objective(init, held, cfg)
    held_after = expected_objective(fitted, held, cfg)
    assert held_after < 0.9 * held_before, (held_before, held_after)  # and generalises
    # retrieval: held-out features sit closer to their nearest fitted memory
    d_init = torch.cdist(held, init).min(1).values.mean()
    d_fit = torch.cdist(held, fitted).min(1).values.mean()
    assert d_fit < d_init, (float(d_init), float(d_fit))


def test_gaussian_fit_objective_falls_from_a_sample_start():
    """The Gaussian encoder's SFNN epochs (memory.epochs > 0 with geometry gaussian) improve
    on randomly drawn starting memories (k-means centres are already near its optimum)."""
    x = _class_features(1)
    cfg = FitConfig(memories=6, beta=1.0, epochs=10, lr=1e-2, geometry="gaussian",
                    init="sample", batch_size=50)
    init = _fit(x[:900], FitConfig(**{**cfg.__dict__, "epochs": 0}))
    fitted = _fit(x[:900], cfg)
    assert not torch.equal(init, fitted)
    assert expected_objective(fitted, x[900:], cfg) < 0.95 * expected_objective(init, x[900:], cfg)


def test_the_whitener_whitens_the_within_class_covariance():
    g = torch.Generator().manual_seed(2)
    d, c = 8, 3
    a = torch.randn(d, d, generator=g)
    labels = torch.arange(3000) % c
    x = 5 * torch.randn(c, d, generator=g)[labels] + torch.randn(3000, d, generator=g) @ a
    mean, w = fit_whitener(x, labels, c)
    z = whiten(x, mean, w).double()
    centred = z - torch.stack([z[labels == k].mean(0) for k in range(c)])[labels]
    cov = centred.T @ centred / len(z)
    torch.testing.assert_close(cov, torch.eye(d, dtype=cov.dtype), atol=1e-3, rtol=0)
    mem = fit_memory(x, labels, c, FitConfig(memories=4, geometry="gaussian", init="kmeans",
                                             epochs=0), seed=0, progress=False)
    assert set(mem) == {"banks", "mask_bias", "mean", "whitener"}
    # the banks live in the whitened space: centres of whitened class features
    for k in range(c):
        zk = whiten(x[labels == k], mem["mean"], mem["whitener"])
        assert torch.cdist(zk, mem["banks"][k]).min(1).values.mean() < 3.0
