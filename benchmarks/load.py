"""Serving load benchmark: closed-loop concurrency sweep, open-loop Poisson rate sweep, and the
four side-by-side ratios of issue 3, each taken in the same run on the same machine.

  (a) served img/s (best closed-loop point) / in-process onnxruntime img/s at its best bucket,
      EfficientNet-Lite0 bundle at 224 px                                     target >= 0.8
  (b) dynamic batching / batch size 1 (buckets=[1]), same server, default bundle   target >= 2
  (c) p50 at concurrency 1 through the batcher minus a direct single runtime call  target <= 1 ms
  (d) the server's resident memory (VmRSS) with the default bundle          target <= 250 MB

The load client runs on the same (small) machine as the server, so served figures include the
client's CPU use; that is stated, not hidden. Every loop is bounded in time and count; the server
listens on 127.0.0.1 only.

    python benchmarks/load.py --effnet PATH [--seconds 4] [--out benchmarks/load_results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hopgate.machine import describe  # noqa: E402
from hopgate.service.runtime.session import Runtime  # noqa: E402
from hopgate.service.server.local import local_server  # noqa: E402

DEFAULT = ROOT / "models" / "default.onnx"
MAX_REQUESTS = 20_000  # hard cap per measurement, besides the time bound


def machine() -> str:
    return f"{describe()}, no GPU (CPUExecutionProvider)"


def png_for(runtime_shape: tuple[int, int, int], seed: int = 0) -> bytes:
    h, w, c = runtime_shape
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, "L" if c == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summary(lat: list[float], n_img: int, wall: float, queue: list[float], compute: list[float],
            errors: dict) -> dict:
    return {"images_per_s": n_img / wall, "requests": len(lat),
            "p50_ms": pct(lat, 50) * 1e3, "p90_ms": pct(lat, 90) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3,
            "server_queue_ms_mean": statistics.fmean(queue) if queue else float("nan"),
            "server_compute_ms_mean": statistics.fmean(compute) if compute else float("nan"),
            "errors": errors}


async def _one(client: httpx.AsyncClient, body: bytes, lat, queue, compute, errors) -> int:
    t = time.perf_counter()
    r = await client.post("/score", content=body, headers={"Content-Type": "image/png"})
    if r.status_code != 200:
        errors[r.status_code] = errors.get(r.status_code, 0) + 1
        return 0
    lat.append(time.perf_counter() - t)
    for res in r.json()["results"]:
        queue.append(res["timings"]["queue_ms"])
        compute.append(res["timings"]["compute_ms"])
    return 1


async def closed_loop(url: str, body: bytes, concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients, each sending its next request when the last one is answered."""
    lat, queue, compute, errors = [], [], [], {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        for _ in range(3):  # warm connections
            await _one(client, body, [], [], [], {})
        stop = time.perf_counter() + seconds
        t0 = time.perf_counter()
        sent = 0

        async def worker():
            nonlocal sent
            while time.perf_counter() < stop and sent < MAX_REQUESTS:
                sent += 1
                await _one(client, body, lat, queue, compute, errors)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    # one image per request: answered images = len(lat) (no shared counter across awaits)
    return {"concurrency": concurrency, **summary(lat, len(lat), wall, queue, compute, errors)}


async def open_loop(url: str, body: bytes, rate: float, seconds: float) -> dict:
    """Poisson arrivals at ``rate`` requests/s, regardless of how fast answers come back."""
    lat, queue, compute, errors = [], [], [], {}
    rng = random.Random(1)
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 limits=httpx.Limits(max_connections=256)) as client:
        tasks, t0 = [], time.perf_counter()
        next_t = t0
        while next_t < t0 + seconds and len(tasks) < MAX_REQUESTS:
            next_t += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(client, body, lat, queue, compute, errors)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return {"offered_rps": rate, **summary(lat, len(lat), wall, queue, compute, errors)}


