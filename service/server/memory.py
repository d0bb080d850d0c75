"""Memory handed back to the system (glibc's allocator; a no-op elsewhere).

Two moments need it. At start (``return_freed_memory``): glibc serves large blocks from heaps
that stay at their peak, so after a burst of big bodies RSS would not fall back. After a hot
reload (``trim``, reload.py): the old onnxruntime session, its arena, its thread pools and the
old batcher's and decoder's buffers are freed, but glibc keeps the freed pages in its per-thread
arenas, and every reload's new threads take more arenas: measured on the default bundle, RSS
grew by ~9 MB per reload (152 MB at start, 335 MB after 20 reloads, 497 MB after 30 more at
once). ``malloc_trim(0)`` returns the free pages of every arena (glibc >= 2.8); with it, RSS
after 50 reloads stays within a few MB of the RSS after the first (tests/service/
test_reload_memory.py). Chosen over an allocator swap (jemalloc, mimalloc: a preload the
image must carry) and over turning onnxruntime's arena off (each run then allocates afresh:
slower, and the session's memory was already freed; it is glibc that kept it).

And the cycle collector (``freeze_start_up``, issue 24): a served request makes no cyclic
garbage, yet CPython's collector ran a young-generation pass every 700 net allocations and,
every hundredth pass, a full one over the ~90,000 objects start-up built (modules, the app,
the bundle's metadata): 0.33 s of collection in 9,600 requests, 34 us per request at c=32 (one
worker, the default bundle; ``gc.callbacks`` timing). After start-up the server freezes what
exists (``gc.freeze``: out of every later pass) and collects the young generation every 7,000
net allocations, more than the objects 32 requests in flight hold at once: 1 young pass in the
same run, and 0.00 s. ``trim`` unfreezes first, so a retired scorer that start-up built is
collected like any other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Any


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def return_freed_memory(mmap_threshold: int = 1 << 20) -> bool:
    """glibc: allocations of ``mmap_threshold`` bytes or more always come from mmap, so they
    go back to the system when freed. (By default glibc raises this threshold to the size of
    the largest block freed, up to 32 MB, after which 15 MB bodies and 16 MB Pillow blocks
    live in heaps that stay at their peak: RSS does not fall back after a burst.) No-op off
    glibc; returns whether it was applied."""
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)
                and libc.mallopt(m_trim_threshold, 2 * mmap_threshold))


YOUNG_GENERATION = 7000  # net allocations between young passes (CPython's default: 700)


def freeze_start_up() -> None:
    """After start-up: collect once, freeze every object that exists (``gc.freeze``), and
    pass over the young generation every ``YOUNG_GENERATION`` net allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION, *gc.get_threshold()[1:])


def trim() -> bool:
    """Collect cycles (a retired scorer's batcher and decoder refer to each other; frozen
    ones too: unfrozen for this pass, the survivors frozen again), then give every arena's
    free pages back to the system. Takes a few ms: call it off the event loop. Returns
    whether glibc released anything (False off glibc)."""
    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
