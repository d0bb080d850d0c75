"""The per-request threshold (issue 17): a target TPR or a log lambda, fed to the graph's
``log_lambda`` input, bounded by the calibration table, on /score and V2; batches never mix
thresholds. Fast tier: the app in process, the committed default bundle, Fashion-MNIST."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import BUNDLE, encode

from hopgate.bundle import load_meta
from hopgate.service.batcher import Batcher
from hopgate.service.errors import ClientError
from hopgate.service.metrics import Metrics
from hopgate.service.runtime.session import Runtime
from hopgate.service.threshold import log_lambda_range, resolve, tau_at_tpr, tpr_range

pytestmark = pytest.mark.anyio
META = load_meta(BUNDLE)
N = 200  # Fashion-MNIST test images (ID)


@pytest.fixture(scope="module")
def id_pngs(fashion):
    return [encode(a) for a in fashion.images[:N]]


async def _score(c, pngs, **query):
    out = []
    for k in range(0, len(pngs), 32):  # the fast tier's max_images
        files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs[k:k + 32])]
        r = await c.post("/score", files=files, params=query)
        assert r.status_code == 200, r.text
        out += r.json()["results"]
    return out


def test_the_table_gives_back_the_calibrated_threshold_and_its_bounds():
    """At the bundle's own target TPR the table gives its calibrated threshold (to the
    table's resolution); the bounds are the table's ends and one calibration image."""
    q = META.score_quantiles
    step = (q[-1] - q[0]) / len(q)
    assert abs(tau_at_tpr(META, META.target_tpr) - META.threshold) < step
    assert tau_at_tpr(META, 0.99) < META.threshold < tau_at_tpr(META, 0.5)
    assert log_lambda_range(META) == (q[0], q[-1])
    lo, hi = tpr_range(META)
    assert lo == pytest.approx(1 / META.calibration_size) and hi == pytest.approx(1 - lo)
    assert resolve(META, True) is None
    assert resolve(META, True, target_tpr="0.99") == pytest.approx(tau_at_tpr(META, 0.99),
                                                                  abs=1e-4)
    assert resolve(META, True, log_lambda=-50) == -50.0


@pytest.mark.parametrize("kwargs, words", [
    ({"target_tpr": 1.0}, ["target_tpr", "outside", "0.99983"]),
    ({"target_tpr": 0.0}, ["target_tpr", "outside"]),
    ({"log_lambda": 0.0}, ["log_lambda", "outside", "-246.3", "-9.8"]),
    ({"log_lambda": -1000}, ["log_lambda", "outside"]),
    ({"log_lambda": "nan"}, ["finite"]),
    ({"target_tpr": "high"}, ["must be a number"]),
    ({"target_tpr": True}, ["must be a number"]),
    ({"target_tpr": 0.9, "log_lambda": -50}, ["not both"]),
])
def test_out_of_range_or_malformed_is_a_400_naming_the_range(kwargs, words):
    with pytest.raises(ClientError) as e:
        resolve(META, True, **kwargs)
    assert e.value.status == 400 and all(w in e.value.message for w in words), e.value.message


def test_a_bundle_without_the_input_refuses_an_override():
    with pytest.raises(ClientError, match="cannot be overridden"):
        resolve(META, False, target_tpr=0.9)


def test_the_default_bundle_has_an_overridable_threshold(fashion):
    """The graph's log_lambda is an optional input defaulting to the calibrated threshold
    (model_export/export.py, _make_threshold_overridable): left out, the metadata's threshold
    decides; fed, the fed one does (mutations caught: the If's branches swapped, the default
    not the metadata's threshold)."""
    import onnxruntime as ort

    assert Runtime(BUNDLE, ["CPUExecutionProvider"], 1).has_log_lambda
    session = ort.InferenceSession(str(BUNDLE), providers=["CPUExecutionProvider"])
    images = fashion.images  # 2,000 ID images: some score within 1.0 above the threshold
    plain = dict(zip(("score", "is_ood"), session.run(["score", "is_ood"], {"images": images})))
    np.testing.assert_array_equal(plain["is_ood"], plain["score"] < np.float32(META.threshold))
    near = (plain["score"] >= META.threshold) & (plain["score"] < META.threshold + 1.0)
    assert near.any()  # so a default off by 1.0 would flip a verdict above
    tau = float(np.median(plain["score"]))  # half the images on each side
    fed = session.run(["is_ood"], {"images": images,
                                   "log_lambda": np.asarray(tau, np.float32)})[0]
    np.testing.assert_array_equal(fed, plain["score"] < np.float32(tau))
    assert 0 < fed.sum() < len(fed)


def test_plain_onnxruntime_loads_the_bundle_without_a_warning():
    """No "Initializer log_lambda appears in graph inputs" from onnxruntime at its default log
    level (issue 22): printed by its C++ logger on stderr, so read from a fresh process."""
    code = ("import onnxruntime as ort, sys; "
            "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])")
    run = subprocess.run([sys.executable, "-c", code, str(BUNDLE)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == "" and run.stdout == "", run.stderr


async def test_a_lower_threshold_lets_more_id_images_through(app_client, id_pngs):
    """Accept rate on ID images at two target TPRs; every verdict is score < the answer's
    threshold, and images let through only by the override have their memories (the graph
    decided, not a comparison after it)."""
    base = await _score(app_client, id_pngs)
    hi = await _score(app_client, id_pngs, target_tpr=0.999)
    lo = await _score(app_client, id_pngs, target_tpr=0.5)
    rate = {k: float(np.mean([not r["ood"] for r in rs]))
            for k, rs in (("base", base), ("0.999", hi), ("0.5", lo))}
    assert rate["0.5"] < 0.7 < rate["base"] <= rate["0.999"], rate
    assert rate["0.999"] - rate["0.5"] > 0.3, rate
    for rs, tpr in ((hi, 0.999), (lo, 0.5)):
        tau = resolve(META, True, target_tpr=tpr)
        assert all(r["threshold"] == pytest.approx(tau, abs=1e-4) for r in rs)
        assert all(r["ood"] == (r["score"] < r["threshold"]) for r in rs)
    assert all(r["threshold"] == pytest.approx(META.threshold) for r in base)
    flipped = [h for b, h in zip(base, hi) if b["ood"] and not h["ood"]]
    assert flipped and all(h["memories"] for h in flipped)
    # the header form, and a log lambda, say the same
    r = await app_client.post("/score", content=id_pngs[0], headers={
        "content-type": "image/png", "x-hopgate-log-lambda": str(lo[0]["threshold"])})
    assert r.json()["results"][0]["threshold"] == pytest.approx(lo[0]["threshold"])
    print(f"accept rate on {N} ID images: {rate}")


async def test_score_refuses_a_bad_threshold_with_the_range(app_client, id_pngs):
    r = await app_client.post("/score", content=id_pngs[0], params={"target_tpr": 2},
                              headers={"content-type": "image/png"})
    assert r.status_code == 400
    assert "outside [0.000166667, 0.999833]" in r.json()["error"]["message"]


async def test_v2_parameters_set_the_threshold(app_client, id_pngs):
    doc = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [32],
                       "data": [base64.b64encode(b).decode() for b in id_pngs[:32]]}],
           "outputs": [{"name": "is_ood"}, {"name": "score"}]}
    url = "/v2/models/default/infer"
    base = (await app_client.post(url, json=doc)).json()["outputs"][0]["data"]
    lo = (await app_client.post(url, json={**doc, "parameters": {"target_tpr": 0.5}}))
    assert lo.status_code == 200, lo.text
    ood = lo.json()["outputs"][0]["data"]
    assert sum(ood) > sum(base) + 32 * 0.3
    bad = await app_client.post(url, json={**doc, "parameters": {"log_lambda": 5}})
    assert bad.status_code == 400 and "outside" in bad.json()["error"]


