"""Drift of served scores against the bundle's calibration table (service/drift.py): the
statistics themselves, then the gauges of a server fed an ID stream (Fashion-MNIST test
images) and a shifted one (noise: OOD for the default bundle). In process, fast tier."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import BUNDLE, encode, in_process
from prometheus_client.parser import text_string_to_metric_families

from hopgate.bundle import load_meta
from hopgate.service.drift import Drift

TABLE = load_meta(BUNDLE).score_quantiles


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def feed(drift: Drift, scores) -> list[tuple[float, float]]:
    """(psi, ks) after each recomputation."""
    return [(drift.psi, drift.ks) for s in scores if drift.observe(float(s))]


def test_ks_is_the_one_sample_statistic_and_psi_the_textbook_sum():
    from scipy import stats

    table = list(np.linspace(0.0, 10.0, 101))  # uniform on [0, 10]
    d = Drift(table, window=400, every=400)
    x = np.random.default_rng(1).uniform(1.0, 12.0, 400)  # shifted, partly off the table
    assert feed(d, x)
    want = stats.kstest(x, stats.uniform(0, 10).cdf).statistic
    assert d.ks == pytest.approx(want, abs=1e-12)
    counts = np.histogram(x, [-np.inf, *np.linspace(0, 10, 11), np.inf])[0]
    served = np.maximum(counts / 400, 0.5 / 400)
    expected = np.maximum(np.array([0, *[0.1] * 10, 0]), 0.5 / 400)
    assert d.psi == pytest.approx(float(np.sum((served - expected) * np.log(served / expected))))


def test_nan_until_enough_scores_then_every_n():
    d = Drift(TABLE, window=1000, every=50, min_count=100)
    assert not any(d.observe(TABLE[500]) for _ in range(99)) and math.isnan(d.psi)
    assert d.observe(TABLE[500]) and not math.isnan(d.ks)  # the 100th
    assert sum(d.observe(TABLE[500]) for _ in range(100)) == 2


def test_id_stream_stays_flat_shifted_stream_rises(fashion, direct):
    id_scores = direct(fashion.images)["score"]  # 2,000 Fashion-MNIST test images
    d = Drift(TABLE, window=1000, every=50)
    on_id = feed(d, id_scores)
    full = on_id[(1000 - 100) // 50:]  # once the window is full
    assert max(p for p, _ in full) < 0.1 and max(k for _, k in full) < 0.06
    on_noise = feed(d, direct(noise(1000))["score"])
    assert on_noise[-1][0] > 2.0 and on_noise[-1][1] > 0.9
    assert all(b[0] >= a[0] - 1e-9 for a, b in zip(on_noise, on_noise[1:]))  # it only rises


def gauges(text: str) -> dict[str, float]:
    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith(("hopgate_score_drift", "hopgate_ood_rate"))}


@pytest.mark.anyio
async def test_the_server_exports_the_gauges(anyio_backend, fashion):
    async def stream(c, images):
        for i in range(0, len(images), 30):
            files = [("images", (f"{j}.png", encode(im), "image/png"))
                     for j, im in enumerate(images[i:i + 30])]
            assert (await c.post("/score", files=files)).status_code == 200

    async with in_process(drift_window=200, drift_every=20) as c:
        assert all(math.isnan(v) for k, v in gauges((await c.get("/metrics")).text).items()
                   if k.startswith("hopgate_score_drift"))
        await stream(c, fashion.images[:300])
        on_id = gauges((await c.get("/metrics")).text)
        await stream(c, noise(120))
        shifted = gauges((await c.get("/metrics")).text)
    assert on_id["hopgate_score_drift_psi"] < 0.15 and on_id["hopgate_score_drift_ks"] < 0.1
    assert shifted["hopgate_score_drift_psi"] > 1.0 and shifted["hopgate_score_drift_ks"] > 0.5
    assert on_id["hopgate_ood_rate"] < 0.15 < shifted["hopgate_ood_rate"]
