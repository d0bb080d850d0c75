"""What the sidecar adds to a classifier's latency, and the two deployment shapes side by side
(issues 23 and 24).

Part 1, the sidecar's added latency: a stub classifier (a bare asyncio HTTP server on
loopback, answering ``POST /predict`` with a small JSON after ``--delay-ms``) is called
``--requests`` times in a row with one ID Fashion-MNIST PNG, directly and through
``hopgate-serve`` in sidecar mode (``HOPGATE_PROXY_ROUTES=["/predict"]``). Added latency =
p50 through the gate - p50 direct, the two called alternately, one request each in turn
(so the load of a shared machine hits both alike). Runs: the stub answering at once,
enforce mode; the stub taking 5 ms, enforce mode and speculative mode
(``HOPGATE_SPECULATIVE``). The speculative run is measured beside the floor of any hop, in
the same rotation: a bare TCP relay (``relay``: bytes copied both ways, no HTTP) and the
gate's own unscored passthrough (a path of the data port that is not a proxied route).

Part 2, the two shapes: the classifier runs the bundle's own network (``--model``; the
stub then decodes the image as the bundle states and runs the bundle's graph with
onnxruntime, its ``logits`` output, one image per call, no busy-waiting threads): a stand-in
for the user's classifier that costs it plus the small gate head:
  * sidecar: client -> hopgate (gate) -> classifier: two forward passes;
  * one pass: client -> hopgate ``/score?top_k=3``: the classifier's probabilities from the
    bundle (bundles with a ``logits`` output).
All three servers (the classifier alone, the reference; the sidecar; hopgate standalone)
run at once: p50/p99 and req/s of ``--requests`` sequential requests sent to each in turn,
then req/s with ``--concurrency`` clients in threads (``--requests`` / 4 each), each shape
twice in turn, the better kept.

Every loop is bounded (``--requests``). One client per thread, keep-alive (http.client).
The machine is named in the results: benchmarks/sidecar_results.json and benchmarks/sidecar.md
(``--out`` for another stem).

    python benchmarks/sidecar.py [--requests 200] [--rounds 3] [--concurrency 8] [--model BUNDLE]
                                 [--label NAME] [--image ID_IMAGE] [--parts 1,2]
                                 [--out benchmarks/sidecar]
    python benchmarks/sidecar.py stub PORT DELAY_MS [MODEL]    (the classifier, internal)
    python benchmarks/sidecar.py relay PORT STUB_PORT          (the bare relay, internal)
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hopgate importable when run from a checkout


# --- the stub classifier (its own process) ------------------------------------------------

def run_stub(port: int, delay_ms: float, model: str | None) -> None:
    """HTTP/1.1 keep-alive on asyncio: ``POST /predict`` answers after ``delay_ms``; with a
    model, the body is decoded and classified (one image per call), as a user's server."""
    classify = None
    if model:
        import numpy as np
        import onnxruntime as ort

        from hopgate.bundle import INPUT_IMAGES, LOGITS, load_meta
        from hopgate.service.imaging import decode

        meta = load_meta(model)
        opts = ort.SessionOptions()  # onnxruntime's defaults, but no busy-waiting threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # (as hopgate)
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

        def classify(body: bytes) -> bytes:
            x = decode(body, meta.height, meta.width, meta.channels, meta.pixels)
            (z,) = sess.run([LOGITS], {INPUT_IMAGES: x[None]})
            return json.dumps({"class": int(np.argmax(z[0]))}).encode()

    answer = b'{"label": "sneaker", "score": 0.93}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                body = await reader.readexactly(length)
                if delay_ms:
                    await asyncio.sleep(delay_ms / 1000)
                out = classify(body) if classify and body else answer
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%b" % (len(out), out))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    serve(handle, port)


def serve(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
          port: int) -> None:
    """``handle`` each connection on loopback ``port``, forever (uvloop where there is one)."""
    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# --- the measuring side -------------------------------------------------------------------

@contextmanager
def stub(delay_ms: float, model: str | None = None):
    with launched("stub", str(delay_ms), *([model] if model else [])) as url:
        yield url


@contextmanager
def launched(role: str, *args: str):
    """This script as ``role`` (``stub``, ``relay``) on a free port; its URL once it listens."""
    from hopgate.service.server.local import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, role, str(port), *args])
    try:
        for _ in range(200):
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def id_png(model: str) -> bytes:
    """One ID image (a Fashion-MNIST test image), PNG, at the bundle's size."""
    import numpy as np
    from PIL import Image

    from hopgate.bundle import load_meta
    from hopgate.model_export.data import sources as data

    meta = load_meta(model)
    images = data.fashion_mnist("test").images[:1]
    a = data.resize_all(images, (meta.height, meta.width), meta.channels)[0] \
        if (meta.height, meta.width, meta.channels) != images.shape[1:] else images[0]
    buf = io.BytesIO()
    Image.fromarray(np.squeeze(a)).save(buf, "PNG")
    return buf.getvalue()


