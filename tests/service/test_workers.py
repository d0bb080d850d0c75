"""The worker model (service/workers.py): N server processes on one port. Unit checks in the
fast tier; in the integration tier a real two-worker server (two processes answering on the
one port; SIGTERM drains both, exit 0)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from conftest import serve
from inputs import encode, synthetic

from hopgate.service import workers


def test_usable_cores_and_resolve():
    cores = workers.usable_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert workers.resolve(0) == cores and workers.resolve(3) == 3


def test_a_lone_server_has_no_inherited_socket(monkeypatch):
    monkeypatch.delenv(workers.LISTEN_FD, raising=False)
    assert workers.inherited_socket() is None


def _children(pid: int) -> list[int]:
    return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.integration
def test_two_workers_share_one_port_and_drain_on_sigterm(tmp_path):
    png = encode(synthetic(1)[0])
    with serve(tmp_path, workers=2, intra_op_threads=1) as s:
        kids = _children(s.proc.pid)
        assert len(kids) == 2
        with httpx.Client(base_url=s.url, timeout=30) as c:
            deadline = time.monotonic() + 60  # both workers ready (each answers /readyz)
            for _ in range(20):
                r = c.post("/score", content=png, headers={"content-type": "image/png"})
                assert r.status_code == 200 and "score" in r.json()["results"][0]
                assert time.monotonic() < deadline
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) == 0
        for k in kids:
            assert not Path(f"/proc/{k}").exists() or "zombie" in Path(
                f"/proc/{k}/status").read_text()
