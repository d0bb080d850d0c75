"""Memories you can look at (fast tier, in process): the default bundle's exemplars, GET
/memories/{index} and its PNGs, memory classes in /score results, the OOD note, and the
exemplar step on a copy of the bundle (onnx + onnxruntime, no torch)."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import onnx
import pytest
from conftest import BUNDLE, in_process
from inputs import encode
from PIL import Image

from hopgate.bundle import BundleError, BundleMeta, load_meta
from hopgate.service.schema import OOD_NOTE

pytestmark = pytest.mark.anyio
NOT_FOUND = {"status": 404, "reason": "not_found"}


def test_default_bundle_carries_exemplars_and_stays_small():
    meta = load_meta(BUNDLE)
    assert BUNDLE.stat().st_size < 2_000_000
    e = meta.exemplars
    assert e is not None and len(e.images) == meta.memory_count == 100
    assert all(e.images), "every memory has at least one exemplar"
    assert e.classes == [i // meta.memories_per_class for i in range(100)]
    img = Image.open(io.BytesIO(base64.b64decode(e.images[0][0])))
    assert img.format == "PNG" and max(img.size) <= max(e.size)


async def test_memory_json_and_its_pngs_are_training_images_retrieved_to_it(direct):
    async with in_process() as c:
        for index in (0, 37, 99):
            r = await c.get(f"/memories/{index}")
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc["index"] == index and doc["class_index"] == index // 10
            assert doc["label"] == load_meta(BUNDLE).class_names[index // 10]
            assert doc["exemplars"] == [f"/memories/{index}/exemplars/{k}.png"
                                        for k in range(len(doc["exemplars"]))]
            assert len(doc["exemplars"]) >= 2
            pixels = []
            for url in doc["exemplars"]:
                png = await c.get(url)
                assert png.status_code == 200 and png.headers["content-type"] == "image/png"
                pixels.append(np.asarray(Image.open(io.BytesIO(png.content)))[..., None])
            out = direct(np.stack(pixels))  # the bundle itself retrieves them to this memory
            assert not out["is_ood"].any()
            assert (out["pred_class"] == index // 10).all()
            assert all(index in row for row in out["memory_index"])
        listing = (await c.get("/memories")).json()
        assert len(listing["memories"]) == 100 and "train" in listing["source"]


@pytest.mark.parametrize("path", ["/memories/100", "/memories/-1", "/memories/0/exemplars/99.png",
                                  "/memories/100/exemplars/0.png"])
async def test_a_bad_memory_is_404_in_the_one_error_body(path):
    async with in_process() as c:
        r = await c.get(path)
        assert r.status_code == 404
        assert set(r.json()) == {"error"} and r.json()["error"].items() >= NOT_FOUND.items()


async def test_results_name_each_memorys_class_and_ood_says_the_class_is_a_guess(fashion):
    noise = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    files = [("images", (f"{i}.png", encode(a), "image/png"))
             for i, a in enumerate([*fashion.images[:8], noise])]
    async with in_process() as c:
        doc = (await c.post("/score", files=files)).json()
    *ids, ood = doc["results"]
    named = [m for r in ids if not r["ood"] for m in r["memories"]]
    assert named, "some Fashion-MNIST test image is ID"
    for r in ids:
        assert ("note" in r) == r["ood"]
        for m in r["memories"]:
            assert m["class_index"] == m["index"] // 10 == r["predicted_class"]
            assert m["label"] == r["label"]
    assert ood["ood"] and ood["memories"] == [] and ood["note"] == OOD_NOTE
    assert "guess" in ood["note"] and "outside" in ood["note"]


def _props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_a_bundle_without_exemplars_still_reads_and_knows_per_class_memories():
    props = {k: v for k, v in _props(BUNDLE).items() if k != "hopgate.exemplars"}
    meta = BundleMeta.from_props(props)
    assert meta.exemplars is None
    assert [meta.memory_class(i) for i in range(100)] == [i // 10 for i in range(100)]
    shared = BundleMeta.from_props({**props, "hopgate.bank": '"shared"'})
    assert shared.memory_class(77) is None
    short = {**props, "hopgate.exemplars": '{"source": "x", "size": [28, 28], "classes": [0], '
                                            '"images": [[]]}'}
    with pytest.raises(BundleError, match="1 classes and 1 image lists for 100 memories"):
        BundleMeta.from_props(short)


def test_exemplars_are_the_rightly_labelled_images_retrieved_with_the_highest_weight(fashion,
                                                                                  direct):
    from hopgate.model_export.exemplars import retrieve

    images, labels = fashion.images[:1000], fashion.labels[:1000].copy()
    labels[:300] = (labels[:300] + 1) % 10  # wrong labels: never an exemplar of that class
    best, classes = retrieve(BUNDLE, images, labels, load_meta(BUNDLE), per_memory=3)
    out = direct(images)
    right = ~out["is_ood"] & (out["pred_class"] == labels)
    assert sum(map(len, best)) > 150
    for mem, picks in enumerate(best):
        assert all(labels[i] == classes[mem] for i in picks)
        weight = {i: w for i in np.flatnonzero(right)
                  for m, w in zip(out["memory_index"][i], out["memory_weight"][i]) if m == mem}
        rest = [w for i, w in weight.items() if i not in picks]
        if picks and rest:
            assert min(weight[i] for i in picks) >= max(rest)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))[..., None]


def test_the_exemplar_step_upgrades_a_bundle_in_place_within_its_budget(tmp_path, fashion,
                                                                         direct):
    from hopgate.model_export import exemplars

    path = tmp_path / "b.onnx"
    shutil.copy(BUNDLE, path)
    before = onnx.load(str(path)).graph.SerializeToString()
    images, labels = fashion.images[:1500], fashion.labels[:1500]
    found = exemplars.exemplars(path, images, labels, "test", per_memory=3, max_bytes=60_000)
    counts = [len(t) for t in found.images]
    assert sum(len(t) for m in found.images for t in m) <= 60_000
    assert 1 <= max(counts) < 3  # the budget cut the depth...
    best, _ = exemplars.retrieve(path, images, labels, load_meta(path), per_memory=3)
    for got, could in zip(counts, best):  # ...round by round: no memory left behind
        assert min(len(could), max(counts) - 1) <= got <= len(could)
    for mem, thumbs in enumerate(found.images):  # each one an ID image of its memory's class
        if thumbs:
            out = direct(np.stack([_pixels(t) for t in thumbs]))
            assert not out["is_ood"].any() and (out["pred_class"] == found.classes[mem]).all()
            assert all(mem in row for row in out["memory_index"])
    exemplars.write(path, found)
    assert onnx.load(str(path)).graph.SerializeToString() == before  # the graph untouched
    meta = load_meta(path)
    assert meta.exemplars is not None and meta.exemplars.source == "test"
    assert {k: v for k, v in _props(path).items() if k != "hopgate.exemplars"} == {
        k: v for k, v in _props(BUNDLE).items() if k != "hopgate.exemplars"}


@pytest.mark.slow
def test_the_build_ends_with_the_exemplar_step(quick_build):
    cfg, report = quick_build
    assert report["exemplars"]["thumbnails"] > 0 and report["exemplars"]["bytes"] < 2_000_000
    meta = load_meta(cfg.output)
    assert meta.exemplars is not None and "train" in meta.exemplars.source
    assert sum(map(len, meta.exemplars.images)) == report["exemplars"]["thumbnails"]