class _Recorder:
    """A runtime that records each batch's size and threshold; the first batch waits for
    ``release`` so the others queue up behind it."""

    shape = (28, 28, 1)
    single_s = float("inf")

    def __init__(self):
        self.calls: list[tuple[int, float | None]] = []
        self.release = threading.Event()

    def run(self, images, bucket=None, log_lambda=None):
        if not self.calls:
            self.release.wait(10)
        self.calls.append((len(images), log_lambda))
        n = len(images)
        return {"score": np.full(n, -1.0 if log_lambda is None else log_lambda, np.float32)}


async def test_a_batch_never_mixes_thresholds():
    rt = _Recorder()
    batcher = Batcher(rt, Metrics([1, 8], [0.0]), [1, 8], 64, 0.0)  # type: ignore[arg-type]
    batcher.start()
    img = np.zeros((28, 28, 1), np.uint8)
    deadline = asyncio.get_running_loop().time() + 30
    first = batcher.submit([img], deadline)  # goes to the runtime at once, and waits there
    later = [batcher.submit([img, img], deadline, log_lambda=lam)
             for lam in (-50.0, None, -50.0, -20.0)]
    rt.release.set()
    await asyncio.wait([*first, *(f for fs in later for f in fs)], timeout=10)
    assert rt.calls == [(1, None), (4, -50.0), (2, None), (2, -20.0)]
    for fs, lam in zip(later, (-50.0, None, -50.0, -20.0)):  # each row got its own threshold
        assert all(f.result()[0]["score"] == (-1.0 if lam is None else lam) for f in fs)
    batcher.close()
