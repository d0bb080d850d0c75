"""The batcher and the decoder as units (fast tier): a stand-in runtime whose batches the
tests control, and the decoding policy of docs/serving.md image by image. No server."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from inputs import _animated, _bomb, _exif_rotated, _png, _sixteen_bit, encode, synthetic
from PIL import Image

from hopgate.service.batcher import Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from hopgate.service.errors import ClientError, ImageError, ServingError
from hopgate.service.imaging import decode, sniff
from hopgate.service.metrics import Metrics

IMG = synthetic(1, seed=3)[0]


# --- the batcher -------------------------------------------------------------------------

class FakeRuntime:
    """Records each batch; a batch blocks until ``release`` is set (when ``gated``)."""

    provider = "CPUExecutionProvider"

    def __init__(self, gated: bool = False):
        self.batches: list[tuple[int, int]] = []  # (images, bucket)
        self.threads: list[int] = []  # the thread each batch ran on
        self.release = threading.Event()
        self.started = threading.Event()
        if not gated:
            self.release.set()

    def run(self, images: np.ndarray, bucket: int | None = None,
            log_lambda: float | None = None) -> dict[str, np.ndarray]:
        self.batches.append((len(images), bucket or len(images)))
        self.threads.append(threading.get_ident())
        self.started.set()
        assert self.release.wait(10)
        return {"score": np.stack(images).reshape(len(images), -1)[:, 0].astype(np.float32)}

    solos = 0  # images run on the solo session

    def run_solo(self, image: np.ndarray, log_lambda: float | None = None
                 ) -> dict[str, np.ndarray]:
        self.solos += 1
        return self.run(image[None], 1, log_lambda)


def make(runtime: FakeRuntime, buckets=(1, 2, 4, 8), capacity: int = 64, delay_ms: float = 2,
         slots: int = 1) -> Batcher:
    metrics = Metrics(list(buckets), [0.0, 1.0])
    b = Batcher(runtime, metrics, list(buckets), capacity, delay_ms, slots)  # type: ignore[arg-type]
    b.start()
    return b


def images(n: int, start: int = 0) -> list[np.ndarray]:
    return [np.full((28, 28, 1), start + i, np.uint8) for i in range(n)]


async def wait_for(condition, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.001)


def later(seconds: float = 10) -> float:
    return time.monotonic() + seconds


async def three_more_arrive(b: Batcher, futures: list[asyncio.Future], start: int) -> list:
    """Three more one-image requests (images ``start`` + 1..3), one per loop pass after the
    first's, as clients answered by the last batch send their next ones; every row, in order."""
    loop = asyncio.get_running_loop()

    def arrive(k: int) -> None:
        futures.extend(b.submit(images(1, start + k), later()))
        if k < 3:
            loop.call_soon(arrive, k + 1)

    loop.call_soon(arrive, 1)
    await wait_for(lambda: len(futures) == 4)
    return await asyncio.wait_for(asyncio.gather(*futures), 5)


def run(coro):
    return asyncio.run(coro)


def test_a_lone_request_is_flushed_at_once_and_padded_to_its_bucket():
    async def go():
        rt = FakeRuntime()
        b = make(rt, delay_ms=10_000)  # a linger would show: the test would time out
        futures = b.submit(images(3), later())
        rows = await asyncio.wait_for(asyncio.gather(*futures), 5)
        b.close()
        return rt, rows

    rt, rows = run(go())
    assert rt.batches == [(3, 4)]  # three images, padded to the bucket of four
    assert [float(r[0]["score"]) for r in rows] == [0.0, 1.0, 2.0]
    assert all(r[3] == 3 for r in rows)  # batch size before padding


def test_a_lone_cheap_image_is_computed_inline_only_when_alone():
    """Issue 15: the only request in the server, one image, cheaper than inline_ms: computed
    on the event loop (its future is done on return from submit); otherwise the thread."""
    async def go():
        rt = FakeRuntime()
        rt.single_s = 0.0005  # type: ignore[attr-defined]
        metrics = Metrics([1, 2, 4], [0.0, 1.0])
        b = Batcher(rt, metrics, [1, 2, 4], 64, 2, 1, inline_ms=2)  # type: ignore[arg-type]
        b.start()
        inline = b.submit(images(1), later(), alone=True)
        done_at_once = inline[0].done()
        threaded = b.submit(images(1, 5), later(), alone=False)
        pair = b.submit(images(2, 7), later(), alone=True)  # two images: never inline
        was_done = threaded[0].done() or pair[0].done()
        rows = await asyncio.wait_for(asyncio.gather(*inline, *threaded, *pair), 5)
        rt.single_s = 0.05  # type: ignore[attr-defined]  # dearer than inline_ms: the thread
        dear = b.submit(images(1), later(), alone=True)
        dear_done = dear[0].done()
        await asyncio.wait_for(dear[0], 5)
        b.close()
        assert (b.inflight_images, metrics.inflight._value.get()) == (0, 0)
        return done_at_once, was_done, dear_done, rows

    done_at_once, was_done, dear_done, rows = run(go())
    assert done_at_once and not was_done and not dear_done
    assert [float(r[0]["score"]) for r in rows] == [0.0, 5.0, 7.0, 8.0]


