"""Fit RecLag memory banks on ID features: the official SFNN-like procedure (reclag.md §5).

Per class c, the memories Xi^(c) (M x D) are the tied weights of a one-hidden-layer SFNN with a
categorical hidden unit: encoder p(mu|x) = softmax(beta Xi x), S samples mu_s, decoder
x_hat = xi_{mu_s}, Gaussian likelihood, importance-weighted loss
    mean_s  w_s [ MSE(x, xi_{mu_s}) - log p(mu_s|x) ].
Data: features of correctly classified training images; initialisation: a random subset of the
class's features rescaled to norm ``init_norm``; Adam(1e-3, 0.9, 0.98, 1e-9); batch 50 with
the remainder dropped, no shuffling.

Deviations, each a flag: the official code samples with probabilities passed as logits
(``sampler="probs_as_logits"``, nearly uniform sampling; default here is the correct
``"probs"``), and computes w_s in float32 where exp(-|x-xi|^2/2) underflows so the weights
silently become uniform (``weights="tf"``; default ``"log"`` computes them in log space).
The official code also sets no seed; here everything is seeded and deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .config import Geometry, Init, Lagrangian, Sampler, Weights
from .reclag import PAD, memory_logits, whiten


@dataclass(frozen=True)
class FitConfig:
    """The fitting settings: the fitting subset of config.MemoryConfig, same names and types
    (recipe.fit_settings makes one from a MemoryConfig), plus ``samples``, fixed by the
    official procedure."""

    memories: int = 10
    beta: float = 5.0
    samples: int = 5
    init_norm: float = 10.0
    epochs: int = 5
    batch_size: int = 50
    lr: float = 1e-3
    sampler: Sampler = "probs"
    weights: Weights = "log"
    init: Init = "kmeans"
    lagrangian: Lagrangian = "lse"  # the encoder p(mu|x) = softmax(a) of this Lagrangian
    power_n: int = 2
    geometry: Geometry = "dot"  # gaussian: a = -beta/2 |x - xi|^2 on whitened features
    shrinkage: float | None = None
    kmeans_n_init: int = 4


def encoder_logits(x: torch.Tensor, xi: torch.Tensor, cfg: FitConfig) -> torch.Tensor:
    """The activations a (B, M) of features x (B, D) against one bank xi (M, D)."""
    if cfg.geometry == "gaussian":
        return -cfg.beta / 2 * torch.cdist(x, xi).pow(2)
    return memory_logits(x @ xi.T, cfg.beta, cfg.lagrangian, cfg.power_n)


def sfnn_loss(xi: torch.Tensor, x: torch.Tensor, cfg: FitConfig,
              gen: torch.Generator) -> torch.Tensor:
    """The importance-sampled SFNN objective for one batch x (B, D) and one bank xi (M, D)."""
    z = torch.softmax(encoder_logits(x, xi, cfg), dim=1)  # p(mu|x)
    with torch.no_grad():
        probs = torch.softmax(z, dim=1) if cfg.sampler == "probs_as_logits" else z
        mu = torch.multinomial(probs, cfg.samples, replacement=True, generator=gen)  # (B, S)
    xhat = xi[mu]  # (B, S, D)
    sq = ((x[:, None, :] - xhat) ** 2)
    mse = sq.mean(-1)
    with torch.no_grad():
        if cfg.weights == "tf":
            g = (2 * math.pi) ** -0.5 * torch.exp(-sq.sum(-1) / 2)
            w = (g + 1e-16) / (g + 1e-16).mean(dim=1, keepdim=True)
        else:  # log-space: w_s = S * softmax_s(-|x - xi_s|^2 / 2), exact where float32 underflows
            w = cfg.samples * torch.softmax(-sq.sum(-1) / 2, dim=1)
    logz = torch.log(z.gather(1, mu) + 1e-12)
    return (w * (mse - logz)).mean()


def _init_bank(x: torch.Tensor, cfg: FitConfig, gen: torch.Generator) -> torch.Tensor:
    m = min(cfg.memories, len(x))
    if cfg.init == "kmeans" and len(x) > m:
        from sklearn.cluster import KMeans

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        km = KMeans(m, n_init=cfg.kmeans_n_init, random_state=seed)
        xi0 = torch.from_numpy(km.fit(x.double().numpy()).cluster_centers_).float()
    else:
        xi0 = x[torch.randperm(len(x), generator=gen)[:m]].clone()
    if cfg.geometry == "gaussian":  # centres live in the whitened space: no rescaling
        return xi0
    return cfg.init_norm * xi0 / xi0.norm(dim=1, keepdim=True).clamp_min(1e-12)


def fit_bank(x: torch.Tensor, cfg: FitConfig, gen: torch.Generator, desc: str = "",
             progress: bool = True) -> torch.Tensor:
    """Fit one memory bank (m x D, m = min(M, N)) on features x (N, D)."""
    xi = torch.nn.Parameter(_init_bank(x, cfg, gen))
    if len(x) <= cfg.memories:  # as the official code: a tiny class keeps its samples
        return xi.detach()
    opt = torch.optim.Adam([xi], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    n_batches = len(x) // cfg.batch_size
    for _ in tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False):
        for i in range(n_batches):
            loss = sfnn_loss(xi, x[i * cfg.batch_size:(i + 1) * cfg.batch_size], cfg, gen)
            if torch.isnan(loss):  # official behaviour: skip the step
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return xi.detach()


def fit_banks(features: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: FitConfig,
              seed: int, shared: bool = False, progress: bool = True):
    """Fit per-class banks (or one shared bank) -> (banks (C_b, M, D), mask_bias (C_b, M)).

    ``features``/``labels`` should be the correctly classified training samples. A shared bank
    holds ``memories * num_classes`` memories fitted on all of them.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if shared:
        cfg_all = replace(cfg, memories=cfg.memories * num_classes)
        order = torch.randperm(len(features), generator=gen)  # mix classes within batches
        bank = fit_bank(features[order], cfg_all, gen, "fit shared bank", progress)
        return bank[None], torch.zeros(1, len(bank))
    m, d = cfg.memories, features.shape[1]
    banks = torch.zeros(num_classes, m, d)
    bias = torch.full((num_classes, m), PAD)
    for c in tqdm(range(num_classes), desc="fit banks", disable=not progress):
        xc = features[labels == c]
        if len(xc) == 0:
            raise ValueError(f"class {c} has no correctly classified training features to fit")
        xi = fit_bank(xc, cfg, gen, f"class {c}", progress)
        banks[c, :len(xi)], bias[c, :len(xi)] = xi, 0.0
    return banks, bias


