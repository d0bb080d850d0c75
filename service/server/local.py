"""Run ``hopgate-serve`` as a subprocess on a loopback port (tests, benchmarks, smoke checks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``url``: the service (in sidecar mode the classifier's data port); ``admin_url``:
    hopgate's own endpoints (the same as ``url`` without an admin port)."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path,
                 admin_port: int | None = None):
        self.proc, self.port, self.log, self.admin_port = proc, port, log, admin_port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}" if admin_port else self.url

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.admin_url + "/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False


@contextmanager
def local_server(log_dir: Path, model: str | Path | None = None, timeout: float = 60,
                 **settings: object) -> Iterator[LocalServer]:
    """Start the service with HOPGATE_* ``settings`` (one worker unless ``workers`` is given);
    yields once /readyz answers 200, and stops it with SIGTERM (then SIGKILL after 30 s)."""
    port = free_port()
    if "proxy_routes" in settings and "admin_port" not in settings:  # sidecar: two ports
        settings["admin_port"] = free_port()
    admin = settings.get("admin_port")
    env = {**os.environ, "HOPGATE_PORT": str(port), "HOPGATE_HOST": "127.0.0.1"}
    if model is not None:
        env["HOPGATE_MODEL"] = str(model)
    settings.setdefault("workers", 1)  # one process: its pid is the server, /metrics all of it
    env.update({f"HOPGATE_{k.upper()}": str(v) for k, v in settings.items()})
    log = Path(log_dir) / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hopgate.service.server.cli"], env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[2])
    server = LocalServer(proc, port, log, int(str(admin)) if admin else None)
    try:
        deadline = time.monotonic() + timeout
        while not server.ready():
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {timeout} s: {log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
