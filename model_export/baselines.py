"""Post-hoc OOD baselines on cached penultimate features and logits (higher score = more ID).

Every detector is fitted on the same correctly classified training features RecLag's banks are
fitted on, and scores the very same test features/logits, so the comparison isolates the score.

  MSP          max softmax (Hendrycks & Gimpel 2017)
  Energy       logsumexp(logits), T = 1 (Liu et al. 2020)
  ReAct        Energy of fc(min(phi, c)), c = a percentile of train activations (Sun et al. 2021;
               the RecLag code clips at the 98th percentile, reclag.md §9; the paper uses 90th)
  HE           logsumexp(beta * X_train^(c) phi) over all stored train features of the
               predicted class (Zhang et al. 2023, as in reclag.md §9)
  SHE          phi . m_c, m_c the mean stored feature of the predicted class (same paper)
  KNN          -(distance to the k-th nearest L2-normalised train feature) (Sun et al. 2022)
  Mahalanobis  -min_c Mahalanobis distance to class means, one shared (tied) covariance
               (Lee et al. 2018, without input pre-processing or feature ensembles)
  ViM          Energy - alpha * |residual of phi - u off the principal subspace| (Wang et al.
               2022; u = -pinv(W) b, alpha matches the mean max-logit on train)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Cache:
    """Features and logits of one image set."""

    phi: torch.Tensor  # (N, D)
    logits: torch.Tensor  # (N, C)

    @property
    def pred(self) -> torch.Tensor:
        return self.logits.argmax(1)


def msp(c: Cache) -> np.ndarray:
    return torch.softmax(c.logits.double(), 1).max(1).values.numpy()


def energy(c: Cache) -> np.ndarray:
    return torch.logsumexp(c.logits.double(), 1).numpy()


class ReAct:
    def __init__(self, train: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 percentile: float = 90.0):
        self.clip = float(np.percentile(train.numpy().ravel(), percentile))
        self.w, self.b = weight.double(), bias.double()

    def __call__(self, c: Cache) -> np.ndarray:
        logits = c.phi.double().clamp(max=self.clip) @ self.w.T + self.b
        return torch.logsumexp(logits, 1).numpy()


class HE:
    """Hopfield energy over every stored pattern of the predicted class."""

    def __init__(self, train: torch.Tensor, labels: torch.Tensor, num_classes: int, beta: float):
        self.stored = [train[labels == k].double() for k in range(num_classes)]
        self.beta = beta

    def __call__(self, c: Cache) -> np.ndarray:
        out = torch.empty(len(c.phi), dtype=torch.float64)
        pred, phi = c.pred, c.phi.double()
        for k, x in enumerate(self.stored):
            rows = pred == k
            if rows.any():
                out[rows] = torch.logsumexp(self.beta * phi[rows] @ x.T, 1)
        return out.numpy()


class SHE:
    def __init__(self, train: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.means = torch.stack([train[labels == k].double().mean(0) for k in range(num_classes)])

    def __call__(self, c: Cache) -> np.ndarray:
        return (c.phi.double() * self.means[c.pred]).sum(1).numpy()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class KNN:
    def __init__(self, train: torch.Tensor, k: int = 50, chunk: int = 1024):
        self.bank, self.k, self.chunk = _unit(train.float()), k, chunk

    def __call__(self, c: Cache) -> np.ndarray:
        q = _unit(c.phi.float())
        out = []
        for i in range(0, len(q), self.chunk):
            sim = q[i:i + self.chunk] @ self.bank.T  # unit vectors: d^2 = 2 - 2 cos
            kth = sim.topk(self.k, dim=1).values[:, -1]
            out.append(-(2 - 2 * kth.double()).clamp_min(0).sqrt())
        return torch.cat(out).numpy()


class Mahalanobis:
    def __init__(self, train: torch.Tensor, labels: torch.Tensor, num_classes: int):
        x = train.double()
        self.means = torch.stack([x[labels == k].mean(0) for k in range(num_classes)])
        centred = x - self.means[labels]
        cov = centred.T @ centred / len(x)
        self.precision = torch.linalg.pinv(cov, hermitian=True)

    def __call__(self, c: Cache) -> np.ndarray:
        out = []
        for x in c.phi.double().split(512):
            d = x[:, None, :] - self.means[None]  # (n, C, D)
            out.append(-((d @ self.precision) * d).sum(-1).min(1).values)
        return torch.cat(out).numpy()


class ViM:
    def __init__(self, train: Cache, weight: torch.Tensor, bias: torch.Tensor, dim: int):
        w, b = weight.double(), bias.double()
        self.u = -torch.linalg.pinv(w) @ b
        x = train.phi.double() - self.u
        eigval, eigvec = torch.linalg.eigh(x.T @ x / len(x))
        order = eigval.argsort(descending=True)
        self.null = eigvec[:, order[dim:]]  # complement of the principal subspace
        vlogit = (x @ self.null).norm(dim=1)
        self.alpha = float(train.logits.double().max(1).values.mean() / vlogit.mean())
        self.dim = dim

    def __call__(self, c: Cache) -> np.ndarray:
        vlogit = ((c.phi.double() - self.u) @ self.null).norm(dim=1)
        return (torch.logsumexp(c.logits.double(), 1) - self.alpha * vlogit).numpy()


def fit_baselines(train: Cache, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  *, he_beta: float, knn_k: int = 50, knn_subset: int | None = None,
                  vim_dim: int | None = None, react_percentile: float = 90.0,
                  seed: int = 0) -> dict:
    """name -> callable(Cache) -> scores, all fitted on ``train`` (correctly classified)."""
    c = int(weight.shape[0])
    d = int(train.phi.shape[1])
    knn_bank = train.phi
    if knn_subset and knn_subset < len(knn_bank):
        idx = torch.randperm(len(knn_bank), generator=torch.Generator().manual_seed(seed))
        knn_bank = knn_bank[idx[:knn_subset]]
    return {
        "MSP": msp,
        "Energy": energy,
        f"ReAct(p{react_percentile:g})": ReAct(train.phi, weight, bias, react_percentile),
        f"HE(b={he_beta:g})": HE(train.phi, labels, c, he_beta),
        "SHE": SHE(train.phi, labels, c),
        f"KNN(k={knn_k})": KNN(knn_bank, knn_k),
        "Mahalanobis": Mahalanobis(train.phi, labels, c),
        f"ViM(dim={vim_dim or d // 2})": ViM(train, weight, bias, vim_dim or d // 2),
    }
