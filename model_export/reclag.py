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

Two memory geometries (``geometry``; reclag.md §10):

    dot       a_mu = beta * xi_mu . v (lse) on v = phi (optionally rescaled to feature_norm)
    gaussian  whiten z = (phi - m) W (W = S^-1/2, S the tied within-class covariance of the
              correctly classified train features), shift z' = (z, R), lift
              z~ = (z', |z'|^2), xi~ = (xi, R, -1/2), b_mu = -beta |(xi_mu, R)|^2 / 2, so
              a_mu = beta xi~_mu . z~ + b_mu = -beta/2 |z - xi_mu|^2 exactly: lse(a) is the log
              of the class-conditional Gaussian-mixture density (M = 1: -Mahalanobis / 2).
              The update acts on z' (the lift is recomputed), and lse(a(z')) = -beta E(z') for
              Ramsauer's energy with biases, so an open trajectory never lowers the score.

One verdict. The ``score`` output is the quantity that decides the flag: the minimum of
lse(a_t) over t <= T along the ungated (vanilla) trajectory, or lse(a_0) when
``rectified=False`` or T = 0. The gated trajectory equals the ungated one until the gate first
closes, and it closes exactly at the first t with lse(a_t) < tau, so is_ood == (score < tau)
for every Lagrangian, geometry, feature_norm and T; calibration thresholds that same score.
The clamp floor is lse(b_c) per bank (a(0) = b: the gate quantity at the origin), which is
log M_c for the dot geometry (b = 0 on real rows): the origin is an attractor iff tau > lse(b).

Long because the two geometries, the two Lagrangians, the decision score and the Lyapunov
energies share one gate and one unrolled update, and the theory lives in one place.
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


FLOOR_EPS = 1e-3


def origin_floor(bias: Tensor) -> Tensor:
    """lse(b) over the last axis: the gate quantity at the origin (a(0) = b), log M_c for
    unbiased banks. The origin is an attractor iff tau > this (theorem T1, reclag.md §10)."""
    return lse(bias)


def safe_threshold(tau: Tensor | float, bias: Tensor | int) -> Tensor:
    """Enforce T1's precondition tau > lse(b) (per row when ``bias`` is (B, M); an int M means
    M unbiased memories, floor log M), so the origin stays an attractor."""
    floor = torch.tensor(math.log(max(bias, 1))) if isinstance(bias, int) else origin_floor(bias)
    return torch.maximum(torch.as_tensor(tau, dtype=torch.float32), floor + FLOOR_EPS)


def whiten(phi: Tensor, mean: Tensor, w: Tensor) -> Tensor:
    """z = (phi - m) W."""
    return (phi - mean) @ w


def shift(z: Tensor, radius: float) -> Tensor:
    """z' = (z, R): R along an extra axis, so the origin is at distance >= R from the data."""
    return torch.cat([z, torch.full_like(z[..., :1], float(radius))], -1)


def lift(v: Tensor) -> Tensor:
    """z' -> z~ = (z', |z'|^2)."""
    return torch.cat([v, (v * v).sum(-1, keepdim=True)], -1)


def lift_banks(banks: Tensor, mask_bias: Tensor, beta: float, radius: float,
               const: float = 0.0) -> tuple[Tensor, Tensor]:
    """Xi~ (C, M, D+2) = (xi, R, -1/2) and b (C, M) = -beta |(xi, R)|^2 / 2 + c (PAD rows kept)."""
    shifted = shift(banks, radius)
    lifted = torch.cat([shifted, torch.full_like(shifted[..., :1], -0.5)], -1)
    bias = -beta * (shifted * shifted).sum(-1) / 2 + const
    return lifted, torch.where(mask_bias < 0, torch.full_like(bias, PAD), bias)


LAGRANGIANS = ("lse", "rep_n")
GEOMETRIES = ("dot", "gaussian")
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
                lagrangian: str = "lse", power_n: int = 2, lifted: bool = False) -> Tensor:
    """a = beta * Xi v (lse) or n log ReLU(Xi v) (rep_n) for per-row banks:
    xi (B, M, D), v (B, D) -> (B, M). ``lifted``: xi is Xi~ (B, M, D+2), v is z' (B, D+1)."""
    v = lift(v) if lifted else v
    a = memory_logits(torch.bmm(xi, v.unsqueeze(-1)).squeeze(-1), beta, lagrangian, power_n)
    return a if bias is None else a + bias


def gate(a: Tensor, tau: Tensor) -> Tensor:
    """Open (1.0) where sum_mu exp(a_mu) >= lambda, compared in the log domain."""
    return (lse(a) >= tau).to(a.dtype)


