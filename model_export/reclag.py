"""RecLag: the rectified memory Lagrangian, its gate, the unrolled dynamics, the Hopfield energy.

The math lives here once; fitting, export and evaluation all call this module.

Notation (reclag.md): features phi in R^D, memory bank Xi in R^{M x D}, a = beta * Xi v.

    L_h(h)  = (1/beta) log max{lambda, sum_mu exp(beta h_mu)}        rectified log-sum-exp
    f(h)    = 1[sum exp(beta h) >= lambda] * softmax(beta h)          gate x softmax
    v_{t+1} = f(Xi v_t) Xi                                            discrete update
    E(v)    = 1/2 |v|^2 - (1/beta) max{lse(beta Xi v), log lambda}    Hopfield energy

The threshold is kept in the log domain, tau = log(lambda), and never exponentiated. For
tau > log M the origin is an attractor of every Xi (theorem T1), and a state whose gate is
closed at t = 0 goes there: that is the OOD verdict. As tau -> -inf the gate is always open
and the update is the vanilla modern-Hopfield (Ramsauer) update (theorem T2).

Banks are a (C_b, M, D) tensor: one bank per class (selected by the predicted class) or one
shared bank (C_b = 1). ``mask_bias`` (C_b, M) is 0 for real memories and a large negative
number for padding rows, so a class with fewer than M memories adds nothing to the sum.

Two memory Lagrangians share this machinery through the log-domain activations ``a``:

    lse    a_mu = beta * xi_mu . v                        score = log sum exp(beta h)
    rep_n  a_mu = n * log ReLU(xi_mu . v)                 score = log sum ReLU(h)^n

rep_n is Dense Associative Memory's rectified polynomial F(h) = ReLU(h)^n (dam.md §2) written
in the log domain (dam.md §8.4: no float32 overflow at n = 30), so the gate, the threshold,
the calibration and the ONNX graph are the same code. Its rectified Lagrangian is
L_h = (1/n) log max{lambda, sum_mu ReLU(h_mu)^n}; the normalised activation is
ReLU(h)^(n-1) / sum ReLU(h)^(n-1) = softmax(a (n-1)/n) (F' normalised, as softmax is the
normalised exp), and E(v) = 1/2 |v|^2 - (1/n) max{score, tau}. beta does not enter rep_n: a
scale T on h only shifts the score by the constant -n log T. ``rectified=False`` keeps the
gate open in the dynamics (the plain MHN / DAM update); the verdict is then the
threshold alone, score < tau, as in the HE baseline.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

PAD = -1.0e9  # additive bias of padded memory rows: exp(PAD) == 0 in float32


def lse(a: Tensor) -> Tensor:
    """log-sum-exp over the last axis, max-shifted by hand (scores reach the hundreds)."""
    m = a.max(dim=-1, keepdim=True).values
    return (m + torch.log(torch.exp(a - m).sum(dim=-1, keepdim=True))).squeeze(-1)


def prepare_features(phi: Tensor, feature_norm: float | None) -> Tensor:
    """Optionally rescale features to a fixed L2 norm (then the gate is a pure density
    threshold, reclag.md §5.1); None keeps the raw features as the official code does."""
    if feature_norm is None:
        return phi
    return feature_norm * phi / phi.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def safe_threshold(tau: Tensor | float, n_memories: int) -> Tensor:
    """Enforce T1's precondition tau > log M, so the origin stays an attractor."""
    floor = math.log(max(n_memories, 1)) + 1e-3
    return torch.clamp(torch.as_tensor(tau, dtype=torch.float32), min=floor)


LAGRANGIANS = ("lse", "rep_n")
_LOG_FLOOR = -30.0  # log of the smallest overlap kept by rep_n: ReLU(h) = 0 -> h^n ~ 1e-13n


def memory_logits(h: Tensor, beta: float, lagrangian: str = "lse", power_n: int = 2) -> Tensor:
    """Log-domain memory activations from overlaps h = Xi v (see the module docstring)."""
    if lagrangian == "lse":
        return beta * h
    if lagrangian == "rep_n":
        return power_n * torch.log(torch.clamp(h, min=math.exp(_LOG_FLOOR)))
    raise ValueError(f"lagrangian {lagrangian!r}: use one of {LAGRANGIANS}")


