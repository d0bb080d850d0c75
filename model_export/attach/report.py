"""The report of ``attach`` on the written bundle: far-OOD AUROC against the OOD sets the
user chose (a built-in set scoring like the data left out of the headline, named), and on a
``--test`` folder the accepted share, the agreement with the classifier and, when its folders
are labelled, the classifier's accuracy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..calibrate import accepted_share
from ..evaluation.metrics import headline
from ..export import run_ort
from .config import AttachConfig
from .images import far_ood, folder_labels, load_folder

BATCH = 32


def evaluate(sess, holdout: np.ndarray, tau: float, cfg: AttachConfig, test: str | None,
             extract, num_classes: int, log: Callable[[str], None]) -> dict:
    """AUROC of the held-out ID images against the chosen far-OOD sets (``headline``), and
    on ``test`` (a folder the build never saw) the accepted share, the agreement with the
    classifier and, when its folders are labelled (the build's rules), both accuracies."""
    id_scores = run_ort(sess, holdout, batch_size=BATCH)["score"]
    ood = {k: run_ort(sess, v, batch_size=BATCH)["score"] for k, v in far_ood(cfg).items()}
    out: dict = {}
    if ood:
        auroc, per, left = headline(id_scores, ood, set(cfg.ood_sets))
        sets = ", ".join(f"{k} {v}" for k, v in per.items() if k not in left)
        log(f"far-OOD AUROC {'-' if auroc is None else f'{auroc:.4f}'} (held-out ID vs "
            f"{sets or 'no set'})")
        for k in left:
            log(f"left out of the headline: {k} (AUROC {per[k]}) looks like your data; "
                f"leave it out with --ood-sets or ood_sets")
        out.update(auroc=auroc, auroc_per_set=per, ood_left_out=left)
    else:
        log("no far-OOD sets (ood_sets: [] and no --ood folder): no AUROC")
    if test is not None:
        t = load_folder(test, cfg)
        got = run_ort(sess, t.images, batch_size=BATCH)
        _, want = extract(t.images)
        out["test_accepted"] = accepted_share(got["score"], tau)
        out["test_agreement"] = float((got["pred_class"] == want.argmax(1)).mean())
        log(f"test folder: accepts {out['test_accepted']:.4f} of {len(t)} images (target "
            f"{cfg.calibrate.target_tpr}); predicted class = classifier's on "
            f"{out['test_agreement']:.2%}")
        index, _ = folder_labels(t.class_names, cfg, num_classes)
        if index is not None:
            truth = index[t.labels]
            out["test_accuracy"] = float((want.argmax(1) == truth).mean())
            ok = got["score"] >= tau
            out["test_accuracy_accepted"] = (float((got["pred_class"][ok] == truth[ok]).mean())
                                             if ok.any() else float("nan"))
            log(f"test folder: classifier accuracy {out['test_accuracy']:.2%} on its folder "
                f"labels; {out['test_accuracy_accepted']:.2%} on the images the gate accepts")
    return out
