"""The full OOD benchmark: RecLag against post-hoc baselines, with ablations, as JSON/Markdown/HTML.

Steps (``hopgate-export evaluate -c CONFIG --report DIR``):

1. Features and logits are extracted ONCE per image set (correctly classified train features,
   the calibration hold-out, the ID test split, every OOD set) with the built backbone and
   cached under ``artifacts/eval/<name>/cache.pt``; everything below reads the cache.
2. RecLag scores come from the built bundle's own head (``RecLagHead.score``: the served score;
   ``tests/test_evaluate.py`` checks the ONNX file against it). Baselines
   (``model_export.baselines``) score the very same features and logits.
3. Metrics (``model_export.metrics``) per method and OOD set, with bootstrap CIs; the calibrated
   threshold is checked on the ID test split, which calibration never saw.
4. Ablations refit banks from the cached features with ``fit.fit_banks`` (fewer epochs than the
   bundle; the reference row is refitted the same way so rows compare like with like).
5. Plots (matplotlib, PNG) and the three report files.

Secondary benchmarks (``--with CONFIG``: the open-set split, the EfficientNet-Lite0 path) get
the same main table without ablations. An open-set config (``name`` starting with "openset")
has its 6-class data written here when missing and trains its own small backbone.
"""

from __future__ import annotations

import html
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, data
from .baselines import Cache, fit_baselines
from .calibrate import accepted_share, threshold_at_tpr
from .config import BuildConfig
from .fit import FitConfig, fit_banks
from .metrics import bootstrap_ci, ood_metrics
from .pipeline import id_splits, id_test, load_backbone, load_model, log
from .reclag import RecLagHead, prepare_features
from .train import extract

RECLAG = "RecLag"
# The better setting the ablations found (k-means centres, no SFNN epochs): shown next to the
# bundle's RecLag row in the main table, refitted from the cached features.
TUNED = "RecLag (k-means centres)"
TUNED_MEMORY = {"init": "kmeans", "epochs": 0}
OPENSET_KNOWN = (0, 1, 2, 3, 4, 5)  # T-shirt, Trouser, Pullover, Dress, Coat, Sandal
OPENSET_TRAIN = 12000


# --- cache -------------------------------------------------------------------------------

EVAL_ROOT = Path("artifacts/eval")  # feature caches, one folder per config name


def eval_dir(cfg: BuildConfig) -> Path:
    return EVAL_ROOT / cfg.name


def ood_sets(cfg: BuildConfig, limit: int | None) -> dict[str, np.ndarray]:
    sets = data.far_ood_sets(cfg.data.size, cfg.data.channels, cfg.seed)
    near = cfg.workdir / "near_ood.npz"
    if near.exists():  # open-set split: the held-out classes' test images
        with np.load(near) as z:
            sets = {"near: held-out classes": data.resize_all(
                z["images"], cfg.data.size, cfg.data.channels), **sets}
    if limit:
        rng = np.random.default_rng(cfg.seed)
        sets = {k: v[np.sort(rng.permutation(len(v))[:limit])] if len(v) > limit else v
                for k, v in sets.items()}
    return sets


def build_cache(cfg: BuildConfig, ood_limit: int | None = None, progress: bool = True) -> dict:
    """Extract (or load) features/logits of every set the benchmark needs."""
    path = eval_dir(cfg) / "cache.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    net, norm, ckpt = load_backbone(cfg)
    train, holdout = id_splits(cfg)
    test = id_test(cfg)
    t0 = time.time()

    def ex(images, desc):
        phi, logits = extract(net, norm, images, progress=progress, desc=desc)
        return {"phi": phi, "logits": logits}

    cache = {"train": ex(train.images, "train features"), "train_labels": train.labels,
             "holdout": ex(holdout.images, "hold-out features"),
             "test": ex(test.images, "test features"), "test_labels": test.labels,
             "ood": {k: ex(v, k) for k, v in ood_sets(cfg, ood_limit).items()},
             "class_names": ckpt["class_names"],
             "fc": {"weight": net.fc.weight.detach().clone(), "bias": net.fc.bias.detach().clone()}}
    cache["extract_seconds"] = round(time.time() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cache, path)
    return cache


