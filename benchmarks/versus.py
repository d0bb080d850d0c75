"""hopgate against the servers a user could write instead (issue 15), side by side in one run.

Each server runs ALONE on the machine while it is measured (started, warmed, measured, stopped),
and ``wrk`` (C, one thread, keep-alive) sends one 224 px Fashion-MNIST JPEG per request at each
concurrency, for a bounded time. Per point: req/s, p50/p90/p99, non-2xx and socket errors, the
server's CPU seconds per 1,000 images (all its processes), its RSS (all processes, and the
largest one: "per worker") and wrk's own CPU. Machine and load average are recorded: on a
shared machine the absolute figures move, the ratios less so.

Servers:
  * ``hopgate``: ``hopgate-serve`` with its defaults (plus ``--env K=V`` for every hopgate run);
  * ``naive``: benchmarks/peers/naive.py (FastAPI + onnxruntime inline, no batching);
  * ``litserve``: benchmarks/peers/litserve_peer.py, with ``--litserve-python`` pointing at a
    venv that has LitServe (skipped with a note otherwise; sent the JPEG as multipart);
  * ``hopgate@REF``: with ``--before REF``, hopgate as of that git commit (``git archive``), to
    show before/after in the same run;
  * ``--variant NAME:K=V,K=V``: more hopgate runs with HOPGATE_* settings (tuning).

    python benchmarks/versus.py [--seconds 10] [--concurrency 1 8 32 128] [--rounds 3]
                                [--before HEAD]

``--rounds N`` measures every server N times, the servers interleaved and the order rotating
(A B C, B C A, C A B, ...), and reports per point the round with the median req/s: other jobs
on a shared machine then hit every server alike. With ``--resident`` every server is started
once and stays up (idle while another is loaded), so a round's points are seconds apart; the
paired ratios (each round's own hopgate ÷ naive, the median over rounds) are then the figures
to quote: on this VM, a server restarted per round moved its CPU per image by ±10 % from
round to round. The 1-minute load average before each point is recorded.

``--before REF`` runs REF's tree from its own directory, so the workers it starts with
``python -m`` run REF's code too (before, they imported this tree's).

``wrk`` comes from Debian (``apt-get install -y wrk``); run as root, the benchmark installs it
itself when it is missing. Output: benchmarks/versus_results.json and benchmarks/versus.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hopgate.machine import describe  # noqa: E402
from hopgate.service.server.local import free_port  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stages  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
DEFAULT = ROOT / "models" / "default.onnx"
LUA = r"""
local f = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "{ctype}"
local non2xx = 0
response = function(status, headers, body)
  if status >= 300 then non2xx = non2xx + 1 end
