"""Soak and overload benchmark: a real hopgate-serve on loopback, bounded in requests and time.

    python benchmarks/soak.py [--requests 4000] [--seconds 240] [--concurrency 16]

Phases (each stops by itself: a request count and a time limit, whichever comes first):
  1. soak: normal traffic (raw PNG, multipart of 4, JSON base64 of 2) at ``--concurrency``;
  2. overload: 64 concurrent 15 MB bodies, then four 6300² 16-bit PNGs at once, each with a
     normal request (2 s deadline) sent alongside;
  3. soak again (half the count): does the server score as before, at the same RSS?
Reported per phase: the server's RSS before and after, its peak (VmHWM, reset at the start
of the phase), the status/reason mix and p50/p99 latency; and the machine. Results go to
``benchmarks/soak_results.json`` (``--out``). Loopback only; nothing else is contacted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "service"))
from heavy import padded_png, png16, reset_peak, rss_mb  # noqa: E402

from hopgate.machine import cpu_name  # noqa: E402
from hopgate.service.server.local import local_server  # noqa: E402

PNG = {"content-type": "image/png"}


def small_pngs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def machine() -> dict:
    mem = next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal"))
    return {"host": platform.node(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "memory_gb": round(int(mem) / 2**20, 1), "python": platform.python_version(),
            "os": platform.platform(), "note": "cores shared with other jobs; loopback"}


def run_phase(url: str, pid: int, jobs: list, concurrency: int, seconds: float) -> dict:
    """Run ``jobs`` (callables returning (status, reason)) on ``concurrency`` threads."""
    reset_peak(pid)
    before = rss_mb(pid)["VmRSS"]
    it, lock = iter(jobs), threading.Lock()
    mix: Counter = Counter()
    lat: list[float] = []
    stop = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < stop:
                with lock:
                    job = next(it, None)
                if job is None:
                    return
                t0 = time.perf_counter()
                try:
                    status, reason = job(c)
                except httpx.HTTPError as e:
                    status, reason = -1, type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    mix[f"{status} {reason}"] += 1
                    if status == 200:
                        lat.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    time.sleep(1.0)  # let the last answers' buffers go
    q = np.percentile(lat, [50, 99]) * 1e3 if lat else [float("nan")] * 2
    return {"requests": sum(mix.values()), "seconds": round(wall, 2),
            "rss_before_mb": round(before), "rss_peak_mb": round(rss_mb(pid)["VmHWM"]),
            "rss_after_mb": round(rss_mb(pid)["VmRSS"]), "mix": dict(mix),
            "p50_ms": round(float(q[0]), 2), "p99_ms": round(float(q[1]), 2)}


def answer(r: httpx.Response) -> tuple[int, str]:
    try:
        err = r.json().get("error")
        reason = err.get("reason", "") if isinstance(err, dict) else ""
    except ValueError:
        reason = ""
    return r.status_code, reason or ("ok" if r.status_code == 200 else "")


def normal_jobs(n: int, pngs: list[bytes]) -> list:
    import base64

    rnd = random.Random(0)

    def raw(c):
        return answer(c.post("/score", content=rnd.choice(pngs), headers=PNG))

    def multi(c):
        files = [("images", (f"{i}.png", rnd.choice(pngs), "image/png")) for i in range(4)]
        return answer(c.post("/score", files=files))

    def js(c):
        items = [base64.b64encode(rnd.choice(pngs)).decode() for _ in range(2)]
        return answer(c.post("/score", json={"images": items}))

    return [rnd.choice((raw, raw, multi, js)) for _ in range(n)]


def overload_jobs(big: bytes, huge: bytes, normal: bytes) -> list:
    def body(c):
        return answer(c.post("/score", content=big, headers=PNG))

    def image(c):
        return answer(c.post("/score", content=huge, headers=PNG))

    def alongside(c):
        return answer(c.post("/score", content=normal,
                             headers={**PNG, "x-hopgate-deadline-ms": "2000"}))

    return [body] * 64 + [alongside] * 4 + [image] * 4 + [alongside] * 4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "soak_results.json"))
    args = ap.parse_args()
    pngs = small_pngs(64)
    big, huge = padded_png(pngs[0], 15_000_000), png16(6300)
    report: dict = {"machine": machine(), "settings": "defaults (intra_op_threads=2)",
                    "phases": {}}
    with tempfile.TemporaryDirectory() as tmp, local_server(Path(tmp),
                                                             intra_op_threads=2) as s:
        pid, per = s.proc.pid, args.seconds / 3
        report["rss_start_mb"] = round(rss_mb(pid)["VmRSS"])
        report["phases"]["soak"] = run_phase(s.url, pid, normal_jobs(args.requests, pngs),
                                             args.concurrency, per)
        report["phases"]["overload"] = run_phase(s.url, pid, overload_jobs(big, huge, pngs[1]),
                                                 72, per)
        report["phases"]["soak_again"] = run_phase(
            s.url, pid, normal_jobs(args.requests // 2, pngs), args.concurrency, per)
        report["rss_end_mb"] = round(rss_mb(pid)["VmRSS"])
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