def _c(d: dict) -> Cache:
    return Cache(d["phi"], d["logits"])


def correct_train(cache: dict) -> tuple[Cache, torch.Tensor]:
    labels = torch.as_tensor(cache["train_labels"])
    right = cache["train"]["logits"].argmax(1) == labels
    return Cache(cache["train"]["phi"][right], cache["train"]["logits"][right]), labels[right]


# --- scoring -----------------------------------------------------------------------------

def head_scores(head: RecLagHead, cache: dict) -> dict:
    s = lambda d: head.score(d["phi"], d["logits"]).double().numpy()  # noqa: E731
    return {"holdout": s(cache["holdout"]), "test": s(cache["test"]),
            "ood": {k: s(v) for k, v in cache["ood"].items()}}


def baseline_scores(cache: dict, train: Cache, labels: torch.Tensor, opts: dict) -> dict:
    methods = fit_baselines(train, labels, cache["fc"]["weight"], cache["fc"]["bias"], **opts)
    out = {}
    for name, fn in tqdm(methods.items(), desc="baselines", leave=False):
        out[name] = {"test": fn(_c(cache["test"])),
                     "ood": {k: fn(_c(v)) for k, v in cache["ood"].items()}}
    return out


def table(scores: dict, n_boot: int, seed: int) -> dict:
    """method -> set -> metrics (+ bootstrap CIs); and per method the mean over the sets."""
    out = {}
    for method, s in tqdm(scores.items(), desc="metrics + bootstrap", leave=False):
        rows = {}
        for k, o in s["ood"].items():
            rows[k] = {**ood_metrics(s["test"], o), "n": len(o),
                       **(bootstrap_ci(s["test"], o, n_boot, seed) if n_boot else {})}
        keys = ["auroc", "aupr_in", "aupr_out", "fpr95_ood_accepted", "fpr95_id_rejected",
                "detection_error"]
        far = [k for k in rows if not k.startswith("near")]
        rows["mean far-OOD"] = {m: float(np.mean([rows[k][m] for k in far])) for m in keys}
        out[method] = rows
    return out


# --- ablations ---------------------------------------------------------------------------

def ablations(cfg: BuildConfig, cache: dict, epochs: int, progress: bool) -> list[dict]:
    m = cfg.memory
    base = dict(memories=m.memories, beta=m.beta, init_norm=m.init_norm, epochs=epochs,
                batch_size=m.batch_size, lr=m.lr, sampler=m.sampler, weights=m.weights, init=m.init)
    train, labels = correct_train(cache)
    c = len(cache["class_names"])
    variants = [("reference (bundle settings)", {}, {}),
                ("features raw (no normalisation)", {}, {"feature_norm": None}),
                ("feature_norm 1", {}, {"feature_norm": 1.0}),
                ("beta 0.5", {"beta": 0.5}, {}), ("beta 1", {"beta": 1.0}, {}),
                ("beta 2", {"beta": 2.0}, {}), ("beta 20", {"beta": 20.0}, {}),
                ("M 1", {"memories": 1}, {}), ("M 30", {"memories": 30}, {}),
                ("shared bank (10 x M memories)", {}, {"shared": True}),
                ("sampler probs_as_logits (official quirk)", {"sampler": "probs_as_logits"}, {}),
                ("init kmeans", {"init": "kmeans"}, {}),
                ("init kmeans, beta 1", {"init": "kmeans", "beta": 1.0}, {}),
                ("init kmeans, beta 1, M 30", {"init": "kmeans", "beta": 1.0, "memories": 30}, {}),
                ("init kmeans, 0 epochs (k-means centres)", {"init": "kmeans", "epochs": 0}, {}),
                ("init kmeans, 0 epochs, beta 1", {"init": "kmeans", "epochs": 0, "beta": 1.0}, {}),
                ("init kmeans, 0 epochs, M 30", {"init": "kmeans", "epochs": 0, "memories": 30}, {})]
    rows = []
    for name, fit_over, head_over in tqdm(variants, desc="ablations", disable=not progress):
        fcfg = FitConfig(**{**base, **fit_over})
        fnorm = head_over.get("feature_norm", m.feature_norm)
        shared = head_over.get("shared", m.bank == "shared")
        t0 = time.time()
        banks, bias = fit_banks(prepare_features(train.phi, fnorm), labels, c, fcfg, cfg.seed,
                                shared=shared, progress=False)
        head = RecLagHead(banks, bias, beta=fcfg.beta, steps=m.steps, shared=shared,
                          feature_norm=fnorm)
        rows.append({"variant": name, **_summary(head, cache), "fit_seconds": round(time.time() - t0, 1)})
        if name.startswith("reference"):
            rows.extend(_steps_rows(head, cache, m.beta, (0, 1, 3, 10)))
    return rows


