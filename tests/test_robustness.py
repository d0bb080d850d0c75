"""Attacks on the gate (model_export/evaluation/robustness.py) against the quick build's real
model."""

from __future__ import annotations

import numpy as np
import pytest

from hopgate.model_export.data import sources as data
from hopgate.model_export.evaluation.robustness import attack, flip_rate, verdicts

pytestmark = pytest.mark.slow  # every test here attacks the quick build's model


@pytest.fixture(scope="module")
def quick_model(quick_build):
    from hopgate.model_export.recipe import load_model

    cfg, _ = quick_build
    model, calib = load_model(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, float(calib["threshold"])


@pytest.fixture(scope="module")
def images():
    ids = data.fashion_mnist("test").images[:40]
    ood = data.far_ood_sets((28, 28), 1, seed=0)
    return ids, np.concatenate([ood["digits"][:20], ood["photos"][:20]])


@pytest.mark.parametrize("kind", ["pgd", "fgsm"])
def test_attacks_stay_in_the_ball_and_move_the_score_their_way(quick_model, images, kind):
    model, tau = quick_model
    ids, ood = images
    eps = 8 / 255
    kw = {"steps": 5} if kind == "pgd" else {"steps": 1, "step_size": eps, "random_start": False}
    adv_id = attack(model, ids, -1, eps, **kw)
    adv_ood = attack(model, ood, +1, eps, **kw)
    for clean, adv in ((ids, adv_id), (ood, adv_ood)):
        assert adv.dtype == np.uint8 and adv.shape == clean.shape
        assert np.abs(adv.astype(int) - clean.astype(int)).max() <= 8
        assert (adv != clean).any()
    _, s_id = verdicts(model, ids, tau)
    _, s_id_adv = verdicts(model, adv_id, tau)
    _, s_ood = verdicts(model, ood, tau)
    _, s_ood_adv = verdicts(model, adv_ood, tau)
    assert np.median(s_id_adv - s_id) < 0 < np.median(s_ood_adv - s_ood)


def test_pgd_flips_more_than_random_noise_of_the_same_size(quick_model, images):
    model, tau = quick_model
    ids, _ = images
    eps = 16 / 255
    adv = attack(model, ids, -1, eps, steps=10)
    rng = np.random.default_rng(0)
    signs = rng.choice([-16, 16], size=ids.shape)
    noisy = np.clip(ids.astype(int) + signs, 0, 255).astype(np.uint8)
    f_adv = flip_rate(model, tau, ids, adv, is_id=True)
    f_noise = flip_rate(model, tau, ids, noisy, is_id=True)
    assert f_adv["right_clean"] == f_noise["right_clean"] > 20
    assert f_adv["flip_rate"] > f_noise["flip_rate"] and f_adv["flip_rate"] > 0.3
    # the flip rate of the clean images against themselves is zero
    assert flip_rate(model, tau, ids, ids, is_id=True)["flip_rate"] == 0