def retrieval_weights(a: Tensor, lagrangian: str = "lse", power_n: int = 2) -> Tensor:
    """The normalised activation f(h) / sum f(h): softmax(beta h) for lse,
    ReLU(h)^(n-1) / sum ReLU(h)^(n-1) for rep_n."""
    if lagrangian == "rep_n":
        return torch.softmax(a * ((power_n - 1) / power_n), dim=-1)
    return torch.softmax(a, dim=-1)


def activations(xi: Tensor, v: Tensor, beta: float, bias: Tensor | None = None,
                lagrangian: str = "lse", power_n: int = 2) -> Tensor:
    """a = beta * Xi v (lse) or n log ReLU(Xi v) (rep_n) for per-row banks:
    xi (B, M, D), v (B, D) -> (B, M)."""
    a = memory_logits(torch.bmm(xi, v.unsqueeze(-1)).squeeze(-1), beta, lagrangian, power_n)
    return a if bias is None else a + bias


def gate(a: Tensor, tau: Tensor) -> Tensor:
    """Open (1.0) where sum_mu exp(a_mu) >= lambda, compared in the log domain."""
    return (lse(a) >= tau).to(a.dtype)


def step(xi: Tensor, a: Tensor, tau: Tensor, lagrangian: str = "lse", power_n: int = 2,
         rectified: bool = True) -> Tensor:
    """One discrete update: v' = 1[S >= lambda] * f(a) Xi (f = softmax for lse, the
    normalised ReLU^(n-1) for rep_n); ``rectified=False`` drops the gate."""
    p = retrieval_weights(a, lagrangian, power_n)
    v = torch.bmm(p.unsqueeze(1), xi).squeeze(1)
    return gate(a, tau).unsqueeze(-1) * v if rectified else v


def hopfield_energy(v: Tensor, a: Tensor, beta: float, tau: Tensor, lagrangian: str = "lse",
                    power_n: int = 2, rectified: bool = True) -> Tensor:
    """The Hopfield (Lyapunov) energy of state v, the bundle's ``energy`` output:
    E(v) = 1/2 |v|^2 - (1/beta) max{lse(a), tau} (lse) or (1/n) max{lse(a), tau} (rep_n);
    without the rectification the max with tau is dropped. (Not the logits' free energy of
    greg.free_energy, nor the baseline score baselines.energy_score.)"""
    scale = power_n if lagrangian == "rep_n" else beta
    s = torch.maximum(lse(a), tau) if rectified else lse(a)
    return 0.5 * (v * v).sum(-1) - s / scale


def run_dynamics(xi: Tensor, phi: Tensor, beta: float, tau: Tensor, steps: int,
                 bias: Tensor | None = None, lagrangian: str = "lse", power_n: int = 2,
                 rectified: bool = True):
    """Unroll ``steps`` updates from v_0 = phi (a Python loop: no ONNX Loop op).

    Returns (score, v_T, a_T, open_T): the t = 0 score lse(a(phi)), the final state,
    its activations and whether the gate is still open (state not at the origin). Without
    the rectification the state never goes to the origin, and open_T is the t = 0 verdict.
    """
    a = activations(xi, phi, beta, bias, lagrangian, power_n)
    score = lse(a)
    v, still_open = phi, gate(a, tau)
    for _ in range(steps):
        v = step(xi, a, tau, lagrangian, power_n, rectified)
        a = activations(xi, v, beta, bias, lagrangian, power_n)
        if rectified:
            still_open = still_open * gate(a, tau)
    return score, v, a, still_open