def refit_head(cfg: BuildConfig, cache: dict, over: dict) -> RecLagHead:
    """A head with the bundle's memory settings overridden by ``over``, fitted on the cache."""
    m = cfg.memory.model_copy(update=over)
    train, labels = correct_train(cache)
    fcfg = FitConfig(memories=m.memories, beta=m.beta, init_norm=m.init_norm, epochs=m.epochs,
                     batch_size=m.batch_size, lr=m.lr, sampler=m.sampler, weights=m.weights,
                     init=m.init)
    shared = m.bank == "shared"
    banks, bias = fit_banks(prepare_features(train.phi, m.feature_norm), labels,
                            len(cache["class_names"]), fcfg, cfg.seed, shared=shared, progress=False)
    return RecLagHead(banks, bias, beta=m.beta, steps=m.steps, shared=shared,
                      feature_norm=m.feature_norm)


def _summary(head: RecLagHead, cache: dict) -> dict:
    s = head_scores(head, cache)
    ms = {k: ood_metrics(s["test"], o) for k, o in s["ood"].items() if not k.startswith("near")}
    return {"mean_auroc": float(np.mean([v["auroc"] for v in ms.values()])),
            "mean_fpr95": float(np.mean([v["fpr95_ood_accepted"] for v in ms.values()])),
            "auroc": {k: v["auroc"] for k, v in ms.items()}}


@torch.no_grad()
def _steps_rows(head: RecLagHead, cache: dict, beta: float, steps: tuple[int, ...]) -> list[dict]:
    """T changes the verdict only through the gate at later steps: calibrate on the hold-out,
    then report the ID test share accepted and the OOD share flagged after T unrolled steps."""
    rows = []
    tau = threshold_at_tpr(head_scores(head, cache)["holdout"], 0.95)
    for t in steps:
        head.steps = t
        run = lambda d: head(d["phi"], d["logits"], torch.tensor(tau))["is_ood"].numpy()  # noqa
        id_acc = float(1 - run(cache["test"]).mean())
        flagged = {k: float(run(v).mean()) for k, v in cache["ood"].items()}
        rows.append({"variant": f"T = {t} steps (reference banks, calibrated threshold)",
                     "steps": t, "id_accepted": id_acc, "ood_flagged": flagged})
    return rows


# --- plots -------------------------------------------------------------------------------

def plots(out: Path, tag: str, scores: dict, threshold: float, head: RecLagHead, cache: dict,
          train_images: np.ndarray, ood_images: dict) -> dict[str, str]:
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
                                         train_images, ood_images)
    return files


