"""The benchmark's scoring path: the served ONNX bundle scores the benchmark images exactly as the
PyTorch evaluation does, the report's cached-feature scores are the bundle's scores, and the
calibrated threshold holds on ID images calibration never saw."""

from __future__ import annotations

import numpy as np
import pytest
from tpr_band import CLIENT_PATH_SHIFT, accepted_band

from hopgate.model_export.calibrate import accepted_share
from hopgate.model_export.data import sources as data
from hopgate.model_export.data.splits import id_test
from hopgate.model_export.evaluation.evaluate import torch_scores
from hopgate.model_export.evaluation.metrics import bootstrap_ci, ood_metrics
from hopgate.model_export.export import ort_session, run_ort
from hopgate.model_export.recipe import load_model


@pytest.fixture(scope="module")
def bench(quick_build):
    """The quick bundle's benchmark images: ID test plus every far-OOD set (subsets)."""
    cfg, _ = quick_build
    model, calib = load_model(cfg)
    ood = data.far_ood_sets(cfg.data.size, cfg.data.channels, cfg.seed)
    images = np.concatenate([id_test(cfg).images[:600]] + [v[:120] for v in ood.values()])
    return cfg, model, calib, images


@pytest.mark.slow
def test_onnx_scores_benchmark_images_as_pytorch(bench):
    cfg, model, calib, images = bench
    tau = calib["threshold"]
    scores, torch_pred = torch_scores(model, images)
    out = run_ort(ort_session(cfg.output), images)
    rel = np.abs(out["score"] - scores) / np.maximum(np.abs(scores), 1.0)
    assert rel.max() < 1e-4, rel.max()
    np.testing.assert_array_equal(out["pred_class"], torch_pred)
    # same flags: the bundle's verdict is score < tau; only a row whose score lies within the
    # float tolerance of the threshold itself could differ, and none may flip otherwise
    torch_ood = scores < tau
    decided = np.abs(scores - tau) > 1e-4 * max(abs(tau), 1.0)
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(out["is_ood"][decided], torch_ood[decided])
    assert 0 < torch_ood.mean() < 1  # both verdicts occur on the benchmark images


@pytest.mark.slow
def test_report_scores_are_bundle_scores(bench, tmp_path):
    """The report scores RecLag from cached features with the bundle's head: same numbers as
    running the whole model on the images."""
    import shutil

    from hopgate.model_export.data.feature_cache import build_cache, cache_path
    from hopgate.model_export.data.splits import Sets
    from hopgate.model_export.evaluation.ablations import steps_rows
    from hopgate.model_export.evaluation.detectors import REGISTRY, Options
    from hopgate.model_export.evaluation.methods import set_scores

    cfg, model, _, _ = bench
    shutil.copy(cfg.workdir / "backbone.pt", tmp_path / "backbone.pt")
    cfg_small = cfg.model_copy(update={"data": cfg.data.model_copy(update={"test_subset": 300}),
                                       "name": "quick-cache", "workdir": tmp_path})
    cache = build_cache(cfg_small, Sets(cfg_small), ood_limit=50, progress=False)
    scores = set_scores(REGISTRY["reclag"](Options(head=model.head)), cache, holdout=True)
    direct, _ = torch_scores(model, id_test(cfg_small).images)
    np.testing.assert_allclose(scores["test"], direct, rtol=1e-5)
    assert set(scores["ood"]) == {"digits", "photos", "faces", "glyphs", "noise"}
    assert cache_path(cfg_small) == tmp_path / "eval" / "cache.pt"  # under the work dir
    assert cache_path(cfg_small).exists()
    # T unrolled steps: the deciding score is calibrated per T on the (raw) hold-out, so the
    # 300 ID test images the threshold never saw are accepted at the target, within the
    # beta-binomial band of 2,400 calibration and 300 test images (tests/tpr_band.py: ~0.89 .. 0.99)
    rows = steps_rows(model.head, cache, (0, 1))
    assert [r["steps"] for r in rows] == [0, 1]
    lo, hi = accepted_band(len(cache["holdout"]["phi"]), len(cache["test"]["phi"]), 0.95)
    assert all(lo <= r["id_accepted"] <= hi for r in rows), (rows, lo, hi)
    assert model.head.steps == cfg.memory.steps  # the head's own T is left as it was


@pytest.mark.slow
def test_calibrated_threshold_holds_on_unseen_id(bench):
    cfg, model, calib, _ = bench
    test = id_test(cfg)
    scores, _ = torch_scores(model, test.images)
    share = accepted_share(scores, calib["threshold"])
    # 2,400 client-path calibration images, 2,000 raw test images: the beta-binomial band
    # (tests/tpr_band.py, ~0.92 .. 0.97) widened by the client path's stated shift
    lo, hi = accepted_band(calib["calibration_size"], len(test), calib["target_tpr"],
                           shift=CLIENT_PATH_SHIFT)
    assert lo <= share <= hi, (share, lo, hi)


def test_metrics_conventions_and_bootstrap():
    rng = np.random.default_rng(0)
    id_s, ood_s = rng.normal(2, 1, 2000), rng.normal(0, 1, 1000)
    m = ood_metrics(id_s, ood_s)
    # paper convention: OOD accepted at the threshold keeping 95 % of ID
    tau = np.quantile(id_s, 0.05)
    assert abs(m["fpr95_ood_accepted"] - np.mean(ood_s >= tau)) < 0.01
    # OpenOOD convention: ID rejected at the threshold catching 95 % of OOD
    tau2 = np.quantile(ood_s, 0.95)
    assert abs(m["fpr95_id_rejected"] - np.mean(id_s < tau2)) < 0.01
    ci = bootstrap_ci(id_s, ood_s, n=50)
    lo, hi = ci["auroc_ci"]
    assert lo < m["auroc"] < hi and hi - lo < 0.05