def test_slots_0_computes_on_the_loop_once_the_tick_s_requests_are_in():
    """Issue 24: each of several CPU workers computes its batches on its event loop. Three
    requests submitted in one tick form one batch, computed on the loop's own thread (no
    hand-off); the next tick's request is a batch of its own."""
    async def go():
        rt = FakeRuntime()
        b = make(rt, slots=0)
        first = [f for k in range(3) for f in b.submit(images(1, k), later())]
        queued = not any(f.done() for f in first)  # not computed inside submit
        rows = await asyncio.wait_for(asyncio.gather(*first), 5)
        rows += await asyncio.wait_for(asyncio.gather(*b.submit(images(1, 9), later())), 5)
        b.close()
        return rt, rows, queued, (b.inflight_images, b.metrics.inflight._value.get())

    rt, rows, queued, inflight = run(go())
    assert queued
    assert inflight == (0, 0)  # hopgate_inflight back to 0: counted in and out alike
    assert [n for n, _ in rt.batches] == [3, 1]
    assert set(rt.threads) == {threading.get_ident()}  # asyncio.run's loop: this thread
    assert [float(r[0]["score"]) for r in rows] == [0.0, 1.0, 2.0, 9.0]


def test_slots_0_waits_for_requests_still_arriving_while_the_queue_grows():
    """Under load the next requests arrive over a few loop passes; a batch waits for them
    while the queue grows (at most GATHER_PASSES passes) instead of computing the first alone."""
    async def go():
        rt = FakeRuntime()
        b = make(rt, slots=0)
        rows = await three_more_arrive(b, list(b.submit(images(1), later())), 0)
        b.close()
        return rt, rows

    rt, rows = run(go())
    assert [n for n, _ in rt.batches] == [4]
    assert [float(r[0]["score"]) for r in rows] == [0.0, 1.0, 2.0, 3.0]


def test_slots_0_runs_a_lone_image_solo_only_when_no_request_follows_it():
    """On the loop, an image alone when it was submitted goes to the solo session only if it
    is still alone after the gather passes; under load the first request read after a batch
    is alone for a moment, and the next ones (one per loop pass here) join its batch
    instead (c=32: batches of 1 and ~12 became batches of ~16, no solo runs)."""
    async def go():
        rt = FakeRuntime()
        rt.single_s = 0.0005  # type: ignore[attr-defined]
        metrics = Metrics([1, 2, 4, 8], [0.0, 1.0])
        b = Batcher(rt, metrics, [1, 2, 4, 8], 64, 2, 0, inline_ms=2)  # type: ignore[arg-type]
        b.start()
        await asyncio.wait_for(asyncio.gather(*b.submit(images(1), later(), alone=True)), 5)
        lone = (rt.solos, list(rt.batches))
        rows = await three_more_arrive(b, list(b.submit(images(1, 10), later(), alone=True)), 10)
        b.close()
        return lone, rt, rows

    lone, rt, rows = run(go())
    assert lone == (1, [(1, 1)])  # alone, and nothing followed: the solo session
    assert rt.solos == 1 and rt.batches[1:] == [(4, 4)]
    assert [float(r[0]["score"]) for r in rows] == [10.0, 11.0, 12.0, 13.0]


def test_slots_0_keeps_the_runtime_thread_off_the_cpu():
    """On a GPU the loop stays free while the device computes: slots 0 is one slot there."""
    async def go():
        rt = FakeRuntime()
        rt.provider = "CUDAExecutionProvider"
        b = make(rt, slots=0)
        await asyncio.wait_for(asyncio.gather(*b.submit(images(2), later())), 5)
        b.close()
        return rt

    rt = run(go())
    assert rt.threads and threading.get_ident() not in rt.threads


def test_images_accumulate_while_busy_and_big_requests_split_at_the_largest_bucket():
    async def go():
        rt = FakeRuntime(gated=True)
        b = make(rt)
        first = b.submit(images(1), later())
        await wait_for(rt.started.is_set)  # the runtime is busy with the first batch
        rest = b.submit(images(11, 1), later())  # queued meanwhile
        rt.release.set()
        await asyncio.wait_for(asyncio.gather(*first, *rest), 5)
        b.close()
        return rt

    rt = run(go())
    assert rt.batches[0] == (1, 1)
    assert [n for n, _ in rt.batches[1:]] == [8, 3]  # never above the largest bucket
    assert rt.batches[2] == (3, 4)


