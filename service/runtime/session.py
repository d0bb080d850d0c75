"""onnxruntime session for one bundle: provider choice (CUDA, then CPU), the graph checked
against the bundle's metadata, bucket padding, warm-up.

Padding (``pad``): ``auto`` pads batches to their bucket on CUDA (few shapes for its kernels and
any graph capture) and not on CPU, where onnxruntime takes any batch size at no set-up cost and
a padded row costs as much as a real one (default bundle, 2 cores, one thread: 0.66 ms per row
at every size, 17 images padded to 32 took 21 ms instead of 11 ms; a first call at an unseen
size costs no more than the next). Spinning: onnxruntime's intra-op threads busy-wait between
runs by default; off here (``spinning``), as they otherwise take cores from the event loop and
the decoders.

The solo session (``solo_threads``): a worker of several gets cores ÷ workers threads, right
for batches when every worker is busy; the only request on the machine (batcher.py's inline
path; the other workers idle, server/board.py) runs on a second session with ``solo_threads``
(every usable core), as the other workers' cores are idle then. Its threads spin while a run
lasts and stop when it returns (``spin_within_runs``): the default bundle's lone image took
0.81 ms with sleeping threads, no faster than one thread (0.76: waking a thread for each of
its small operators costs what the split saves), and 0.48 ms spinning, for 0.91 against 0.83
CPU ms per run; spinning between runs too cost 1.77 CPU ms per run. A 73 MB EfficientNet-Lite0
bundle: 8.4 against 11.1 ms per image (sleeping threads), for a second copy of its weights
(+82 MB RSS).

IOBinding (``io_binding``, binding.py) runs every batch on buffers bound once per bucket; on by
default (CPU, default bundle, 2 cores: docs/gpu.md has the numbers). The CUDA provider's
options, the no-GPU fallback and CUDA graphs are in cuda.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hopgate.bundle import (
    INPUT_IMAGES,
    INPUT_LOG_LAMBDA,
    LOGITS,
    OUTPUTS,
    BundleError,
    BundleMeta,
    load_meta,
    served_outputs,
)

from . import cuda
from .binding import Binding

log = logging.getLogger("hopgate.runtime")


class Runtime:
    """Runs padded batches of uint8 images through the bundle. Not thread-safe by design:
    the batcher calls it from one worker thread per batch slot (ORT's run() itself is safe)."""

    def __init__(self, path: str | Path, providers: list[str], intra_op_threads: int = 0,
                 inter_op_threads: int = 1, pad: str = "auto", spinning: bool = False,
                 io_binding: bool = True, cuda_graphs: bool = True,
                 conv_algo_search: str = "EXHAUSTIVE", tf32: bool = False,
                 solo_threads: int = 0):
        import onnxruntime as ort

        self.path = Path(path)
        self.meta: BundleMeta = load_meta(self.path)
        available = ort.get_available_providers()
        chosen = cuda.choose(ort, providers)
        opts = options(ort, intra_op_threads, inter_op_threads, spinning)
        pads = pad == "bucket" or (pad == "auto" and chosen[0] != "CPUExecutionProvider")
        self.cuda_graphs = cuda_graphs and io_binding and pads and cuda.CUDA in chosen

        def session(graphs: bool) -> Any:
            entries = cuda.provider_entries(chosen, self.path, graphs, conv_algo_search, tf32)
            try:
                return ort.InferenceSession(str(self.path), opts, providers=entries)
            except Exception as e:
                raise BundleError(f"{self.path}: onnxruntime cannot load it: {e}") from None

        self._session = session
        try:
            self.session = session(self.cuda_graphs)
        except BundleError as e:
            if not self.cuda_graphs:
                raise
            self._graphs_off(e)
        self.provider = self.session.get_providers()[0]
        # a lone image's session (``run_solo``): more threads than a batch's where the worker
        # has fewer than the machine (its threads idle while only one request is in)
        self.solo: Any = None
        if (self.provider == "CPUExecutionProvider" and 0 < intra_op_threads < solo_threads):
            self.solo = ort.InferenceSession(str(self.path),
                                             options(ort, solo_threads, spin_within_runs=True),
                                             providers=["CPUExecutionProvider"])
        self.has_log_lambda = check_graph(self.session, self.meta, self.path)
        self.outputs = served_outputs({o.name for o in self.session.get_outputs()})
        self.has_logits = LOGITS in self.outputs  # /score's top_k (the one-pass shape)
        m = self.meta
        self.shape = (m.height, m.width, m.channels)
        self.single_s = float("inf")  # one image's compute, measured by warm()
        self.pads = pad == "bucket" or (pad == "auto" and self.provider != "CPUExecutionProvider")
        self.io_binding = io_binding and self.provider in ("CPUExecutionProvider", cuda.CUDA)
        self.binding: Binding | None = None  # made by warm(), which knows the buckets
        # with graphs on, a run outside the binding must neither capture nor replay one
        self.plain_options = ort.RunOptions()
        if self.cuda_graphs:
            self.plain_options.add_run_config_entry("gpu_graph_id", "-1")
        log.info("loaded %s (%s) on %s (available: %s)", self.path.name, m.model_version,
                 self.provider, ", ".join(available))

    def run(self, images: np.ndarray | Sequence[np.ndarray], bucket: int | None = None,
            log_lambda: float | None = None) -> dict[str, np.ndarray]:
        """images uint8 [n, H, W, C] (or n arrays [H, W, C]: the binding stacks them straight
        into its buffer); zero-padded to ``bucket`` rows when this runtime pads, outputs cut
        back to n. With IOBinding, ``bucket`` is the binding's own (the same buckets)."""
        if self.binding is not None and len(images) <= self.binding.buckets[-1]:
            return self.binding.run(images, log_lambda)
        n = len(images)
        if not isinstance(images, np.ndarray):
            images = np.stack(images)
        if bucket and bucket > n and self.pads:
            pad = np.zeros((bucket - n, *self.shape), dtype=np.uint8)
            images = np.concatenate([images, pad])
        out = self.session.run(list(self.outputs), self._feed(images, log_lambda),
                               self.plain_options)
        return {k: v[:n] for k, v in zip(self.outputs, out)}

    def run_solo(self, image: np.ndarray, log_lambda: float | None = None
                 ) -> dict[str, np.ndarray]:
        """One image [H, W, C] while nothing else is in flight: on the solo session if any."""
        if self.solo is None:
            return self.run(image[None], 1, log_lambda)
        out = self.solo.run(list(self.outputs), self._feed(image[None], log_lambda))
        return dict(zip(self.outputs, out))

    def _feed(self, images: np.ndarray, log_lambda: float | None) -> dict[str, np.ndarray]:
        """The graph's inputs: uint8 images [n, H, W, C] and the request's threshold, if any
        (threshold.py bounds it)."""
        feed = {INPUT_IMAGES: np.ascontiguousarray(images, dtype=np.uint8)}
        if log_lambda is not None:
            if not self.has_log_lambda:
                raise ValueError(f"{self.path.name} has no '{INPUT_LOG_LAMBDA}' input")
            feed[INPUT_LOG_LAMBDA] = np.asarray(log_lambda, dtype=np.float32)
        return feed

    def _graphs_off(self, why: Exception) -> None:
        """A session without CUDA graphs (e.g. a node the CUDA provider leaves to the CPU
        makes onnxruntime refuse capture), said in one line."""
        log.warning("CUDA graphs off for %s: %s", self.path.name, str(why).splitlines()[0][:200])
        self.cuda_graphs = False
        self.session = self._session(False)
        if hasattr(self, "plain_options"):
            import onnxruntime as ort

            self.plain_options = ort.RunOptions()

    def warm(self, buckets: list[int]) -> None:
        """One run per bucket so the first real request of each size pays no set-up; with
        IOBinding, the buffers are bound here, and on CUDA graphs each bucket runs until its
        graph is captured (onnxruntime captures on a bucket's third run). A capture that fails
        (at bind or run time) turns graphs off, in one line, and warms again without."""
        try:
            self._bind(buckets)
            self._warm_buckets(buckets)
        except BundleError as e:
            if not self.cuda_graphs:
                raise
            self._graphs_off(e)
            self._bind(buckets)
            self._warm_buckets(buckets)
        one = np.zeros((1, *self.shape), dtype=np.uint8)
        times = []
        for _ in range(5):  # what one image costs, warm (batcher.py: may it run inline?)
            t0 = time.perf_counter()
            self.run_solo(one[0])
            times.append(time.perf_counter() - t0)
        self.single_s = sorted(times)[len(times) // 2]

    def _bind(self, buckets: list[int]) -> None:
        self.binding = None
        if not self.io_binding:
            return
        import onnxruntime as ort

        device = "cuda" if self.provider == cuda.CUDA else "cpu"
        default = self.meta.threshold if self.has_log_lambda else None
        try:
            self.binding = Binding(ort, self.session, self.shape, buckets, default,
                                   self.pads, device, self.cuda_graphs, self.plain_options)
        except Exception as e:
            if self.cuda_graphs:  # maybe the graphs: warm() retries without them
                raise BundleError(str(e).splitlines()[0][:300]) from None
            log.warning("IOBinding off for %s: %s", self.path.name,  # the plain path serves
                        str(e).splitlines()[0][:200])

    def _warm_buckets(self, buckets: list[int]) -> None:
        for b in buckets:
            try:
                for _ in range(3 if self.cuda_graphs else 1):
                    self.run(np.zeros((b, *self.shape), dtype=np.uint8))
            except Exception as e:  # onnxruntime's own error: the graph, not the request
                raise BundleError(f"{self.path}: the graph fails on a batch of {b} blank "
                                  f"images: {str(e).splitlines()[0][:300]}") from None


def options(ort: Any, intra_op_threads: int, inter_op_threads: int = 1,
            spinning: bool = False, spin_within_runs: bool = False) -> Any:
    """A serving session's options: its threads, and no busy-waiting unless asked:
    ``spinning`` between runs too, ``spin_within_runs`` only while a run lasts (onnxruntime's
    ``session.force_spinning_stop``: the pool stops spinning when the run returns)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the overridable log_lambda initializer is intended
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    if spin_within_runs and not spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    elif not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def check_graph(session: Any, meta: BundleMeta, path: Path) -> bool:
    """The graph's I/O against the bundle's metadata (``BundleError`` naming the first
    disagreement); whether it has the optional ``log_lambda`` input."""
    inputs = {i.name: i for i in session.get_inputs()}
    if INPUT_IMAGES not in inputs:
        raise BundleError(f"{path}: graph has no '{INPUT_IMAGES}' input")
    missing = set(OUTPUTS) - {o.name for o in session.get_outputs()}
    if missing:
        raise BundleError(f"{path}: graph lacks outputs {sorted(missing)}")
    images = inputs[INPUT_IMAGES]
    if images.type != "tensor(uint8)":
        raise BundleError(f"{path}: graph input '{INPUT_IMAGES}' is {images.type}, "
                          "not tensor(uint8)")
    shape = list(images.shape)
    if len(shape) != 4:
        raise BundleError(f"{path}: graph input '{INPUT_IMAGES}' has shape {shape}, not "
                          "[batch, height, width, channels]")
    for axis, dim, want in zip(("height", "width", "channels"), shape[1:],
                               (meta.height, meta.width, meta.channels)):
        if isinstance(dim, int) and dim != want:  # a symbolic dimension takes any size
            raise BundleError(f"{path}: metadata says {axis} {want} but the graph's "
                              f"'{INPUT_IMAGES}' input is {shape} ({axis} {dim})")
    # exported as an initializer that is also a graph input (overridable): onnxruntime lists
    # it among the overridable initializers, not the inputs
    overridable = {i.name for i in session.get_overridable_initializers()}
    return INPUT_LOG_LAMBDA in inputs or INPUT_LOG_LAMBDA in overridable


def check_bundle(path: str | Path) -> BundleMeta:
    """Metadata and graph agree, checked without the cost of a serving session (no graph
    optimisation, CPU): ``hopgate-serve`` calls it before it starts, to refuse a bad bundle
    with one clear message."""
    import onnxruntime as ort

    path = Path(path)
    meta = load_meta(path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BundleError(f"{path}: onnxruntime cannot load it: "
                          f"{str(e).splitlines()[0][:300]}") from None
    check_graph(session, meta, path)
    return meta
