"""Quick OOD figures of a built model: ID test accuracy, calibrated TPR, AUROC/FPR95 per far-OOD
set.

(The full benchmark with baselines, ablations and the HTML report builds on this; see
``model_export.report``.)
"""

from __future__ import annotations

import numpy as np
import torch

from ..calibrate import accepted_share
from ..config import BuildConfig
from ..data.clientpath import encoding_table, format_table
from ..data.sources import Split
from ..data.splits import Sets
from ..model import GatedModel
from ..recipe import load_model
from ..train import extract
from .metrics import LOOKS_LIKE_ID, headline, ood_metrics


@torch.no_grad()
def torch_scores(model: GatedModel, images: np.ndarray, progress: bool = False,
                 desc: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """(scores, predicted classes) of uint8 images through the PyTorch model's head (the
    model the bundle is exported from; the ONNX file itself is run by ``export.run_ort``)."""
    phi, logits = extract(model.backbone, model.normalize, images, progress=progress, desc=desc)
    return model.head.score(phi, logits).numpy(), logits.argmax(1).numpy()


def served_table(cfg: BuildConfig, model: GatedModel, calib: dict, test: Split,
                 limit: int | None = None) -> list[dict]:
    """Accepted share and accuracy of unseen ID test images (the first ``limit``) per client
    encoding, through the service's decode and fit (``clientpath.encoding_table``)."""
    test = test if not limit or limit >= len(test) else test.subset(slice(0, limit))
    return encoding_table(lambda x: torch_scores(model, x), test.images, test.labels,
                          calib["threshold"], calib["target_tpr"], cfg.data.resize)


def quick_report(cfg: BuildConfig, progress: bool = True, sets: Sets | None = None,
                 served_limit: int | None = 2000) -> dict:
    sets = sets or Sets(cfg)
    model, calib = load_model(cfg, calibrated=True)
    # no test split (data.test: null): the calibration hold-out stands in, and the report says so
    test, id_set = (sets.test, "test") if sets.test is not None else (sets.holdout, "hold-out")
    id_scores, pred = torch_scores(model, test.images, progress, f"ID {id_set}")
    report = {
        "id_set": id_set,
        "test_accuracy": float((pred == test.labels).mean()),
        "threshold": calib["threshold"],
        "target_tpr": calib["target_tpr"],
        "holdout_tpr": calib["holdout_tpr"],
        "test_tpr": accepted_share(id_scores, calib["threshold"]),
        "ood": {},
        "encodings": served_table(cfg, model, calib, test, served_limit),
    }
    scores = {}
    for name, imgs in sets.far_ood.items():
        s, _ = torch_scores(model, imgs, progress, name)
        scores[name] = s
        report["ood"][name] = {**ood_metrics(id_scores, s), "n": len(s),
                               "flagged_ood": 1.0 - accepted_share(s, calib["threshold"])}
    report["far_ood_auroc"], _, report["ood_left_out"] = headline(
        id_scores, scores, set(cfg.data.ood_sets))
    return report


def format_quick(report: dict) -> str:
    id_set = report.get("id_set", "test")
    lines = [f"ID {id_set} accuracy {report['test_accuracy']:.4f}; threshold "
             f"{report['threshold']:.3f} accepts {report['test_tpr']:.4f} of ID {id_set} "
             f"(target {report['target_tpr']})",
             "| OOD set | n | AUROC | FPR95 (OOD accepted @ 95% ID kept) "
             "| flagged OOD at threshold |",
             "|---|---|---|---|---|"]
    left = report.get("ood_left_out", [])
    for name, m in report["ood"].items():
        mark = " (looks like your data: left out of the headline)" if name in left else ""
        lines.append(f"| {name}{mark} | {m['n']} | {m['auroc']:.4f} | "
                     f"{m['fpr95_ood_accepted']:.4f} | {m['flagged_ood']:.4f} |")
    if report.get("far_ood_auroc") is not None:
        kept = [k for k in report["ood"] if k not in left]
        lines.append(f"\nFar-OOD AUROC {report['far_ood_auroc']:.4f} over {', '.join(kept)} "
                     "pooled" + (f"; left out: {', '.join(left)}, which score like the ID data "
                                 f"(AUROC < {LOOKS_LIKE_ID}): choose the sets with "
                                 "data.ood_sets" if left else "") + ".")
    elif left:
        lines.append("\nNo far-OOD headline: every set scores like the ID data "
                     f"({', '.join(left)}).")
    elif not report["ood"]:
        lines.append("No far-OOD set (data.ood_sets: [] and no data.ood_folders).")
    if report.get("encodings"):
        seen = ("Unseen ID test images" if report.get("id_set", "test") == "test"
                else "ID hold-out images")
        lines += ["", f"{seen} as clients send them (service decode + resize):", ""]
        lines += format_table(report["encodings"], report["target_tpr"])
    return "\n".join(lines)
