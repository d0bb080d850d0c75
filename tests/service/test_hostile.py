"""Issue 14, client mistakes and correctness (fast tier, the app in process): every client
mistake is a 4xx naming the problem (that image alone where a request has several), anything
else a counted, logged 500 that leaks nothing; the gate's policy and header hygiene; the
API key's scheme; the request id's cap; the bundle checked against its graph."""

from __future__ import annotations

import base64
import json
import logging
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import BUNDLE, in_process
from hostile import V2, deep_json, rational_strip_offsets_tiff, v2_cases
from inputs import encode, synthetic
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.anyio
PNGS = [encode(a) for a in synthetic(3, seed=5)]
PNG = {"content-type": "image/png"}


def counts(text: str) -> dict[tuple[str, str], float]:
    return {(s.labels["status"], s.labels["reason"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "hopgate_requests_total"}


async def score_of(c: httpx.AsyncClient) -> float:
    r = await c.post("/score", content=PNGS[0], headers=PNG)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["score"]


async def test_score_json_nested_1000_deep_is_400(app_client):
    before = await score_of(app_client)
    r = await app_client.post("/score", content=deep_json(),
                              headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    assert await score_of(app_client) == before


async def test_v2_client_mistakes_are_400s_naming_the_problem(app_client):
    before = await score_of(app_client)
    for name, kwargs, status, word in v2_cases(PNGS[0]):
        r = await app_client.post(V2, **kwargs)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
        msg = r.json()["error"]
        assert isinstance(msg, str) and word in msg, f"{name}: {msg}"
        assert len(msg) < 400 and " at 0x" not in msg, name
    assert await score_of(app_client) == before
    text = (await app_client.get("/metrics")).text
    assert not [k for k in counts(text) if k[0] == "500"]


async def test_v2_bytes_element_2_62_never_allocates(app_client):
    import tracemalloc

    tracemalloc.start()
    r = await app_client.post(V2, json={"inputs": [{"name": "b", "datatype": "BYTES",
                                                    "shape": [1], "data": [2**62]}]})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert r.status_code == 400 and peak < 50_000_000


async def test_v2_good_requests_still_work_nested_and_binary(app_client):
    img = np.zeros((2, 28, 28, 1), np.uint8)
    flat = await app_client.post(V2, json={"inputs": [{
        "name": "images", "datatype": "UINT8", "shape": [2, 28, 28, 1],
        "data": img.reshape(-1).tolist()}], "outputs": [{"name": "score"}]})
    nested = await app_client.post(V2, json={"inputs": [{
        "name": "images", "datatype": "UINT8", "shape": [2, 28, 28, 1], "data": img.tolist()}],
        "outputs": [{"name": "score", "parameters": {"binary_data": False}}]})
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                     "shape": [2, 28, 28, 1],
                                     "parameters": {"binary_data_size": img.size}}]}).encode()
    binary = await app_client.post(V2, content=header + img.tobytes(), headers={
        "inference-header-content-length": str(len(header))})
    assert flat.status_code == nested.status_code == binary.status_code == 200, binary.text
    assert flat.json()["outputs"] == nested.json()["outputs"]
    got = {o["name"]: o["data"] for o in binary.json()["outputs"]}
    assert got["score"] == flat.json()["outputs"][0]["data"]


async def test_the_rational_strip_offsets_tiff_fails_alone_with_422(app_client):
    tiff = rational_strip_offsets_tiff()
    assert len(tiff) < 2000
    r = await app_client.post("/score", content=tiff, headers={"content-type": "image/tiff"})
    assert r.status_code == 422, r.text
    files = [("images", ("a.png", PNGS[0], "image/png")), ("images", ("b.tif", tiff, "x")),
             ("images", ("c.png", PNGS[1], "image/png"))]
    res = (await app_client.post("/score", files=files)).json()["results"]
    assert "score" in res[0] and "score" in res[2]
    assert res[1]["error"]["status"] == 422 and "TIFF" in res[1]["error"]["message"]


async def test_decode_messages_carry_no_object_reprs(app_client):
    garbage = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    r = await app_client.post("/score", content=garbage, headers=PNG)
    assert r.status_code == 422 and " at 0x" not in r.text and "BytesIO" not in r.text


B64_PNG = base64.b64encode(PNGS[0]).decode()  # JSON BYTES: base64 (v2/request.py)


