"""The classifier's own resize policy (issue 23.4): filter, resize-then-centre-crop and
shorter-side resize in hopgate.pixels, stated in the bundle (hopgate.bundle) and used as
stated by the service; old bundles keep today's policy. Fast: Pillow, onnx, the default bundle.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hopgate.bundle import BundleMeta, load_meta
from hopgate.pixels import Resize, fit

ROOT = Path(__file__).resolve().parents[1]


def _photo(w: int = 300, h: int = 200, seed: int = 0) -> Image.Image:
    """A smooth RGB image with detail (filters give different pixels on it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([127 + 100 * np.sin(x / 7.0), 127 + 100 * np.cos(y / 5.0),
                  (x * y) % 256], -1) + rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_shorter_side_crop_is_torchvisions_resize_then_center_crop():
    """Resize(256) + CenterCrop(224) (torchvision, PIL backend) written out by hand: the
    short side to 256 (long side truncated), then the centred 224 px. Mutations caught: the
    crop ratio ignored; the aspect not kept (stretch); the crop off-centre; the filter not
    the stated one."""
    img = _photo()  # 300 x 200
    want = np.asarray(img.resize((384, 256), Image.Resampling.BILINEAR).crop(
        (80, 16, 304, 240)))
    got = fit(img, 224, 224, Resize("shorter_side", "bilinear", 0.875))
    np.testing.assert_array_equal(got, want)
    tall = _photo(200, 300)
    want = np.asarray(tall.resize((256, 384), Image.Resampling.BICUBIC).crop(
        (16, 80, 240, 304)))
    np.testing.assert_array_equal(fit(tall, 224, 224, Resize("shorter_side", "bicubic",
                                                             0.875)), want)


def test_stretch_crop_and_filters():
    """stretch with a crop: to size / crop, then the centre; each filter is Pillow's own."""
    img = _photo()
    want = np.asarray(img.resize((64, 64), Image.Resampling.BOX).crop((16, 16, 48, 48)))
    np.testing.assert_array_equal(fit(img, 32, 32, Resize("stretch", "box", 0.5)), want)
    outs = {f: fit(img, 32, 32, Resize("stretch", f)) for f in
            ("nearest", "bilinear", "bicubic", "lanczos", "box")}
    for f, a in outs.items():
        np.testing.assert_array_equal(
            a, np.asarray(img.resize((32, 32), getattr(Image.Resampling, f.upper()))))
    assert len({a.tobytes() for a in outs.values()}) == 5


def test_default_policy_is_todays():
    """No filter and no crop stated = the policy every bundle had (Lanczos down, bilinear
    up, centre square for center_crop)."""
    img = _photo()
    np.testing.assert_array_equal(fit(img, 28, 28), np.asarray(
        img.resize((28, 28), Image.Resampling.LANCZOS)))
    np.testing.assert_array_equal(fit(img, 28, 28, "center_crop"), np.asarray(
        img.crop((50, 0, 250, 200)).resize((28, 28), Image.Resampling.LANCZOS)))
    small = _photo(8, 8)
    np.testing.assert_array_equal(fit(small, 28, 28, Resize()), np.asarray(
        small.resize((28, 28), Image.Resampling.BILINEAR)))
    with pytest.raises(ValueError, match="crop"):
        Resize(crop=0)
    with pytest.raises(ValueError, match="filter"):
        Resize(filter="hamming")


def test_bundle_states_the_policy_and_old_bundles_keep_todays():
    """The new keys round-trip through the bundle's props; a bundle without them (every
    bundle made before) reads as today's policy."""
    meta = load_meta(ROOT / "models" / "default.onnx")
    props = meta.to_props()
    old = {k: v for k, v in props.items()
           if k not in ("hopgate.resize_filter", "hopgate.crop")}
    assert BundleMeta.from_props(old).pixels == Resize(meta.resize, "auto", 1.0)
    props.update({"hopgate.resize": json.dumps("shorter_side"),
                  "hopgate.resize_filter": json.dumps("bicubic"),
                  "hopgate.crop": json.dumps(0.875)})
    assert BundleMeta.from_props(props).pixels == Resize("shorter_side", "bicubic", 0.875)


def test_service_decodes_with_the_bundles_policy(tmp_path):
    """The service (in process, its real decode pool) fits an image with what the bundle
    states: the default bundle restated with shorter_side / nearest / crop 0.5 scores a
    300 x 200 image exactly as the bundle run on pixels fitted that way, not today's way.
    Mutation caught: scoring.py passing ``m.resize`` (the mode alone) to the decode pool."""
    import httpx
    import onnx

    from hopgate.model_export.export import ort_session, run_ort
    from hopgate.service.app import create_app
    from hopgate.service.config import Settings

    model = onnx.load(str(ROOT / "models" / "default.onnx"))
    policy = Resize("shorter_side", "nearest", 0.5)
    for p in model.metadata_props:
        if p.key == "hopgate.resize":
            p.value = json.dumps(policy.mode)
    model.metadata_props.add(key="hopgate.resize_filter", value=json.dumps(policy.filter))
    model.metadata_props.add(key="hopgate.crop", value=json.dumps(policy.crop))
    bundle = tmp_path / "policy.onnx"
    onnx.save(model, str(bundle))
    meta = load_meta(bundle)
    assert meta.pixels == policy
    img = _photo().convert("L")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    settings = Settings(model=bundle, buckets=[1, 2], intra_op_threads=1, log_requests=False)

    async def score() -> dict:
        app = create_app(settings)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://hopgate",
                timeout=30) as client:
            r = await client.post("/score", content=buf.getvalue(),
                                  headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            return r.json()["results"][0]

    got = asyncio.run(score())
    sess = ort_session(bundle)
    stated = run_ort(sess, fit(img, meta.height, meta.width, policy)[None])["score"][0]
    today = run_ort(sess, fit(img, meta.height, meta.width, meta.resize)[None])["score"][0]
    assert abs(stated - today) > 1e-3  # the two policies give this image different scores
    assert got["score"] == pytest.approx(float(stated), rel=1e-5, abs=1e-4)
