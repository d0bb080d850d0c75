"""Gatekeeper mode with a real upstream process on loopback that counts its calls
(integration tier; the gate's logic runs in process in tests/service/test_app.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import httpx
import numpy as np
import pytest

from hopgate.service.server.local import free_port, local_server

pytestmark = pytest.mark.integration

UPSTREAM = textwrap.dedent('''
    import sys, time, json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    calls, traces, delay = [0], [], float(sys.argv[2])
    status, size = int(sys.argv[3]), int(sys.argv[4])
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def _send(self, code, doc):
            b = json.dumps(doc).encode()
            self.send_response(code); self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(b))); self.end_headers(); self.wfile.write(b)
        def do_GET(self):
            self._send(200, {"calls": calls[0], "traces": traces})
        def do_POST(self):
            n = int(self.headers["content-length"]); self.rfile.read(n)
            calls[0] += 1; traces.append(self.headers.get("traceparent"))
            time.sleep(delay)
            if size:
                self.send_response(200); self.end_headers()  # no length: read to the close
                self.wfile.write(b"x" * size); return
            self._send(status, {"label": "sneaker", "bytes": n})
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


class Upstream:
    def __init__(self, delay: float = 0.0, status: int = 200, size: int = 0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(self.port), str(delay),
                                      str(status), str(size)])
        for _ in range(100):
            try:
                httpx.get(self.url, timeout=0.5)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("upstream did not start")

    def state(self):
        return httpx.get(self.url).json()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def png(arr) -> bytes:
    import io

    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(arr.squeeze(-1)).save(b, "PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def images():
    from pathlib import Path

    import onnxruntime as ort

    from hopgate.bundle import INPUT_IMAGES, OUTPUTS
    from hopgate.model_export.data import (
        sources as data,  # numpy + Pillow (+ scikit-learn for the digits)
    )

    bundle = Path(__file__).resolve().parents[2] / "models" / "default.onnx"
    sess = ort.InferenceSession(str(bundle), providers=["CPUExecutionProvider"])

    def run_ort(images):
        return dict(zip(OUTPUTS, sess.run(list(OUTPUTS), {INPUT_IMAGES: images})))

    test = data.fashion_mnist("test").subset(np.arange(500))
    out = run_ort(test.images)
    id_img = test.images[int(np.flatnonzero(~out["is_ood"] & (out["msp"] > 0.99))[0])]
    digits = data.resize_all(data.ood_digits()[:50], (28, 28), 1)
    d_out = run_ort(digits)
    return png(id_img), png(digits[int(np.flatnonzero(d_out["is_ood"])[0])])


def post(s, blob, **headers):
    return httpx.post(s.url + "/score", content=blob, timeout=30,
                      headers={"content-type": "image/png", **headers})


def test_id_passes_through_ood_never_reaches_upstream(tmp_path, images):
    id_png, ood_png = images
    up = Upstream()
    try:
        with local_server(tmp_path, upstream_url=up.url + "/predict", intra_op_threads=2,
                          gate_ood_status=403, gate_ood_body='{"blocked": true}') as s:
            tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            r = post(s, id_png, traceparent=tp)
            assert r.status_code == 200
            res = r.json()["results"][0]
            assert res["ood"] is False
            assert res["upstream"] == {"status": 200,
                                       "body": {"label": "sneaker", "bytes": len(id_png)}}
            r = post(s, ood_png)
            assert r.status_code == 403 and r.json()["blocked"] is True
            assert r.json()["results"][0]["ood"] is True and r.json()["results"][0]["held_back"]
            metrics = httpx.get(s.url + "/metrics").text
        state = up.state()
        assert state["calls"] == 1  # the OOD image never reached it
        assert state["traces"] == [tp]
        assert "hopgate_upstream_held_back_total 1.0" in metrics
        assert 'hopgate_upstream_calls_total{outcome="ok"} 1.0' in metrics
    finally:
        up.stop()


@pytest.mark.parametrize("policy,status", [("fail_closed", 502), ("fail_open", 200)])
def test_upstream_down_gets_the_policy(tmp_path, images, policy, status):
    dead = f"http://127.0.0.1:{free_port()}/predict"  # nothing listens there
    with local_server(tmp_path, upstream_url=dead, upstream_policy=policy, intra_op_threads=2) as s:
        r = post(s, images[0])
        assert r.status_code == status
        res = r.json()["results"][0]
        assert res["ood"] is False and "unreachable" in res["upstream"]["error"]
        metrics = httpx.get(s.url + "/metrics").text
        assert 'hopgate_upstream_errors_total{kind="unreachable"} 1.0' in metrics


def test_slow_upstream_gets_the_timeout(tmp_path, images):
    up = Upstream(delay=3.0)
    try:
        with local_server(tmp_path, upstream_url=up.url + "/predict", upstream_timeout_s=0.5,
                          intra_op_threads=2) as s:
            t0 = time.monotonic()
            r = post(s, images[0])
            took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["reason"] == "upstream"
        assert took < 2.5
    finally:
        up.stop()


@pytest.mark.parametrize("policy,status", [("fail_closed", 502), ("fail_open", 200)])
@pytest.mark.parametrize("upstream", [{"status": 503}, {"size": 5_000_000}])
def test_upstream_5xx_or_oversized_gets_the_policy(tmp_path, images, policy, status, upstream):
    up = Upstream(**upstream)
    try:
        with local_server(tmp_path, upstream_url=up.url + "/predict", upstream_policy=policy,
                          upstream_max_body_bytes=1_000_000, intra_op_threads=2) as s:
            r = post(s, images[0])
            metrics = httpx.get(s.url + "/metrics").text
        assert r.status_code == status
        answer = r.json()["results"][0]["upstream"]
        assert answer["status"] == 502 and ("503" in answer["error"] or "over" in answer["error"])
        kind = "status" if "status" in upstream else "too_big"
        assert f'hopgate_upstream_errors_total{{kind="{kind}"}} 1.0' in metrics
    finally:
        up.stop()


def test_non_ascii_content_type_and_traceparent_are_sanitised(tmp_path, images):
    up = Upstream()
    try:
        with local_server(tmp_path, upstream_url=up.url + "/predict", intra_op_threads=2) as s:
            r1 = post(s, images[0], **{"content-type": "image/p\xe9ng".encode("latin-1")})
            r2 = post(s, images[0], traceparent="00-\xff".encode("latin-1"))
            ok = post(s, images[0])
        assert r1.status_code == r2.status_code == ok.status_code == 200
        assert up.state()["traces"] == [None, None, None]
    finally:
        up.stop()
