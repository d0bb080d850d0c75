"""Train a backbone's classifier on ID images (the whole net, or only its head when frozen)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.clientpath import simulate
from .data.sources import Split
from .model import Normalize

# Small data (a few hundred images) needs more epochs than Fashion-MNIST's 4 to train at all:
# auto epochs give at least this many optimiser steps; each epoch at least STEPS_PER_EPOCH.
MIN_STEPS = 120
STEPS_PER_EPOCH = 8


def plan(n: int, batch_size: int, epochs: int | None) -> tuple[int, int, list[str]]:
    """(batch, epochs, notes) for ``n`` training images: the batch clamps to the data (at most
    1/STEPS_PER_EPOCH of it, at least 1: a batch larger than the data trained nothing, issue
    16), ``epochs=None`` means max(4, enough for MIN_STEPS steps). ``notes`` say what changed."""
    notes = []
    batch = max(1, min(batch_size, n // STEPS_PER_EPOCH))
    if batch < batch_size:
        notes.append(f"batch_size {batch_size} clamped to {batch} for {n} training images "
                     f"({n // batch} steps an epoch)")
    if epochs is None:
        epochs = max(4, math.ceil(MIN_STEPS / max(n // batch, 1)))
        if epochs > 4:
            notes.append(f"epochs: auto = {epochs} (at least {MIN_STEPS} steps on small data)")
    return batch, epochs, notes


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a +-2 px shift: cheap, label-preserving for Fashion-MNIST."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(backbone, normalize: Normalize, data: Split, *, epochs: int, batch_size: int,
                     lr: float, seed: int, augment_images: bool = True, client_path: float = 0.0,
                     progress: bool = True):
    """SGD with one-cycle learning rate; returns the per-epoch mean loss.

    ``client_path``: the share of each batch first sent along a random client path
    (``clientpath.simulate``: resized, JPEG/PNG, the service's decode and fit), drawn fresh per
    batch (about 1 ms an image on one core). Not for a frozen trunk (its features are cached).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 13])
    n_client = int(round(client_path * batch_size))
    prefix = getattr(backbone, "trainable_prefix", None)
    params = [p for n, p in backbone.named_parameters()
              if p.requires_grad and (prefix is None or n.startswith(prefix))]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    per_epoch = len(data) // batch_size
    if epochs and not per_epoch:
        raise ValueError(f"batch_size {batch_size} > {len(data)} training images: no step "
                         "would train (train.plan clamps it)")
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    frozen = prefix is not None
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    if frozen:  # a frozen trunk gives the same features every epoch: extract them once
        images, _ = extract(backbone, normalize, data.images, progress=progress,
                            desc="frozen features")
    history = []
    # one bar over every step of every epoch: its time left is the whole training's
    bar = tqdm(total=steps, desc="train", disable=not progress, leave=False)
    for epoch in range(epochs):
        backbone.train()
        order = torch.randperm(len(data), generator=gen)
        losses = []
        for i in range(per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            if frozen:
                logits = backbone.fc(images[idx])
            else:
                x = images[idx]
                if n_client:
                    x = x.clone()
                    sent = simulate(data.images[idx[:n_client].numpy()], rng)
                    x[:n_client] = torch.from_numpy(sent)
                x = normalize(x)
                _, logits = backbone(augment(x, gen) if augment_images else x)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{np.mean(losses[-50:]):.3f}")
        history.append(float(np.mean(losses)))
    bar.close()
    backbone.eval()
    return history


@torch.no_grad()
def extract(backbone, normalize: Normalize, images: np.ndarray, batch_size: int = 512,
            progress: bool = False, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and logits of uint8 images, in eval mode."""
    backbone.eval()
    phis, logits = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        p, lo = backbone(normalize(torch.from_numpy(images[i:i + batch_size])))
        phis.append(p)
        logits.append(lo)
    return torch.cat(phis), torch.cat(logits)