async def test_a_bug_is_a_counted_logged_500_that_leaks_nothing(anyio_backend, caplog,
                                                                 monkeypatch):
    async with in_process() as c:
        async def boom(*a, **k):
            raise RuntimeError("<_io.BytesIO object at 0x7f00deadbeef> /tmp/hopgate-secret")

        monkeypatch.setattr(c.app.state.scorer, "decode_all", boom)
        with caplog.at_level(logging.ERROR, logger="hopgate"):
            r = await c.post("/score", content=PNGS[0],
                             headers={**PNG, "x-request-id": "req-42"})
            r2 = await c.post(V2, json={"inputs": [{"name": "b", "datatype": "BYTES",
                                                    "shape": [1], "data": [B64_PNG]}]})
        text = (await c.get("/metrics")).text
    assert r.status_code == 500 and r.json() == {"error": {
        "status": 500, "reason": "internal", "message": "internal error"}}
    assert r2.status_code == 500 and r2.json() == {"error": "internal error"}
    assert counts(text)[("500", "internal")] == 2
    rec = [x for x in caplog.records if x.getMessage() == "unhandled error"]
    assert rec and rec[0].exc_info and rec[0].__dict__["request_id"] == "req-42"
    from hopgate.service.server.logs import JsonFormatter

    line = json.loads(JsonFormatter().format(rec[0]))
    assert line["request_id"] == "req-42" and "RuntimeError" in line["exc_info"]


async def test_a_server_side_os_error_is_a_500_without_its_path(anyio_backend, monkeypatch):
    """Was: a full or read-only temp directory answered 400 with the temp path. Multipart is
    parsed in memory now; any OSError of the server's is a 500 that names no path."""
    from hopgate.service import parsing

    def full(*a, **kw):
        raise OSError(28, "No space left on device", "/tmp/tmpab12cd/upload")

    monkeypatch.setattr(parsing, "_multipart", full)
    async with in_process() as c:
        r = await c.post("/score", files=[("images", ("a.png", PNGS[0], "image/png"))])
    assert r.status_code == 500 and "/tmp" not in r.text
    assert r.json()["error"]["reason"] == "internal"


async def test_request_id_is_capped_never_echoed_or_logged_whole(anyio_backend, caplog):
    huge = "a" * 100_000
    async with in_process(log_requests=True) as c:
        with caplog.at_level(logging.INFO, logger="hopgate.access"):
            r = await c.post("/score", content=PNGS[0], headers={**PNG, "x-request-id": huge})
            ok = await c.post("/score", content=PNGS[0], headers={**PNG, "x-request-id": "ab-1"})
            bad = await c.post("/score", content=PNGS[0],
                               headers={**PNG, "x-request-id": "a b\u00e9".encode("latin-1")})
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32
    assert ok.headers["x-request-id"] == "ab-1"
    assert bad.headers["x-request-id"] != "a b\u00e9"
    assert all(len(x.getMessage()) < 1000 for x in caplog.records)


async def test_api_key_scheme_and_the_docs(anyio_backend):
    async with in_process(api_key="s3cret") as c:
        async def status(path: str = "/score", **headers) -> int:
            if path == "/score":
                return (await c.post(path, content=PNGS[0], headers={**PNG, **headers})
                        ).status_code
            return (await c.get(path, headers=headers)).status_code

        assert await status(authorization="s3cret") == 401  # no scheme: no key
        assert await status(authorization="Basic s3cret") == 401
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert await status(authorization=f"{scheme} s3cret") == 200, scheme
        assert await status(**{"x-api-key": "s3cret"}) == 200
        for path in ("/docs", "/openapi.json"):  # protected like every non-probe path
            assert await status(path) == 401, path
            assert await status(path, authorization="Bearer s3cret") == 200, path


async def test_infer_request_model_is_in_the_openapi(app_client):
    doc = (await app_client.get("/openapi.json")).json()
    body = doc["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    schema = body["application/json"]["schema"]
    assert schema["required"] == ["inputs"]
    inp = schema["properties"]["inputs"]["items"]
    assert inp["properties"]["datatype"]["enum"] == ["BYTES", "UINT8"]
    assert "$ref" not in json.dumps(schema)


def test_bundle_disagreeing_with_its_graph_exits_with_one_message(tmp_path):
    import onnx

    from hopgate.bundle import BundleError
    from hopgate.service.runtime.session import Runtime

    model = onnx.load(str(BUNDLE))
    for p in model.metadata_props:
        if p.key == "hopgate.height":
            p.value = "32"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(BundleError, match="metadata says height 32"):
        Runtime(bad, ["CPUExecutionProvider"])
    shutil.copy(BUNDLE, tmp_path / "good.onnx")
    run = subprocess.run([sys.executable, "-m", "hopgate.service.server.cli", "--model", str(bad),
                          "--port", "1"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "Traceback" not in run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "metadata says height 32" in lines[0], run.stderr
