"""Hot reload under load (issue 17): a real hopgate-serve on loopback keeps answering a
bounded load loop while its bundle file is replaced and reloaded by SIGHUP, then by the V2
repository load call, then refused (a broken file): not one failed request, every answer
names the version that scored it, and each client sees the versions switch in order."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time

import httpx
import pytest
from bundles import relabelled
from conftest import BUNDLE, Server, in_process
from inputs import encode, synthetic

from hopgate.bundle import load_meta
from hopgate.service.server.local import local_server

PNG = encode(synthetic(1, seed=3)[0])
THREADS = 4  # clients; the last one uploads its body slowly
MAX_REQUESTS = 6000  # the loop's bound, whatever happens


def slow_body():
    """The image in four chunks over ~0.2 s: a request that is in the server (pinned to a
    scorer, body still arriving) when a reload swaps the scorer."""
    for k in range(4):
        time.sleep(0.05)  # pacing a slow client, not waiting for the server
        yield PNG[k * len(PNG) // 4:(k + 1) * len(PNG) // 4]


class Load:
    """``THREADS`` clients posting one image to /score in a loop until stopped (or
    ``MAX_REQUESTS``); each answer recorded as (client, time, status, header, body version)."""

    def __init__(self, url: str):
        self.url, self.stop = url, threading.Event()
        self.answers: list[tuple[int, float, int, str, str]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(k,)) for k in range(THREADS)]

    def _client(self, k: int) -> None:
        slow = k == THREADS - 1
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set() and len(self.answers) < MAX_REQUESTS:
                try:
                    r = c.post("/score", content=slow_body() if slow else PNG,
                               headers={"content-type": "image/png"})
                    body = r.json()["model"]["version"] if r.status_code == 200 else r.text
                    row = (k, time.monotonic(), r.status_code,
                           r.headers.get("x-hopgate-model-version", ""), body)
                except Exception as e:  # a refused or cut connection is a failed request
                    with self.lock:
                        self.errors.append(f"{type(e).__name__}: {e}")
                    continue
                with self.lock:
                    self.answers.append(row)

    def seen_by_all(self, version: str, times: int = 3) -> bool:
        with self.lock:
            counts = [sum(1 for a in self.answers if a[0] == k and a[4] == version)
                      for k in range(THREADS)]
        return min(counts) >= times

    def wait_for(self, version: str, timeout: float = 90) -> float:
        """Seconds until every client has had ``version`` three times."""
        t0 = time.monotonic()
        while not self.seen_by_all(version):
            assert time.monotonic() - t0 < timeout, f"{version} not served in {timeout} s"
            assert not self.stop.is_set() and all(t.is_alive() for t in self.threads)
            time.sleep(0.02)
        return time.monotonic() - t0

    def first(self, version: str) -> float:
        return min(a[1] for a in self.answers if a[4] == version)


@pytest.mark.integration
def test_reload_under_load_fails_no_request(tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copyfile(BUNDLE, model)
    v0 = load_meta(model).model_version
    with local_server(tmp_path, model, intra_op_threads=1, drain_seconds=20) as local:
        server = Server(local)
        load = Load(server.url)
        for t in load.threads:
            t.start()
        try:
            load.wait_for(v0)
            v1 = relabelled(BUNDLE, model, "X")  # SIGHUP
            t_sig = time.monotonic()
            os.kill(server.proc.pid, signal.SIGHUP)
            load.wait_for(v1)
            v2 = relabelled(BUNDLE, model, "Y")  # the V2 repository load call
            t_load = time.monotonic()
            r = httpx.post(f"{server.url}/v2/repository/models/default/load", timeout=60)
            assert r.status_code == 200 and r.json()["version"] == v2, r.text
            assert r.headers["x-hopgate-model-version"] == v1  # answered under the old one
            load.wait_for(v2)
            model.write_bytes(b"not a bundle")  # refused: the old one keeps serving
            bad = httpx.post(f"{server.url}/v2/repository/models/default/load", timeout=60)
            assert bad.status_code == 400 and "not a readable ONNX file" in bad.json()["error"]
            assert f"still serving {v2}" in bad.json()["error"]
            os.kill(server.proc.pid, signal.SIGHUP)
            n = len(load.answers)
            while len(load.answers) < n + 200:  # the loop goes on, on v2
                assert all(t.is_alive() for t in load.threads)
                time.sleep(0.02)
        finally:
            load.stop.set()
            for t in load.threads:
                t.join(60)
        info = httpx.get(f"{server.url}/metrics").text
    answers, versions = load.answers, [v0, v1, v2]
    failed = [a for a in answers if a[2] != 200] + load.errors
    assert not failed, failed[:5]
    assert all(a[3] == a[4] for a in answers)  # the header names the version in the body
    assert {a[4] for a in answers} == set(versions)
    for k in range(THREADS):  # each client: v0, then v1, then v2, never back
        seq = [versions.index(a[4]) for a in answers if a[0] == k]
        assert seq == sorted(seq)
    assert all(a[4] == v2 for a in answers[-100:])
    assert f'version="{v2}"' in info
    log = server.log.read_text()
    assert "reload on SIGHUP failed, still serving the old bundle" in log
    print(f"reload under load: {len(answers)} requests, {len(failed)} failed; "
          f"SIGHUP -> first {v1} answer {load.first(v1) - t_sig:.2f} s; "
          f"load call -> first {v2} answer {load.first(v2) - t_load:.2f} s; "
          f"last {v0} answer {max(a[1] for a in answers if a[4] == v0) - t_sig:+.2f} s "
          f"after SIGHUP")


@pytest.mark.anyio
async def test_a_changed_file_is_reloaded_when_watched(tmp_path, anyio_backend):
    """reload_poll_s: replacing the bundle file is enough; the old scorer is retired (its
    batcher closed) once nothing is pinned to it."""
    model = tmp_path / "model.onnx"
    shutil.copyfile(BUNDLE, model)
    async with in_process(model=model, reload_poll_s=0.05, buckets=[1, 2]) as c:
        old = c.app.state.scorer
        r = await c.post("/score", content=PNG, headers={"content-type": "image/png"})
        assert r.headers["x-hopgate-model-version"] == old.meta.model_version
        new_version = relabelled(BUNDLE, model, "W")
        for _ in range(600):  # the watcher polls every 0.05 s; give it 30 s on a busy machine
            if c.app.state.scorer.meta.model_version == new_version:
                break
            await asyncio.sleep(0.05)
        r = await c.post("/score", content=PNG, headers={"content-type": "image/png"})
        assert r.json()["model"]["version"] == new_version
        assert r.headers["x-hopgate-model-version"] == new_version
        await asyncio.gather(*c.app.state.reloader.retiring)
        assert old.batcher.closed and old.users == 0
