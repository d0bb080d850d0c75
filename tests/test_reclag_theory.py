"""RecLag's theory on the PyTorch module (reclag.md §4): T1, the stronger T1 fact, T2."""

import math

import pytest
import torch

from hopgate.model_export import reclag

torch.set_default_dtype(torch.float32)


def random_bank(seed, m=8, d=16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(m, d, generator=g), g


@pytest.mark.parametrize("seed", range(20))
def test_origin_is_a_fixed_point_that_attracts(seed):
    xi, g = random_bank(seed, scale=0.5 + seed / 10)
    m, beta = xi.shape[0], 0.5 + seed / 7
    tau = torch.tensor(math.log(m) + 0.1 + seed / 20)  # lambda > M
    xib = xi[None]
    zero = torch.zeros(1, xi.shape[1])
    a0 = reclag.activations(xib, zero, beta)
    assert torch.equal(reclag.step(xib, a0, tau), zero)  # fixed point
    # attracting: every state in a small ball around 0 has a closed gate and maps to 0
    v = 1e-3 * torch.randn(256, xi.shape[1], generator=g)
    xis = xib.expand(256, -1, -1)
    a = reclag.activations(xis, v, beta)
    assert (reclag.gate(a, tau) == 0).all()
    assert torch.equal(reclag.step(xis, a, tau), torch.zeros_like(v))


@pytest.mark.parametrize("seed", range(10))
def test_closed_gate_at_t0_flows_to_origin_in_continuous_time(seed):
    """The stronger fact: the whole region S < lambda flows to 0 and the gate never reopens."""
    xi, g = random_bank(seed)
    beta, tau = 0.5, torch.tensor(math.log(2 * xi.shape[0]))
    v = torch.randn(512, xi.shape[1], generator=g)
    xis = xi[None].expand(len(v), -1, -1)
    closed = reclag.gate(reclag.activations(xis, v, beta), tau) == 0
    assert closed.sum() > 10, "the sample should contain closed-gate starts"
    v, xis = v[closed], xis[closed]
    for _ in range(2000):  # Euler, tau_v = 1, dt = 0.01
        a = reclag.activations(xis, v, beta)
        assert (reclag.gate(a, tau) == 0).all(), "gate reopened along the trajectory"
        v = v + 0.01 * (reclag.step(xis, a, tau) - v)
    assert v.norm(dim=1).max() < 1e-7


@pytest.mark.parametrize("seed", range(10))
def test_vanilla_limit(seed):
    """lambda -> 0 (tau -> -inf): the update is Ramsauer's v' = Xi^T softmax(beta Xi v)."""
    xi, g = random_bank(seed)
    beta = 0.3 + seed / 5
    v = torch.randn(64, xi.shape[1], generator=g)
    xis = xi[None].expand(len(v), -1, -1)
    got = reclag.step(xis, reclag.activations(xis, v, beta), torch.tensor(-1e30))
    want = torch.softmax(beta * v @ xi.T, dim=1) @ xi
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [0, 1, 3, 7])
def test_closed_gate_at_t0_ends_at_origin_after_T_steps(steps):
    xi, g = random_bank(steps)
    beta, tau = 1.0, torch.tensor(math.log(xi.shape[0]) + 2.0)
    phi = 1.5 * torch.randn(400, xi.shape[1], generator=g)
    xis = xi[None].expand(len(phi), -1, -1)
    score, v, a, still_open = reclag.run_dynamics(xis, phi, beta, tau, steps)
    closed0 = score < tau
    assert closed0.any() and (~closed0).any()
    assert (still_open[closed0] == 0).all()
    if steps > 0:
        assert (v[closed0] == 0).all()
        # Hopfield energy of the origin: -tau / beta
        e = reclag.hopfield_energy(v, a, beta, tau)
        torch.testing.assert_close(e[closed0], torch.full_like(e[closed0], -float(tau) / beta))


def test_lse_is_stable_for_large_scores():
    a = torch.tensor([[800.0, 799.0, -1e9]])
    assert torch.isfinite(reclag.lse(a)).all()
    torch.testing.assert_close(reclag.lse(a), torch.tensor([800.0 + math.log1p(math.exp(-1))]))


def test_head_marks_memory_index_minus_one_exactly_for_ood_rows():
    g = torch.Generator().manual_seed(0)
    banks = torch.randn(4, 5, 12, generator=g)
    head = reclag.RecLagHead(banks, beta=2.0, steps=2, top_k=3)
    phi = torch.randn(300, 12, generator=g)
    logits = torch.randn(300, 4, generator=g)
    out = head(phi, logits, torch.tensor(4.0))
    ood = out["is_ood"]
    assert ood.any() and (~ood).any()
    assert (out["memory_index"][ood] == -1).all()
    assert (out["memory_index"][~ood] >= 0).all()
    assert (out["memory_weight"][ood] == 0).all()
    # global index = bank * M + local, within the predicted class's bank
    assert torch.equal(out["memory_index"][~ood][:, 0] // 5, out["pred_class"][~ood])


def test_threshold_is_clamped_above_log_M():
    """T1's precondition is enforced whatever threshold a user passes."""
    banks = torch.zeros(1, 6, 4)
    head = reclag.RecLagHead(banks, beta=1.0, steps=1, shared=True)
    out = head(torch.zeros(2, 4), torch.zeros(2, 3), torch.tensor(-50.0))
    assert out["is_ood"].all()  # S(0) = M: with tau clamped to log M + eps, the origin is OOD


@pytest.mark.parametrize("seed", range(3))
def test_no_feature_change_within_the_stability_margin_flips_the_verdict(seed):
    """The margin against an actual worst-case perturbation: projected gradient steps that push
    the score towards tau, kept inside the ball of radius 0.99 * margin, never flip a verdict;
    at 3 * margin they do flip some (the bound is not vacuous)."""
    g = torch.Generator().manual_seed(seed)
    banks = torch.randn(3, 6, 12, generator=g)
    head = reclag.RecLagHead(banks, beta=1.5, steps=0, top_k=3)
    phi = 1.5 * torch.randn(300, 12, generator=g)
    logits = torch.randn(300, 3, generator=g)
    s = head.score(phi, logits)
    tau = float(s.median())
    marg = head.stability_margin(phi, logits, tau)
    assert torch.equal(marg < 0, s < tau)
    sign = torch.where(s >= tau, -1.0, 1.0)  # push ID rows down, OOD rows up

    def worst(radius):
        delta = torch.zeros_like(phi, requires_grad=True)
        for _ in range(30):
            (sign * head.score(phi + delta, logits)).sum().backward()
            with torch.no_grad():
                delta += 0.1 * radius[:, None] * delta.grad / delta.grad.norm(dim=1, keepdim=True)
                delta *= (radius / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None]
            delta.grad = None
        with torch.no_grad():
            return (head.score(phi + delta, logits) < tau) != (s < tau)

    assert not worst(0.99 * marg.abs()).any()
    assert worst(3.0 * marg.abs()).any()
