"""The report's ablations: RecLag banks refitted from the cached features with one memory
setting changed per row (fewer fitting epochs than the bundle; the reference row is refitted
the same way, so rows compare like with like), and the verdict after T unrolled steps."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..calibrate import threshold_at_tpr
from ..config import MemoryConfig
from ..data.feature_cache import correct_train, linear
from ..reclag import RecLagHead
from .detectors import RecLag
from .methods import far_summary, set_scores

# (row name, memory settings changed from the bundle's)
VARIANTS: list[tuple[str, dict]] = [
    ("reference (bundle settings)", {}),
    ("features raw (no normalisation)", {"feature_norm": None}),
    ("feature_norm 1", {"feature_norm": 1.0}),
    ("beta 0.5", {"beta": 0.5}), ("beta 1", {"beta": 1.0}),
    ("beta 2", {"beta": 2.0}), ("beta 20", {"beta": 20.0}),
    ("M 1", {"memories": 1}), ("M 30", {"memories": 30}),
    ("shared bank (10 x M memories)", {"bank": "shared"}),
    ("sampler probs_as_logits (official quirk)", {"sampler": "probs_as_logits"}),
    ("init kmeans", {"init": "kmeans"}),
    ("init kmeans, beta 1", {"init": "kmeans", "beta": 1.0}),
    ("init kmeans, beta 1, M 30", {"init": "kmeans", "beta": 1.0, "memories": 30}),
    ("init kmeans, 0 epochs (k-means centres)", {"init": "kmeans", "epochs": 0}),
    ("init kmeans, 0 epochs, beta 1", {"init": "kmeans", "epochs": 0, "beta": 1.0}),
    ("init kmeans, 0 epochs, M 30", {"init": "kmeans", "epochs": 0, "memories": 30}),
]
STEPS = (0, 1, 3, 10)


def ablations(memory: MemoryConfig, cache: dict, epochs: int, seed: int,
              progress: bool = True) -> list[dict]:
    """One row per VARIANTS entry (``epochs`` fitting epochs unless the row sets its own), and
    after the reference row the T-steps rows of its banks."""
    train, labels = correct_train(cache)
    rows = []
    for name, over in tqdm(VARIANTS, desc="ablations", disable=not progress):
        det = RecLag(memory.model_copy(update={"epochs": epochs, **over}), seed, name)
        det.fit(train, labels, linear(cache))
        rows.append({"variant": name, **far_summary(set_scores(det, cache)),
                     "fit_seconds": det.fit_seconds})
        if name.startswith("reference"):
            rows.extend(steps_rows(det.head, cache, STEPS))
    return rows


@torch.no_grad()
def steps_rows(head: RecLagHead, cache: dict, steps: tuple[int, ...]) -> list[dict]:
    """T changes the verdict only through the gate at later steps: for each T, calibrate the
    deciding score (which depends on T) on the hold-out, then report the ID test share accepted
    and the OOD share flagged after T unrolled steps. The head's own ``steps`` is left as it
    was."""
    rows = []
    kept = head.steps
    try:
        for t in steps:
            head.steps = t
            tau = threshold_at_tpr(head.score(cache["holdout"]["phi"], cache["holdout"]["logits"])
                                   .double().numpy(), 0.95)
            run = lambda d: head(d["phi"], d["logits"], torch.tensor(tau))["is_ood"].numpy()  # noqa: E731,B023
            id_acc = float(1 - run(cache["test"]).mean())
            flagged = {k: float(run(v).mean()) for k, v in cache["ood"].items()}
            rows.append({"variant": f"T = {t} steps (reference banks, calibrated threshold)",
                         "steps": t, "id_accepted": id_acc, "ood_flagged": flagged})
    finally:
        head.steps = kept
    return rows