def step(xi: Tensor, a: Tensor, tau: Tensor, lagrangian: str = "lse", power_n: int = 2,
         rectified: bool = True, lifted: bool = False) -> Tensor:
    """One discrete update: v' = 1[S >= lambda] * f(a) Xi (f = softmax for lse, the
    normalised ReLU^(n-1) for rep_n); ``rectified=False`` drops the gate. ``lifted``: the
    update acts on z' with Xi' (Xi~ without its last column); the lift is redone by
    ``activations``."""
    p = retrieval_weights(a, lagrangian, power_n)
    v = torch.bmm(p.unsqueeze(1), xi[..., :-1] if lifted else xi).squeeze(1)
    return gate(a, tau).unsqueeze(-1) * v if rectified else v


_TINY = 1e-30  # |v| floor of rep_n's log|v| term (the origin): finite in float32


def hopfield_energy(v: Tensor, a: Tensor, beta: float, tau: Tensor, lagrangian: str = "lse",
                    power_n: int = 2, rectified: bool = True, lifted: bool = False) -> Tensor:
    """The Lyapunov energy of state v under ``step`` (the bundle's ``energy`` output); with
    s = max{lse(a), tau} (rectified) or lse(a):
        lse, dot       E = 1/2 |v|^2 - s / beta      (Ramsauer's energy, rectified Lagrangian)
        lse, gaussian  E = -s / beta                 (the lift carries the 1/2 |z'|^2 term)
        rep_n          E = log|v| - s / n            (scale-free: lse(a) - n log|v| is the
                       log of G(v/|v|), G = sum ReLU(xi.v)^n convex and n-homogeneous, and the
                       normalised update moves v/|v| along grad G, which never lowers G)
    None rises along the update (tests/test_reclag_theory.py). (Not the logits' free energy
    of greg.free_energy, nor the baseline score baselines.energy_score.)"""
    s = torch.maximum(lse(a), tau) if rectified else lse(a)
    if lagrangian == "rep_n":
        return torch.log(v.norm(dim=-1).clamp_min(_TINY)) - s / power_n
    return (0.0 if lifted else 0.5 * (v * v).sum(-1)) - s / beta


def decision_score(xi: Tensor, phi: Tensor, beta: float, steps: int, bias: Tensor | None = None,
                   lagrangian: str = "lse", power_n: int = 2, rectified: bool = True,
                   lifted: bool = False) -> Tensor:
    """The score that decides the flag (module docstring): min_t<=T lse(a_t) on the ungated
    trajectory when rectified, else lse(a_0). Independent of tau."""
    a = activations(xi, phi, beta, bias, lagrangian, power_n, lifted)
    score, v = lse(a), phi
    for _ in range(steps if rectified else 0):
        v = step(xi, a, a[..., 0], lagrangian, power_n, False, lifted)  # ungated: tau unused
        a = activations(xi, v, beta, bias, lagrangian, power_n, lifted)
        score = torch.minimum(score, lse(a))
    return score


def run_dynamics(xi: Tensor, phi: Tensor, beta: float, tau: Tensor, steps: int,
                 bias: Tensor | None = None, lagrangian: str = "lse", power_n: int = 2,
                 rectified: bool = True, lifted: bool = False):
    """Unroll ``steps`` gated updates from v_0 = phi (a Python loop: no ONNX Loop op).

    Returns (score, v_T, a_T, open_T): the decision score (``decision_score``), the final
    state, its activations and whether the gate is still open (state not at the origin).
    Without the rectification the state never goes to the origin, and open_T is the t = 0
    verdict. open_T == (score >= tau) holds by the theorem; the build checks it.
    """
    score = decision_score(xi, phi, beta, steps, bias, lagrangian, power_n, rectified, lifted)
    a = activations(xi, phi, beta, bias, lagrangian, power_n, lifted)
    v, still_open = phi, gate(a, tau)
    for _ in range(steps):
        v = step(xi, a, tau, lagrangian, power_n, rectified, lifted)
        a = activations(xi, v, beta, bias, lagrangian, power_n, lifted)
        if rectified:
            still_open = still_open * gate(a, tau)
    return score, v, a, still_open


