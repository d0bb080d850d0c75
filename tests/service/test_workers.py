"""The worker model (service/server/workers.py): N server processes on one port. Unit checks in the
fast tier; in the integration tier a real two-worker server (two processes answering on the
one port; SIGTERM drains both, exit 0)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from conftest import BUNDLE, serve
from inputs import encode, synthetic

from hopgate.service.server import workers


def test_usable_cores_and_resolve():
    cores = workers.usable_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert workers.resolve(0) == cores and workers.resolve(3) == 3


def test_a_lone_server_has_no_inherited_socket(monkeypatch):
    monkeypatch.delenv(workers.LISTEN_FD, raising=False)
    assert workers.inherited_socket() is None


def _environ(pid: int) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0")
                if "=" in kv)


def _listening_socket(pid: int) -> str:
    env = _environ(pid)
    return os.readlink(f"/proc/{pid}/fd/{env[workers.LISTEN_FD]}")  # socket:[inode]


def _children(pid: int) -> list[int]:
    return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.integration
def test_two_workers_share_one_port_and_drain_on_sigterm(tmp_path):
    png = encode(synthetic(1)[0])
    with serve(tmp_path, workers=2, intra_op_threads=1) as s:
        kids = _children(s.proc.pid)
        assert len(kids) == 2
        # each its own listening socket on the port (SO_REUSEPORT): the kernel spreads the
        # connections; one shared socket gave 29 of 32 to one worker
        assert len({_listening_socket(k) for k in kids}) == 2
        # each computes its batches on its event loop (issue 24: no runtime thread per worker)
        assert {_environ(k).get("HOPGATE_BATCH_SLOTS") for k in kids} == {"0"}
        # ... and share one board, a slot each (server/board.py: a lone image spins the solo
        # session's threads only when the other worker is idle)
        boards = {os.readlink(f"/proc/{k}/fd/{_environ(k)['HOPGATE_BOARD_FD']}") for k in kids}
        assert len(boards) == 1 and boards.pop().startswith("/memfd:hopgate-board")
        assert sorted(_environ(k)["HOPGATE_WORKER_INDEX"] for k in kids) == ["0", "1"]
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


MB = 2**20


def test_choose_one_per_core_bounded_by_quota_and_memory(tmp_path, monkeypatch):
    """HOPGATE_WORKERS=0 (the default): one per usable core, the cgroup CPU quota and memory
    limit included; one on CUDA; a set number as set."""
    monkeypatch.setattr(workers, "CGROUP", tmp_path)
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(8)))
    cpu = ["CPUExecutionProvider"]
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    bundle = 2 * MB
    per = workers.WORKER_BASE_BYTES + workers.BUNDLE_FACTOR * bundle
    (tmp_path / "memory.max").write_text("max\n")  # no limit: MemAvailable (this machine)
    assert workers.choose(0, both, cpu, bundle)[0] == min(8, workers.memory_available() // per)
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # 2.5 cores: 3 workers
    n, why = workers.choose(0, both, cpu, bundle)
    assert n == 3 and why.startswith("workers: 3 (")
    (tmp_path / "memory.max").write_text(f"{2 * per + MB}\n")  # memory for two of them
    assert workers.choose(0, both, cpu, bundle)[0] == 2
    assert workers.choose(0, both, cpu, 100 * MB)[0] == 1  # a big bundle: one fits
    assert workers.choose(0, both, both, bundle) == (1, workers.choose(0, both, both, 0)[1])
    assert "CUDA" in workers.choose(0, both, both, bundle)[1]
    assert workers.choose(0, cpu, both, bundle)[0] == 2  # CUDA present, not asked for
    assert workers.choose(5, both, both, bundle)[0] == 5  # set: as set, even on CUDA
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()  # cgroup v1
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{per + MB}\n")
    assert workers.choose(0, cpu, cpu, bundle)[0] == 1


@pytest.mark.integration
def test_the_default_serves_with_the_chosen_workers_and_says_so(tmp_path):
    """No HOPGATE_WORKERS: the start log names the choice; local_server pins one worker."""
    with serve(tmp_path, workers=0) as s:
        log = s.log.read_text()
        kids = _children(s.proc.pid)
    n = workers.choose(0, ["CPUExecutionProvider"], ["CPUExecutionProvider"],
                       BUNDLE.stat().st_size)[0]
    assert log.count('"message": "workers: ') == 1, log
    assert f'"message": "workers: {n} (' in log
    assert len(kids) == (n if n > 1 else 0)


def test_a_worker_keeps_numpys_blas_to_one_thread():
    """The resize's products (hopgate/resample.py: 112 x 112 x 28 for the default bundle) are
    above OpenBLAS's threshold for splitting over its threads, which spin after returning;
    a worker sets NumPy's BLAS to one thread at start (cli.DrainingServer.startup)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from hopgate.service.server.cli import one_blas_thread

    blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
    if not blas:
        pytest.skip("NumPy without a BLAS threadpoolctl knows")
    with threadpool_limits(limits=None):  # put back as it was afterwards
        one_blas_thread()
        assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {1}
