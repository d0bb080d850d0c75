"""Post-hoc OOD baselines on cached penultimate features and logits (higher score = more ID).

Every detector (``detector.Detector``) is fitted on the same correctly classified training
features RecLag's banks are fitted on, and scores the very same test features/logits, so the
comparison isolates the score.

  MSP          max softmax (Hendrycks & Gimpel 2017)
  Energy       energy_score = +logsumexp(logits), T = 1 (Liu et al. 2020; the negative free
               energy, greg.free_energy, so that higher = more ID)
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

import numpy as np
import torch

from .detector import Detector, Features, Linear


def msp(x: Features) -> np.ndarray:
    return torch.softmax(x.logits.double(), 1).max(1).values.numpy()


def energy_score(x: Features) -> np.ndarray:
    """+logsumexp(logits): the Energy baseline's score (high = ID)."""
    return torch.logsumexp(x.logits.double(), 1).numpy()


class MSP(Detector):
    label = "MSP"

    def score(self, x: Features) -> np.ndarray:
        return msp(x)


class Energy(Detector):
    label = "Energy"

    def score(self, x: Features) -> np.ndarray:
        return energy_score(x)


class ReAct(Detector):
    def __init__(self, percentile: float = 90.0):
        self.percentile = percentile
        self.label = f"ReAct(p{percentile:g})"

    def fit(self, train: Features, labels: torch.Tensor, linear: Linear) -> ReAct:
        self.clip = float(np.percentile(train.phi.numpy().ravel(), self.percentile))
        self.w, self.b = linear.weight.double(), linear.bias.double()
        return self

    def score(self, x: Features) -> np.ndarray:
        logits = x.phi.double().clamp(max=self.clip) @ self.w.T + self.b
        return torch.logsumexp(logits, 1).numpy()


def _per_class(train: Features, labels: torch.Tensor, linear: Linear) -> list[torch.Tensor]:
    return [train.phi[labels == k].double() for k in range(int(linear.weight.shape[0]))]


class HE(Detector):
    """Hopfield energy over every stored pattern of the predicted class."""

    def __init__(self, beta: float):
        self.beta = beta
        self.label = f"HE(b={beta:g})"

    def fit(self, train: Features, labels: torch.Tensor, linear: Linear) -> HE:
        self.stored = _per_class(train, labels, linear)
        return self

    def score(self, x: Features) -> np.ndarray:
        out = torch.empty(len(x.phi), dtype=torch.float64)
        pred, phi = x.pred, x.phi.double()
        for k, stored in enumerate(self.stored):
            rows = pred == k
            if rows.any():
                out[rows] = torch.logsumexp(self.beta * phi[rows] @ stored.T, 1)
        return out.numpy()


class SHE(Detector):
    label = "SHE"

    def fit(self, train: Features, labels: torch.Tensor, linear: Linear) -> SHE:
        self.means = torch.stack([s.mean(0) for s in _per_class(train, labels, linear)])
        return self

    def score(self, x: Features) -> np.ndarray:
        return (x.phi.double() * self.means[x.pred]).sum(1).numpy()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class KNN(Detector):
    """``subset``: keep that many training features (a seeded random choice) as the bank."""

    def __init__(self, k: int = 50, subset: int | None = None, seed: int = 0, chunk: int = 1024):
        self.k, self.subset, self.seed, self.chunk = k, subset, seed, chunk
        self.label = f"KNN(k={k})"

    def fit(self, train: Features, labels: torch.Tensor, linear: Linear) -> KNN:
        bank = train.phi
        if self.subset and self.subset < len(bank):
            idx = torch.randperm(len(bank), generator=torch.Generator().manual_seed(self.seed))
            bank = bank[idx[:self.subset]]
        self.bank = _unit(bank.float())
        return self

    def score(self, x: Features) -> np.ndarray:
        q = _unit(x.phi.float())
        out = []
        for i in range(0, len(q), self.chunk):
            sim = q[i:i + self.chunk] @ self.bank.T  # unit vectors: d^2 = 2 - 2 cos
            kth = sim.topk(self.k, dim=1).values[:, -1]
            out.append(-(2 - 2 * kth.double()).clamp_min(0).sqrt())
        return torch.cat(out).numpy()


class Mahalanobis(Detector):
    label = "Mahalanobis"

    def fit(self, train: Features, labels: torch.Tensor, linear: Linear) -> Mahalanobis:
        x = train.phi.double()
        self.means = torch.stack([s.mean(0) for s in _per_class(train, labels, linear)])
        centred = x - self.means[labels]
        cov = centred.T @ centred / len(x)
        self.precision = torch.linalg.pinv(cov, hermitian=True)
        return self

    def score(self, x: Features) -> np.ndarray:
        out = []
        for rows in x.phi.double().split(512):
            d = rows[:, None, :] - self.means[None]  # (n, C, D)
            out.append(-((d @ self.precision) * d).sum(-1).min(1).values)
        return torch.cat(out).numpy()


class ViM(Detector):
    """``dim``: the principal subspace's dimension (default: half the feature dimension)."""

    def __init__(self, dim: int | None = None):
        self.dim = dim

    @property
    def label(self) -> str:
        return f"ViM(dim={self.dim})"

    def fit(self, train: Features, labels: torch.Tensor, linear: Linear) -> ViM:
        self.dim = self.dim or int(train.phi.shape[1]) // 2
        w, b = linear.weight.double(), linear.bias.double()
        self.u = -torch.linalg.pinv(w) @ b
        x = train.phi.double() - self.u
        eigval, eigvec = torch.linalg.eigh(x.T @ x / len(x))
        order = eigval.argsort(descending=True)
        self.null = eigvec[:, order[self.dim:]]  # complement of the principal subspace
        vlogit = (x @ self.null).norm(dim=1)
        self.alpha = float(train.logits.double().max(1).values.mean() / vlogit.mean())
        return self

    def score(self, x: Features) -> np.ndarray:
        vlogit = ((x.phi.double() - self.u) @ self.null).norm(dim=1)
        return (torch.logsumexp(x.logits.double(), 1) - self.alpha * vlogit).numpy()
