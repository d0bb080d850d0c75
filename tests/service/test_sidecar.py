"""The transparent sidecar (service/sidecar/proxy.py, passthrough.py): an unchanged client of a
stub classifier, once through hopgate in enforce mode and once in shadow mode; a classifier
with routes of its own (/predict, /healthz, /metrics, /v1/info) whose other routes pass
through the data port unchanged while hopgate's own answer on the admin port; a 20 MB
download and upload streamed through (integration: real servers on loopback); then shadow
mode against a classifier 500, the upstream failure policy with the verdict headers,
speculative mode and the request counting in process (fast)."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import encode, in_process, serve
from prometheus_client.parser import text_string_to_metric_families

STUB_TYPE = "application/vnd.stub.prediction+json; charset=utf-8"


def serve_in_thread(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """A stub HTTP server on a free loopback port, served from a daemon thread (its request
    threads are daemons too: ThreadingHTTPServer's default)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def stop(httpd: ThreadingHTTPServer) -> None:
    httpd.shutdown()
    httpd.server_close()


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

        self.httpd, self.url = serve_in_thread(Handler)

    def close(self):
        stop(self.httpd)


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
                s.client() as c, s.admin() as admin:
            scored = admin.post("/score", content=id_png,
                                headers={"content-type": "image/png"}).json()
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
            # no image in the body: refused unscored; a method not proxied goes to the
            # classifier unchanged (the stub has no GET: its own 501)
            r = c.post("/predict", content=b"hello", headers={"content-type": "text/plain"})
            assert r.status_code == 415 and r.json()["error"]["reason"] == "bad_input"
            assert len(stub.seen) == 3
            assert c.get("/predict").status_code == 501
            m = samples(admin.get("/metrics").text)
        log = [json.loads(line) for line in s.log.read_text().splitlines()
               if '"hopgate.access"' in line]
    finally:
        stub.close()
    proxied = {k[1]: v for k, v in m.items() if k[0] == "hopgate_proxied_requests_total"}
    assert proxied[(("mode", "enforce"), ("verdict", "id"))] == 3
    assert proxied[(("mode", "enforce"), ("verdict", "ood"))] == 3
    assert proxied[(("mode", "enforce"), ("verdict", "unscored"))] == 1
    assert m[("hopgate_requests_total", (("reason", "ood"), ("status", "403")))] == 3
    assert m[("hopgate_passthrough_requests_total", (("code", "5xx"),))] == 1
    lines = [x for x in log if x.get("path") == "/predict"]
    assert [x["verdict"] for x in lines[:2]] == ["id", "ood"]
    assert all(x["model_version"] == version for x in lines)


@pytest.mark.integration
def test_shadow_mode_forwards_everything_and_labels_it(tmp_path, images):
    id_png, ood_png = images
    stub = Stub()
    try:
        with serve(tmp_path, upstream_url=stub.url + "/predict", proxy_routes='["/predict"]',
                   gate_mode="shadow") as s, s.client() as c, s.admin() as admin:
            labels = []
            broken = b"\x89PNG\r\n\x1a\nbroken"  # a PNG's magic, then nothing decodable
            for blob, ctype in [(id_png, "image/png"), (ood_png, "image/png"),
                                (b"hello", "text/plain"), (broken, "image/png")]:
                r = c.post("/predict", content=blob, headers={"content-type": ctype})
                assert r.status_code == 201 and r.headers["content-type"] == STUB_TYPE
                labels.append(r.headers["x-hopgate-ood"])
            m = samples(admin.get("/metrics").text)
    finally:
        stub.close()
    assert labels == ["false", "true", "unscored", "unscored"]
    assert [x["body"] for x in stub.seen] == [id_png, ood_png, b"hello", broken]
    proxied = {k[1]: v for k, v in m.items() if k[0] == "hopgate_proxied_requests_total"}
    assert proxied == {(("mode", "shadow"), ("verdict", "id")): 1,
                       (("mode", "shadow"), ("verdict", "ood")): 1,
                       (("mode", "shadow"), ("verdict", "unscored")): 2}
    assert m[("hopgate_upstream_held_back_total", ())] == 0


# --- a classifier with routes of its own, behind the gate ------------------------------

ADMIN = 9901  # in process: the admin port is the one the request URL names
BIG = 20 * 1024 * 1024  # the streamed download


class Classifier:
    """A classifier on loopback (HTTP/1.1, keep-alive) with the routes real ones have:
    POST /predict (its status settable), GET /healthz, /metrics, /v1/info, /big (20 MB,
    chunked, made as it is sent), and POST /v1/echo (not proxied: answers what it got)."""

    def __init__(self, status: int = 200, delay: float = 0.0):
        self.seen: list[dict] = []
        self.status = status
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _answer(self, status, body, ctype="application/json", extra=()):
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _record(self, body=b""):
                stub.seen.append({"method": self.command, "path": self.path, "body": body,
                                  "headers": {k.lower(): v for k, v in self.headers.items()}})

            def do_GET(self):
                self._record()
                if self.path == "/big":
                    self.send_response(200)
                    self.send_header("content-type", "application/octet-stream")
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    block = b"\x5a" * (256 * 1024)
                    for _ in range(BIG // len(block)):
                        self.wfile.write(b"%x\r\n%b\r\n" % (len(block), block))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                answers = {"/healthz": b'{"ok": true}', "/metrics": b"classifier_up 1\n",
                           "/v1/info?verbose=1": b'{"name": "stub", "classes": 10}'}
                if self.path not in answers:
                    return self._answer(404, b'{"detail": "Not Found"}')
                ctype = "text/plain; version=0.0.4" if self.path == "/metrics" else \
                    "application/json"
                self._answer(200, answers[self.path], ctype, [("x-classifier", "stub")])

            def do_POST(self):
                n = int(self.headers.get("content-length", 0))
                body = self.rfile.read(n)
                self._record(body)
                if delay:
                    time.sleep(delay)
                if self.path.split("?")[0] == "/v1/echo":
                    return self._answer(207, body, self.headers.get("content-type", ""),
                                        [("x-echo-length", str(n))])
                if stub.status >= 500:
                    return self._answer(stub.status, b"classifier says no", "text/plain",
                                        [("x-classifier", "broken")])
                self._answer(stub.status, json.dumps({"label": "sneaker"}).encode(), STUB_TYPE,
                             [("x-stub", "yes"), ("x-hopgate-ood", "spoofed")])

        self.httpd, self.url = serve_in_thread(Handler)

    def close(self):
        stop(self.httpd)


@pytest.fixture
def classifier():
    stub = Classifier()
    yield stub
    stub.close()


def sidecar(stub: Classifier | str, **settings):
    url = stub if isinstance(stub, str) else stub.url
    return in_process(upstream_url=url + "/predict", proxy_routes=["/predict"],
                      admin_port=ADMIN, **settings)


def admin(path: str) -> str:
    return f"http://hopgate:{ADMIN}{path}"


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.integration
def test_sidecar_hides_nothing_of_the_classifier(tmp_path, images):
    """Through the data port the classifier's own routes answer as if called directly
    (mutations caught: the data port answering hopgate's /healthz or /metrics; the query,
    a header or the body dropped on the way; the classifier's status or headers replaced);
    hopgate's health, metrics and /score answer on the admin port, not the classifier's
    route."""
    stub = Classifier()
    try:
        with serve(tmp_path, upstream_url=stub.url + "/predict", proxy_routes='["/predict"]',
                   workers=2) as s, s.client() as c, s.admin() as a:  # both ports, 2 workers
            for path in ("/healthz", "/metrics", "/v1/info?verbose=1"):
                via, direct = c.get(path), httpx.get(stub.url + path)
                assert (via.status_code, via.content) == (direct.status_code, direct.content)
                assert via.headers["content-type"] == direct.headers["content-type"]
                assert via.headers["x-classifier"] == "stub"
            assert c.get("/docs").status_code == 404  # the classifier's 404, not hopgate's
            assert c.get("/docs").json() == {"detail": "Not Found"}
            stub.seen.clear()
            body = b"\x00\x01 not an image" * 1000
            r = c.post("/v1/echo?x=1&y=%20", content=body,
                       headers={"content-type": "application/x-thing", "x-custom": "kept",
                                "authorization": "Bearer classifier-key"})
            assert r.status_code == 207 and r.content == body
            assert r.headers["x-echo-length"] == str(len(body))
            assert "x-hopgate-ood" not in r.headers  # not scored
            seen = stub.seen[-1]
            assert seen["method"] == "POST" and seen["path"] == "/v1/echo?x=1&y=%20"
            assert seen["body"] == body
            assert seen["headers"]["x-custom"] == "kept"
            assert seen["headers"]["authorization"] == "Bearer classifier-key"
            assert seen["headers"]["content-type"] == "application/x-thing"
            assert "user-agent" not in seen["headers"] or \
                seen["headers"]["user-agent"].startswith("python-httpx")  # the client's own
            # hopgate's own endpoints: on the admin port
            assert a.get("/healthz").json() == {"status": "ok"}
            assert a.get("/readyz").status_code == 200
            assert "hopgate_passthrough_requests_total" in a.get("/metrics").text
            assert a.post("/score", content=images[0],
                          headers={"content-type": "image/png"}).status_code == 200
            r = a.post("/predict", content=images[0], headers={"content-type": "image/png"})
            assert r.status_code == 404  # the classifier's route is on the data port only
    finally:
        stub.close()


@pytest.mark.integration
def test_passthrough_streams_a_20mb_download_and_upload(tmp_path):
    """20 MB each way through the data port with the gate's peak memory barely moving
    (mutation caught: the answer or the request body read whole before it is passed on,
    as proxy.py does for a small scored answer: +20 MB or more)."""
    stub = Classifier()
    try:
        with serve(tmp_path, upstream_url=stub.url + "/predict",
                   proxy_routes='["/predict"]') as s, s.client() as c:
            c.get("/healthz")  # the passthrough's first use, before the baseline
            base = peak_rss_kb(s.proc.pid)
            size = 0
            with c.stream("GET", "/big") as r:
                assert r.status_code == 200
                for chunk in r.iter_raw():
                    size += len(chunk)
            assert size == BIG
            up = (b"\x33" * (256 * 1024) for _ in range(BIG // (256 * 1024)))
            r = c.post("/v1/echo", content=up, headers={"content-type": "application/x-blob",
                                                        "content-length": str(BIG)})
            assert r.status_code == 207 and len(r.content) == BIG
            grown_mb = (peak_rss_kb(s.proc.pid) - base) / 1024
            assert grown_mb < 12, f"peak RSS grew {grown_mb:.1f} MB for 20 MB passed through"
    finally:
        stub.close()


@pytest.mark.anyio
@pytest.mark.parametrize("mode,policy,status", [
    ("shadow", "fail_closed", 500), ("shadow", "fail_open", 500),
    ("enforce", "fail_open", 500), ("enforce", "fail_closed", 502)])
async def test_shadow_mode_never_changes_the_answer(images, mode, policy, status):
    """A classifier 500: shadow mode passes it on whatever the policy (status, body and
    headers as sent, plus the verdict); enforce mode applies the policy, with the verdict
    headers on hopgate's 502 too. Mutations caught: shadow mode following the policy;
    the verdict headers left off the 502."""
    stub = Classifier(status=500)
    try:
        async with sidecar(stub, gate_mode=mode, upstream_policy=policy) as c:
            for blob, ood in ((images[0], "false"), (images[1], "true")):
                r = await c.post("/predict", content=blob, headers={"content-type": "image/png"})
                assert r.headers["x-hopgate-ood"] == ood
                assert "x-hopgate-score" in r.headers and "x-hopgate-model-version" in r.headers
                if ood == "true" and mode == "enforce":
                    assert r.status_code == 422
                    continue
                assert r.status_code == status
                if status == 500:
                    assert r.content == b"classifier says no"
                    assert r.headers["x-classifier"] == "broken"
                    assert r.headers["content-type"] == "text/plain"
                else:
                    assert r.json()["error"]["reason"] == "upstream"
    finally:
        stub.close()


@pytest.mark.anyio
@pytest.mark.parametrize("policy,upstream,status,reason", [
    ("fail_closed", 500, 502, "upstream"), ("fail_open", 500, 500, "upstream"),
    ("fail_closed", 0, 502, "upstream"), ("fail_open", 0, 502, "upstream"),
    ("fail_closed", 400, 400, "bad_input"), ("fail_closed", 404, 404, "not_found")])
async def test_upstream_failure_policy(images, policy, upstream, status, reason):
    """The policy, and the reason each answer is counted under (the classifier's own 4xx
    passed on are client errors: a 404 is ``not_found`` like any other); every answer
    carries the verdict headers, an unreachable classifier's 502 included."""
    stub = Classifier(status=upstream or 200)
    url = stub.url
    if upstream == 0:
        stub.close()  # nothing listens there any more
    try:
        async with sidecar(url, upstream_policy=policy) as c:
            r = await c.post("/predict", content=images[0],
                             headers={"content-type": "image/png"})
            assert r.status_code == status and r.headers["x-hopgate-ood"] == "false"
            if status == 502:
                assert r.json()["error"]["reason"] == "upstream"
            m = samples((await c.get(admin("/metrics"))).text)
    finally:
        if upstream:
            stub.close()
    errors = sum(v for k, v in m.items() if k[0] == "hopgate_upstream_errors_total")
    assert errors == (0 if 0 < upstream < 500 else 1)
    assert m[("hopgate_requests_total", (("reason", reason), ("status", str(status))))] == 1


@pytest.mark.anyio
async def test_speculative_mode_calls_while_scoring_and_drops_ood_answers(images):
    """Speculative: the classifier gets every request at once (it sees the OOD one too, as
    documented); the ID answer is passed on, the OOD one replaced by the refusal. Mutation
    caught: releasing the classifier's answer without waiting for the verdict."""
    stub = Classifier(status=201)
    try:
        async with sidecar(stub, speculative=True) as c:
            r = await c.post("/predict", content=images[0], headers={"content-type": "image/png"})
            assert r.status_code == 201 and r.headers["x-stub"] == "yes"
            r = await c.post("/predict", content=images[1], headers={"content-type": "image/png"})
            assert r.status_code == 422 and r.headers["x-hopgate-ood"] == "true"
            assert r.json()["results"][0]["held_back"] is True
        for _ in range(100):  # the stub's thread records what it read
            if len(stub.seen) == 2:
                break
            time.sleep(0.02)
        assert [x["body"] for x in stub.seen] == [images[0], images[1]]
    finally:
        stub.close()


@pytest.mark.anyio
@pytest.mark.parametrize("speculative", [False, True])
async def test_a_request_scored_beside_the_classifier_takes_no_solo_session(
        images, monkeypatch, speculative):
    """Speculative mode scores while the classifier computes, often on the same node's
    cores: a lone image then keeps to its worker's thread (not ``alone``, so no solo
    session spinning every core under the classifier); enforce mode forwards after scoring,
    so its lone image is alone. Mutation caught: the proxy not telling the scorer."""
    from hopgate.service.batcher import Batcher

    seen: list[bool] = []
    submit = Batcher.submit

    def recording(self, images, deadline, alone=False, log_lambda=None):
        seen.append(alone)
        return submit(self, images, deadline, alone, log_lambda)

    monkeypatch.setattr(Batcher, "submit", recording)
    stub = Classifier()
    try:
        async with sidecar(stub, speculative=speculative) as c:
            r = await c.post("/predict", content=images[0], headers={"content-type": "image/png"})
            assert r.status_code == 200
    finally:
        stub.close()
    assert seen == [not speculative]


@pytest.mark.anyio
async def test_score_gate_answers_carry_the_verdict_headers(images):
    """/score in gatekeeper mode: the verdict headers on the 502 of an unreachable upstream
    and on the OOD refusal (mutation caught: Gate.__call__ not adding them)."""
    async with in_process(upstream_url="http://127.0.0.1:9/predict") as c:
        for blob, status, ood in ((images[0], 502, "false"), (images[1], 422, "true")):
            r = await c.post("/score", content=blob, headers={"content-type": "image/png"})
            assert r.status_code == status and r.headers["x-hopgate-ood"] == ood
            assert float(r.headers["x-hopgate-score"]) == pytest.approx(
                r.json()["results"][0]["score"])


def test_sidecar_settings_need_an_admin_port(tmp_path, capsys):
    """Sidecar mode without an admin port, or on the data port, or a port taken: one line,
    exit 2."""
    import socket

    from hopgate.service.config import Settings
    from hopgate.service.server.cli import main

    with pytest.raises(ValueError, match="HOPGATE_ADMIN_PORT"):
        Settings(upstream_url="http://127.0.0.1:9/predict", proxy_routes=["/predict"])
    with pytest.raises(ValueError, match="admin_port must differ from port"):
        Settings(port=9000, admin_port=9000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--port", "0", "--admin-port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port}" in err[0] and "admin" in err[0].lower()


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
