"""The workers' board (service/server/board.py): which workers of the machine have a scoring
request in flight, so that a lone image spins the solo session's threads only when the
machine is otherwise idle. Fast tier: a memfd and the admission middleware, no server (the
supervisor's side is in test_workers.py)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from starlette.datastructures import State

from hopgate.service.admission import Admission
from hopgate.service.config import Settings
from hopgate.service.server import board

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd (not Linux)")


@pytest.fixture
def shared(monkeypatch):
    fd = board.create(2)
    assert fd is not None
    yield fd
    os.close(fd)


def test_a_worker_sees_the_others_busy_and_then_quiet(shared, monkeypatch):
    """Busy while a request is in flight, and for QUIET_NS after the last one (two clients,
    one per worker, leave each idle for microseconds between requests); a worker's own slot
    never counts. Mutations caught: the idle time ignored (quiet at once); own slot counted."""
    a, b = board.Board(shared, 0), board.Board(shared, 1)
    assert not a.others_busy() and not b.others_busy()  # a fresh board: nobody ever busy
    a.set(1)
    assert b.others_busy() and not a.others_busy()
    a.set(0)
    assert b.others_busy()  # idle for less than QUIET_NS
    monkeypatch.setattr(board, "QUIET_NS", 1_000)
    time.sleep(0.002)
    assert not b.others_busy()
    b.set(3)
    assert a.others_busy() and not b.others_busy()


def test_only_a_worker_of_a_supervisor_has_a_board(shared, monkeypatch):
    monkeypatch.delenv(board.BOARD_FD, raising=False)
    monkeypatch.delenv(board.WORKER_INDEX, raising=False)
    assert board.Board.inherited() is None  # a lone server counts only itself
    monkeypatch.setenv(board.BOARD_FD, str(shared))
    monkeypatch.setenv(board.WORKER_INDEX, "1")
    mine = board.Board.inherited()
    assert mine is not None and mine.index == 1 and mine.others == [0]
    monkeypatch.setenv(board.BOARD_FD, "not a number")
    assert board.Board.inherited() is None


def test_admission_writes_its_requests_on_the_board_and_asks_it(shared, monkeypatch):
    """A scoring request in flight in this worker is on the board for the other worker
    (whose ``alone`` is then False though it has no request of its own), and off it once
    answered. Mutation caught: Admission not writing its count (the other worker spins its
    solo session beside this one's request)."""
    monkeypatch.setenv(board.BOARD_FD, str(shared))
    monkeypatch.setenv(board.WORKER_INDEX, "0")
    inside, leave = asyncio.Event(), asyncio.Event()

    async def app(scope, receive, send):
        inside.set()
        await leave.wait()

    async def scenario():
        state = State()
        state.draining = False
        here = Admission(app, state, Settings())
        other = board.Board(shared, 1)
        assert here.alone() and not other.others_busy()
        scope = {"type": "http", "method": "POST", "path": "/score", "headers": []}
        task = asyncio.create_task(here(scope, None, None))
        await inside.wait()
        assert other.others_busy() and here.active == 1 and here.alone()
        other.set(1)  # the other worker takes a request: this one is no longer alone
        assert not here.alone()
        other.set(0)
        leave.set()
        await task
        assert here.active == 0 and other._slots[0] == 0

    asyncio.run(scenario())