class RecLagHead(nn.Module):
    """Memory banks plus the gated dynamics, applied to backbone features and logits.

    forward(phi, logits, tau) -> dict of the bundle's outputs (see service/bundle.py).
    """

    def __init__(self, banks: Tensor, mask_bias: Tensor | None = None, beta: float = 5.0,
                 steps: int = 1, top_k: int = 3, shared: bool = False,
                 feature_norm: float | None = None, lagrangian: str = "lse", power_n: int = 2,
                 rectified: bool = True):
        super().__init__()
        if lagrangian not in LAGRANGIANS:
            raise ValueError(f"lagrangian {lagrangian!r}: use one of {LAGRANGIANS}")
        if lagrangian == "rep_n" and int(power_n) < 1:
            raise ValueError(f"power_n must be >= 1, got {power_n}")
        self.lagrangian, self.power_n, self.rectified = lagrangian, int(power_n), bool(rectified)
        if banks.dim() != 3:
            raise ValueError(f"banks must be (banks, memories, dim), got {tuple(banks.shape)}")
        self.register_buffer("banks", banks.float())
        if mask_bias is None:
            mask_bias = torch.zeros(banks.shape[:2])
        self.register_buffer("mask_bias", mask_bias.float())
        self.beta, self.steps, self.shared = float(beta), int(steps), bool(shared)
        self.feature_norm = feature_norm
        self.top_k = min(int(top_k), banks.shape[1])

    @property
    def memories_per_bank(self) -> int:
        return self.banks.shape[1]

    def select(self, pred: Tensor) -> Tensor:
        """Index of the bank each row uses: its predicted class, or 0 for a shared bank."""
        return torch.zeros_like(pred) if self.shared else pred

    def score(self, phi: Tensor, logits: Tensor) -> Tensor:
        """The t = 0 gate quantity lse(beta Xi^(c) phi); cheap, no dynamics."""
        bank = self.select(logits.argmax(-1))
        phi = prepare_features(phi, self.feature_norm)
        return lse(activations(self.banks[bank], phi, self.beta, self.mask_bias[bank],
                               self.lagrangian, self.power_n))

    def stability_margin(self, phi: Tensor, logits: Tensor, tau: Tensor | float) -> Tensor:
        """(score - tau) / L: a lower bound on the L2 feature change that can move the score
        across tau in the same bank, L = beta * max_mu |xi_mu| being the score's Lipschitz
        constant (|grad_phi lse(beta Xi phi)| = beta |sum_mu p_mu xi_mu|; greg.md §11.4). lse
        only (rep_n's log-ReLU score is not globally Lipschitz). The distance is measured in
        the feature space the banks see (after ``feature_norm``), not in pixels."""
        if self.lagrangian != "lse":
            raise ValueError("a global stability margin exists for the lse Lagrangian only")
        bank = self.select(logits.argmax(-1))
        norms = self.banks.norm(dim=-1) + torch.where(self.mask_bias < 0, -1e30, 0.0)
        lip = self.beta * norms.max(-1).values[bank]
        return (self.score(phi, logits) - torch.as_tensor(tau)) / lip

    def forward(self, phi: Tensor, logits: Tensor, tau: Tensor) -> dict[str, Tensor]:
        tau = safe_threshold(tau, self.memories_per_bank)  # S(0) <= M < lambda
        phi = prepare_features(phi, self.feature_norm)
        pred = logits.argmax(-1)
        bank = self.select(pred)
        xi, bias = self.banks[bank], self.mask_bias[bank]
        score, v, a, still_open = run_dynamics(xi, phi, self.beta, tau, self.steps, bias,
                                               self.lagrangian, self.power_n, self.rectified)
        is_ood = still_open < 0.5
        p = retrieval_weights(a, self.lagrangian, self.power_n)
        weight, local = torch.topk(p, self.top_k, dim=-1)
        glob = bank.unsqueeze(-1) * self.memories_per_bank + local
        keep = ~is_ood.unsqueeze(-1)
        probs = torch.softmax(logits, dim=-1)
        return {
            "score": score,
            "is_ood": is_ood,
            "pred_class": pred,
            "memory_index": torch.where(keep, glob, torch.full_like(glob, -1)),
            "memory_weight": torch.where(keep, weight, torch.zeros_like(weight)),
            "energy": hopfield_energy(v, a, self.beta, tau, self.lagrangian, self.power_n,
                                      self.rectified),
            "msp": probs.max(-1).values,
            "energy_score": lse(logits),  # the Energy baseline: +LSE(logits), high = ID
        }
