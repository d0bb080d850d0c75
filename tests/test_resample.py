"""hopgate.resample: Pillow's resize, bit for bit, with the weights cached per geometry.

Every figure the gate was calibrated on came through Pillow's ``Image.resize`` (training and
serving share ``hopgate.pixels.fit``), so the faster path must give the same bytes, not
nearly the same. Checked against the installed Pillow on random geometries, images and
filters. Fast tier: Pillow and NumPy only.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from hopgate import resample
from hopgate.pixels import Resize, fit

FILTERS = list(resample.FILTERS)


def _image(rng: np.random.Generator, w: int, h: int, mode: str, kind: int) -> Image.Image:
    shape = (h, w) if mode == "L" else (h, w, 3)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == 1:  # hard edges: LANCZOS and BICUBIC overshoot, so the clip to 0..255 matters
        a = (a // 128 * 255).astype(np.uint8)
    elif kind == 2:  # smooth: every rounding sits near a half
        y, x = np.mgrid[0:h, 0:w]
        smooth = (127 + 120 * np.sin(x / 3.1) * np.cos(y / 4.7)).astype(np.uint8)
        a = smooth if mode == "L" else np.stack([smooth, smooth[::-1], 255 - smooth], -1)
    return Image.fromarray(a, mode)


def _geometries(rng: np.random.Generator, n: int):
    for i in range(n):
        big = i % 2
        w, h = (int(v) for v in rng.integers(1, 300 if big else 40, 2))
        W, H = (int(v) for v in rng.integers(1, 120, 2))
        if i % 7 == 0:
            W = w  # one axis only
        elif i % 7 == 1:
            H = h
        elif i % 7 == 2:  # the height shrinks most: Pillow 13 runs the vertical pass first
            h, H = max(h, 3 * w + 10), max(1, h // 8)
        yield w, h, W, H, ("L", "RGB")[i % 3 == 0], FILTERS[i % len(FILTERS)], i % 3


def test_the_matrix_passes_are_pillows_bytes_on_random_geometries():
    """1,500 random cases (sizes 1-300 px in, 1-120 out; up and down; L and RGB; BOX,
    BILINEAR, BICUBIC, LANCZOS; noise, hard edges, smooth ramps): every output byte equal.
    Mutations caught: the pass order always horizontal first (the vertical-first cases);
    the weights rounded without the half (``int(w * one)``); the sums floored without the
    half; the clip left out (hard edges overshoot); the taps summed in another order."""
    rng = np.random.default_rng(20261206)
    bad = []
    for w, h, W, H, mode, f, kind in _geometries(rng, 1500):
        img = _image(rng, w, h, mode, kind)
        want = np.asarray(img.resize((W, H), f))
        got = resample.computed(img, (W, H), f)
        if not np.array_equal(got, want):
            bad.append((mode, (w, h), (W, H), f.name, kind))
    assert not bad, f"{len(bad)} of 1500 differ from Pillow, e.g. {bad[:5]}"


def test_the_default_models_geometry_is_computed_not_handed_to_pillow(monkeypatch):
    """112 -> 28 px LANCZOS (a 224 px JPEG drafted to 112 for the 28 px default model): the
    first image is Pillow's, the second is computed and compared, and from the third on the
    matrices alone serve it, with Pillow's bytes. Mutation caught: ``resize`` always
    returning Pillow's answer (the fast path never taken)."""
    resample._geometries.clear()
    lanczos = Image.Resampling.LANCZOS
    for seed in range(2):
        img = _image(np.random.default_rng(seed), 112, 112, "L", 2)
        assert np.array_equal(resample.resize(img, (28, 28), lanczos),
                              np.asarray(img.resize((28, 28), lanczos)))
    assert resample._geometries[("L", (112, 112), (28, 28), lanczos)] == resample.AGREES
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("Pillow called"))
    for seed in range(3):
        other = _image(np.random.default_rng(seed + 2), 112, 112, "L", seed % 3)
        assert resample.resize(other, (28, 28), lanczos).shape == (28, 28)


