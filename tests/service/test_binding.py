"""IOBinding (service/runtime/binding.py) on the CPU provider: the same code the CUDA path runs,
minus the device copies. Parity with the plain ``session.run`` path on 1,000 Fashion-MNIST
images, no allocation growth over 10,000 calls, and the no-GPU fallback in one line
(service/runtime/cuda.py)."""

from __future__ import annotations

import logging
import resource
import tracemalloc

import numpy as np
import onnxruntime as ort
import pytest
from conftest import BUNDLE

from hopgate.bundle import INPUT_IMAGES, INPUT_LOG_LAMBDA, OUTPUTS
from hopgate.service.config import Settings
from hopgate.service.runtime import cuda
from hopgate.service.runtime.binding import Binding
from hopgate.service.runtime.session import Runtime

BUCKETS = [1, 2, 4, 8, 16, 32, 64]


def batches(n_images: int, seed: int = 0) -> list[tuple[int, int]]:
    """(start, size) covering ``n_images`` with sizes 1..64 in random order, every bucket's
    batch sizes included."""
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < n_images:
        n = int(rng.integers(1, 65))
        out.append((i, min(n, n_images - i)))
        i += n
    return out


@pytest.mark.parametrize("pad", ["none", "bucket"])  # CPU's own way, and the CUDA way
def test_parity_with_plain_run_on_1000_images(fashion, pad):
    """Every output equal to the plain path's, batch by batch, results kept across calls
    (a result that is a view of a reused buffer would be overwritten by the next batch), the
    images given as one array or as the batcher's list of rows, and a per-request threshold
    every few batches (the bound scalar must follow it, and go back)."""
    images = fashion.images[:1000]
    bound = Runtime(BUNDLE, ["CPUExecutionProvider"], 1, pad=pad)
    plain = Runtime(BUNDLE, ["CPUExecutionProvider"], 1, pad=pad, io_binding=False)
    bound.warm(BUCKETS)
    plain.warm(BUCKETS)
    assert bound.binding is not None and plain.binding is None
    thresholds = [None, None, -5.0, None, 40.0]  # 40: nearly everything OOD
    got, want = [], []
    for j, (i, n) in enumerate(batches(len(images))):
        chunk, lam = images[i:i + n], thresholds[j % len(thresholds)]
        rows = list(chunk) if j % 2 else chunk
        got.append(bound.run(rows, _bucket(n), lam))
        want.append(plain.run(chunk, _bucket(n), lam))
    for k in OUTPUTS:
        a = np.concatenate([g[k] for g in got])
        b = np.concatenate([w[k] for w in want])
        assert a.shape == b.shape == (1000, *b.shape[1:]), k
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)
    flags = np.concatenate([g["is_ood"] for g in got])
    assert 0 < flags.sum() < len(flags)  # the thresholds did change verdicts both ways


def _bucket(n: int) -> int:
    return next(b for b in BUCKETS if b >= n)


