"""The one-pass shape: ``/score?top_k=K`` (and V2's ``probabilities``, the Python client's
``top_k``) return the classifier's own probabilities from the bundle's ``logits`` output, so
a client needs no second forward pass. Here on the default bundle (its logits exposed by a
graph-only edit); tests/test_attach.py checks an attached bundle against the user's own
classifier."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from conftest import BUNDLE, encode, in_process

from hopgate.bundle import INPUT_IMAGES, LOGITS

pytestmark = pytest.mark.anyio


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def sample(fashion):
    """Twelve test images, and the bundle's own logits and msp for them (onnxruntime)."""
    import onnxruntime as ort

    images = fashion.images[:12]
    sess = ort.InferenceSession(str(BUNDLE), providers=["CPUExecutionProvider"])
    logits, msp = sess.run([LOGITS, "msp"], {INPUT_IMAGES: images})
    return [encode(a) for a in images], logits, msp


async def test_top_k_is_the_classifiers_softmax(sample):
    """Mutations caught: probabilities from the logits unnormalised (or a softmax over the
    wrong axis), the top classes out of order, ``logits`` always sent or never."""
    blobs, logits, msp = sample
    want = softmax(logits)
    async with in_process() as c:
        files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
        r = await c.post("/score", files=files, params={"top_k": 3, "logits": "true"})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        plain = (await c.post("/score", files=files[:1])).json()["results"][0]
    assert "probabilities" not in plain  # only when asked
    for i, res in enumerate(results):
        top = res["probabilities"]
        assert [p["class_index"] for p in top] == list(np.argsort(-want[i], kind="stable")[:3])
        assert top[0]["class_index"] == res["predicted_class"] and top[0]["label"] == res["label"]
        for p in top:
            assert abs(p["probability"] - want[i, p["class_index"]]) <= 1e-5
            assert abs(p["logit"] - logits[i, p["class_index"]]) <= 1e-5
        # the graph's own softmax (its msp baseline) agrees: an independent reference
        assert abs(top[0]["probability"] - msp[i]) <= 1e-5


@pytest.mark.parametrize("query,message", [
    ({"top_k": "0"}, "from 1 to 10"), ({"top_k": "11"}, "from 1 to 10"),
    ({"top_k": "two"}, "from 1 to 10"), ({"logits": "maybe"}, "true or false")])
async def test_bad_top_k_is_one_clear_400(sample, query, message):
    async with in_process() as c:
        r = await c.post("/score", content=sample[0][0], headers={"content-type": "image/png"},
                         params=query)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


async def test_top_k_needs_a_bundle_with_logits(sample, monkeypatch):
    """A bundle without the output (made before it existed): one clear 400."""
    async with in_process() as c:
        monkeypatch.setattr(c.app.state.scorer.runtime, "has_logits", False)
        r = await c.post("/score?top_k=2", content=sample[0][0],
                         headers={"content-type": "image/png"})
    assert r.status_code == 400 and "logits" in r.json()["error"]["message"]


async def test_v2_probabilities_and_the_python_client(sample):
    """V2's ``probabilities`` output (asked for by name) and ``Client(top_k=...)``."""
    import httpx

    from hopgate.client import AsyncClient

    blobs, logits, _ = sample
    async with in_process() as c:
        doc = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                           "data": [base64.b64encode(b).decode() for b in blobs[:2]]}],
               "outputs": [{"name": "probabilities"}, {"name": "score"}]}
        name = c.app.state.scorer.meta.name
        r = await c.post(f"/v2/models/{name}/infer", json=doc)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        meta = (await c.get(f"/v2/models/{name}")).json()
        transport = httpx.ASGITransport(app=c.app)
        async with AsyncClient("http://hopgate", transport=transport, top_k=2) as client:
            res = await client.score(blobs[0])
    assert out["probabilities"]["shape"] == [2, 10]
    np.testing.assert_allclose(np.reshape(out["probabilities"]["data"], (2, 10)),
                               softmax(logits[:2]), atol=1e-6)
    assert {"probabilities", "logits"} <= {o["name"] for o in meta["outputs"]}
    want = softmax(logits[:1])[0]
    assert len(res.probabilities) == 2
    assert res.probabilities[0].class_index == int(want.argmax())
    assert abs(res.probabilities[0].probability - want.max()) <= 1e-5