end
done = function(s, lat, req)
  local e = s.errors
  io.write(string.format('WRKJSON {{"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"mean_us":%.1f,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d}}\n', s.requests, s.duration, lat:percentile(50), lat:percentile(90),
    lat:percentile(99), lat.max, lat.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def machine() -> str:
    return f"{describe()}, no GPU"


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk missing: apt-get install -y wrk", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=False,
                       stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
        if found:
            return found
    sys.exit("versus.py needs wrk: `apt-get install -y wrk` (Debian/Ubuntu) or "
             "https://github.com/wg/wrk")


def fashion_jpeg(index: int = 0, side: int = 224, quality: int = 90) -> bytes:
    """A Fashion-MNIST test image as a client sends it: grey, bilinear to ``side``, JPEG."""
    with gzip.open(FASHION, "rb") as f:
        a = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    img = Image.fromarray(a[index]).resize((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def multipart(jpeg: bytes, boundary: str = "hopgateversusboundary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; "
            f"filename=\"x.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + jpeg + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def cpu_seconds(pids: list[int]) -> float:
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError):
            pass
    return total


def rss_mb(pids: list[int]) -> list[float]:
    out = []
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) / 1024.0)
        except OSError:
            pass
    return out


class Server:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log: Path,
                 ctype: str, body: Path, cwd: Path = ROOT):
        self.name, self.port, self.ctype, self.body = name, port, ctype, body
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=cwd, start_new_session=True)
        self.log = log

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready in {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its kids
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def wrk_point(wrk: str, server: Server, script: Path, conc: int, seconds: float) -> dict:
    pids = tree(server.proc.pid)
    cpu0, wall0 = cpu_seconds(pids), time.perf_counter()
    child0 = os.times()
    argv = [wrk, "-t1", f"-c{conc}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script),
            server.url + "/score"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    child1 = os.times()
    pids = tree(server.proc.pid)
    cpu = cpu_seconds(pids) - cpu0
    line = next((x for x in run.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk said: {run.stdout}\n{run.stderr}")
    r = json.loads(line[len("WRKJSON "):])
    n, dur = r["requests"], r["duration_us"] / 1e6
    rss = rss_mb(pids)
    bad = r["status"]  # wrk's own count of non-2xx/3xx answers
    return {"concurrency": conc, "requests": n, "req_per_s": n / dur,
            "p50_ms": r["p50_us"] / 1e3, "p90_ms": r["p90_us"] / 1e3,
            "p99_ms": r["p99_us"] / 1e3, "max_ms": r["max_us"] / 1e3,
            "non2xx": bad, "socket_errors": r["connect"] + r["read"] + r["write"] + r["timeout"],
            "server_cpu_s_per_1000": 1000 * cpu / max(n, 1),
            "server_cpu_share": cpu / (time.perf_counter() - wall0),
            "wrk_cpu_s_per_1000": 1000 * ((child1.children_user + child1.children_system)
                                          - (child0.children_user + child0.children_system))
                                  / max(n, 1),
            "rss_mb_total": round(sum(rss), 1), "rss_mb_max_process": round(max(rss), 1),
            "processes": len(rss), "loadavg_1m_after": os.getloadavg()[0]}


def serve_entry(ref: str) -> tuple[str, str]:
    """``hopgate-serve``'s module and function as of ``ref`` (its pyproject's scripts: the
    module moved with issue 22's layout)."""
    text = subprocess.run(["git", "show", f"{ref}:pyproject.toml"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    line = next(x for x in text.splitlines() if x.strip().startswith("hopgate-serve"))
    module, _, func = line.split("=", 1)[1].split("#")[0].strip().strip('"').partition(":")
    return module, func


def before_tree(ref: str, into: Path) -> Path:
    """hopgate as of ``ref``: its hopgate/ with service/ inside it, importable from ``into``."""
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, "hopgate", "service"], cwd=ROOT,
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = into / "pkg"
    shutil.copytree(src / "hopgate", pkg / "hopgate")
    shutil.copytree(src / "service", pkg / "hopgate" / "service")
    return pkg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--servers", nargs="+", default=["hopgate", "naive", "litserve"])
    p.add_argument("--litserve-python", default="/work/litserve-venv/bin/python",
                   help="a python with litserve installed (the peer is skipped without one)")
    p.add_argument("--before", action="append", default=[],
                   help="also run hopgate as of this git ref (repeatable)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:K=V,K=V  another hopgate run with these HOPGATE_* settings")
    p.add_argument("--env", action="append", default=[], help="K=V for every hopgate run")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every server this many times, interleaved; the median counts")
    p.add_argument("--resident", action="store_true",
                   help="start every server once and keep it up; each round loads them one "
                        "at a time (paired rounds, no start-up between them)")
    p.add_argument("--profile", type=int, default=32, metavar="C",
                   help="after the points, profile each server at this concurrency with py-spy "
                        "(stage by stage; 0: do not)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "versus_results.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "versus.md")
    a = p.parse_args(argv)
    wrk = ensure_wrk()
    tmp = Path(tempfile.mkdtemp(prefix="hopgate-versus-"))
    jpeg = fashion_jpeg()
    raw, form = tmp / "body.jpg", tmp / "body.multipart"
    raw.write_bytes(jpeg)
    form_body, form_type = multipart(jpeg)
    form.write_bytes(form_body)
    out: dict = {"machine": machine(), "seconds_per_point": a.seconds, "client": "wrk -t1",
                 "profile_concurrency": a.profile, "rounds": a.rounds,
                 "image": f"Fashion-MNIST test[0], 224 px grey JPEG q90, {len(jpeg)} bytes",
                 "model": str(a.model.relative_to(ROOT) if a.model.is_relative_to(ROOT)
                              else a.model),
                 "loadavg_start": os.getloadavg(), "servers": {}, "notes": []}
    snapshot = tmp / a.model.name  # every server runs the same bytes, even if the file changes
    shutil.copyfile(a.model, snapshot)
    a.model = snapshot
    out["model_sha256"] = hashlib.sha256(snapshot.read_bytes()).hexdigest()
    py = sys.executable
    hop_env = dict(kv.split("=", 1) for kv in a.env)
    plans: list[tuple[str, list[str], dict[str, str], Path, str]] = []
    cwds: dict[str, Path] = {}  # a server run from another tree than this one
    for name in a.servers:
        if name == "hopgate":
            plans.append(("hopgate", [py, "-m", "hopgate.service.server.cli"], hop_env, raw,
                          "image/jpeg"))
        elif name == "naive":
            plans.append(("naive", [py, "benchmarks/peers/naive.py", "{port}", str(a.model)],
                          {}, raw, "image/jpeg"))
        elif name == "litserve":
            ok = Path(a.litserve_python).exists() and subprocess.run(
                [a.litserve_python, "-c", "import litserve"], capture_output=True).returncode == 0
            if not ok:
                out["notes"].append(f"litserve skipped: no litserve at {a.litserve_python}")
                continue
            plans.append(("litserve", [a.litserve_python, "benchmarks/peers/litserve_peer.py",
                                       "{port}", str(a.model)], {}, form, form_type))
    for v in a.variant:
        name, _, kvs = v.partition(":")
        env = {**hop_env, **dict(kv.split("=", 1) for kv in kvs.split(",") if kv)}
        plans.append((name, [py, "-m", "hopgate.service.server.cli"], env, raw, "image/jpeg"))
    for ref in a.before:  # run from its own tree: cwd first on sys.path, for the workers it
        pkg = before_tree(ref, tmp / f"before-{ref}")  # starts with ``-m`` as for itself
        module, func = serve_entry(ref)
        code = f"import sys; from {module} import {func}; sys.exit({func}())"
        plans.append((f"hopgate@{ref}", [py, "-c", code], hop_env, raw, "image/jpeg"))
        cwds[f"hopgate@{ref}"] = pkg

    runs: dict[str, list[list[dict]]] = {}
    if a.resident:  # every server up at once; the load alternates between them
        runs = resident(wrk, tmp, a, plans, cwds, out)
    for rnd in range(0 if a.resident else a.rounds):  # rounds interleave the servers
        for name, cmd, env, body, ctype in rotated(plans, rnd):
            profile_now = a.profile and rnd == a.rounds - 1
            points, stage = measure(wrk, tmp, a, name, cmd, env, body, ctype, profile_now,
                                    cwds.get(name, ROOT))
            runs.setdefault(name, []).append(points)
            out["servers"].setdefault(name, {"settings": env})["rounds"] = runs[name]
            if stage is not None:
                out["servers"][name]["stages"] = stage
    for name, rounds in runs.items():  # per point, the round with the median req/s
        out["servers"][name]["points"] = [
            sorted(pts, key=lambda p: p["req_per_s"])[len(pts) // 2] for pts in zip(*rounds)]
    out["loadavg_end"] = os.getloadavg()
    out["ratios_vs_naive"] = ratios(out["servers"])
    out["paired_ratios_vs_naive"] = paired(out["servers"])
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    a.markdown.write_text(markdown(out))
    print(json.dumps(out["paired_ratios_vs_naive"] or out["ratios_vs_naive"], indent=1))


def _start(tmp: Path, a: argparse.Namespace, name: str, cmd: list[str], env: dict[str, str],
           body: Path, ctype: str, cwd: Path) -> tuple[Server, Path]:
    port = free_port()
    full_env = {**os.environ, "HOPGATE_PORT": str(port), "HOPGATE_HOST": "127.0.0.1",
                "HOPGATE_MODEL": str(a.model), "PYTHONUNBUFFERED": "1"}
    full_env.update({k if k.startswith("HOPGATE_") else f"HOPGATE_{k.upper()}": v
                     for k, v in env.items()})
    script = tmp / f"{name.replace('@', '_')}.lua"
    script.write_text(LUA.format(body=body, ctype=ctype))
    s = Server(name, [c.replace("{port}", str(port)) for c in cmd], full_env, port,
               tmp / f"{name.replace('@', '_')}.log", ctype, body, cwd)
    return s, script


def rotated(items: list, rnd: int) -> list:
    """Round ``rnd``'s order: drift hits every server alike, and each round starts with the
    next one, so does any effect of going first."""
    turn = rnd % len(items)
    return items[turn:] + items[:turn]


def _warm(wrk: str, s: Server, script: Path) -> None:
    time.sleep(1.0)
    wrk_point(wrk, s, script, 8, 2.0)  # warm: connections, allocator, caches


def _point(wrk: str, s: Server, script: Path, c: int, seconds: float) -> dict:
    load = os.getloadavg()[0]
    pt = {**wrk_point(wrk, s, script, c, seconds), "loadavg_1m_before": load}
    print(f"{s.name:>16} c={c:<4} {pt['req_per_s']:7.1f} req/s  p50 "
          f"{pt['p50_ms']:7.2f} ms  p99 {pt['p99_ms']:7.2f} ms  cpu/1k "
          f"{pt['server_cpu_s_per_1000']:.2f} s  rss {pt['rss_mb_max_process']:.0f}"
          f" MB ({pt['processes']} proc)  non2xx {pt['non2xx']}  load {load:.2f}", flush=True)
    return pt


def resident(wrk: str, tmp: Path, a: argparse.Namespace, plans: list, cwds: dict[str, Path],
             out: dict) -> dict[str, list[list[dict]]]:
    """``--resident``: every server started and warmed once; then, round by round (the order
    rotating), each alone under load at every concurrency while the others sit idle. A
    round's points are seconds apart, not a server start apart: the per-round ratios pair."""
    runs: dict[str, list[list[dict]]] = {}
    started: list[tuple[Server, Path, dict[str, str]]] = []
    try:
        for name, cmd, env, body, ctype in plans:
            s, script = _start(tmp, a, name, cmd, env, body, ctype, cwds.get(name, ROOT))
            started.append((s, script, env))
            s.wait_ready()
        for s, script, _ in started:
            _warm(wrk, s, script)
        for rnd in range(a.rounds):
            for s, script, env in rotated(started, rnd):
                runs.setdefault(s.name, []).append(
                    [_point(wrk, s, script, c, a.seconds) for c in a.concurrency])
                out["servers"].setdefault(s.name, {"settings": env})["rounds"] = runs[s.name]
        if a.profile:
            for s, script, _ in started:
                out["servers"][s.name]["stages"] = profile(
                    wrk, s, script, a.profile, a.seconds, runs[s.name][-1])
    finally:
        for s, _, _ in started:
            s.stop()
    return runs


def measure(wrk: str, tmp: Path, a: argparse.Namespace, name: str, cmd: list[str],
            env: dict[str, str], body: Path, ctype: str, profile_now: bool, cwd: Path = ROOT
            ) -> tuple[list[dict], dict | None]:
    """Start one server alone, warm it, measure every concurrency, profile, stop it."""
    s, script = _start(tmp, a, name, cmd, env, body, ctype, cwd)
    stage = None
    try:
        s.wait_ready()
        _warm(wrk, s, script)
        points = [_point(wrk, s, script, c, a.seconds) for c in a.concurrency]
        if profile_now:
            stage = profile(wrk, s, script, a.profile, a.seconds, points)
    finally:
        s.stop()
    time.sleep(1.0)
    return points, stage


def profile(wrk: str, server: Server, script: Path, conc: int, seconds: float,
            points: list[dict]) -> dict | None:
    """Stage-by-stage CPU per request under a separate (unmeasured) wrk run at ``conc``."""
    import threading

    holder: dict = {}

    def load() -> None:
        holder["point"] = wrk_point(wrk, server, script, conc, seconds)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(1.0)
    raw = stages.record(server.proc.pid, max(1.0, seconds - 2))
    t.join()
    if raw is None:
        return None
    ref = next((p for p in points if p["concurrency"] == conc), holder["point"])
    return stages.breakdown(raw, ref["server_cpu_s_per_1000"])  # s per 1000 = ms per request


def paired(servers: dict) -> dict:
    """Per server and concurrency, the median over rounds of each round's own ratio to the
    naive server (req/s, CPU per image, p99): with --resident, the pairs are seconds apart."""
    if "naive" not in servers or len(servers["naive"].get("rounds", [])) < 2:
        return {}
    base = servers["naive"]["rounds"]
    out: dict = {}

    def med(xs: list[float]) -> float:
        return round(float(np.median(xs)), 3)

    for name, s in servers.items():
        if name == "naive":
            continue
        per: dict = {}
        for rnd, nrnd in zip(s["rounds"], base):
            for p, q in zip(rnd, nrnd):
                r = per.setdefault(str(p["concurrency"]), {"req": [], "cpu": [], "p99": []})
                r["req"].append(p["req_per_s"] / q["req_per_s"])
                r["cpu"].append(p["server_cpu_s_per_1000"] / q["server_cpu_s_per_1000"])
                r["p99"].append(p["p99_ms"] / q["p99_ms"])
        out[name] = {c: {"throughput_ratio": med(r["req"]), "cpu_ratio": med(r["cpu"]),
                         "p99_ratio": med(r["p99"]),
                         "throughput_ratio_rounds": [round(x, 3) for x in r["req"]],
                         "cpu_ratio_rounds": [round(x, 3) for x in r["cpu"]]}
                     for c, r in per.items()}
    return out


def ratios(servers: dict) -> dict:
    """Per server and concurrency: req/s ÷ naive's, p50 − naive's, p99 ÷ naive's."""
    if "naive" not in servers:
        return {}
    base = {p["concurrency"]: p for p in servers["naive"]["points"]}
    out: dict = {}
    for name, s in servers.items():
        if name == "naive":
            continue
        out[name] = {str(p["concurrency"]): {
            "throughput_ratio": round(p["req_per_s"] / base[p["concurrency"]]["req_per_s"], 3),
            "p50_minus_naive_ms": round(p["p50_ms"] - base[p["concurrency"]]["p50_ms"], 3),
            "p99_ratio": round(p["p99_ms"] / base[p["concurrency"]]["p99_ms"], 3)}
            for p in s["points"] if p["concurrency"] in base}
    return out


def _table(servers: dict, key: str) -> list[str]:
    """One table of ``servers[name][key]`` points, ratios to naive's points of the same key."""
    r = ratios({n: {"points": s[key]} for n, s in servers.items()})
    lines = ["| server | c | req/s | p50 ms | p99 ms | CPU s / 1k img | RSS MB (largest "
             "process / all) | non-2xx | × naive req/s | p50 − naive ms | p99 ÷ naive | "
             "load avg before |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in servers.items():
        for p in s[key]:
            c = str(p["concurrency"])
            ratio = r.get(name, {}).get(c, {})
            lines.append(
                f"| {name} | {c} | {p['req_per_s']:.0f} | {p['p50_ms']:.2f} | {p['p99_ms']:.1f}"
                f" | {p['server_cpu_s_per_1000']:.2f} | {p['rss_mb_max_process']:.0f} / "
                f"{p['rss_mb_total']:.0f} | {p['non2xx'] + p['socket_errors']} | "
                f"{ratio.get('throughput_ratio', '')} | {ratio.get('p50_minus_naive_ms', '')} | "
                f"{ratio.get('p99_ratio', '')} | {p.get('loadavg_1m_before', float('nan')):.2f} |")
    return lines


def markdown(out: dict) -> str:
    lines = [f"# hopgate versus its peers ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Machine: {out['machine']}. Client: {out['client']} on the same cores. "
             f"{out['image']}. Model: {out['model']}. {out['seconds_per_point']:g} s per point, "
             f"{out['rounds']} round(s), the servers interleaved. "
             f"Load average (1 min) at start {out['loadavg_start'][0]:.2f}, end "
             f"{out['loadavg_end'][0]:.2f} (the benchmark itself adds ~2 on 2 cores: read the "
             "column as a hint, and a round that ran beside other jobs as such).", ""]
    lines += [f"Note: {n}" for n in out["notes"]]
    rounds = out["rounds"]
    for i in range(rounds):
        per = {n: {"points": s["rounds"][i]} for n, s in out["servers"].items()}
        lines += ["", f"## Round {i + 1} of {rounds}", "", *_table(per, "points")]
    if rounds > 1:
        lines += ["", "## Per point, the round with the median req/s", "",
                  *_table(out["servers"], "points")]
    if out.get("paired_ratios_vs_naive"):
        lines += ["", "## Paired: each round's own ratio to the naive server, median over "
                      "rounds", "", "| server | c | × naive req/s | CPU per image ÷ naive's | "
                      "p99 ÷ naive's | CPU ratio, round by round |", "|---|---|---|---|---|---|"]
        for name, per in out["paired_ratios_vs_naive"].items():
            for c, r in per.items():
                lines.append(f"| {name} | {c} | {r['throughput_ratio']:.3f} | "
                             f"{r['cpu_ratio']:.3f} | {r['p99_ratio']:.3f} | "
                             f"{', '.join(f'{x:.3f}' for x in r['cpu_ratio_rounds'])} |")
    for name, s in out["servers"].items():
        if s.get("stages"):
            lines += ["", f"### {name}: server CPU per request by stage (py-spy, "
                          f"c={out['profile_concurrency']})", "", *stages.table(s["stages"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