def inprocess_best(model: Path, buckets: list[int], seconds: float, threads: int) -> dict:
    """In-process onnxruntime throughput per batch size (the ceiling the server is held to)."""
    rt = Runtime(model, ["CPUExecutionProvider"], threads, 1)
    per = {}
    for b in buckets:
        x = np.random.default_rng(0).integers(0, 256, (b, *rt.shape), dtype=np.uint8)
        rt.run(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds and n < MAX_REQUESTS:
            rt.run(x)
            n += b
        per[b] = n / (time.perf_counter() - t0)
    best = max(per, key=per.get)
    return {"per_batch_images_per_s": per, "best_batch": best, "best_images_per_s": per[best]}


async def batcher_overhead(model: Path, n: int = 300) -> dict:
    """(c): p50 of one image through Batcher (idle runtime) vs p50 of a direct runtime call."""
    from hopgate.service.batcher import Batcher
    from hopgate.service.metrics import Metrics

    rt = Runtime(model, ["CPUExecutionProvider"], 0, 1)
    m = rt.meta
    buckets = [1, 2, 4, 8, 16, 32, 64]
    rt.warm(buckets)
    batcher = Batcher(rt, Metrics(buckets, Metrics.score_buckets(m.score_quantiles, m.threshold)),
                      buckets, 512, 2.0)
    batcher.start()
    img = np.random.default_rng(0).integers(0, 256, rt.shape, dtype=np.uint8)
    direct, through = [], []
    for _ in range(n):  # interleaved, so drift hits both alike
        t = time.perf_counter()
        rt.run(img[None])
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        (f,) = batcher.submit([img], time.monotonic() + 10)
        await f
        through.append(time.perf_counter() - t)
    batcher.close()
    d, b = pct(direct, 50) * 1e3, pct(through, 50) * 1e3
    return {"direct_p50_ms": d, "batcher_p50_ms": b, "overhead_ms": b - d}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--default", type=Path, default=DEFAULT)
    p.add_argument("--effnet", type=Path, help="EfficientNet-Lite0 bundle (224 px) for ratio (a)")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--rates", type=float, nargs="+", default=[100, 300, 600])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "load_results.json")
    a = p.parse_args(argv)
    out: dict = {"machine": machine(), "seconds_per_point": a.seconds,
                 "note": "client and server share the machine's cores",
                 "load_average_start": os.getloadavg()}
    logs = Path(tempfile.mkdtemp(prefix="hopgate-load-"))
    rt = Runtime(a.default, ["CPUExecutionProvider"])
    body = png_for(rt.shape)
    del rt

    # default bundle: sweeps, (b) and (d)
    with local_server(logs, a.default, log_requests="false") as s:
        closed = [asyncio.run(closed_loop(s.url, body, c, a.seconds)) for c in a.concurrency]
        rates = [asyncio.run(open_loop(s.url, body, r, a.seconds)) for r in a.rates]
        out["default"] = {"closed_loop": closed, "open_loop": rates}
        out["d_rss_mb"] = rss_mb(s.proc.pid)
        batched = max(closed, key=lambda r: r["images_per_s"])
    with local_server(logs, a.default, log_requests="false", buckets="[1]") as s:
        single = asyncio.run(closed_loop(s.url, body, batched["concurrency"], a.seconds))
    out["b_dynamic_over_batch1"] = {"dynamic": batched, "batch1": single,
                                    "ratio": batched["images_per_s"] / single["images_per_s"]}
    out["c_batcher_overhead"] = asyncio.run(batcher_overhead(a.default))

    if a.effnet:
        ert = Runtime(a.effnet, ["CPUExecutionProvider"])
        ebody = png_for(ert.shape)
        del ert
        ceiling = inprocess_best(a.effnet, [1, 2, 4, 8, 16], a.seconds, 0)
        with local_server(logs, a.effnet, timeout=180, log_requests="false",
                          buckets="[1,2,4,8,16]") as s:
            served = [asyncio.run(closed_loop(s.url, ebody, c, a.seconds * 2)) for c in (8, 16)]
        best = max(served, key=lambda r: r["images_per_s"])
        out["a_served_over_inprocess"] = {
            "inprocess": ceiling, "served": served,
            "ratio": best["images_per_s"] / ceiling["best_images_per_s"]}

    out["load_average_end"] = os.getloadavg()  # other jobs on the machine skew absolute figures
    a.out.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(json.dumps({k: out[k] for k in out if k in ("machine", "d_rss_mb", "c_batcher_overhead")},
                     indent=2))
    print("b ratio", round(out["b_dynamic_over_batch1"]["ratio"], 2))
    if "a_served_over_inprocess" in out:
        print("a ratio", round(out["a_served_over_inprocess"]["ratio"], 3))


if __name__ == "__main__":
    main()
