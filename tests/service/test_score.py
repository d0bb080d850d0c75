"""POST /score against a real server: verdicts, batching equivalence, malformed inputs, metrics."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from model_export import data

from conftest import ROOT, encode


def post_image(client, blob: bytes, ctype: str = "image/png", headers=None):
    return client.post("/score", content=blob, headers={"content-type": ctype, **(headers or {})})


def test_fashion_jpeg_256_rgb_comes_back_id(server, direct, fashion):
    ref = direct(fashion.images)
    meta_thr = server.client().post("/score", content=encode(fashion.images[0]),
                                    headers={"content-type": "image/png"}).json()["model"]["threshold"]
    # images the bundle itself accepts with a margin: the test is about the serving path
    picks = np.flatnonzero((ref["score"] > meta_thr + 15) & (ref["msp"] > 0.995))[:5]
    assert len(picks) == 5
    with server.client() as c:
        for i in picks:
            blob = encode(fashion.images[i], "JPEG", size=256, mode="RGB", quality=95)
            r = post_image(c, blob, "image/jpeg")
            assert r.status_code == 200, r.text
            res = r.json()["results"][0]
            assert res["ood"] is False
            assert res["predicted_class"] == int(ref["pred_class"][i])
            assert res["label"] == data.FASHION_CLASSES[res["predicted_class"]]
            assert abs(res["score"] - float(ref["score"][i])) < 0.05 * abs(float(ref["score"][i]))
            # retrieved from the predicted class's bank (10 memories per class)
            assert res["memories"] and res["memories"][0]["index"] // 10 == res["predicted_class"]
            assert 0 < res["p_value"] <= 1


def test_digit_and_photo_come_back_ood(server, direct):
    from skimage import data as sk

    digits = data.resize_all(data.ood_digits()[:50], (28, 28), 1)
    ref = direct(digits)
    i = int(np.flatnonzero(ref["is_ood"])[0])
    photo = np.asarray(sk.astronaut())
    photo_ref = direct(data.resize_all(photo[None], (28, 28), 1))
    assert photo_ref["is_ood"][0], "the default bundle should reject the astronaut photo"
    with server.client() as c:
        r = post_image(c, encode(data.ood_digits()[i], size=64)).json()["results"][0]
        assert r["ood"] is True and r["memories"] == []
        r = post_image(c, encode(photo, "JPEG"), "image/jpeg").json()["results"][0]
        assert r["ood"] is True and r["memories"] == [] and r["p_value"] < 0.05


def test_sixteen_in_one_request_equal_sixteen_singles(server, fashion):
    blobs = [encode(fashion.images[i]) for i in range(16)]
    with server.client() as c:
        many = c.post("/score", files=[("images", (f"{i}.png", b, "image/png"))
                                       for i, b in enumerate(blobs)]).json()["results"]
        singles = [post_image(c, b).json()["results"][0] for b in blobs]
        as_json = c.post("/score", json={"images": [base64.b64encode(b).decode() for b in blobs]})
    assert len(many) == 16
    for m, s, j in zip(many, singles, as_json.json()["results"]):
        for r in (m, j):
            assert r["ood"] == s["ood"] and r["predicted_class"] == s["predicted_class"]
            assert r["score"] == pytest.approx(s["score"], rel=1e-5)
            assert [x["index"] for x in r["memories"]] == [x["index"] for x in s["memories"]]


# --- malformed inputs: the documented status of each (docs/serving.md) ---------------------

def _png(arr, **kw):
    return encode(arr, "PNG", **kw)


def _bomb() -> bytes:
    img = Image.new("L", (12000, 12000))  # 144 Mpx of zeros: compresses to ~150 kB
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def _sixteen_bit() -> bytes:
    a = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")  # uint16 -> mode I;16
    return buf.getvalue()


def _animated() -> bytes:
    frames = [Image.fromarray(np.full((28, 28), v, np.uint8)) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _exif_rotated(arr) -> bytes:
    img = Image.fromarray(arr.squeeze(-1)).rotate(90, expand=True)  # stored rotated ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with "rotate 90 CW to display" in its EXIF orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def corpus(img):
    png = _png(img)
    jpg = encode(img, "JPEG")
    big_noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    return [
        # name, content-type, body (bytes or dict for JSON), expected status
        ("zero bytes", "image/png", b"", 400),
        ("truncated png", "image/png", png[: len(png) // 2], 422),
        ("truncated jpeg", "image/jpeg", jpg[: len(jpg) // 2], 422),
        ("png header only", "image/png", png[:8], 422),
        ("gif magic, garbage", "image/gif", b"GIF89a" + b"\x00" * 40, 422),
        ("text", "image/png", b"hello, I am not an image", 415),
        ("html", "image/png", b"<!doctype html><html><body>hi</body></html>", 415),
        ("pdf", "image/png", b"%PDF-1.4\n%...", 415),
        ("decompression bomb", "image/png", _bomb(), 413),
        ("oversized body", "image/png", _png(big_noise), 413),
        ("wrong content type", "text/plain", png, 415),
        ("no content type", "", png, 415),
        ("bad base64", "application/json", {"images": ["!!!not base64!!!"]}, 400),
        ("not json", "application/json", b"{images: nope", 400),
        ("json without images", "application/json", {"pictures": []}, 400),
        ("json empty list", "application/json", {"images": []}, 400),
        ("too many images", "application/json",
         {"images": [base64.b64encode(png).decode()] * 33}, 413),
        ("multipart without images part", "multipart", {"other": png}, 400),
        ("16-bit png", "image/png", _sixteen_bit(), 200),
        ("palette png", "image/png", _png(img, mode="P"), 200),
        ("cmyk jpeg", "image/jpeg", encode(img, "JPEG", mode="CMYK"), 200),
        ("rgba png", "image/png", _png(img, mode="RGBA"), 200),
        ("animated gif", "image/gif", _animated(), 200),
        ("exif-rotated jpeg", "image/jpeg", _exif_rotated(img), 200),
        ("webp", "image/webp", encode(img, "WEBP"), 200),
        ("bmp", "image/bmp", encode(img, "BMP"), 200),
        ("tiff", "image/tiff", encode(img, "TIFF"), 200),
        ("jpeg sent as image/png", "image/png", jpg, 200),
    ]


def send(c, ctype, body):
    if ctype == "multipart":
        return c.post("/score", files={k: ("x.png", v, "image/png") for k, v in body.items()})
    if isinstance(body, dict):
        return c.post("/score", json=body)
    headers = {"content-type": ctype} if ctype else {}
    if not ctype:  # httpx would add none; make sure none is sent
        return c.post("/score", content=body, headers={"content-type": ""})
    return c.post("/score", content=body, headers=headers)


def documented_statuses() -> dict[str, int]:
    """The case table of docs/serving.md: the documented status of each malformed input."""
    text = (ROOT / "docs" / "serving.md").read_text()
    lines = text.split("### The malformed-input corpus", 1)[1].split("| case | status |", 1)[1]
    table = []
    for line in lines.splitlines()[2:]:  # skip the rest of the header line and the |---| rule
        if not line.startswith("| "):
            break
        name, status = line.strip().strip("|").split("|")
        table.append((name.strip(), int(status)))
    return dict(table)


def test_malformed_corpus_each_gets_its_status_and_the_next_request_is_fine(server, fashion):
    img = fashion.images[1]
    good = _png(img)
    cases = corpus(img)
    assert len(cases) >= 20
    documented = documented_statuses()
    assert documented == {name: status for name, _, _, status in cases}, "docs/serving.md table"
    with server.client() as c:
        expected = post_image(c, good).json()["results"][0]
        for name, ctype, body, status in cases:
            r = send(c, ctype, body)
            assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
            if status != 200:
                err = r.json().get("error") or r.json()["results"][0]["error"]
                assert err["status"] == status and err["message"], name
            after = post_image(c, good)
            assert after.status_code == 200, f"after {name}: {after.text[:200]}"
            assert after.json()["results"][0]["score"] == pytest.approx(expected["score"], rel=1e-6)


def test_exif_orientation_is_applied(server, fashion):
    img = fashion.images[3]
    with server.client() as c:
        upright = post_image(c, encode(img, "JPEG", quality=95), "image/jpeg").json()["results"][0]
        rotated = post_image(c, _exif_rotated(img), "image/jpeg").json()["results"][0]
    assert rotated["predicted_class"] == upright["predicted_class"]
    assert rotated["score"] == pytest.approx(upright["score"], rel=0.02)


def test_a_bad_image_fails_alone(server, fashion):
    good = [_png(fashion.images[i]) for i in range(3)]
    files = [("images", ("a.png", good[0], "image/png")),
             ("images", ("b.png", b"not an image", "image/png")),
             ("images", ("c.png", good[1], "image/png")),
             ("images", ("d.png", good[2][:40], "image/png"))]
    with server.client() as c:
        r = c.post("/score", files=files)
        assert r.status_code == 200
        res = r.json()["results"]
        assert res[1]["error"]["status"] == 415 and res[3]["error"]["status"] == 422
        alone = [post_image(c, b).json()["results"][0] for b in good[:2]]
        assert res[0]["score"] == pytest.approx(alone[0]["score"], rel=1e-5)
        assert res[2]["score"] == pytest.approx(alone[1]["score"], rel=1e-5)
        # every image failed: the request gets that status
        r = c.post("/score", files=[("images", ("x.png", b"nope", "image/png"))])
        assert r.status_code == 415


def test_deadline_header_can_shorten_and_is_validated(server, fashion):
    with server.client() as c:
        r = post_image(c, _png(fashion.images[0]), headers={"x-hopgate-deadline-ms": "abc"})
        assert r.status_code == 400
        r = post_image(c, _png(fashion.images[0]), headers={"x-hopgate-deadline-ms": "0.0001"})
        assert r.status_code == 504 and r.json()["results"][0]["error"]["reason"] == "deadline"
        r = post_image(c, _png(fashion.images[0]), headers={"x-hopgate-deadline-ms": "1e12"})
        assert r.status_code == 200  # longer than the server's default: capped, not refused


def test_openapi_describes_score(server):
    doc = server.client().get("/openapi.json").json()
    op = doc["paths"]["/score"]["post"]
    assert {"image/png", "multipart/form-data", "application/json"} <= set(op["requestBody"]["content"])
    result = doc["components"]["schemas"]["ImageResult"]["properties"]
    assert {"ood", "score", "threshold", "p_value", "predicted_class", "label", "memories"} <= set(result)


def test_metrics_parse_and_count_what_was_sent(tmp_path, fashion):
    from conftest import serve

    with serve(tmp_path) as s, s.client() as c:
        ok = [post_image(c, _png(fashion.images[i])) for i in range(5)]
        bad = [post_image(c, b"junk") for _ in range(3)]
        multi = c.post("/score", files=[("images", ("a.png", _png(fashion.images[i]), "image/png"))
                                        for i in range(4)])
        text = c.get("/metrics").text
    assert all(r.status_code == 200 for r in ok + [multi]) and all(r.status_code == 415 for r in bad)
    samples = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            samples[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    assert samples[("hopgate_requests_total", (("reason", "ok"), ("status", "200")))] == 6
    assert samples[("hopgate_requests_total", (("reason", "bad_input"), ("status", "415")))] == 3
    verdicts = sum(v for (n, lab), v in samples.items() if n == "hopgate_images_total"
                   and dict(lab)["verdict"] in ("id", "ood"))
    assert verdicts == 9
    assert samples[("hopgate_batch_size_count", ())] >= 1
    assert samples[("hopgate_request_seconds_count", ())] == 9
    assert ("hopgate_model_info", (("backbone", "small_resnet"), ("hopgate_version", "0.1.0"),
            ("name", "default"), ("provider", "CPUExecutionProvider"),
            ("version", next(v for (n, lab), _ in samples.items() if n == "hopgate_model_info"
                             for k, v in lab if k == "version")))) in samples


def test_service_never_imports_torch():
    code = ("import sys; import service.api, service.cli, service.v2, service.batcher; "
            "service.api.create_app(); assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'model_export' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