def sequential(url: str, path: str, body: bytes, n: int, warm: int = 20) -> list[float]:
    """Seconds per request of ``n`` requests in a row on one keep-alive connection."""
    return rotation([(url, path)], body, n, warm, timeout=30)[0]


def concurrent(url: str, path: str, body: bytes, n: int, clients: int) -> float:
    """req/s with ``clients`` threads, each sending ``n`` requests in a row."""
    sequential(url, path, body, 5, 0)
    start = time.perf_counter()
    threads = [threading.Thread(target=sequential, args=(url, path, body, n, 0))
               for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return clients * n / (time.perf_counter() - start)


def pct(times: list[float], q: float) -> float:
    s = sorted(times)
    return 1e3 * s[min(len(s) - 1, int(q * len(s)))]


def summary(times: list[float]) -> dict:
    return {"p50_ms": round(pct(times, 0.5), 3), "p90_ms": round(pct(times, 0.9), 3),
            "p99_ms": round(pct(times, 0.99), 3),
            "req_s": round(len(times) / sum(times), 1),
            "mean_ms": round(1e3 * statistics.fmean(times), 3)}


@contextmanager
def gate(tmp: Path, model: str, **settings):
    from hopgate.service.server.local import local_server

    with local_server(tmp, model, log_requests="false", **settings) as s:  # else defaults
        yield s


def run_relay(port: int, upstream: int) -> None:
    """The floor of any hop: a bare TCP relay (asyncio, uvloop where there is one) that
    copies bytes both ways between each client connection and one to the stub."""
    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
        except ConnectionError:
            pass
        finally:
            w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

    serve(handle, port)


@contextmanager
def relay(upstream: str):
    with launched("relay", upstream.rsplit(":", 1)[1]) as url:
        yield url


def added_latency(model: str, body: bytes, n: int, tmp: Path, rounds: int) -> list[dict]:
    """Per run, ``rounds`` rounds of ``n`` requests to each target in turn; the round with
    the median added p50 is reported, with every round's added p50 beside it. The speculative
    run is taken beside the floor of a hop, in the same rotation: a bare TCP relay, and the
    gate's own unscored passthrough (another path on its data port, sidecar/passthrough.py)."""
    rows = []
    for label, delay, extra in (("stub at once, enforce", 0.0, {}),
                                ("stub 5 ms, enforce", 5.0, {}),
                                ("stub 5 ms, speculative", 5.0, {"speculative": "true"})):
        with stub(delay) as up, gate(tmp, model, upstream_url=up + "/predict",
                                     proxy_routes='["/predict"]', **extra) as g, \
                relay(up) as bare:
            names = [label]
            targets = [(up, "/predict"), (g.url, "/predict")]
            if extra:
                names += ["stub 5 ms, bare TCP relay (the floor of a hop)",
                          "stub 5 ms, gate passthrough (unscored path)"]
                targets += [(bare, "/predict"), (g.url, "/other")]
            measured: list[list] = [[] for _ in names]
            for k in range(rounds):
                direct, *through = rotation(targets, body, n, shuffled=random.Random(k))
                d = summary(direct)
                for m, t in zip(measured, map(summary, through)):
                    m.append((round(t["p50_ms"] - d["p50_ms"], 3), d, t))
        for name, m in zip(names, measured):
            m.sort(key=lambda x: x[0])
            added, d, t = m[len(m) // 2]
            rows.append({"run": name, "direct": d, "through_gate": t, "added_p50_ms": added,
                         "added_p50_ms_rounds": [x[0] for x in m]})
            print(f"{name}: direct p50 {d['p50_ms']} ms, through {t['p50_ms']} ms, "
                  f"added {added} ms", flush=True)
    return rows


def rotation(targets: list[tuple[str, str]], body: bytes, n: int, warm: int = 20,
             timeout: float = 60, shuffled: random.Random | None = None) -> list[list[float]]:
    """``n`` requests to each (url, path), one to each in turn (each its own keep-alive
    connection), so that whatever else the machine does hits them alike; ``shuffled``: each
    turn in another order, so that no target always follows the same one (on this VM the
    added p50 of one target moved by 0.5 ms with the target before it: which processes
    had just run, and how long the others had slept)."""
    conns = [(http.client.HTTPConnection(*u.removeprefix("http://").split(":"),
                                         timeout=timeout), p) for u, p in targets]
    headers = {"content-type": "image/png"}
    times: list[list[float]] = [[] for _ in targets]
    turn = list(zip(conns, times))
    for i in range(warm + n):
        if shuffled is not None:
            shuffled.shuffle(turn)
        for (conn, path), out in turn:
            t0 = time.perf_counter()
            conn.request("POST", path, body, headers)
            r = conn.getresponse()
            r.read()
            if r.status >= 300:
                raise RuntimeError(f"{conn.host}:{conn.port}{path}: {r.status}")
            if i >= warm:
                out.append(time.perf_counter() - t0)
    for conn, _ in conns:
        conn.close()
    return times


def shapes(model: str, body: bytes, n: int, clients: int, tmp: Path) -> list[dict]:
    """The classifier alone, the sidecar and one pass, all three up at once: latency from
    requests sent to each in turn; throughput with ``clients`` threads, each shape twice in
    turn (the better of its two kept: interference only ever lowers it)."""
    names = ("classifier alone (reference)", "sidecar (gate, then the classifier: two passes)",
             "one pass (hopgate /score?top_k=3)")
    with stub(0.0, model) as up, \
            gate(tmp, model, upstream_url=up + "/predict", proxy_routes='["/predict"]') as side, \
            gate(tmp, model) as one:
        targets = [(up, "/predict"), (side.url, "/predict"), (one.url, "/score?top_k=3")]
        rows = [{"shape": name, **summary(t)}
                for name, t in zip(names, rotation(targets, body, n))]
        best = [0.0] * len(targets)
        for _ in range(2):
            for k, (url, path) in enumerate(targets):
                best[k] = max(best[k], concurrent(url, path, body, max(n // 4, 10), clients))
    for r, rate in zip(rows, best):
        r["req_s_concurrent"] = round(rate, 1)
        r["added_p50_ms"] = round(r["p50_ms"] - rows[0]["p50_ms"], 3)
        print(r, flush=True)
    return rows


def machine() -> str:
    from hopgate.machine import describe

    return f"{describe()}, no GPU; load average {os.getloadavg()[0]:.2f} at the start"


def render(doc: dict) -> str:
    out = ["# Sidecar latency and the two deployment shapes", "",
           "Written by `benchmarks/sidecar.py` (its docstring says what is measured); each "
           "section names its run: command, machine, time.", ""]
    for bundle, part in doc["runs"].items():
        out += [f"### {bundle}", "", f"`python benchmarks/sidecar.py {part.get('args', '')}` "
                f"on {part.get('machine', doc['machine'])}, {part.get('when', doc['when'])}.",
                ""]
        if part.get("added"):
            out += [f"## Added latency through the gate ({bundle})", "",
                    "| run | direct p50 | through the gate p50 | p99 | added p50 (median "
                    "round) | added p50, every round |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['run']} | {r['direct']['p50_ms']} ms | {r['through_gate']['p50_ms']} "
                    f"ms | {r['through_gate']['p99_ms']} ms | **{r['added_p50_ms']} ms** | "
                    f"{', '.join(str(x) for x in r.get('added_p50_ms_rounds', []))} |"
                    for r in part["added"]]
            out.append("")
        if part.get("shapes"):
            out += [f"## Two shapes ({bundle})", "",
                    "| shape | p50 | p99 | req/s, 1 client | req/s, "
                    f"{part.get('concurrency', doc['concurrency'])} clients | added p50 over "
                    "the classifier |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['shape']} | {r['p50_ms']} ms | {r['p99_ms']} ms | {r['req_s']} | "
                    f"{r['req_s_concurrent']} | {r['added_p50_ms']} ms |" for r in part["shapes"]]
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stub"]:
        run_stub(int(argv[1]), float(argv[2]), argv[3] if len(argv) > 3 else None)
        return 0
    if argv[:1] == ["relay"]:
        run_relay(int(argv[1]), int(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="part 1: rounds per run (median)")
    ap.add_argument("--model", default=str(ROOT / "models" / "default.onnx"))
    ap.add_argument("--label", default="default bundle")
    ap.add_argument("--image", help="an ID image for the bundle (default: a Fashion-MNIST "
                                    "test image, ID for the default bundle)")
    ap.add_argument("--parts", default="1,2", help="1: added latency, 2: the two shapes")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "sidecar"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    doc = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "args": " ".join(Path(a).name if os.path.isabs(a) else a for a in argv),
           "requests": args.requests, "concurrency": args.concurrency,
           "runs": {}}
    if out.with_suffix(".json").exists():  # runs of other bundles are kept
        old = json.loads(out.with_suffix(".json").read_text())
        doc["runs"] = {k: v for k, v in old.get("runs", {}).items() if k != args.label}
    body = Path(args.image).read_bytes() if args.image else id_png(args.model)
    part: dict = {"args": doc["args"], "machine": doc["machine"], "when": doc["when"],
                  "concurrency": args.concurrency}
    with tempfile.TemporaryDirectory() as tmp:
        if "1" in args.parts:
            part["added"] = added_latency(args.model, body, args.requests, Path(tmp),
                                          args.rounds)
        if "2" in args.parts:
            part["shapes"] = shapes(args.model, body, args.requests, args.concurrency, Path(tmp))
    doc["runs"][args.label] = part
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(doc) + "\n")
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
