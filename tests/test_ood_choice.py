"""OOD sets are the user's choice in ``hopgate-export build`` and its card (issue 23.3): the
built-in sets named by ``data.ood_sets`` (none: []), the user's own folders, and a built-in set
scoring like the ID data named and left out of the headline. Fast: no model is trained."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hopgate.model_export.config import BuildConfig, ConfigError, load_config
from hopgate.model_export.data.splits import Sets
from hopgate.model_export.evaluation.evaluate import format_quick


def test_build_chooses_its_ood_sets(tmp_path):
    """Mutation caught: Sets.far_ood ignoring data.ood_sets (all five sets come back)."""
    folder = tmp_path / "mine" / "deep"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    cfg = BuildConfig.model_validate({"data": {"ood_sets": ["noise"],
                                               "ood_folders": [f"folder:{tmp_path / 'mine'}"]}})
    sets = Sets(cfg).far_ood
    assert list(sets) == ["noise", "folder:mine"]
    assert sets["folder:mine"].shape == (3, 28, 28, 1)
    none = BuildConfig.model_validate({"data": {"ood_sets": []}})
    assert Sets(none).far_ood == {}
    with pytest.raises(ConfigError, match="ood_sets"):
        load_config(None, {"data.ood_sets": ["mnist"]})


def test_card_names_a_set_that_looks_like_the_data():
    """The card's table marks the left-out set and its headline pools the others. Mutation
    caught: format_quick dropping the mark or the headline line."""
    m = {"fpr95_ood_accepted": 0.1, "flagged_ood": 0.9}
    report = {"test_accuracy": 0.9, "threshold": -1.0, "test_tpr": 0.95, "target_tpr": 0.95,
              "ood": {"digits": {**m, "n": 10, "auroc": 0.43},
                      "noise": {**m, "n": 10, "auroc": 1.0}},
              "far_ood_auroc": 0.99, "ood_left_out": ["digits"]}
    text = format_quick(report)
    assert "| digits (looks like your data: left out of the headline) |" in text
    assert "Far-OOD AUROC 0.9900 over noise pooled; left out: digits" in text
