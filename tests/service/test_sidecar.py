"""The transparent sidecar (service/sidecar/proxy.py): an unchanged client of a stub classifier,
once through hopgate in enforce mode and once in shadow mode (integration: real servers on
loopback), then the upstream failure policy and the request counting in process (fast)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from conftest import encode, in_process, serve
from prometheus_client.parser import text_string_to_metric_families

STUB_TYPE = "application/vnd.stub.prediction+json; charset=utf-8"


class Stub:
    """A classifier on a loopback port with its own path (/predict) and content type; it
    records every request it receives."""

    def __init__(self):
        self.seen: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                stub.seen.append({"path": self.path, "type": self.headers.get("content-type"),
                                  "body": body, "auth": self.headers.get("authorization"),
                                  "rid": self.headers.get("x-request-id")})
                if not self.path.startswith("/predict"):
                    self.send_response(404)
                    self.end_headers()
                    return
                answer = json.dumps({"label": "sneaker", "bytes": len(body)}).encode()
                self.send_response(201)
                self.send_header("content-type", STUB_TYPE)
                self.send_header("x-stub", "yes")
                self.send_header("x-hopgate-ood", "spoofed")  # never passed back
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def images(fashion, direct):
    """An ID Fashion-MNIST PNG (well inside the calibration) and an OOD one (noise)."""
    out = direct(fashion.images[:200])
    i = int(np.argmax(out["score"]))
    assert not out["is_ood"][i]
    noise = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    ood = np.flatnonzero(direct(noise)["is_ood"])
    assert ood.size, "noise should be OOD for the default bundle"
    return encode(fashion.images[i]), encode(noise[int(ood[0])])


def samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def multipart(image: bytes) -> tuple[bytes, str]:
    boundary = "stubboundary42"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n3\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + image + (
            f"\r\n--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.integration
def test_unchanged_client_enforce(tmp_path, images):
    id_png, ood_png = images
    stub = Stub()
    try:
        with serve(tmp_path, upstream_url=stub.url + "/predict", proxy_routes='["/predict"]',
                   gate_ood_status=403, gate_ood_body='{"blocked": true}') as s, \
                s.client() as c:
            scored = c.post("/score", content=id_png, headers={"content-type": "image/png"}).json()
            version, result = scored["model"]["version"], scored["results"][0]
            stub.seen.clear()  # /score's own forward
            # an ID image: the classifier's answer unchanged, plus the verdict headers
            r = c.post("/predict?top=3", content=id_png,
                       headers={"content-type": "image/png", "authorization": "Bearer cls"})
            assert r.status_code == 201 and r.headers["content-type"] == STUB_TYPE
            assert r.json() == {"label": "sneaker", "bytes": len(id_png)}
            assert r.headers["x-stub"] == "yes"
            assert r.headers["x-hopgate-ood"] == "false"
            assert float(r.headers["x-hopgate-score"]) == pytest.approx(result["score"])
            assert float(r.headers["x-hopgate-p-value"]) == pytest.approx(result["p_value"])
            assert r.headers["x-hopgate-model-version"] == version
            assert stub.seen == [{"path": "/predict?top=3", "type": "image/png", "body": id_png,
                                  "auth": "Bearer cls", "rid": r.headers["x-request-id"]}]
            # an OOD image: the configured refusal; the classifier never sees it
            r = c.post("/predict", content=ood_png, headers={"content-type": "image/png"})
            assert r.status_code == 403 and r.json()["blocked"] is True
            assert r.json()["results"][0]["held_back"] is True
            assert r.headers["x-hopgate-ood"] == "true"
            assert len(stub.seen) == 1
            # multipart: the body goes on byte for byte, parts with their own types
            body, ctype = multipart(id_png)
            r = c.post("/predict", content=body, headers={"content-type": ctype})
            assert r.status_code == 201 and r.headers["x-hopgate-ood"] == "false"
            assert stub.seen[-1]["body"] == body and stub.seen[-1]["type"] == ctype
            assert stub.seen[-1]["path"] == "/predict"  # the path as sent: no stray "?"
            body, ctype = multipart(ood_png)
            assert c.post("/predict", content=body,
                          headers={"content-type": ctype}).status_code == 403
            # JSON with base64 images anywhere in it
            doc = {"instances": [{"b64": base64.b64encode(id_png).decode()}]}
            r = c.post("/predict", json=doc)
            assert r.status_code == 201 and json.loads(stub.seen[-1]["body"]) == doc
            doc = {"instances": [{"b64": base64.b64encode(ood_png).decode()}]}
            assert c.post("/predict", json=doc).status_code == 403
            # no image in the body: refused unscored; a method not proxied: 405
            r = c.post("/predict", content=b"hello", headers={"content-type": "text/plain"})
            assert r.status_code == 415 and r.json()["error"]["reason"] == "bad_input"
            assert c.get("/predict").status_code == 405
            assert len(stub.seen) == 3
            m = samples(c.get("/metrics").text)
        log = [json.loads(line) for line in s.log.read_text().splitlines()
               if '"hopgate.access"' in line]
    finally:
        stub.close()
    proxied = {k[1]: v for k, v in m.items() if k[0] == "hopgate_proxied_requests_total"}
    assert proxied[(("mode", "enforce"), ("verdict", "id"))] == 3
    assert proxied[(("mode", "enforce"), ("verdict", "ood"))] == 3
    assert proxied[(("mode", "enforce"), ("verdict", "unscored"))] == 1
    assert m[("hopgate_requests_total", (("reason", "ood"), ("status", "403")))] == 3
    assert m[("hopgate_requests_total", (("reason", "method_not_allowed"),
                                         ("status", "405")))] == 1
    lines = [x for x in log if x.get("path") == "/predict"]
    assert [x["verdict"] for x in lines[:2]] == ["id", "ood"]
    assert all(x["model_version"] == version for x in lines)


@pytest.mark.integration
def test_shadow_mode_forwards_everything_and_labels_it(tmp_path, images):
    id_png, ood_png = images
    stub = Stub()
    try:
        with serve(tmp_path, upstream_url=stub.url + "/predict", proxy_routes='["/predict"]',
                   gate_mode="shadow") as s, s.client() as c:
            labels = []
            broken = b"\x89PNG\r\n\x1a\nbroken"  # a PNG's magic, then nothing decodable
            for blob, ctype in [(id_png, "image/png"), (ood_png, "image/png"),
                                (b"hello", "text/plain"), (broken, "image/png")]:
                r = c.post("/predict", content=blob, headers={"content-type": ctype})
                assert r.status_code == 201 and r.headers["content-type"] == STUB_TYPE
                labels.append(r.headers["x-hopgate-ood"])
            m = samples(c.get("/metrics").text)
    finally:
        stub.close()
    assert labels == ["false", "true", "unscored", "unscored"]
    assert [x["body"] for x in stub.seen] == [id_png, ood_png, b"hello", broken]
    proxied = {k[1]: v for k, v in m.items() if k[0] == "hopgate_proxied_requests_total"}
    assert proxied == {(("mode", "shadow"), ("verdict", "id")): 1,
                       (("mode", "shadow"), ("verdict", "ood")): 1,
                       (("mode", "shadow"), ("verdict", "unscored")): 2}
    assert m[("hopgate_upstream_held_back_total", ())] == 0


# --- in process: the upstream answered by httpx.MockTransport ------------------------------

class _Body(httpx.AsyncByteStream):  # a streamed body, as from the network (not pre-read)
    async def __aiter__(self):
        yield b"classifier says no"


def _answering(status: int):
    def handler(request: httpx.Request) -> httpx.Response:
        if status == 0:
            raise httpx.ConnectError("refused")
        return httpx.Response(status, stream=_Body(), headers={"content-type": "text/plain"})
    return httpx.MockTransport(handler)


@pytest.mark.anyio
@pytest.mark.parametrize("policy,upstream,status,body,reason", [
    ("fail_closed", 500, 502, None, "upstream"),
    ("fail_open", 500, 500, b"classifier says no", "upstream"),
    ("fail_closed", 0, 502, None, "upstream"), ("fail_open", 0, 502, None, "upstream"),
    ("fail_closed", 400, 400, b"classifier says no", "bad_input"),
    ("fail_closed", 404, 404, b"classifier says no", "not_found")])
async def test_upstream_failure_policy(images, policy, upstream, status, body, reason):
    """The policy, and the reason each answer is counted under (the classifier's own 4xx
    passed on are client errors: a 404 is ``not_found`` like any other)."""
    async with in_process(upstream_url="http://up/predict", proxy_routes=["/predict"],
                          upstream_policy=policy) as c:
        gate = c.app.state.gate
        await gate.client.aclose()
        gate.client = httpx.AsyncClient(transport=_answering(upstream))
        r = await c.post("/predict", content=images[0], headers={"content-type": "image/png"})
        assert r.status_code == status
        if body is None:
            assert r.json()["error"]["reason"] == "upstream"
        else:
            assert r.content == body and r.headers["x-hopgate-ood"] == "false"
        m = samples((await c.get("/metrics")).text)
    errors = sum(v for k, v in m.items() if k[0] == "hopgate_upstream_errors_total")
    assert errors == (0 if 0 < upstream < 500 else 1)
    assert m[("hopgate_requests_total", (("reason", reason), ("status", str(status))))] == 1


@pytest.mark.anyio
async def test_client_errors_are_counted_as_client_errors(anyio_backend):
    async with in_process() as c:
        await c.get("/score")  # 405
        await c.get("/v2/models/nope")  # 404 (a V2 route's own answer)
        await c.post("/score", content=b"junk", headers={"content-type": "image/png"})  # 415
        m = samples((await c.get("/metrics")).text)
    reqs = {k[1]: v for k, v in m.items() if k[0] == "hopgate_requests_total"}
    assert reqs == {(("reason", "method_not_allowed"), ("status", "405")): 1,
                    (("reason", "not_found"), ("status", "404")): 1,
                    (("reason", "bad_input"), ("status", "415")): 1}


@pytest.mark.anyio
async def test_score_gate_forwards_each_multipart_item_with_its_own_type(images):
    import io

    from PIL import Image

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["content-type"])
        return httpx.Response(200, json={"label": "x"})

    jpeg = io.BytesIO()
    Image.open(io.BytesIO(images[0])).save(jpeg, "JPEG", quality=95)  # the ID image again
    async with in_process(upstream_url="http://up/predict") as c:
        gate = c.app.state.gate
        await gate.client.aclose()
        gate.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        r = await c.post("/score", files=[("images", ("a.png", images[0], "image/png")),
                                          ("images", ("b.jpg", jpeg.getvalue(), "image/jpeg"))])
    assert r.status_code == 200 and all(x["ood"] is False for x in r.json()["results"])
    assert sorted(seen) == ["image/jpeg", "image/png"]  # not application/octet-stream
