"""Which of this machine's workers have a scoring request in flight: one slot per worker in a
memory block the supervisor shares (a memfd), each worker writing only its own slot.

It answers one question, asked before a lone image runs (scoring.Scorer.alone): is this the
only request on the machine, or only in this worker? The solo session's threads
(runtime/session.py) spin while a run lasts, which halves a lone image's compute on 2 cores
(0.81 -> 0.48 ms), but two workers each running one that way put four busy threads on two
cores: at c=2 the server's CPU per image rose by a third and its p99 doubled. With the board,
a worker whose peers are busy runs its lone image on its own one-thread session instead.

No locks: a slot is two aligned 8-byte words, written by one process; a reader that sees a
value a moment old makes a slightly worse choice of session, nothing more. Without
``os.memfd_create`` (not Linux) there is no board, and every worker counts only itself.
"""

from __future__ import annotations

import mmap
import os
import time

BOARD_FD = "HOPGATE_BOARD_FD"  # set by the supervisor for each worker: the shared block
WORKER_INDEX = "HOPGATE_WORKER_INDEX"  # ... and the worker's slot in it
SLOT = 16  # two 8-byte words: requests in flight, and when the worker last fell idle
# a worker idle for less than this still counts as busy: two clients, one per worker, leave
# each worker idle for tens to hundreds of microseconds between their requests, while the
# other worker at concurrency 1 has been idle since the last point (CLOCK_MONOTONIC is one
# clock for every process of the machine)
QUIET_NS = 2_000_000


def create(workers: int) -> int | None:
    """In the supervisor: a zeroed block of ``workers`` slots; its inheritable fd."""
    if not hasattr(os, "memfd_create"):
        return None
    fd = os.memfd_create("hopgate-board")  # workers get it through Popen's pass_fds
    os.ftruncate(fd, SLOT * workers)
    return fd


class Board:
    def __init__(self, fd: int, index: int):
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size)
        self._slots = memoryview(self._map).cast("q")  # per worker: active, idle since (ns)
        self.index = index
        self.others = [j for j in range(size // SLOT) if j != index]

    @classmethod
    def inherited(cls) -> Board | None:
        """In a worker: its slot on the supervisor's board; None in a lone server."""
        fd, index = os.environ.get(BOARD_FD), os.environ.get(WORKER_INDEX)
        if not fd or not index:
            return None
        try:
            return cls(int(fd), int(index))
        except (OSError, ValueError):  # not the block we were told: count only ourselves
            return None

    def set(self, active: int) -> None:
        if active == 0:
            self._slots[2 * self.index + 1] = time.monotonic_ns()
        self._slots[2 * self.index] = active

    def others_busy(self) -> bool:
        """Another worker has a request in flight, or had one within ``QUIET_NS``."""
        slots, now = self._slots, time.monotonic_ns()
        return any(slots[2 * j] or now - slots[2 * j + 1] < QUIET_NS for j in self.others)
