"""Smoke test run *inside* a built image: the image's own Python and Pillow, stdlib HTTP.

    python smoke.py URL ID_IMAGE.png

Waits for /readyz, scores an in-distribution image (expects ID) and a noise image (expects
OOD), sends garbage (expects a 4xx and a server that still answers), reads /metrics, and
checks that the image holds no torch.
Prints one JSON line with what it saw; exits non-zero on the first surprise.
"""
import importlib.util
import io
import json
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image


def call(url, body=None, ctype="image/png"):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(base, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if call(base + "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    sys.exit(f"smoke: {base}/readyz not 200 within {seconds}s")


def score(base, png: bytes) -> dict:
    status, body = call(base + "/score", png)
    if status != 200:
        sys.exit(f"smoke: /score answered {status}: {body[:200]!r}")
    return json.loads(body)["results"][0]


def main(base: str, id_path: str) -> None:
    wait_ready(base)
    with open(id_path, "rb") as f:
        id_bytes = f.read()
    in_dist = score(base, id_bytes)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    ood = score(base, buf.getvalue())
    bad_status, _ = call(base + "/score", b"not an image")
    metrics = call(base + "/metrics")[1].decode()
    seen = {"id": {k: in_dist[k] for k in ("ood", "score", "threshold", "label")},
            "noise": {k: ood[k] for k in ("ood", "score", "threshold")},
            "garbage_status": bad_status,
            "metrics_lines": sum(1 for line in metrics.splitlines() if line.startswith("hopgate_")),
            "torch_in_image": importlib.util.find_spec("torch") is not None}
    print(json.dumps(seen))
    if in_dist["ood"] or not ood["ood"]:
        sys.exit("smoke: verdicts wrong (want ID for the sample, OOD for noise)")
    if not 400 <= bad_status < 500 or score(base, id_bytes)["ood"]:
        sys.exit("smoke: garbage not refused with a 4xx, or the next request failed")
    if not seen["metrics_lines"]:
        sys.exit("smoke: /metrics has no hopgate_ series")
    if seen["torch_in_image"]:
        sys.exit("smoke: torch is installed in a serving image")


if __name__ == "__main__":
    main(sys.argv[1].rstrip("/"), sys.argv[2])
