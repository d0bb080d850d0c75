"""One verdict (issue 13 item 2) and the Lyapunov energies (item 5) on the PyTorch module, for
every Lagrangian, geometry, feature_norm, T and rectification the config allows; the origin
theorem with the lse(bias) floor, on the module and on the exported graph (onnxruntime)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hopgate.model_export import recipe
from hopgate.model_export import reclag as R
from hopgate.model_export.calibrate import VerdictError, check_floor, check_one_verdict
from hopgate.model_export.config import MemoryConfig
from hopgate.model_export.export import check_parity, export_onnx, ort_session, run_ort
from hopgate.model_export.model import GatedModel, Normalize
from tests.test_graph import C, D, M, PixelFeatures, meta_for

LAGRANGIANS = [("lse", 2), ("rep_n", 2), ("rep_n", 10)]


def _memory(geometry, lagrangian, n, feature_norm, steps, rectified):
    return MemoryConfig(geometry=geometry, lagrangian=lagrangian, power_n=n,
                        feature_norm=feature_norm, steps=steps, rectified=rectified,
                        beta=1.0 if geometry == "gaussian" else 2.0, memories=M,
                        radius=50.0 if geometry == "gaussian" else None)


def _head(memory, seed=0):
    """A head through recipe.make_head: random banks at feature scale ~1; the gaussian one
    with a random whitening. Features are 5x the banks' scale (un-normalised raw features,
    the README EfficientNet failure: one step pulls the state to memory scale)."""
    g = torch.Generator().manual_seed(seed)
    banks = torch.randn(C, M, D, generator=g).abs() / math.sqrt(D) * 2
    extra = {}
    if memory.geometry == "gaussian":
        a = torch.randn(D, D, generator=g) / math.sqrt(D)
        extra = {"mean": torch.randn(D, generator=g), "whitener": a @ a.T + 0.5 * torch.eye(D)}
    head = recipe.make_head(memory, banks, torch.zeros(C, M), **extra)
    phi = 5 * (torch.randn(600, D, generator=g).abs() + 0.1 * torch.randn(600, D, generator=g))
    return head, phi, torch.randn(600, C, generator=g)


SETTINGS = [(geo, lag, n, fn, t, rect)
            for geo in ("dot", "gaussian") for lag, n in LAGRANGIANS
            for fn in (None, 10.0) for t in (0, 1, 3) for rect in (True, False)
            if geo == "dot" or lag == "lse"]


@pytest.mark.parametrize("geo,lag,n,fn,steps,rect", SETTINGS)
def test_the_flag_is_score_below_threshold(geo, lag, n, fn, steps, rect):
    head, phi, logits = _head(_memory(geo, lag, n, fn, steps, rect))
    with torch.no_grad():
        s = head.score(phi, logits)  # what calibration thresholds
        tau = float(s.sort().values[len(s) // 2])
        out = head(phi, logits, torch.tensor(tau))
    assert out["is_ood"].any() and (~out["is_ood"]).any()
    torch.testing.assert_close(out["score"], s, rtol=0, atol=0)  # graph score = calibrated one
    assert check_one_verdict(out["is_ood"].numpy(), out["score"].numpy(), tau, "test") == len(s)


def test_the_deciding_score_is_below_the_t0_score_where_the_dynamics_close_the_gate():
    """Not vacuous: without feature normalisation one step lowers the score of the raw
    features, so the t = 0 score would contradict the flag (the README EfficientNet failure)."""
    head, phi, logits = _head(_memory("dot", "lse", 2, None, 1, True))
    with torch.no_grad():
        s0 = R.lse(R.activations(head.banks[logits.argmax(-1)], phi, head.beta))
        s = head.score(phi, logits)
        tau = float(s.sort().values[len(s) // 2])
        out = head(phi, logits, torch.tensor(tau))
    assert (s < s0 - 1.0).float().mean() > 0.5
    assert ((s0 >= tau) & out["is_ood"]).sum() > 0  # t = 0 score says ID, the gate says OOD


def test_check_one_verdict_and_floor_refuse():
    with pytest.raises(VerdictError, match="disagrees"):
        check_one_verdict(np.array([False, False]), np.array([5.0, 6.0]), 5.5, "held-out images")
    with pytest.raises(VerdictError, match="clamp floor"):
        check_floor(-3.0, -2.0)
    check_floor(-1.0, -2.0)


# --- energies: Lyapunov functions of the update, every Lagrangian and geometry -----------------

ENERGY_SETTINGS = [("dot", "lse", 2), ("dot", "rep_n", 1), ("dot", "rep_n", 2),
                   ("dot", "rep_n", 10), ("dot", "rep_n", 30), ("gaussian", "lse", 2)]


@pytest.mark.parametrize("rect", [True, False])
@pytest.mark.parametrize("geo,lag,n", ENERGY_SETTINGS)
def test_energy_never_rises_under_the_update(geo, lag, n, rect):
    g = torch.Generator().manual_seed(n)
    dt = torch.float64
    b, beta = 256, 1.0 if geo == "gaussian" else 2.0
    xi = torch.randn(b, M, D, generator=g, dtype=dt)
    v = torch.randn(b, D, generator=g, dtype=dt) * 3
    bias, lifted = None, geo == "gaussian"
    if lifted:
        xi, bias = R.lift_banks(xi, torch.zeros(b, M, dtype=dt), beta, 3 * math.sqrt(D))
        v = R.shift(v, 3 * math.sqrt(D))
    kw = dict(lagrangian=lag, power_n=n)
    a = R.activations(xi, v, beta, bias, **kw, lifted=lifted)
    tau = R.lse(a).median().to(dt)
    e_prev, rises, steps = None, 0, 0
    for _ in range(12):
        a = R.activations(xi, v, beta, bias, **kw, lifted=lifted)
        e = R.hopfield_energy(v, a, beta, tau, **kw, rectified=rect, lifted=lifted)
        if e_prev is not None:
            rises += int((e > e_prev + 1e-9 * (1 + e_prev.abs())).sum())
            steps += len(e)
        e_prev = e
        v = R.step(xi, a, tau, **kw, rectified=rect, lifted=lifted)
    assert steps and rises == 0, f"energy rose in {rises} of {steps} steps"


# --- the origin theorem: an attractor iff tau > lse(b) -----------------------------------------

def _gaussian_head(radius=3.0, steps=2):
    memory = _memory("gaussian", "lse", 2, None, steps, True).model_copy(
        update={"radius": radius})
    return _head(memory, seed=1)


@pytest.mark.parametrize("margin", [0.5, -0.5])
def test_origin_is_an_attractor_iff_tau_exceeds_lse_bias(margin):
    head, _, _ = _gaussian_head()
    xi, bias = head.banks, head.bias  # every class's bank, the exported buffers
    floor = R.origin_floor(bias)  # (C,)
    tau = floor + margin
    zero = torch.zeros(C, D + 1)  # z' = 0, the lifted origin
    a0 = R.activations(xi, zero, head.beta, bias, lifted=True)
    torch.testing.assert_close(R.lse(a0), floor)  # a(0) = b
    nxt = R.step(xi, a0, tau, lifted=True)
    near = 1e-3 * torch.randn(C, D + 1, generator=torch.Generator().manual_seed(0))
    a_near = R.activations(xi, near, head.beta, bias, lifted=True)
    if margin > 0:  # closed at and around the origin, which maps to itself: an attractor
        assert (R.gate(a0, tau) == 0).all() and torch.equal(nxt, zero)
        assert torch.equal(R.step(xi, a_near, tau, lifted=True), zero)
    else:  # the gate is open at the origin: the update leaves it
        assert (R.gate(a0, tau) == 1).all() and (nxt.norm(dim=-1) > 1.0).all()
    # the head never runs with tau at or below the floor: it clamps to lse(b_c) + eps
    eff = R.safe_threshold(tau, bias)
    assert (eff > floor).all()


def test_exported_graph_uses_the_floor_and_the_calibrated_tau(tmp_path):
    """On the exported gaussian graph (onnxruntime): a calibrated tau above the floor is used
    as is (flag == score < tau, flagged rows at the origin: energy -tau/beta, no memories); a
    log_lambda below lse(b_c) is clamped to it (flag == score < lse(b_c) + eps per class)."""
    g = torch.Generator().manual_seed(3)
    banks = torch.rand(C, M, D, generator=g) * 4 - 2
    memory = _memory("gaussian", "lse", 2, None, 2, True).model_copy(update={"radius": 3.0})
    head = recipe.make_head(memory, banks, torch.zeros(C, M), mean=torch.zeros(D),
                            whitener=torch.eye(D) * 0.25)
    model = GatedModel(Normalize([0.5], [0.1]), PixelFeatures(3), head).eval()
    images = torch.randint(0, 256, (400, 1, D, 1), generator=g, dtype=torch.uint8).numpy()
    with torch.no_grad():
        s = head.score(*model.features(torch.from_numpy(images))).sort().values
    floors = R.origin_floor(head.bias).numpy()
    tau = float(s[len(s) // 2] + s[len(s) // 2 - 1]) / 2
    assert tau > floors.max()
    meta = meta_for(tau, 2, 1.0, geometry="gaussian", radius=3.0)
    path = export_onnx(model, meta, tmp_path / "g.onnx")
    check_parity(model, path, images, tau)
    sess = ort_session(path)
    out = run_ort(sess, images)
    ood = out["is_ood"]
    assert ood.any() and (~ood).any()
    np.testing.assert_array_equal(ood, out["score"] < np.float32(tau))
    np.testing.assert_allclose(out["energy"][ood], -tau / 1.0, rtol=1e-6)
    assert (out["memory_weight"][ood] == 0).all() and (out["energy"][~ood] < -tau).all()
    low = float(floors.min()) - 50.0  # below every bank's floor: the clamp decides
    out = run_ort(sess, images, log_lambda=low)
    eff = floors[out["pred_class"]] + R.FLOOR_EPS
    np.testing.assert_array_equal(out["is_ood"], out["score"] < eff.astype(np.float32))
    assert out["is_ood"].any() and (out["score"] >= low).all()  # flagged by the floor alone
