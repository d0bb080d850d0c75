"""The benchmark's plots (matplotlib, PNG at 72 dpi): ROC curves, score histograms, memory usage
and retrieved memories. Each function returns the file name it wrote, relative to ``out``."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..reclag import RecLagHead, prepare_features
from .detectors import RECLAG


class Images(NamedTuple):
    """The uint8 images the cached features came from (the retrieval plot shows them)."""

    train: np.ndarray
    test: np.ndarray
    ood: dict[str, np.ndarray]


def plots(out: Path, tag: str, scores: dict, threshold: float, head: RecLagHead, cache: dict,
          images: Images) -> dict[str, str]:
    """The four PNGs of one benchmark (file names by kind): ROC per OOD set for every method,
    RecLag score histograms with the calibrated threshold, per-class memory usage, and a few
    queries with the memories they retrieve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    files = {}
    sets = list(scores[RECLAG]["ood"])
    # ROC per OOD set
    fig, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 3.2), squeeze=False)
    for ax, k in zip(axes[0], sets):
        for method, s in scores.items():
            y = np.r_[np.ones(len(s["test"])), np.zeros(len(s["ood"][k]))]
            fpr, tpr, _ = roc_curve(y, np.r_[s["test"], s["ood"][k]])
            ax.plot(fpr, tpr, lw=2.2 if method == RECLAG else 0.9,
                    color="k" if method == RECLAG else None, label=method)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("FPR (OOD accepted)", fontsize=8)
        ax.set_ylabel("TPR (ID kept)", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    files["roc"] = _save(fig, out / f"{tag}-roc.png")
    # score histograms with the calibrated threshold
    fig, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 2.8), squeeze=False)
    s = scores[RECLAG]
    lo = min(np.percentile(s["test"], 0.5), *(np.percentile(v, 0.5) for v in s["ood"].values()))
    bins = np.linspace(lo, s["test"].max(), 60)
    for ax, k in zip(axes[0], sets):
        ax.hist(s["test"], bins, density=True, alpha=0.5, label="ID test")
        ax.hist(np.clip(s["ood"][k], lo, None), bins, density=True, alpha=0.5, label=k)
        ax.axvline(threshold, color="r", lw=1, label="calibrated threshold")
        ax.set_title(f"RecLag score: {k}", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    files["hist"] = _save(fig, out / f"{tag}-hist.png")
    # per-class memory usage: which memory of its bank each ID test image retrieves
    out_test = head(cache["test"]["phi"], cache["test"]["logits"], torch.tensor(threshold))
    idx = out_test["memory_index"][:, 0].numpy()
    nb, m = head.banks.shape[:2]
    usage = np.zeros((nb, m))
    for g in idx[idx >= 0]:
        usage[g // m, g % m] += 1
    fig, ax = plt.subplots(figsize=(0.45 * m + 2, 0.3 * nb + 1.5))
    im = ax.imshow(usage, cmap="viridis", aspect="auto")
    ax.set_xlabel("memory (within bank)")
    ax.set_ylabel("bank")
    names = cache["class_names"] if nb == len(cache["class_names"]) else ["shared"]
    ax.set_yticks(range(nb), names, fontsize=7)
    ax.set_title("ID test images retrieving each memory (top-1, gate open)", fontsize=9)
    fig.colorbar(im)
    fig.tight_layout()
    files["usage"] = _save(fig, out / f"{tag}-memory-usage.png")
    files["retrieval"] = _retrieval_plot(out / f"{tag}-retrieval.png", head, cache, threshold,
                                         images)
    return files


def _retrieval_plot(path: Path, head: RecLagHead, cache: dict, threshold: float,
                    images: Images) -> str:
    """A few ID and OOD queries, each with its top-3 retrieved memories shown as the nearest
    training image to each memory, in the head's own geometry (cosine for dot; Euclidean in
    the whitened space for gaussian, whose lifted banks end in the constant -1/2)."""
    import matplotlib.pyplot as plt

    banks = head.banks.reshape(-1, head.banks.shape[-1])
    if head.geometry == "gaussian":
        states = head.state(cache["train"]["phi"])
        nearest = torch.cdist(banks[:, :-1], states).argmin(1)
    else:
        tr_phi = prepare_features(cache["train"]["phi"], head.feature_norm)
        tr_unit = tr_phi / tr_phi.norm(dim=1, keepdim=True)
        nearest = (banks / banks.norm(dim=1, keepdim=True).clamp_min(1e-12) @ tr_unit.T).argmax(1)
    queries = [("ID", cache["test"], images.test, i) for i in range(3)]
    for k in list(images.ood)[:3]:
        queries.append((k, cache["ood"][k], images.ood[k], 0))
    rows = len(queries)
    fig, axes = plt.subplots(rows, 4, figsize=(4 * 1.3, rows * 1.45))
    for r, (name, d, imgs, i) in enumerate(queries):
        o = head(d["phi"][i:i + 1], d["logits"][i:i + 1], torch.tensor(threshold))
        axes[r][0].imshow(_show(imgs[i]), cmap="gray")
        axes[r][0].set_title(f"{name}: {'OOD' if o['is_ood'][0] else 'ID'}\n"
                             f"score {float(o['score'][0]):.0f}", fontsize=6)
        for j in range(3):
            g = int(o["memory_index"][0, j])
            ax = axes[r][j + 1]
            if g >= 0:
                ax.imshow(_show(images.train[int(nearest[g])]), cmap="gray")
                ax.set_title(f"mem {g} w {float(o['memory_weight'][0, j]):.2f}", fontsize=6)
            else:
                ax.text(0.5, 0.5, "origin\n(no memory)", ha="center", va="center", fontsize=6)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


def _show(img: np.ndarray) -> np.ndarray:
    return img[..., 0] if img.shape[-1] == 1 else img


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=72)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name
