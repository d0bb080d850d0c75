"""The worker model for CPU machines: N server processes on one port (``HOPGATE_WORKERS``).

``hopgate-serve`` with ``workers`` > 1 becomes a small supervisor: it binds N listening
sockets on the port (SO_REUSEPORT; one shared socket where the platform has none) and starts
N copies of itself, each a whole server (its own event loop, decoder, batcher and onnxruntime
session) accepting on its own socket; the kernel spreads new connections over them by their
addresses (a shared socket gave a burst of connections to whichever worker woke first: 29 of
32 to one of two). One process per core is what
a CPU machine wants: one Python process does its HTTP, decoding and answers under one GIL,
and onnxruntime gains little from more threads on a small model (issue 15, measured in
benchmarks/versus.md). ``workers = 0``, the default, is ``choose``: one per usable core (CPU
affinity and a cgroup CPU quota both count), fewer where memory (the cgroup limit, else what
the machine has available) holds fewer workers of this bundle, and one where onnxruntime will
run on CUDA (one process keeps the device busy with many requests in flight and larger
batches). The choice and its reasons are logged at start in one line. Each worker's
onnxruntime gets cores ÷ workers intra-op threads unless ``HOPGATE_INTRA_OP_THREADS`` says
otherwise, computes its batches on its event loop (``HOPGATE_BATCH_SLOTS`` 0, batcher.py),
and runs a lone request's image on a session with every usable core (``HOPGATE_SOLO_THREADS``,
runtime/session.py): at concurrency 1 the other workers' cores are idle.

The supervisor forwards SIGTERM/SIGINT to every worker; each drains as a lone server does
(cli.py) and the supervisor exits with the worst exit code once all have. SIGHUP is
forwarded too: each worker reloads its bundle (reload.py). If a worker dies on
its own, the others are stopped and the supervisor exits non-zero: the orchestrator restarts
the whole pod or unit (no half-capacity server left running quietly).

What is per worker: the bounds (bytes in flight, queues, decode memory: each worker has the
whole budget, so a machine with N workers holds up to N times it), and ``/metrics`` (a scrape
reaches one worker; use one worker per pod, or scrape each, where exact totals matter).
On a GPU machine use one worker: one process keeps the device busy with larger batches.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from . import board

CGROUP = Path("/sys/fs/cgroup")  # cpu.max and memory.max (v2), memory/ (v1)
LISTEN_FD = "HOPGATE_LISTEN_FD"  # set by the supervisor for each worker: its listening socket
ADMIN_FD = "HOPGATE_ADMIN_FD"  # ... and the admin port's, in sidecar mode (sidecar/passthrough.py)


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = (CGROUP / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def resolve(workers: int) -> int:
    return workers if workers > 0 else usable_cores()


WORKER_BASE_BYTES = 200 * 2**20  # one worker's RSS beside its bundle (measured: ~140-155 MB)
# the bundle's bytes: the file, the session's weights, its arena, and the solo session
# (runtime/session.py; measured: a 73 MB bundle adds 187 MB without it, 269 MB with it)
BUNDLE_FACTOR = 4


def memory_available() -> int | None:
    """Bytes this process may use: the cgroup limit (v2, then v1), else MemAvailable."""
    for path in (CGROUP / "memory.max", CGROUP / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # v1 writes "no limit" as a huge number
            return int(text)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose(workers: int, providers: list[str], available: list[str],
           bundle_bytes: int) -> tuple[int, str]:
    """How many workers, and why (the line logged at start). ``workers`` > 0 is taken as set;
    0 is one per usable core, bounded by memory, and one on CUDA."""
    if workers > 0:
        return workers, f"workers: {workers} (HOPGATE_WORKERS)"
    first = next((p for p in providers if p in available), "CPUExecutionProvider")
    if first == "CUDAExecutionProvider":
        return 1, ("workers: 1 (onnxruntime on CUDA: one process, many requests in flight; "
                   "HOPGATE_WORKERS sets more)")
    cores = usable_cores()
    per = WORKER_BASE_BYTES + BUNDLE_FACTOR * bundle_bytes
    memory = memory_available()
    by_memory = max(1, memory // per) if memory is not None else cores
    n = max(1, min(cores, by_memory))
    mem = (f"memory {memory / 2**20:.0f} MiB holds {by_memory} at ~{per / 2**20:.0f} MiB each"
           if memory is not None else "memory unknown")
    return n, (f"workers: {n} (one per usable core: {cores} (affinity and cgroup CPU quota); "
               f"{mem}; HOPGATE_WORKERS sets another number, 1 for one process)")


def inherited_socket(name: str = LISTEN_FD) -> socket.socket | None:
    """In a worker: the supervisor's listening socket (``ADMIN_FD``: the admin port's);
    None in a lone server."""
    fd = os.environ.get(name)
    return socket.socket(fileno=int(fd)) if fd else None


def listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port``, inheritable by workers; ``reuse_port``: one of
    several on the same port (SO_REUSEPORT), among which the kernel spreads new connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def supervise(host: str, port: int, workers: int, argv: list[str],
              admin_port: int | None = None) -> int:
    """Bind ``host:port`` (and ``admin_port``), run ``workers`` copies of ``hopgate-serve
    argv`` on them, forward signals, and return the worst exit code."""
    # one listening socket per worker on the one port (SO_REUSEPORT): the kernel spreads the
    # connections by their addresses. One shared socket let whichever worker woke first take
    # a burst: 29 of wrk's 32 connections went to one of two workers, 3 to the other.
    reuse = hasattr(socket, "SO_REUSEPORT")
    first = listen_socket(host, port, reuse)
    port = first.getsockname()[1]  # port 0: the one the first socket got
    socks = [first] + [listen_socket(host, port, True) for _ in range(workers - 1) if reuse]
    env = {**os.environ, "HOPGATE_WORKERS": "1"}
    fds: list[int] = []
    if admin_port is not None:  # each worker accepts on both (sidecar/passthrough.py)
        admin = listen_socket(host, admin_port)
        env[ADMIN_FD] = str(admin.fileno())
        fds.append(admin.fileno())
    # the cores shared out: onnxruntime's threads per worker, unless set (0, the chart's, is not)
    if env.get("HOPGATE_INTRA_OP_THREADS", "0").strip() in ("", "0"):
        env["HOPGATE_INTRA_OP_THREADS"] = str(max(1, usable_cores() // workers))
    # ... and a worker's batches on its event loop: with about one core each, a runtime thread
    # beside the loop overlaps nothing and costs two hand-offs per batch (batcher.py)
    env.setdefault("HOPGATE_BATCH_SLOTS", "0")
    # ... and which of them are busy: a lone request spins two threads only on an idle machine
    shared = board.create(workers)
    if shared is not None:
        env[board.BOARD_FD] = str(shared)
        fds.append(shared)
    cmd = [sys.executable, "-m", "hopgate.service.server.cli", *argv]
    procs = []
    for k in range(workers):
        sock = socks[k % len(socks)]
        procs.append(subprocess.Popen(cmd, env={**env, LISTEN_FD: str(sock.fileno()),
                                                board.WORKER_INDEX: str(k)},
                                      pass_fds=(sock.fileno(), *fds)))
    stopping = False

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    def reload(sig: int, frame: FrameType | None) -> None:  # each worker reloads (reload.py)
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    signal.signal(signal.SIGHUP, reload)
    died = False
    while any(p.poll() is None for p in procs):
        if not stopping and any(p.poll() is not None for p in procs):  # one died on its own
            died = True
            forward(signal.SIGTERM, None)
        time.sleep(0.2)
    for sock in socks:
        sock.close()
    worst = max((abs(p.returncode) for p in procs), default=0)
    return worst or (1 if died else 0)
