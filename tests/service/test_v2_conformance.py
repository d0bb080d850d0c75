"""V2 conformance (issue 17), through tritonclient's HTTP client against a real hopgate-serve
on loopback: health, server and model metadata, model config with the class names, infer
with binary tensors and with plain JSON (BYTES as base64 strings), both inputs at once, the
class_name output, a per-request threshold, unknown model / version errors the client
decodes, the repository (index, load = reload, unload refused) and statistics."""

from __future__ import annotations

import base64
import json
import shutil

import httpx
import numpy as np
import pytest
import tritonclient.http as tc
from bundles import relabelled
from conftest import BUNDLE, Server
from inputs import encode, synthetic
from tritonclient.utils import InferenceServerException

from hopgate.bundle import load_meta
from hopgate.service.server.local import local_server

pytestmark = pytest.mark.integration
META = load_meta(BUNDLE)
IMAGES = synthetic(4, seed=7)
PNGS = [encode(a) for a in IMAGES]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A server on a copy of the default bundle (the load test replaces it)."""
    tmp = tmp_path_factory.mktemp("v2")
    model = tmp / "model.onnx"
    shutil.copyfile(BUNDLE, model)
    with local_server(tmp, model, intra_op_threads=1, buckets="[1,2,4,8]") as s:
        server = Server(s)
        server.model = model  # type: ignore[attr-defined]
        yield server


@pytest.fixture(scope="module")
def client(live):
    return tc.InferenceServerClient(f"127.0.0.1:{live.port}")


def _bytes_input(pngs: list[bytes], binary: bool) -> tc.InferInput:
    inp = tc.InferInput("image_bytes", [len(pngs)], "BYTES")
    data = pngs if binary else [base64.b64encode(p) for p in pngs]  # JSON: base64 strings
    inp.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return inp


def _pixels_input(images: np.ndarray) -> tc.InferInput:
    inp = tc.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images, binary_data=True)
    return inp


def test_health_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("default")
    assert client.is_model_ready("default", META.model_version)
    meta = client.get_server_metadata()
    assert {"binary_tensor_data", "model_repository", "statistics"} <= set(meta["extensions"])


def test_metadata_describes_what_can_be_sent(client):
    """Both inputs the metadata lists can be sent, alone or together."""
    meta = client.get_model_metadata("default")
    assert meta["versions"] == [META.model_version]
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert set(inputs) == {"image_bytes", "images"}
    assert "class_name" in {o["name"] for o in meta["outputs"]}
    both = [_bytes_input(PNGS[:2], True), _pixels_input(IMAGES[2:])]
    res = client.infer("default", both)
    alone = client.infer("default", [_pixels_input(IMAGES)])
    np.testing.assert_allclose(res.as_numpy("score"), alone.as_numpy("score"), rtol=1e-5)
    names = [META.class_names[c] for c in alone.as_numpy("pred_class")]
    assert [n.decode() for n in res.as_numpy("class_name")] == names


def test_config_names_the_classes_and_threshold_bounds(client):
    cfg = client.get_model_config("default")
    params = cfg["parameters"]
    assert json.loads(params["class_names"]["string_value"]) == META.class_names
    assert json.loads(params["log_lambda_range"]["string_value"]) == [
        META.score_quantiles[0], META.score_quantiles[-1]]
    assert {i["name"]: i["optional"] for i in cfg["input"]} == {"image_bytes": True,
                                                                "images": True}


def test_binary_and_json_answer_alike(client):
    outs = [tc.InferRequestedOutput(n, binary_data=b)
            for n, b in (("score", True), ("class_name", False), ("p_value", True))]
    binary = client.infer("default", [_bytes_input(PNGS, True)], outputs=outs)
    plain = client.infer("default", [_bytes_input(PNGS, False)],
                         outputs=[tc.InferRequestedOutput(n, binary_data=False)
                                  for n in ("score", "class_name", "p_value")])
    np.testing.assert_allclose(binary.as_numpy("score"), plain.as_numpy("score"), rtol=1e-6)
    np.testing.assert_allclose(binary.as_numpy("p_value"), plain.as_numpy("p_value"),
                               rtol=1e-6)
    assert list(binary.as_numpy("class_name")) == list(plain.as_numpy("class_name"))


def test_json_bytes_that_are_no_image_name_the_parameter(live):
    doc = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                       "data": ["not an image at all"]}]}
    r = httpx.post(f"{live.url}/v2/models/default/infer", json=doc)
    assert r.status_code == 400 and "parameters.base64" in r.json()["error"]
    raw = {"inputs": [{**doc["inputs"][0], "data": [PNGS[0].decode("latin-1")],
                       "parameters": {"base64": False}}]}
    assert httpx.post(f"{live.url}/v2/models/default/infer", json=raw).status_code == 200


def test_a_threshold_through_the_parameters(client, fashion):
    ins = [_pixels_input(fashion.images[:16])]  # ID images
    hi = client.infer("default", ins, parameters={"log_lambda": META.score_quantiles[-1]})
    lo = client.infer("default", ins, parameters={"target_tpr": 0.9998})
    assert hi.as_numpy("is_ood").all() and not lo.as_numpy("is_ood").any()
    with pytest.raises(InferenceServerException, match=r"target_tpr 1\.5 is outside"):
        client.infer("default", ins, parameters={"target_tpr": 1.5})


def test_unknown_model_and_version_are_404s_the_client_decodes(client, live):
    ins = [_pixels_input(IMAGES[:1])]
    with pytest.raises(InferenceServerException, match="unknown version '999'") as e:
        client.infer("default", ins, model_version="999")
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException, match="unknown version"):
        client.get_model_metadata("default", "999")
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_inference_statistics("nope")
    with pytest.raises(InferenceServerException, match="Not Found"):  # no such V2 route
        client.get_log_settings()
    r = httpx.get(f"{live.url}/v2/models/default/versions/999")
    assert r.status_code == 404 and set(r.json()) == {"error"}
    r = httpx.get(f"{live.url}/v2/nothing/here")
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_statistics_count_what_was_scored(client):
    before = client.get_inference_statistics("default")["model_stats"][0]
    client.infer("default", [_pixels_input(IMAGES)])
    after = client.get_inference_statistics("default", META.model_version)["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + len(IMAGES)
    assert after["inference_stats"]["success"]["count"] == (
        before["inference_stats"]["success"]["count"] + 1)
    assert client.get_inference_statistics()["model_stats"][0]["name"] == "default"


def test_repository_index_load_and_unload(client, live):
    index = client.get_model_repository_index()
    assert index == [{"name": "default", "version": META.model_version, "state": "READY",
                      "reason": ""}]
    with pytest.raises(InferenceServerException, match="unload is not supported"):
        client.unload_model("default")
    with pytest.raises(InferenceServerException, match="load takes no parameters"):
        client.load_model("default", config="{}")
    new = relabelled(BUNDLE, live.model, "Z")
    client.load_model("default")  # the reload: the next requests are scored by the new one
    assert client.get_model_metadata("default")["versions"] == [new]
    res = client.infer("default", [_pixels_input(IMAGES[:1])], model_version=new)
    assert res.get_response()["model_version"] == new
    r = httpx.post(f"{live.url}/score", content=PNGS[0], headers={"content-type": "image/png"})
    assert r.headers["x-hopgate-model-version"] == new == r.json()["model"]["version"]
    with pytest.raises(InferenceServerException, match="unknown version"):
        client.infer("default", [_pixels_input(IMAGES[:1])], model_version=META.model_version)
    assert client.get_model_repository_index()[0]["version"] == new