def test_a_full_queue_rejects_at_once_and_accepts_all_or_nothing():
    async def go():
        rt = FakeRuntime(gated=True)
        b = make(rt, capacity=4)
        b.submit(images(1), later())
        await wait_for(rt.started.is_set)
        b.submit(images(3), later())
        with pytest.raises(QueueFull):
            b.submit(images(2), later())
        assert len(b.queue) == 3
        rt.release.set()
        b.close()

    run(go())


def test_expired_images_never_reach_the_runtime():
    async def go():
        rt = FakeRuntime(gated=True)
        b = make(rt)
        b.submit(images(1), later())
        await wait_for(rt.started.is_set)
        expired = b.submit(images(2), time.monotonic() + 0.01)
        alive = b.submit(images(1, 5), later())
        await asyncio.sleep(0.05)  # the two pass their deadline while the runtime is busy
        rt.release.set()
        await asyncio.wait_for(asyncio.gather(*alive), 5)
        results = await asyncio.gather(*expired, return_exceptions=True)
        b.close()
        return rt, results

    rt, results = run(go())
    assert all(isinstance(r, DeadlineExceeded) for r in results)
    assert rt.batches == [(1, 1), (1, 1)]  # the expired pair never formed a batch


def test_drain_waits_for_accepted_work_then_refuses_new_work():
    async def go():
        rt = FakeRuntime(gated=True)
        b = make(rt)
        accepted = b.submit(images(2), later())
        await wait_for(rt.started.is_set)
        drain = asyncio.ensure_future(b.drain(5))
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDown):
            b.submit(images(1), later())
        assert not drain.done()
        rt.release.set()
        assert await asyncio.wait_for(drain, 5) is True
        assert all(f.done() and f.exception() is None for f in accepted)
        b.close()

    run(go())


def test_a_runtime_failure_reaches_every_image_of_its_batch():
    class Broken(FakeRuntime):
        def run(self, images, bucket=None, log_lambda=None):
            raise RuntimeError("boom")

    async def go():
        b = make(Broken())
        futures = b.submit(images(3), later())
        out = await asyncio.gather(*futures, return_exceptions=True)
        b.close()
        return out

    assert all(isinstance(e, RuntimeError) for e in run(go()))


# --- the decoder -------------------------------------------------------------------------

@pytest.mark.parametrize("name,blob", [
    ("png", _png(IMG)), ("jpeg", encode(IMG, "JPEG", quality=95)), ("webp", encode(IMG, "WEBP")),
    ("bmp", encode(IMG, "BMP")), ("tiff", encode(IMG, "TIFF")), ("gif", encode(IMG, "GIF")),
    ("16-bit png", _sixteen_bit()), ("palette png", _png(IMG, mode="P")),
    ("rgba png", _png(IMG, mode="RGBA")), ("cmyk jpeg", encode(IMG, "JPEG", mode="CMYK")),
    ("animated gif", _animated()), ("large rgb jpeg", encode(IMG, "JPEG", size=256, mode="RGB")),
])
def test_decode_gives_the_bundle_layout(name, blob):
    for channels in (1, 3):
        out = decode(blob, 28, 28, channels)
        assert out.shape == (28, 28, channels) and out.dtype == np.uint8, name


def test_decode_keeps_pixels_and_applies_exif_orientation():
    np.testing.assert_array_equal(decode(_png(IMG), 28, 28, 1), IMG)
    upright = decode(encode(IMG, "JPEG", quality=95), 28, 28, 1).astype(int)
    rotated = decode(_exif_rotated(IMG), 28, 28, 1).astype(int)
    assert np.abs(upright - rotated).mean() < 8  # JPEG noise only: the rotation was undone


def test_decode_scales_sixteen_bits_and_blackens_transparency():
    assert decode(_sixteen_bit(), 28, 28, 1).max() > 128  # scaled, not clipped to 255 / 256
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255  # white, fully transparent
    assert decode(encode(rgba), 28, 28, 1).max() == 0


@pytest.mark.parametrize("blob,status", [
    (b"", 400), (b"hello", 415), (b"%PDF-1.4\n", 415), (_png(IMG)[:30], 422),
    (b"GIF89a" + b"\0" * 40, 422), (_bomb(), 413),
])
def test_decode_failures_are_image_errors_with_a_status(blob, status):
    with pytest.raises(ImageError) as e:
        decode(blob, 28, 28, 1, max_pixels=40_000_000)
    assert e.value.status == status and e.value.message
    assert isinstance(e.value, ClientError) and isinstance(e.value, ServingError)
    assert isinstance(e.value, ValueError)  # as before the hierarchy


def test_max_pixels_is_read_from_the_header():
    big = Image.new("L", (300, 300))
    with pytest.raises(ImageError) as e:
        decode(encode(np.asarray(big)), 28, 28, 1, max_pixels=300 * 300 - 1)
    assert e.value.status == 413


def test_sniff_trusts_magic_bytes_not_names():
    assert sniff(encode(IMG, "JPEG")) == "JPEG" and sniff(_png(IMG)) == "PNG"
    assert sniff(encode(IMG, "WEBP")) == "WEBP"