def fit_whitener(x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 shrinkage: float | None = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), W (D, D)), z = (x - mean) W, W = S^-1/2 of the tied within-class covariance
    of ``x`` (the correctly classified training features), shrunk towards tr(S)/D I by
    ``shrinkage``; None = Ledoit-Wolf's estimate of it (about 0 on Fashion-MNIST's 50k
    features; large on a few hundred, where the raw inverse blows noise directions up and the
    hold-out lands thousands of units below the training features: issue 16)."""
    x = x.double()
    means = torch.stack([x[labels == k].mean(0) if (labels == k).any() else x.mean(0)
                         for k in range(num_classes)])
    centred = x - means[labels]
    sigma = centred.T @ centred / len(x)
    d = sigma.shape[0]
    if shrinkage is None:
        from sklearn.covariance import ledoit_wolf_shrinkage

        shrinkage = float(ledoit_wolf_shrinkage(centred.numpy(), assume_centered=True))
    eye = torch.eye(d, dtype=x.dtype)
    s = (1 - shrinkage) * sigma + shrinkage * (torch.trace(sigma) / d) * eye
    evals, evecs = torch.linalg.eigh(s)
    evals = evals.clamp_min(float(evals.max()) * 1e-10)
    return x.mean(0).float(), (evecs @ torch.diag(evals.rsqrt()) @ evecs.T).float()


def fit_memory(features: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: FitConfig,
               seed: int, shared: bool = False, progress: bool = True) -> dict:
    """Everything a head's memory needs, as memory.pt stores it: ``banks``, ``mask_bias`` and,
    for the gaussian geometry, the whitening ``mean``/``whitener`` (banks fitted on whitened
    features)."""
    if cfg.geometry != "gaussian":
        banks, bias = fit_banks(features, labels, num_classes, cfg, seed, shared, progress)
        return {"banks": banks, "mask_bias": bias}
    mean, w = fit_whitener(features, labels, num_classes, cfg.shrinkage)
    banks, bias = fit_banks(whiten(features, mean, w), labels, num_classes, cfg, seed, shared,
                            progress)
    return {"banks": banks, "mask_bias": bias, "mean": mean, "whitener": w}
