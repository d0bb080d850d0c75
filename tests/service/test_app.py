"""The app in process (fast tier): httpx's ASGI transport, the lifespan run, the committed
bundle models/default.onnx, no torch and no dataset. Each documented behaviour of /score,
the error body, readiness, the API key, the metrics, V2 and the gate."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest
from conftest import in_process
from inputs import corpus, documented_statuses, encode, send, synthetic
from prometheus_client.parser import text_string_to_metric_families

from hopgate.service.imaging import decode
from hopgate.service.schema import ScoreResponse

pytestmark = pytest.mark.anyio
IMAGES = synthetic(16, seed=1)
PNGS = [encode(a) for a in IMAGES]


async def post_image(c: httpx.AsyncClient, blob: bytes, ctype: str = "image/png", **headers):
    return await c.post("/score", content=blob, headers={"content-type": ctype, **headers})


def pixels(blob: bytes) -> np.ndarray:
    return decode(blob, 28, 28, 1)


async def test_one_image_matches_the_bundle_and_the_schema(app_client, direct):
    r = await post_image(app_client, PNGS[0])
    assert r.status_code == 200, r.text
    doc = r.json()
    ScoreResponse.model_validate(doc)  # the documented schema is what came back
    assert set(doc) == {"results", "model"}
    res = doc["results"][0]
    assert "error" not in res and "upstream" not in res and "held_back" not in res
    ref = direct(pixels(PNGS[0])[None])
    assert res["score"] == pytest.approx(float(ref["score"][0]), rel=1e-5)
    assert res["ood"] is bool(ref["is_ood"][0])
    assert res["predicted_class"] == int(ref["pred_class"][0])
    assert res["label"] == doc["model"]["classes"][res["predicted_class"]]
    assert res["threshold"] == doc["model"]["threshold"] and 0 < res["p_value"] <= 1
    assert (res["memories"] == []) is res["ood"]
    assert set(res["timings"]) == {"queue_ms", "compute_ms", "batch_size"}
    assert r.headers["x-request-id"]


async def test_many_in_one_request_equal_singles_in_every_body_form(app_client, direct):
    files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(PNGS)]
    many = (await app_client.post("/score", files=files)).json()["results"]
    as_json = (await app_client.post("/score", json={
        "images": [base64.b64encode(b).decode() for b in PNGS]})).json()["results"]
    singles = await asyncio.gather(*(post_image(app_client, b) for b in PNGS))
    ref = direct(np.stack([pixels(b) for b in PNGS]))
    assert len(many) == len(as_json) == 16
    for i, (m, j, s) in enumerate(zip(many, as_json, singles)):
        s = s.json()["results"][0]
        for r in (m, j):
            assert r["ood"] == s["ood"] and r["predicted_class"] == s["predicted_class"]
            assert r["score"] == pytest.approx(s["score"], rel=1e-5)
            assert [x["index"] for x in r["memories"]] == [x["index"] for x in s["memories"]]
        assert s["score"] == pytest.approx(float(ref["score"][i]), rel=1e-5)


async def test_malformed_corpus_gets_the_documented_status_and_error_shape(app_client):
    cases = corpus(IMAGES[2])
    assert documented_statuses() == {name: status for name, _, _, status in cases}
    good = (await post_image(app_client, PNGS[2])).json()["results"][0]["score"]
    for name, ctype, body, status in cases:
        r = await send(app_client, ctype, body)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
        if status != 200:
            doc = r.json()
            err = doc["results"][0]["error"] if "results" in doc else doc["error"]
            assert set(err) == {"status", "reason", "message"}, name
            assert err["status"] == status and err["message"], name
            if "results" not in doc:
                assert set(doc) == {"error"}, name
        after = await post_image(app_client, PNGS[2])
        assert after.json()["results"][0]["score"] == pytest.approx(good, rel=1e-6), name


async def test_a_bad_image_fails_alone(app_client):
    files = [("images", ("a.png", PNGS[0], "image/png")),
             ("images", ("b.png", b"not an image", "image/png")),
             ("images", ("c.png", PNGS[1], "image/png")),
             ("images", ("d.png", PNGS[2][:40], "image/png"))]
    r = await app_client.post("/score", files=files)
    assert r.status_code == 200
    res = r.json()["results"]
    assert res[1] == {"error": {"status": 415, "reason": "bad_input", "message": res[1]["error"][
        "message"]}}
    assert res[3]["error"]["status"] == 422 and "score" in res[0] and "score" in res[2]
    r = await app_client.post("/score", files=[("images", ("x.png", b"nope", "image/png"))])
    assert r.status_code == 415  # every image failed: the request gets its status


async def test_deadline_header(app_client):
    r = await post_image(app_client, PNGS[0], **{"x-hopgate-deadline-ms": "abc"})
    assert r.status_code == 400 and r.json()["error"]["reason"] == "bad_input"
    r = await post_image(app_client, PNGS[0], **{"x-hopgate-deadline-ms": "0.0001"})
    assert r.status_code == 504 and r.json()["results"][0]["error"]["reason"] == "deadline"
    r = await post_image(app_client, PNGS[0], **{"x-hopgate-deadline-ms": "1e12"})
    assert r.status_code == 200


async def test_framework_errors_share_the_one_error_shape(app_client):
    app = app_client.app

    @app.get("/_probe/{n}")
    async def probe(n: int) -> dict:
        return {"n": n}

    for method, path, status, reason in [("GET", "/nope", 404, "not_found"),
                                         ("GET", "/score", 405, "method_not_allowed"),
                                         ("GET", "/_probe/abc", 422, "bad_input")]:
        r = await app_client.request(method, path)
        assert r.status_code == status, path
        err = r.json()["error"]
        assert err["status"] == status and err["reason"] == reason and err["message"], path
    # V2 keeps the protocol's own shape, for the framework's errors too
    r = await app_client.get("/v2/models/nope")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = await app_client.get("/v2/models/default/infer")
    assert r.status_code == 405 and isinstance(r.json()["error"], str)


async def test_openapi_documents_the_response_that_is_sent(app_client):
    doc = (await app_client.get("/openapi.json")).json()
    op = doc["paths"]["/score"]["post"]
    assert {"image/png", "multipart/form-data", "application/json"} <= set(
        op["requestBody"]["content"])
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ScoreResponse")
    result = doc["components"]["schemas"]["ImageResult"]["properties"]
    assert {"ood", "score", "threshold", "p_value", "predicted_class", "label", "memories",
            "error", "upstream", "held_back"} <= set(result)


async def test_v2_infer_uint8_and_bytes_match_score(app_client):
    imgs = np.stack([pixels(b) for b in PNGS[:4]])
    r = await app_client.post("/v2/models/default/infer", json={"inputs": [
        {"name": "images", "datatype": "UINT8", "shape": list(imgs.shape),
         "data": imgs.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    out = {o["name"]: o["data"] for o in r.json()["outputs"]}
    r2 = await app_client.post("/v2/models/default/infer", json={"inputs": [
        {"name": "image_bytes", "datatype": "BYTES", "shape": [4],
         "parameters": {"base64": True}, "data": [base64.b64encode(b).decode()
                                                  for b in PNGS[:4]]}],
        "outputs": [{"name": "score"}]})
    singles = [(await post_image(app_client, b)).json()["results"][0] for b in PNGS[:4]]
    np.testing.assert_allclose(out["score"], [s["score"] for s in singles], rtol=1e-5)
    np.testing.assert_allclose(r2.json()["outputs"][0]["data"], out["score"], rtol=1e-5)
    np.testing.assert_allclose(out["p_value"], [s["p_value"] for s in singles], rtol=1e-5)
    bad = await app_client.post("/v2/models/default/infer", content=b"{nope")
    assert bad.status_code == 400 and bad.json()["error"].startswith("bad V2 request")


async def test_metrics_count_what_was_sent(anyio_backend):
    async with in_process() as c:
        ok = [await post_image(c, PNGS[i]) for i in range(5)]
        bad = [await post_image(c, b"junk") for _ in range(3)]
        multi = await c.post("/score", files=[("images", ("a.png", PNGS[i], "image/png"))
                                              for i in range(4)])
        await c.get("/nope")  # not counted: not a scoring path
        text = (await c.get("/metrics")).text
    assert all(r.status_code == 200 for r in [*ok, multi])
    assert all(r.status_code == 415 for r in bad)
    samples = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            samples[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    assert samples[("hopgate_requests_total", (("reason", "ok"), ("status", "200")))] == 6
    assert samples[("hopgate_requests_total", (("reason", "bad_input"), ("status", "415")))] == 3
    assert samples[("hopgate_request_seconds_count", ())] == 9
    verdicts = sum(v for (n, lab), v in samples.items() if n == "hopgate_images_total"
                   and dict(lab)["verdict"] in ("id", "ood"))
    assert verdicts == 9


async def test_readiness_and_draining(anyio_backend):
    async with in_process() as c:
        app = c.app
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.get("/v2/health/ready")).status_code == 200
        app.state.draining = True  # what cli.DrainingServer does on SIGTERM
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"ready": False, "draining": True}
        assert (await c.get("/v2/health/ready")).status_code == 503
        r = await post_image(c, PNGS[0])
        assert r.status_code == 503 and r.json()["error"]["reason"] == "shutdown"
        assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
        r = await c.post("/v2/models/default/infer", json={"inputs": []})
        assert r.status_code == 503 and r.json() == {"error": "shutting down"}
        assert (await c.get("/healthz")).status_code == 200
    assert not app.state.ready  # the lifespan's shutdown ran


async def test_api_key(anyio_backend):
    async with in_process(api_key="s3cret") as c:
        r = await post_image(c, PNGS[0])
        assert r.status_code == 401
        assert r.json() == {"error": {"status": 401, "reason": "unauthorized",
                                      "message": "missing or wrong API key"}}
        assert (await post_image(c, PNGS[0], **{"x-api-key": "nope"})).status_code == 401
        assert (await post_image(c, PNGS[0], authorization="Bearer s3cret")).status_code == 200
        r = await c.get("/v2/models/default")
        assert r.status_code == 401 and r.json() == {"error": "missing or wrong API key"}
        for path in ("/healthz", "/livez", "/readyz", "/metrics", "/v2/health/ready"):
            assert (await c.get(path)).status_code == 200, path
        assert (await c.get("/livez")).json() == {"status": "ok"}
        assert (await c.get("/openapi.json")).status_code == 401  # only the probes are open


async def test_queue_full_is_rejected_at_once(anyio_backend):
    async with in_process(queue_images=4, reject_status=429) as c:
        files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(PNGS[:5])]
        r = await c.post("/score", files=files)  # 5 images never fit a queue of 4
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["reason"] == "queue_full"
        assert (await post_image(c, PNGS[0])).status_code == 200


# --- the gate, with the upstream answered in process ------------------------------------

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # W3C, or not forwarded


def _upstream(calls: list) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("traceparent"))
        return httpx.Response(200, json={"label": "x", "bytes": len(request.content)})
    return httpx.MockTransport(answer)


async def test_gate_forwards_id_and_holds_back_ood(anyio_backend, direct):
    ref = direct(np.stack([pixels(b) for b in PNGS]))
    assert ref["is_ood"].any() and not ref["is_ood"].all(), "the synthetic set needs both"
    id_i, ood_i = int(np.flatnonzero(~ref["is_ood"])[0]), int(np.flatnonzero(ref["is_ood"])[0])
    calls: list = []
    async with in_process(upstream_url="http://upstream/predict", gate_ood_status=403,
                          gate_ood_body='{"blocked": true}') as c:
        gate = c.app.state.gate
        await gate.client.aclose()
        gate.client = httpx.AsyncClient(transport=_upstream(calls))
        r = await post_image(c, PNGS[id_i], traceparent=TRACEPARENT)
        assert r.status_code == 200
        res = r.json()["results"][0]
        assert res["upstream"] == {"status": 200, "body": {"label": "x",
                                                           "bytes": len(PNGS[id_i])}}
        ScoreResponse.model_validate(r.json())
        r = await post_image(c, PNGS[ood_i])
        assert r.status_code == 403 and r.json()["blocked"] is True
        assert r.json()["results"][0]["held_back"] is True and "upstream" not in r.json()[
            "results"][0]
    assert calls == [TRACEPARENT]  # the OOD image never reached the upstream


async def test_gate_fail_closed_when_upstream_down(anyio_backend):
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with in_process(upstream_url="http://upstream/predict",
                          upstream_policy="fail_closed") as c:
        gate = c.app.state.gate
        await gate.client.aclose()
        gate.client = httpx.AsyncClient(transport=httpx.MockTransport(down))
        files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(PNGS[:8])]
        r = await c.post("/score", files=files)
        doc = r.json()
        assert any(not res["ood"] for res in doc["results"])  # something was forwarded
        assert r.status_code == 502 and doc["error"]["reason"] == "upstream"
        assert "unreachable" in doc["error"]["message"]
        ScoreResponse.model_validate(doc)
