"""The served path (issue 13 item 3): one resize policy, the client-path simulation that training
and calibration use, and the per-encoding table. The slow tests check the quick bundle keeps its
promise (within the band of tests/tpr_band.py) on every client encoding of unseen ID images,
and that its threshold and p-value table were set on the client-path hold-out. Mutation
measured on the quick build: with ``calibrate.client_path: 0`` the served encodings are
accepted at 0.960-0.963 instead of 0.951-0.954: still inside the band, so only the second test
catches it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from tpr_band import CLIENT_PATH_SHIFT, accepted_band

from hopgate.model_export.data import clientpath as cp
from hopgate.model_export.data import sources as data
from hopgate.model_export.evaluation import render
from hopgate.pixels import fit, resample_for
from hopgate.service.imaging import decode


def _items(n: int = 24) -> np.ndarray:
    return data.fashion_mnist("test").images[:n]


def test_filter_lanczos_down_bilinear_up():
    assert resample_for((224, 224), (28, 28)) == Image.Resampling.LANCZOS
    assert resample_for((28, 40), (28, 28)) == Image.Resampling.LANCZOS
    assert resample_for((8, 8), (28, 28)) == Image.Resampling.BILINEAR
    assert resample_for((28, 28), (28, 28)) == Image.Resampling.BILINEAR
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224), np.uint8))
    want = np.asarray(big.resize((28, 28), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(fit(big, 28, 28)[..., 0], want)


def test_training_and_service_resize_alike():
    """data.resize (training, evaluation) and the service's decode give the same pixels."""
    for a in _items(4):
        big = Image.fromarray(a[..., 0]).resize((224, 224), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, "PNG")
        np.testing.assert_array_equal(decode(buf.getvalue(), 28, 28, 1),
                                      data.resize(big, (28, 28), 1))


def test_native_png_is_lossless_and_encodings_differ():
    x = _items()
    np.testing.assert_array_equal(cp.served([cp.encode(a, cp.Encoding()) for a in x], x.shape[1:]),
                                  x)
    jpeg = cp.served([cp.encode(a, cp.Encoding(224, "JPEG", 75)) for a in x], x.shape[1:])
    assert jpeg.shape == x.shape and 1.0 < np.abs(jpeg.astype(int) - x).mean() < 20.0
    assert {e.label for e in cp.ENCODINGS} >= {"native PNG", "56 px PNG", "224 px PNG",
                                               "448 px PNG", "224 px JPEG q75", "224 px JPEG q90"}


def test_simulate_is_seeded_and_varied():
    x = _items(200)
    a = cp.simulate(x, np.random.default_rng(1))
    np.testing.assert_array_equal(a, cp.simulate(x, np.random.default_rng(1)))
    assert a.shape == x.shape and a.dtype == np.uint8
    same = (a == x).reshape(len(x), -1).all(1)
    assert 0.0 < same.mean() < 0.15  # only native-size PNGs (P_NATIVE * P_PNG) come back as-is
    encs = cp.random_encodings(2000, (28, 28, 1), np.random.default_rng(0))
    sides = [e.side for e in encs if e.side]
    assert min(sides) >= 28 and max(sides) <= cp.MAX_SIDE and np.median(sides) > 56
    assert 0.25 < np.mean([e.fmt == "PNG" for e in encs]) < 0.35
    assert {e.mode for e in encs} == {"L", "RGB"}
    big = cp.random_encodings(500, (224, 224, 3), np.random.default_rng(0))
    assert min(e.side for e in big if e.side) < 224 and all(e.mode == "RGB" for e in big)


def test_calibration_images_share():
    x = _items(300)
    np.testing.assert_array_equal(cp.calibration_images(x, 0.0, 0), x)
    mixed = cp.calibration_images(x, 0.5, 0)
    changed = np.abs(mixed.astype(int) - x).reshape(len(x), -1).max(1) > 0
    assert 0.35 < changed.mean() < 0.6  # about half sent (a few as native-size PNG)


