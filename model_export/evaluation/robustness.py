"""The gate under attack: L-inf PGD/FGSM on the PyTorch model and the gate-flip rate.

Threat model. The attacker sees the image the service sees (uint8 pixels) and moves every pixel
by at most eps (in units of the 0..255 range, eps = 8/255 means 8 grey levels). The objective
is the gate's own score, lse(a(phi)) of reclag.py, in the bank of the predicted class: pushed
down for ID images (accepted -> rejected) and up for OOD images (rejected -> accepted). The
adversarial image is rounded back to uint8, because that is what reaches the service.

* White-box: the attack is run on the model it is evaluated on (GatedModel.head.score is
  differentiable everywhere but at the bank choice, an argmax; the gradient flows through the
  chosen bank). For rep_n the score is log sum ReLU(h)^n: no tanh, no saturation, so high n
  does not mask the gradient (dam.md §8.5).
* Transfer: crafted on a surrogate (the plain model, a low-power DAM) and applied to another.

Flip rate = among images the target gates right when clean (ID accepted, OOD rejected), the
share whose verdict the attack flips. The verdict is the bundle's ``is_ood`` output at the
calibrated threshold.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model import GatedModel
from ..reclag import prepare_features


def gate_score(model: GatedModel, images: torch.Tensor) -> torch.Tensor:
    """The bundle's score of float pixel images [B, H, W, C] in 0..255 (differentiable)."""
    phi, logits = model.features(images)
    return model.head.score(phi, logits)


def attack(model: GatedModel, images: np.ndarray, direction: int, eps: float, steps: int = 10,
           step_size: float | None = None, random_start: bool = True, seed: int = 0,
           batch_size: int = 200) -> np.ndarray:
    """L-inf attack on the gate score; ``direction`` -1 lowers it (ID -> OOD), +1 raises it
    (OOD -> ID). ``steps=1, random_start=False, step_size=eps`` is FGSM; otherwise PGD with
    step 2.5 eps / steps (Madry et al.). ``eps`` is a fraction of the 0..255 range."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    e = 255.0 * eps
    alpha = 255.0 * (step_size if step_size is not None else 2.5 * eps / steps)
    out = []
    for i in range(0, len(images), batch_size):
        x0 = torch.from_numpy(images[i:i + batch_size]).float()
        x = x0.clone()
        if random_start:
            x = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * e).clamp(0, 255)
        for _ in range(steps):
            x.requires_grad_(True)
            s = gate_score(model, x)
            (g,) = torch.autograd.grad(direction * s.sum(), x)
            with torch.no_grad():
                x = x + alpha * g.sign()
                x = torch.min(torch.max(x, x0 - e), x0 + e).clamp(0, 255)
        out.append(x.detach().round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


@torch.no_grad()
def verdicts(model: GatedModel, images: np.ndarray, tau: float, batch_size: int = 500):
    """(is_ood, score) of uint8 images at threshold tau, from the model's full forward."""
    ood, score = [], []
    for i in range(0, len(images), batch_size):
        out = model.run(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])), tau)
        ood.append(out["is_ood"].numpy())
        score.append(out["score"].numpy())
    return np.concatenate(ood), np.concatenate(score)


def flip_rate(model: GatedModel, tau: float, clean: np.ndarray, adv: np.ndarray,
              is_id: bool) -> dict:
    """Share of the right clean verdicts that the adversarial images flip."""
    ood_clean, _ = verdicts(model, clean, tau)
    ood_adv, _ = verdicts(model, adv, tau)
    right = ~ood_clean if is_id else ood_clean
    flipped = right & (ood_adv != ood_clean)
    n = int(right.sum())
    return {"flip_rate": float(flipped.sum() / max(n, 1)), "right_clean": n,
            "flipped": int(flipped.sum())}


def stability_margins(model: GatedModel, images: np.ndarray, tau: float) -> np.ndarray:
    """Per-image feature-space margin (score - tau) / (beta max |xi|) (RecLagHead)."""
    with torch.no_grad():
        phi, logits = model.features(torch.from_numpy(images))
        return model.head.stability_margin(phi, logits, tau).numpy()


@torch.no_grad()
def feature_shifts(model: GatedModel, clean: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """L2 distance each attack moved the features in the space the banks see (after
    ``feature_norm``): what a stability margin has to be compared with."""
    def prepared(images):
        phi, _ = model.features(torch.from_numpy(np.ascontiguousarray(images)))
        return prepare_features(phi, model.head.feature_norm)
    return (prepared(adv) - prepared(clean)).norm(dim=-1).numpy()
