"""IOBinding: every batch runs on buffers allocated once per bucket, never per call.

Per bucket ``b`` there is one host input buffer ``uint8 [b, H, W, C]`` (page-locked on CUDA:
cuda.HostPin), the output buffers, the scalar threshold, and one IOBinding per batch size that
bucket serves, bound once at start-up to the prefix of those buffers:
  * CPU: onnxruntime reads the host buffer and writes the outputs where they are bound: the
    batch is stacked straight into the buffer (``np.stack(out=...)``) and nothing else is
    allocated but the result rows handed back.
  * CUDA: the bucket's device input is filled from the pinned host buffer by one copy
    (``update_inplace``), the outputs stay bound on the device and come back with one copy each;
    inputs and outputs keep their addresses, which is what a CUDA graph replay needs: one graph
    per bucket, ``gpu_graph_id`` = the bucket's index.
Padding rows are zeroed on every call, so a batch's answer never depends on the one before.
The results are copies (the next batch overwrites the buffers) of the ``n`` real rows.
A lock per bucket: two batch slots never share a bucket's buffers at once.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from hopgate.bundle import INPUT_IMAGES, INPUT_LOG_LAMBDA, served_outputs

from .cuda import HostPin


def page_aligned(shape: tuple[int, ...], page: int = 4096) -> np.ndarray:
    """A zeroed uint8 array starting on a page boundary (cudaHostRegister pins whole pages)."""
    size = int(np.prod(shape))
    raw = np.zeros(size + page, np.uint8)
    start = -raw.ctypes.data % page
    return raw[start:start + size].reshape(shape)


class Slot:
    """One bucket's buffers and its bindings, one per batch size it serves."""

    def __init__(self, bucket: int, index: int) -> None:
        self.bucket, self.index = bucket, index
        self.lock = threading.Lock()
        self.images: np.ndarray = np.empty(0, np.uint8)
        self.threshold = np.zeros((), np.float32)
        self.outputs: dict[str, np.ndarray] = {}  # CPU: where onnxruntime writes
        self.device: dict[str, Any] = {}  # CUDA: the bound device OrtValues
        self.bindings: dict[int, Any] = {}  # batch size -> IOBinding
        self.run_options: Any = None
        self.written: np.float32 | None = None  # the threshold in the bound scalar