def tiny_session(h: int = 4, w: int = 4, c: int = 1):
    """A graph with the bundle's I/O contract and next to no compute, so 10,000 calls take
    well under a second and what is measured is the binding, not the model."""
    pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper as H

    nodes = [
        H.make_node("Cast", [INPUT_IMAGES], ["f"], to=T.FLOAT),
        H.make_node("ReduceMean", ["f"], ["score"], keepdims=0, axes=[1, 2, 3]),
        H.make_node("Less", ["score", INPUT_LOG_LAMBDA], ["is_ood"]),
        H.make_node("Cast", ["score"], ["pred_class"], to=T.INT64),
        H.make_node("Unsqueeze", ["pred_class", "ax"], ["p1"]),
        H.make_node("Concat", ["p1", "p1", "p1"], ["memory_index"], axis=1),
        H.make_node("Unsqueeze", ["score", "ax"], ["s1"]),
        H.make_node("Concat", ["s1", "s1", "s1"], ["memory_weight"], axis=1),
        H.make_node("Neg", ["score"], ["energy"]),
        H.make_node("Sigmoid", ["score"], ["msp"]),
        H.make_node("Identity", ["score"], ["energy_score"]),
    ]
    types = {"score": T.FLOAT, "is_ood": T.BOOL, "pred_class": T.INT64,
             "memory_index": T.INT64, "memory_weight": T.FLOAT, "energy": T.FLOAT,
             "msp": T.FLOAT, "energy_score": T.FLOAT}
    outs = [H.make_tensor_value_info(k, types[k], ["B", 3] if "memory" in k else ["B"])
            for k in OUTPUTS]
    graph = H.make_graph(
        nodes, "tiny", [H.make_tensor_value_info(INPUT_IMAGES, T.UINT8, ["B", h, w, c]),
                        H.make_tensor_value_info(INPUT_LOG_LAMBDA, T.FLOAT, [])], outs,
        initializer=[H.make_tensor("ax", T.INT64, [1], [1]),
                     H.make_tensor(INPUT_LOG_LAMBDA, T.FLOAT, [], [100.0])])
    model = H.make_model(graph, opset_imports=[H.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.parametrize("pads", [False, True])
def test_no_allocation_growth_over_10000_calls(monkeypatch, pads):
    """10,000 batches (sizes 1..16, two thresholds): no IOBinding and no OrtValue made after
    start-up, Python heap and resident memory flat (bounds far above noise, far below what a
    leak of one buffer per call would reach: 10,000 calls x >= 16 B)."""
    session = tiny_session()
    made = {"io_binding": 0, "ortvalue": 0}
    real_io, real_ov = session.io_binding, ort.OrtValue.ortvalue_from_shape_and_type

    def io_binding():
        made["io_binding"] += 1
        return real_io()

    def ortvalue(*a, **kw):
        made["ortvalue"] += 1
        return real_ov(*a, **kw)

    binding = Binding(ort, session, (4, 4, 1), [1, 2, 4, 8, 16], 100.0, pads)
    monkeypatch.setattr(session, "io_binding", io_binding)
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", ortvalue)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, 4, 4, 1), dtype=np.uint8)
    sizes = rng.integers(1, 17, 10_000)
    for n in sizes[:500]:  # warm: first calls may fill caches
        binding.run(images[:n])
    tracemalloc.start()
    heap0, rss0 = tracemalloc.get_traced_memory()[0], rss_bytes()
    for j, n in enumerate(sizes):
        out = binding.run(images[:n], None if j % 3 else 0.5)
    heap1, rss1 = tracemalloc.get_traced_memory()[0], rss_bytes()
    tracemalloc.stop()
    assert made == {"io_binding": 0, "ortvalue": 0}
    assert heap1 - heap0 < 64 * 1024, heap1 - heap0
    assert rss1 - rss0 < 8 * 1024 * 1024, rss1 - rss0
    # the last call's answer is right (the tiny graph: score = mean pixel)
    n = int(sizes[-1])
    np.testing.assert_allclose(out["score"], images[:n].reshape(n, -1).mean(1), rtol=1e-6)


def test_binding_is_on_by_default_and_switchable():
    assert Settings().io_binding is True
    rt = Runtime(BUNDLE, ["CPUExecutionProvider"], 1, io_binding=False)
    rt.warm([1, 4])
    assert rt.binding is None


def test_no_gpu_means_cpu_in_one_line(caplog):
    """A GPU build of onnxruntime on a machine with no GPU: CUDA and TensorRT are dropped
    before onnxruntime tries them, with one warning that says why."""
    if cuda.gpu_visible()[0]:
        pytest.skip("a GPU is visible here")

    class GpuBuild:
        @staticmethod
        def get_available_providers():
            return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    with caplog.at_level(logging.INFO, logger="hopgate.runtime"):
        chosen = cuda.choose(GpuBuild, ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                        "CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("no GPU visible (") and \
        lines[0].endswith("): serving on CPUExecutionProvider"), lines


def test_cuda_options_are_the_documented_ones(tmp_path):
    """The CUDA provider's options as service/runtime/cuda.py and docs/gpu.md state them (they only
    take effect on a GPU, so this is where a silent change would show)."""
    (trt, t), (cu, c), cpu = cuda.provider_entries(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        tmp_path / "b.onnx", True, "EXHAUSTIVE", False)
    assert (trt, cu, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                              "CPUExecutionProvider")
    assert c == {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE",
                 "arena_extend_strategy": "kSameAsRequested", "use_tf32": "0",
                 "do_copy_in_default_stream": "1", "enable_cuda_graph": "1"}
    assert t["trt_fp16_enable"] == "0"
    assert t["trt_engine_cache_path"] == str(tmp_path / ".trt-cache")
    _, c = cuda.provider_entries(["CUDAExecutionProvider"], tmp_path / "b.onnx", False,
                                 "HEURISTIC", True)[0]
    assert (c["enable_cuda_graph"], c["cudnn_conv_algo_search"], c["use_tf32"]) == \
        ("0", "HEURISTIC", "1")


def test_a_refused_graph_capture_turns_graphs_off_in_one_line(monkeypatch, caplog, fashion):
    """A CUDA graph capture that fails (onnxruntime refuses it for a graph with nodes off the
    GPU) must not stop the server: one warning, then warm again without graphs, still bound.
    Played on the CPU with a binding that fails whenever graphs are asked for."""
    from hopgate.service.runtime import session as runtime_module

    real = runtime_module.Binding

    def binding(*a, **kw):
        if a[7]:  # graphs
            raise RuntimeError("This session cannot use the graph capture feature")
        return real(*a, **kw)

    monkeypatch.setattr(runtime_module, "Binding", binding)
    rt = Runtime(BUNDLE, ["CPUExecutionProvider"], 1, pad="bucket")
    rt.cuda_graphs = True  # as on CUDA
    with caplog.at_level(logging.INFO, logger="hopgate.runtime"):
        rt.warm([1, 4, 16])
    assert rt.cuda_graphs is False and rt.binding is not None
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].startswith("CUDA graphs off for default.onnx: "), said
    plain = Runtime(BUNDLE, ["CPUExecutionProvider"], 1, io_binding=False)
    x = fashion.images[:13]
    np.testing.assert_array_equal(rt.run(x, 16)["pred_class"], plain.run(x)["pred_class"])


def test_a_lone_image_runs_on_the_solo_session_with_the_same_answers(fashion):
    """Issue 24: a worker with fewer onnxruntime threads than the machine's cores runs a lone
    image on a second session with ``solo_threads``; its answers are the batch path's."""
    rt = Runtime(BUNDLE, ["CPUExecutionProvider"], intra_op_threads=1, solo_threads=2)
    rt.warm([1, 8])
    assert rt.solo is not None
    solo_ops = rt.solo.get_session_options()
    assert solo_ops.intra_op_num_threads == 2
    # its threads spin while a run lasts and stop when it returns: on 2 cores a lone image
    # took 0.81 ms with sleeping threads (no faster than one thread) and 0.48 ms spinning
    assert solo_ops.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError):  # spinning left at onnxruntime's default: allowed
        solo_ops.get_session_config_entry("session.intra_op.allow_spinning")
    batch_ops = rt.session.get_session_options()  # ... the batch session's never spin
    assert batch_ops.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for image in fashion.images[:32]:
        solo, batch = rt.run_solo(image), rt.run(image[None])
        for k in OUTPUTS:
            np.testing.assert_allclose(solo[k], batch[k], rtol=1e-5, atol=1e-4, err_msg=k)
    # a threshold of the request's own, as on the batch path
    lam = float(np.asarray(rt.run(fashion.images[:1])["score"])[0]) + 1.0
    assert bool(rt.run_solo(fashion.images[0], lam)["is_ood"][0])
    # no second session where it would add nothing: all threads already, or as many
    for threads in (0, 2):
        plain = Runtime(BUNDLE, ["CPUExecutionProvider"], intra_op_threads=threads,
                        solo_threads=2)
        assert plain.solo is None, threads