def _retrieval_plot(path: Path, head: RecLagHead, cache: dict, threshold: float,
                    train_images: np.ndarray, ood_images: dict) -> str:
    """A few ID and OOD queries, each with its top-3 retrieved memories shown as the nearest
    training image (cosine over all training features) to each memory."""
    import matplotlib.pyplot as plt

    tr_phi = prepare_features(cache["train"]["phi"], head.feature_norm)
    tr_unit = tr_phi / tr_phi.norm(dim=1, keepdim=True)
    banks = head.banks.reshape(-1, head.banks.shape[-1])
    nearest = (banks / banks.norm(dim=1, keepdim=True).clamp_min(1e-12) @ tr_unit.T).argmax(1)
    queries = [("ID", cache["test"], cache["test_images"], i) for i in range(3)]
    for k in list(ood_images)[:3]:
        queries.append((k, cache["ood"][k], ood_images[k], 0))
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
                ax.imshow(_show(train_images[int(nearest[g])]), cmap="gray")
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


# --- one benchmark -----------------------------------------------------------------------

def benchmark(cfg: BuildConfig, out: Path, *, do_ablations: bool, ablation_epochs: int = 3,
              n_boot: int = 200, ood_limit: int | None = None, knn_subset: int | None = 20000,
              tuned: dict | None = None, progress: bool = True) -> dict:
    tag = cfg.name
    if tag.startswith("openset"):
        prepare_openset(cfg, progress)
    log(f"[{tag}] features (cached under {eval_dir(cfg)})")
    cache = build_cache(cfg, ood_limit, progress)
    model, calib = load_model(cfg)
    head = model.head
    train, labels = correct_train(cache)
    scores = {RECLAG: head_scores(head, cache)}
    for label, over in (tuned or {}).items():  # other memory settings, refitted from the cache
        scores[label] = head_scores(refit_head(cfg, cache, over), cache)
    d = train.phi.shape[1]
    opts = {"he_beta": 0.2 if d <= 256 else 0.01, "knn_k": 50, "knn_subset": knn_subset,
            "vim_dim": d // 2, "react_percentile": 90.0, "seed": cfg.seed}
    log(f"[{tag}] baselines on {len(train.phi)} correctly classified train features (D={d})")
    scores.update(baseline_scores(cache, train, labels, opts))
    tbl = table({k: {"test": v["test"], "ood": v["ood"]} for k, v in scores.items()}, n_boot,
                cfg.seed)
    tau = calib["threshold"]
    rl = scores[RECLAG]
    result = {
        "config": cfg.name, "backbone": cfg.backbone.name, "feature_dim": d,
        "memory": cfg.memory.model_dump(), "baseline_options": opts,
        "sizes": {"train_correct": len(train.phi), "holdout": len(rl["holdout"]),
                  "test": len(rl["test"]), **{k: len(v) for k, v in rl["ood"].items()}},
        "test_accuracy": float((cache["test"]["logits"].argmax(1).numpy()
                                == cache["test_labels"]).mean()),
        "calibration": {"threshold": tau, "target_tpr": calib["target_tpr"],
                        "holdout_tpr": accepted_share(rl["holdout"], tau),
                        "test_tpr": accepted_share(rl["test"], tau),
                        "gap_points": 100 * abs(accepted_share(rl["test"], tau) - calib["target_tpr"]),
                        "ood_flagged": {k: 1 - accepted_share(v, tau) for k, v in rl["ood"].items()}},
        "table": tbl, "extract_seconds": cache.get("extract_seconds"),
    }
    if do_ablations:
        log(f"[{tag}] ablations ({ablation_epochs} fitting epochs each, from cached features)")
        result["ablation_epochs"] = ablation_epochs
        result["ablations"] = ablations(cfg, cache, ablation_epochs, progress)
    train_split, _ = id_splits(cfg)
    cache["test_images"] = id_test(cfg).images
    ood_imgs = ood_sets(cfg, ood_limit)
    result["plots"] = plots(out, tag, scores, tau, head, cache, train_split.images,
                            ood_imgs)
    return result


def prepare_openset(cfg: BuildConfig, progress: bool) -> None:
    """Write the 6-known-class data (train subset, test) and the held-out classes' test images
    (near-OOD), then train/fit/calibrate a small backbone on it if not yet built."""
    from . import pipeline

    cfg.workdir.mkdir(parents=True, exist_ok=True)
    known = np.asarray(OPENSET_KNOWN)
    names = data.fashion_mnist("train").class_names
    for split in ("train", "test"):
        path = Path(cfg.data.id[len("npz:"):] if split == "train" else cfg.data.test[len("npz:"):])
        if path.exists():
            continue
        s = data.fashion_mnist(split)
        keep = np.isin(s.labels, known)
        imgs, labs = s.images[keep], s.labels[keep]
        if split == "train":
            idx = np.sort(np.random.default_rng(cfg.seed).permutation(len(imgs))[:OPENSET_TRAIN])
            imgs, labs = imgs[idx], labs[idx]
        remap = {int(c): i for i, c in enumerate(known)}
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, images=imgs, labels=np.array([remap[int(x)] for x in labs]),
                            class_names=np.array([names[c] for c in known]))
        if split == "test":
            np.savez_compressed(cfg.workdir / "near_ood.npz", images=s.images[~keep])
    for step in ("train", "fit", "calibrate"):
        marker = {"train": "backbone.pt", "fit": "memory.pt", "calibrate": "calibration.json"}[step]
        if not (cfg.workdir / marker).exists():
            pipeline.STEPS[step](cfg, progress)