class RecLagHead(nn.Module):
    """Memory banks plus the gated dynamics, applied to backbone features and logits.

    forward(phi, logits, tau) -> dict of the bundle's outputs (see hopgate/bundle.py).
    ``geometry="gaussian"`` takes the whitening (``mean``, ``whitener``) and banks of whitened
    k-means centres (C_b, M, D); it stores them lifted (C_b, M, D+2) with their bias, and the
    whitening, shift and lift run inside the graph.
    """

    def __init__(self, banks: Tensor, mask_bias: Tensor | None = None, beta: float = 5.0,
                 steps: int = 1, top_k: int = 3, shared: bool = False,
                 feature_norm: float | None = None, lagrangian: str = "lse", power_n: int = 2,
                 rectified: bool = True, geometry: str = "dot", mean: Tensor | None = None,
                 whitener: Tensor | None = None, radius: float | None = None):
        super().__init__()
        if lagrangian not in LAGRANGIANS:
            raise ValueError(f"lagrangian {lagrangian!r}: use one of {LAGRANGIANS}")
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry {geometry!r}: use one of {GEOMETRIES}")
        if geometry == "gaussian" and (lagrangian != "lse" or mean is None or whitener is None):
            raise ValueError("geometry gaussian needs the lse Lagrangian and a whitening "
                             "(mean, whitener)")
        if lagrangian == "rep_n" and int(power_n) < 1:
            raise ValueError(f"power_n must be >= 1, got {power_n}")
        self.lagrangian, self.power_n, self.rectified = lagrangian, int(power_n), bool(rectified)
        if banks.dim() != 3:
            raise ValueError(f"banks must be (banks, memories, dim), got {tuple(banks.shape)}")
        if mask_bias is None:
            mask_bias = torch.zeros(banks.shape[:2])
        self.geometry, self.lifted = geometry, geometry == "gaussian"
        self.beta, self.steps, self.shared = float(beta), int(steps), bool(shared)
        self.radius = None
        bias = mask_bias.float()
        if self.lifted:
            assert mean is not None and whitener is not None
            self.radius = float(radius if radius is not None else 3.0 * banks.shape[-1] ** 0.5)
            banks, bias = lift_banks(banks.float(), bias, self.beta, self.radius)
            self.register_buffer("mean", mean.float())
            self.register_buffer("whitener", whitener.float())
        self.register_buffer("banks", banks.float())
        self.register_buffer("mask_bias", mask_bias.float())  # 0 real row, PAD padding
        self.register_buffer("bias", bias)  # the activations' bias b (= mask_bias for dot)
        self.feature_norm = feature_norm
        self.top_k = min(int(top_k), banks.shape[1])

    @property
    def memories_per_bank(self) -> int:
        return self.banks.shape[1]

    def select(self, pred: Tensor) -> Tensor:
        """Index of the bank each row uses: its predicted class, or 0 for a shared bank."""
        return torch.zeros_like(pred) if self.shared else pred

    def state(self, phi: Tensor) -> Tensor:
        """The initial state v_0: phi (optionally normalised), or z' = (whiten(phi), R)."""
        phi = prepare_features(phi, self.feature_norm)
        if not self.lifted:
            return phi
        assert self.radius is not None
        return shift(whiten(phi, self.mean, self.whitener), self.radius)

    def floor(self) -> float:
        """The largest per-bank clamp floor lse(b_c) (+ eps): a calibrated tau must exceed it."""
        return float(origin_floor(self.bias).max()) + FLOOR_EPS

    def _dyn(self):
        return dict(lagrangian=self.lagrangian, power_n=self.power_n, rectified=self.rectified,
                    lifted=self.lifted)

    def score(self, phi: Tensor, logits: Tensor) -> Tensor:
        """The decision score (``decision_score``): what the gate compares with tau, what
        calibration thresholds and the p-value table holds. No tau needed."""
        bank = self.select(logits.argmax(-1))
        return decision_score(self.banks[bank], self.state(phi), self.beta, self.steps,
                              self.bias[bank], **self._dyn())

    def stability_margin(self, phi: Tensor, logits: Tensor, tau: Tensor | float) -> Tensor:
        """(score - tau) / L: a lower bound on the L2 feature change that can move the score
        across tau in the same bank, L = beta * max_mu |xi_mu| being the score's Lipschitz
        constant (|grad_phi lse(beta Xi phi)| = beta |sum_mu p_mu xi_mu|; greg.md §11.4). lse
        and dot only, and only where the t = 0 score decides (T = 0 or rectified=False): with
        gated steps the dynamics can lower the score and this bound does not hold. The
        distance is measured in the feature space the banks see (after ``feature_norm``)."""
        if self.lagrangian != "lse" or self.lifted:
            raise ValueError("a global stability margin exists for the lse Lagrangian and the "
                             "dot geometry only")
        if self.steps > 0 and self.rectified:
            raise ValueError("the stability margin bounds the t = 0 score: it needs steps: 0 or "
                             "rectified: false (gated steps can lower the deciding score)")
        bank = self.select(logits.argmax(-1))
        norms = self.banks.norm(dim=-1) + torch.where(self.mask_bias < 0, -1e30, 0.0)
        lip = self.beta * norms.max(-1).values[bank]
        return (self.score(phi, logits) - torch.as_tensor(tau)) / lip

    def forward(self, phi: Tensor, logits: Tensor, tau: Tensor) -> dict[str, Tensor]:
        pred = logits.argmax(-1)
        bank = self.select(pred)
        xi, bias = self.banks[bank], self.bias[bank]
        tau = safe_threshold(tau, bias)  # per row: tau > lse(b_c), the origin attracts
        score, v, a, still_open = run_dynamics(xi, self.state(phi), self.beta, tau, self.steps,
                                               bias, **self._dyn())
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
            "energy": hopfield_energy(v, a, self.beta, tau, **self._dyn()),
            "msp": probs.max(-1).values,
            "energy_score": lse(logits),  # the Energy baseline: +LSE(logits), high = ID
        }