def test_a_size_seen_once_is_pillows_and_costs_no_weights(monkeypatch):
    """Clients that send every size: each new geometry goes to Pillow, no weights computed
    (in Python, they cost more than Pillow's resize for one image). Mutation caught: the
    weights built on a geometry's first image."""
    resample._geometries.clear()
    monkeypatch.setattr(resample, "weights", lambda *a: pytest.fail("weights computed"))
    rng = np.random.default_rng(5)
    for w in range(60, 90):
        img = _image(rng, w, 2 * w, "RGB", 0)
        assert np.array_equal(resample.resize(img, (28, 28), Image.Resampling.LANCZOS),
                              np.asarray(img.resize((28, 28), Image.Resampling.LANCZOS)))


def test_a_geometry_that_disagrees_with_pillow_goes_back_to_pillow(monkeypatch, caplog):
    """A geometry's second image is computed both ways; a disagreement (here: weights
    deliberately off) is logged once and that geometry is Pillow's from then on. Mutation
    caught: the comparison's result ignored (the wrong bytes served)."""
    resample._geometries.clear()
    resample.weights.cache_clear()
    good = resample.weights

    def off(*args):
        return good(*args) * 1.01

    monkeypatch.setattr(resample, "weights", off)
    rng = np.random.default_rng(7)
    with caplog.at_level(logging.WARNING, "hopgate.resample"):
        for _ in range(4):
            img = _image(rng, 90, 70, "RGB", 0)
            want = np.asarray(img.resize((30, 20), Image.Resampling.BICUBIC))
            assert np.array_equal(resample.resize(img, (30, 20), Image.Resampling.BICUBIC),
                                  want)
    assert sum("differs from Pillow" in r.message for r in caplog.records) == 1
    resample._geometries.clear()


def test_large_images_and_other_filters_go_to_pillow(monkeypatch):
    """Sides above MAX_SIDE (a pass is a dense product, its weights a cached matrix) and
    NEAREST or HAMMING: Pillow itself, same bytes."""
    resample._geometries.clear()
    monkeypatch.setattr(resample, "weights", lambda *a: pytest.fail("weights computed"))
    rng = np.random.default_rng(3)
    big = _image(rng, resample.MAX_SIDE + 1, 64, "L", 0)
    small = _image(rng, 50, 40, "RGB", 0)
    for _ in range(3):  # seen again and again: still Pillow's
        assert np.array_equal(resample.resize(big, (28, 28), Image.Resampling.LANCZOS),
                              np.asarray(big.resize((28, 28), Image.Resampling.LANCZOS)))
        assert np.array_equal(resample.resize(small, (resample.MAX_SIDE + 1, 10),
                                              Image.Resampling.BILINEAR),
                              np.asarray(small.resize((resample.MAX_SIDE + 1, 10),
                                                      Image.Resampling.BILINEAR)))
        for f in (Image.Resampling.NEAREST, Image.Resampling.HAMMING):
            assert np.array_equal(resample.resize(small, (20, 10), f),
                                  np.asarray(small.resize((20, 10), f)))


@pytest.mark.parametrize("policy", [Resize(), Resize("center_crop"),
                                    Resize("shorter_side", "bilinear", 0.875),
                                    Resize("stretch", "box", 0.5)])
def test_fit_gives_the_bytes_pillows_resize_and_crop_gave(policy):
    """``fit`` now crops an array, not an image: the same bytes as Pillow's resize then
    ``crop`` for every policy mode, on odd sizes (the centre rounds)."""
    rng = np.random.default_rng(11)
    for w, h in ((301, 199), (57, 90), (28, 28), (13, 200)):
        img = _image(rng, w, h, "RGB", 2)
        got = fit(img, 24, 24, policy)
        ref = img
        if policy.mode == "center_crop":
            s = min(w, h)
            ref = ref.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        outer = (round(24 / policy.crop), round(24 / policy.crop))
        if policy.mode == "shorter_side":
            k = max(outer[0] / ref.width, outer[1] / ref.height)
            outer = (max(outer[0], int(ref.width * k)), max(outer[1], int(ref.height * k)))
        f = resample_filter(policy, ref.size, outer)
        if ref.size != outer:
            ref = ref.resize(outer, f)
        left, top = round((ref.width - 24) / 2), round((ref.height - 24) / 2)
        want = np.asarray(ref.crop((left, top, left + 24, top + 24)))
        assert got.shape == (24, 24, 3) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


def resample_filter(policy: Resize, src: tuple[int, int], dst: tuple[int, int]):
    from hopgate.pixels import FILTERS as NAMED
    from hopgate.pixels import resample_for
    return resample_for(src, dst) if policy.filter == "auto" else NAMED[policy.filter]