def test_encoding_table_counts_the_served_pixels():
    """Score = mean brightness: the table's accepted share is the share of served images over
    the threshold, per encoding, and accuracy compares the predictions with the labels."""
    x = _items(100)
    labels = np.arange(len(x)) % 3

    def score_fn(imgs):
        return imgs.reshape(len(imgs), -1).mean(1), np.arange(len(imgs)) % 3

    tau = float(np.median(score_fn(x)[0]))
    rows = cp.encoding_table(score_fn, x, labels, tau, 0.95)
    assert [r["encoding"] for r in rows] == [e.label for e in cp.ENCODINGS]
    assert rows[0]["accepted"] == np.mean(score_fn(x)[0] >= tau)
    assert all(r["accuracy"] == 1.0 and r["n"] == 100 for r in rows)
    assert abs(rows[0]["gap"] - (rows[0]["accepted"] - 0.95)) < 1e-12
    md = "\n".join(cp.format_table(rows, 0.95))
    assert "| 224 px JPEG q90 | 100 |" in md


def test_train_sends_a_share_of_each_batch(monkeypatch):
    import torch

    from hopgate.model_export import train
    from hopgate.model_export.backbones import build
    from hopgate.model_export.model import Normalize

    sizes = []

    def spy(images, rng):
        sizes.append(len(images))
        return cp.simulate(images, rng)

    monkeypatch.setattr(train, "simulate", spy)
    torch.set_num_threads(1)
    split = data.Split(_items(64), np.zeros(64, dtype=np.int64), ["a", "b"])
    train.train_classifier(build("small_resnet", 2, 1), Normalize([0.5], [0.5]), split,
                           epochs=1, batch_size=32, lr=0.01, seed=0, client_path=0.25,
                           progress=False)
    assert sizes == [8, 8]


def test_report_renders_the_encoding_table(tmp_path):
    from tests.test_report_render import _report

    report = _report()
    rows = [{"encoding": "224 px JPEG q90", "n": 10, "accepted": 0.9, "accuracy": 0.8,
             "accuracy_accepted": 0.85, "gap": -0.05}]
    report["benchmarks"]["quick"]["encodings"] = rows
    render.write(report, tmp_path, t0=0.0)
    md = (tmp_path / "README.md").read_text()
    assert "| 224 px JPEG q90 | 10 | 0.9000 (-0.0500) | 0.8000 | 0.8500 |" in md


@pytest.mark.slow
def test_promise_holds_per_client_encoding(quick_build):
    """Every client encoding of unseen ID test images: accepted share within the calibration's
    band around the target TPR (tests/tpr_band.py; a bilinear downscale or a native-only
    calibration each move the served shares by about 0.012 on the quick build)."""
    from hopgate.model_export.data.splits import id_test
    from hopgate.model_export.evaluation.evaluate import served_table
    from hopgate.model_export.recipe import load_model

    cfg, _ = quick_build
    assert cfg.calibrate.client_path > 0 and cfg.backbone.client_path > 0
    model, calib = load_model(cfg)
    test = id_test(cfg)
    rows = served_table(cfg, model, calib, test)
    # the beta-binomial band of 2,400 calibration and 2,000 test images (tests/tpr_band.py)
    # widened by the stated client-path shift: about 0.91 .. 0.98 (was a flat +-0.03)
    lo, hi = accepted_band(calib["calibration_size"], len(test), calib["target_tpr"],
                           shift=CLIENT_PATH_SHIFT)
    bad = [(r["encoding"], round(r["accepted"], 4)) for r in rows
           if not lo <= r["accepted"] <= hi]
    assert not bad, (bad, lo, hi)


@pytest.mark.slow
def test_calibration_is_set_on_what_clients_send(quick_build):
    """The recorded p-value table is the score table of the hold-out with its client-path share
    sent (clientpath.calibration_images), not of the native hold-out."""
    from hopgate.model_export.calibrate import quantile_table
    from hopgate.model_export.data.splits import Sets
    from hopgate.model_export.evaluation.evaluate import torch_scores
    from hopgate.model_export.recipe import load_model

    cfg, _ = quick_build
    model, calib = load_model(cfg)
    hold = Sets(cfg).holdout.images
    sent = cp.calibration_images(hold, cfg.calibrate.client_path, cfg.seed, cfg.data.resize)
    table = np.asarray(calib["score_quantiles"])
    want = quantile_table(torch_scores(model, sent)[0], cfg.calibrate.quantiles)
    native = quantile_table(torch_scores(model, hold)[0], cfg.calibrate.quantiles)
    np.testing.assert_allclose(table, want, rtol=1e-5)
    assert np.abs(table - np.asarray(native)).max() > 1e-3
    assert calib["calibration_size"] == len(hold) and calib["client_path"] > 0
