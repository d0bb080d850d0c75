"""The worker model for CPU machines: N server processes on one port (``HOPGATE_WORKERS``).

``hopgate-serve`` with ``workers`` > 1 becomes a small supervisor: it binds the listening
socket once and starts N copies of itself, each a whole server (its own event loop, decoder,
batcher and onnxruntime session) accepting on that one shared socket, so the kernel hands
each new connection to whichever worker is free to accept it. One process per core is what
a CPU machine wants: one Python process does its HTTP, decoding and answers under one GIL,
and onnxruntime gains little from more threads on a small model (issue 15, measured in
benchmarks/versus.md). ``workers = 0`` means one per usable core (CPU affinity and a cgroup
CPU quota both count). Each worker's onnxruntime gets cores ÷ workers intra-op threads unless
``HOPGATE_INTRA_OP_THREADS`` says otherwise.

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

LISTEN_FD = "HOPGATE_LISTEN_FD"  # set by the supervisor for its workers: the shared socket


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def resolve(workers: int) -> int:
    return workers if workers > 0 else usable_cores()


def inherited_socket() -> socket.socket | None:
    """In a worker: the supervisor's listening socket; None in a lone server."""
    fd = os.environ.get(LISTEN_FD)
    return socket.socket(fileno=int(fd)) if fd else None


def supervise(host: str, port: int, workers: int, argv: list[str]) -> int:
    """Bind ``host:port``, run ``workers`` copies of ``hopgate-serve argv`` on it, forward
    signals, and return the worst exit code."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    env = {**os.environ, LISTEN_FD: str(sock.fileno()), "HOPGATE_WORKERS": "1"}
    # the cores shared out: onnxruntime's threads per worker, unless set
    env.setdefault("HOPGATE_INTRA_OP_THREADS", str(max(1, usable_cores() // workers)))
    cmd = [sys.executable, "-m", "hopgate.service.cli", *argv]
    procs = [subprocess.Popen(cmd, env=env, pass_fds=(sock.fileno(),)) for _ in range(workers)]
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
    sock.close()
    worst = max((abs(p.returncode) for p in procs), default=0)
    return worst or (1 if died else 0)