# --- the report --------------------------------------------------------------------------

def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(terse=True)}


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_report(cfg: BuildConfig, out: str | Path, extra: list[BuildConfig] = (), *,
               command: str = "", n_boot: int = 200, ablation_epochs: int = 3,
               progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = {"hopgate_version": __version__, "commit": commit(), "machine": machine(),
              "command": command, "benchmarks": {}}
    report["benchmarks"][cfg.name] = benchmark(
        cfg, out, do_ablations=True, n_boot=n_boot, ablation_epochs=ablation_epochs,
        tuned={TUNED: TUNED_MEMORY}, progress=progress)
    write(report, out, t0)
    for c in extra:  # written after each, so a slow secondary benchmark never loses the rest
        small = c.backbone.name != "small_resnet"
        report["benchmarks"][c.name] = benchmark(c, out, do_ablations=False, n_boot=n_boot,
                                                 ood_limit=500 if small else None,
                                                 progress=progress)
        write(report, out, t0)
    return report


def write(report: dict, out: Path, t0: float) -> None:
    report["seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_np))
    md = markdown(report)
    (out / "README.md").write_text(md)
    (out / "report.html").write_text(to_html(report, md))
    log(f"report written to {out} in {report['seconds']}s")


def _np(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))


def _ci(m: dict, key: str) -> str:
    lo, hi = m.get(f"{key}_ci", (None, None))
    return "" if lo is None else f" [{lo:.3f}, {hi:.3f}]"


def markdown(report: dict) -> str:
    L = ["# hopgate OOD benchmark: RecLag vs post-hoc baselines", "",
         f"hopgate {report['hopgate_version']}, commit `{report['commit']}`; machine: "
         f"{report['machine']['cpu']}, {report['machine']['cores']} cores, torch "
         f"{report['machine']['torch']}; {report['seconds']} s.", "",
         f"Rebuild: `{report['command']}`", "",
         "Scores: higher = more ID; ID is the positive class. **FPR95 (paper)** = share of OOD "
         "accepted when the threshold keeps 95 % of ID (RecLag/SHE/Hendrycks convention). "
         "**FPR95 (OpenOOD)** = share of ID rejected when the threshold catches 95 % of OOD. "
         "Brackets: 95 % bootstrap intervals (resampling ID and OOD). All methods score the same "
         "cached features and logits; baselines are fitted on the correctly classified training "
         "features RecLag's banks are fitted on.", ""]
    for name, b in report["benchmarks"].items():
        L += [f"## {name}: {b['backbone']} (D = {b['feature_dim']}), ID test accuracy "
              f"{b['test_accuracy']:.4f}", "",
              f"Sizes: {b['sizes']}. RecLag memory settings: beta {b['memory']['beta']}, "
              f"M {b['memory']['memories']}, {b['memory']['bank']} banks, feature_norm "
              f"{b['memory']['feature_norm']}, sampler {b['memory']['sampler']}, "
              f"{b['memory']['epochs']} fitting epochs. Baseline options: {b['baseline_options']}.", ""]
        cal = b["calibration"]
        L += [f"**Calibration.** Threshold {cal['threshold']:.3f} (target TPR {cal['target_tpr']}) "
              f"accepts {cal['holdout_tpr']:.4f} of the hold-out it was set on and "
              f"**{cal['test_tpr']:.4f} of the ID test split it never saw** "
              f"({cal['gap_points']:.2f} points from the target). Share of each OOD set flagged: "
              + ", ".join(f"{k} {v:.3f}" for k, v in cal["ood_flagged"].items()) + ".", ""]
        sets = list(b["table"][RECLAG])
        for metric, label in (("auroc", "AUROC"), ("fpr95_ood_accepted", "FPR95 (paper: OOD accepted @ 95 % ID kept)"),
                              ("fpr95_id_rejected", "FPR95 (OpenOOD: ID rejected @ 95 % OOD caught)"),
                              ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"),
                              ("detection_error", "detection error")):
            L += [f"### {label}", "", "| method | " + " | ".join(sets) + " |",
                  "|---" * (len(sets) + 1) + "|"]
            best = {k: (max if metric.startswith("au") else min)(
                b["table"][m][k][metric] for m in b["table"]) for k in sets}
            for method, rows in b["table"].items():
                cells = []
                for k in sets:
                    v = rows[k][metric]
                    cell = f"{v:.3f}" + (_ci(rows[k], metric) if metric in ("auroc", "fpr95_ood_accepted") else "")
                    cells.append(f"**{cell}**" if abs(v - best[k]) < 1e-12 else cell)
                L.append(f"| {method} | " + " | ".join(cells) + " |")
            L.append("")
        if "ablations" in b:
            L += [f"### Ablations (banks refitted from cached features, {b['ablation_epochs']} "
                  "epochs each; mean over far-OOD sets)", "",
                  "| variant | mean AUROC | mean FPR95 (paper) | AUROC per set | fit s |", "|---|---|---|---|---|"]
            for r in b["ablations"]:
                if "mean_auroc" in r:
                    per = ", ".join(f"{k} {v:.3f}" for k, v in r["auroc"].items())
                    L.append(f"| {r['variant']} | {r['mean_auroc']:.4f} | {r['mean_fpr95']:.4f} | "
                             f"{per} | {r['fit_seconds']} |")
            L += ["", "Unrolled steps T (the score is the t = 0 gate quantity, so AUROC does not "
                  "depend on T; T can only change the verdict, through the gate at later steps):", "",
                  "| T | ID test accepted | OOD flagged per set |", "|---|---|---|"]
            for r in b["ablations"]:
                if "steps" in r:
                    L.append(f"| {r['steps']} | {r['id_accepted']:.4f} | " + ", ".join(
                        f"{k} {v:.3f}" for k, v in r["ood_flagged"].items()) + " |")
            L.append("")
        p = b["plots"]
        L += ["### Plots", "", f"![ROC]({p['roc']})", "", f"![histograms]({p['hist']})", "",
              f"![memory usage]({p['usage']})", "", f"![retrieved memories]({p['retrieval']})", ""]
    return "\n".join(L)


def to_html(report: dict, md: str) -> str:
    """A self-contained page: the Markdown's tables rendered, plots inline by file name."""
    body, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                tag = "th"
            else:
                tag = "td"
            body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<p><img src="{html.escape(src[:-1])}" alt="{html.escape(alt)}"></p>')
        elif line.startswith("#"):
            n = len(line) - len(line.lstrip("#"))
            body.append(f"<h{n}>{_inline(line[n:].strip())}</h{n}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1300px;margin:auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>hopgate OOD benchmark</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def _inline(s: str) -> str:
    import re

    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)