class Binding:
    """Runs batches through ``session`` with IOBinding (see the module docstring)."""

    def __init__(self, ort: Any, session: Any, shape: tuple[int, int, int], buckets: list[int],
                 default_threshold: float | None, pads: bool, device: str = "cpu",
                 graphs: bool = False, plain_options: Any = None) -> None:
        self.session, self.shape, self.pads = session, shape, pads
        self.device, self.graphs = device, graphs and device == "cuda" and pads
        self.buckets = sorted(buckets)
        self.default_threshold = default_threshold  # None: the graph has no log_lambda input
        self.pinned = False
        self.outputs = served_outputs({o.name for o in session.get_outputs()})  # + logits
        probe = session.run(list(self.outputs),  # the output shapes; never a graph capture
                            {INPUT_IMAGES: np.zeros((1, *shape), np.uint8)}, plain_options)
        rows = {k: (v.shape[1:], v.dtype.type) for k, v in zip(self.outputs, probe)}
        pin = HostPin() if device == "cuda" else None
        self.slots = []
        for i, b in enumerate(self.buckets):
            slot = Slot(b, i)
            slot.images = page_aligned((b, *shape))
            if pin is not None:
                self.pinned = pin.pin(slot.images)
                if self.pinned:
                    weakref.finalize(slot, pin.rt.cudaHostUnregister,  # type: ignore[union-attr]
                                     slot.images.ctypes.data)
            for k, (row, dtype) in rows.items():
                if device == "cuda":
                    slot.device[k] = ort.OrtValue.ortvalue_from_shape_and_type(
                        (b, *row), dtype, "cuda", 0)
                else:
                    slot.outputs[k] = np.zeros((b, *row), dtype)
            if device == "cuda":
                slot.device[INPUT_IMAGES] = ort.OrtValue.ortvalue_from_shape_and_type(
                    (b, *shape), np.uint8, "cuda", 0)
                slot.device[INPUT_LOG_LAMBDA] = ort.OrtValue.ortvalue_from_shape_and_type(
                    (), np.float32, "cuda", 0)
            if self.graphs:
                slot.run_options = ort.RunOptions()
                slot.run_options.add_run_config_entry("gpu_graph_id", str(i))
            lo = self.buckets[i - 1] + 1 if i else 1
            for n in ([b] if pads else range(lo, b + 1)):
                slot.bindings[n] = self._bind(slot, n, rows)
            self._set_threshold(slot, default_threshold)
            self.slots.append(slot)

    def _bind(self, slot: Slot, n: int, rows: dict[str, tuple[tuple, type]]) -> Any:
        """An IOBinding of the first ``n`` rows of ``slot``'s buffers."""
        io = self.session.io_binding()
        if self.device == "cuda":
            d = slot.device
            io.bind_input(INPUT_IMAGES, "cuda", 0, np.uint8, (n, *self.shape),
                          d[INPUT_IMAGES].data_ptr())
            if self.default_threshold is not None:
                io.bind_ortvalue_input(INPUT_LOG_LAMBDA, d[INPUT_LOG_LAMBDA])
            for k, (row, dtype) in rows.items():
                io.bind_output(k, "cuda", 0, dtype, (n, *row), d[k].data_ptr())
        else:
            io.bind_input(INPUT_IMAGES, "cpu", 0, np.uint8, (n, *self.shape),
                          slot.images.ctypes.data)
            if self.default_threshold is not None:
                io.bind_input(INPUT_LOG_LAMBDA, "cpu", 0, np.float32, (),
                              slot.threshold.ctypes.data)
            for k, (row, dtype) in rows.items():
                io.bind_output(k, "cpu", 0, dtype, (n, *row), slot.outputs[k].ctypes.data)
        return io

    def _set_threshold(self, slot: Slot, value: float | None) -> None:
        """The batch's threshold into the bound scalar (a copy to the device only when it
        changes: requests that set their own are rare)."""
        if self.default_threshold is None:
            return
        v = np.float32(self.default_threshold if value is None else value)
        if slot.written == v:
            return
        slot.threshold[()] = v
        if self.device == "cuda":
            slot.device[INPUT_LOG_LAMBDA].update_inplace(slot.threshold)
        slot.written = v

    def slot(self, n: int) -> Slot:
        return self.slots[bisect.bisect_left(self.buckets, n)]

    def run(self, images: Sequence[np.ndarray] | np.ndarray,
            log_lambda: float | None = None) -> dict[str, np.ndarray]:
        """The outputs for ``images`` (uint8 ``[H, W, C]`` each, at most the largest bucket)."""
        n = len(images)
        if n == 0 or n > self.buckets[-1]:
            raise ValueError(f"a batch of {n} images: the buckets hold 1 to {self.buckets[-1]}")
        if log_lambda is not None and self.default_threshold is None:
            raise ValueError(f"the graph has no '{INPUT_LOG_LAMBDA}' input")
        slot = self.slot(n)
        with slot.lock:
            if isinstance(images, np.ndarray):
                slot.images[:n] = images
            else:
                np.stack(images, out=slot.images[:n])
            rows = slot.bucket if self.pads else n
            slot.images[n:rows] = 0  # padding: zeros, whatever the last batch left there
            self._set_threshold(slot, log_lambda)
            io = slot.bindings[rows]
            if self.device == "cuda":
                slot.device[INPUT_IMAGES].update_inplace(slot.images)
                self.session.run_with_iobinding(io, slot.run_options)
                out = io.copy_outputs_to_cpu()
                return {k: v[:n] for k, v in zip(self.outputs, out)}
            self.session.run_with_iobinding(io)
            return {k: slot.outputs[k][:n].copy() for k in self.outputs}
