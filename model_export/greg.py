"""GReg and GReg+: gradient-regularised OOD training of the backbone (greg.md).

    L = CE(ID) + lambda_S * L_S + lambda_gradS * L_gradS,     S(x) = -LSE(logits(x))  (low = ID)

* L_S: squared hinge, ID energy pushed below m_in, auxiliary energy above m_aux (greg.md §3.2).
* L_gradS: norm of the input gradient of the score, only for samples already detected right
  (ID with S <= m_in, outliers with S >= m_aux; §3.3). ``grad_scaling="code"`` reproduces the
  official code, whose scalar is a batch mean so each row's gradient carries 1/n_group; the
  hinge there only masks (not squared), and the Jacobian is taken in train() mode as in the
  code. ``"paper"`` is the printed expectation of per-sample norms (equal to lambda * n_group
  times the code's term). The gradient is w.r.t. the *normalised* input (§3.3.6).
* GReg (``backbone.method: greg``): a random auxiliary batch of the ID batch's size.
  GReg+ (``greg_plus``): energy-based sampling per step (§4): a candidate batch of
  ``candidates * batch_size`` outliers, K-Means (k = batch size, n_init = 3) on their
  L2-normalised penultimate features, and per cluster the lowest-energy member (hard: feeds
  L_S) and the highest-energy one (well detected: feeds L_gradS), filled up randomly to 2B.
* Fine-tuning (``greg.init`` = a backbone.pt) or training from scratch (``init: null``); Adam
  as in the official fine-tuning runs. Outliers come from model_export/data/outliers.py, disjoint
  from every test OOD set.

The result is an ordinary backbone: fit, calibrate, export and the service do not change.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.outliers import pool_cache
from .train import augment


def free_energy(logits: torch.Tensor) -> torch.Tensor:
    """The free energy S_En = -LSE(logits) (T = 1); low = ID. (baselines.energy_score is its
    negative, a score where high = ID.)"""
    return -torch.logsumexp(logits, dim=1)


@torch.no_grad()
def select_outliers(net, normalize, candidates: np.ndarray, k: int, seed: int) -> np.ndarray:
    """GReg+ energy-based sampling: indices into ``candidates`` (2k of them, greg.md §4.2)."""
    from sklearn.cluster import KMeans

    was_training = net.training
    net.eval()
    phi, logits = net(normalize(torch.from_numpy(candidates)))
    net.train(was_training)
    s = free_energy(logits).numpy()
    z = F.normalize(phi, dim=1).numpy()
    k = min(k, len(candidates))
    labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(z).labels_
    chosen: list[int] = []
    for j in range(k):
        members = np.flatnonzero(labels == j)
        if len(members) == 0:
            continue
        members = members[np.argsort(s[members])]
        chosen.append(int(members[0]))  # lowest energy: a hard outlier
        if len(members) > 1:
            chosen.append(int(members[-1]))  # highest energy: a well-detected one
    rest = np.setdiff1d(np.arange(len(candidates)), chosen)
    fill = np.random.default_rng(seed).permutation(rest)[:max(2 * k - len(chosen), 0)]
    return np.concatenate([np.asarray(chosen, dtype=np.int64), fill])


def greg_loss(net, x_in: torch.Tensor, y_in: torch.Tensor, x_aux: torch.Tensor, g) -> tuple:
    """(loss, parts) for one step; x_* are normalised image batches, ``g`` the GregConfig."""
    n = len(x_in)
    x = torch.cat([x_in, x_aux]).requires_grad_(True)
    _, logits = net(x)
    s = free_energy(logits)
    s_in, s_aux = s[:n], s[n:]
    ce = F.cross_entropy(logits[:n], y_in)
    l_s = (F.relu(s_in - g.m_in) ** 2).mean() + (F.relu(g.m_aux - s_aux) ** 2).mean()
    if g.grad_scaling == "code":  # the official scalar: batch means, the hinge as a mask
        inner = -F.relu(g.m_in - s_in).mean() + F.relu(s_aux - g.m_aux).mean()
    else:  # paper: per-sample gradients of the masked score
        mask = torch.cat([s_in <= g.m_in, s_aux >= g.m_aux]).float().detach()
        inner = (mask * s).sum()
    if g.lambda_grad > 0 and inner.requires_grad:
        grad = torch.autograd.grad(inner, x, create_graph=True)[0]
        norms = grad.flatten(1).norm(dim=1)
        l_g = norms.mean() if g.grad_scaling == "code" else norms[:n].mean() + norms[n:].mean()
    else:
        l_g = s.new_zeros(())
    loss = ce + g.lambda_score * l_s + g.lambda_grad * l_g
    parts = {"ce": ce.item(), "score": l_s.item(), "grad": l_g.item(),
             "in_mask": float((s_in <= g.m_in).float().mean()),
             "aux_mask": float((s_aux >= g.m_aux).float().mean())}
    return loss, parts


def train_greg(net, normalize, train, cfg, progress: bool = True) -> list[float]:
    """Fine-tune (GReg) or train (GReg+) ``net`` in place; returns the per-epoch mean loss.
    Per-epoch means of the loss parts and mask occupancies are kept in ``net.greg_log``."""
    g, plus = cfg.greg, cfg.backbone.method == "greg_plus"
    if g.init is not None:
        ckpt = torch.load(g.init, map_location="cpu", weights_only=False)
        net.load_state_dict(ckpt["state_dict"])
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pool = pool_cache(g.aux_pool, cfg.data.size, cfg.data.channels, cfg.seed, cfg.workdir)
    images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=g.lr)
    b = g.batch_size
    per_epoch = min(len(train), g.train_subset or len(train)) // b
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(g.epochs * per_epoch, 1))
    history, net.greg_log = [], []
    for epoch in range(g.epochs):
        net.train()
        order = torch.randperm(len(train), generator=gen)
        losses, parts_all = [], []
        bar = tqdm(range(per_epoch), desc=f"{cfg.backbone.method} epoch {epoch + 1}/{g.epochs}",
                   disable=not progress, leave=False)
        for i in bar:
            idx = order[i * b:(i + 1) * b]
            x_in = augment(normalize(images[idx]), gen)
            if plus:
                cand = pool[rng.choice(len(pool), size=min(g.candidates * b, len(pool)),
                                       replace=False)]
                aux = cand[select_outliers(net, normalize, cand, b, int(rng.integers(2**31)))]
            else:
                aux = pool[rng.choice(len(pool), size=b, replace=False)]
            loss, parts = greg_loss(net, x_in, labels[idx], normalize(torch.from_numpy(aux)), g)
            if not torch.isfinite(loss):
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            parts_all.append(parts)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        history.append(float(np.mean(losses)) if losses else float("nan"))
        net.greg_log.append({k: float(np.mean([p[k] for p in parts_all])) for k in parts_all[0]}
                            if parts_all else {})
    net.eval()
    return history
