"""The CUDA provider: whether a GPU is there at all, its libraries, and the options it runs with.

A GPU build of onnxruntime with no GPU visible (a GPU image on a CPU node, a container started
without ``--gpus``) would otherwise fail inside the CUDA provider and print pages of
``EP Error`` before falling back; ``gpu_visible`` asks the driver first (``libcuda.so.1``, which
the NVIDIA container toolkit injects), so the fallback is one log line.

Options (``provider_entries``), chosen for a server whose every batch is a warmed bucket:
  * ``cudnn_conv_algo_search`` EXHAUSTIVE (setting ``cuda_conv_algo_search``): cuDNN times every
    algorithm the first time it sees a shape. On CUDA the runtime pads to buckets and warms them
    all before ready, so the search is paid before the first request and never stalls a new
    shape at serve time; HEURISTIC starts faster and may pick slower kernels.
    ``benchmarks/gpu_check`` measures both.
  * ``arena_extend_strategy`` kSameAsRequested: the bucket shapes repeat, so the arena grows by
    what is asked instead of the next power of two (kNextPowerOfTwo can hold twice the memory a
    sidecar needs, next to the classifier it guards on the same GPU).
  * ``use_tf32`` 0 (setting ``cuda_tf32``): TF32 matmuls and convolutions keep 10 mantissa bits,
    which moves scores by about 1e-3 relative: the CPU parity gate's bound. Off by default.
  * ``do_copy_in_default_stream`` 1: copies and kernels on one stream, ordered without events.
  * ``enable_cuda_graph`` (setting ``cuda_graphs``): one graph captured per bucket (binding.py
    replays it with ``gpu_graph_id``); it needs every node on CUDA and fixed I/O addresses, so
    the runtime falls back to no graphs with one log line when the session refuses it.
TensorRT is used only where the providers setting names it and the wheel offers it (engines
cached beside the bundle, fp32 so parity holds).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("hopgate.runtime")

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (CUDA, TENSORRT)


def gpu_visible() -> tuple[bool, str]:
    """(whether the driver reports at least one CUDA device, why not in words)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no NVIDIA driver: libcuda.so.1 not found"
    if (rc := cuda.cuInit(0)) != 0:
        return False, f"the NVIDIA driver cannot start (cuInit error {rc})"
    count = ctypes.c_int(0)
    if (rc := cuda.cuDeviceGetCount(ctypes.byref(count))) != 0 or count.value == 0:
        return False, f"the NVIDIA driver sees no device (cuDeviceGetCount error {rc})"
    return True, f"{count.value} device(s)"


def preload(ort: Any) -> None:
    """Load the CUDA and cuDNN libraries of the ``nvidia-*`` wheels (onnxruntime >= 1.21 knows
    where pip puts them); the provider library itself carries no path to them."""
    fn = getattr(ort, "preload_dlls", None)
    if fn is not None:
        try:
            fn()
        except Exception as e:  # the image's LD_LIBRARY_PATH may still find them
            log.debug("onnxruntime.preload_dlls: %s", e)


def provider_entries(chosen: list[str], model: Path, graphs: bool, conv_algo_search: str,
                     tf32: bool) -> list[Any]:
    """``chosen`` with each GPU provider's options (module docstring)."""
    out: list[Any] = []
    for p in chosen:
        if p == CUDA:
            out.append((p, {
                "device_id": "0",
                "cudnn_conv_algo_search": conv_algo_search,
                "arena_extend_strategy": "kSameAsRequested",
                "use_tf32": "1" if tf32 else "0",
                "do_copy_in_default_stream": "1",
                "enable_cuda_graph": "1" if graphs else "0",
            }))
        elif p == TENSORRT:
            cache = str(model.parent / ".trt-cache")
            out.append((p, {"device_id": "0", "trt_fp16_enable": "0",
                            "trt_engine_cache_enable": "1", "trt_engine_cache_path": cache,
                            "trt_timing_cache_enable": "1", "trt_timing_cache_path": cache}))
        else:
            out.append(p)
    return out


def choose(ort: Any, wanted: list[str], load: bool = True) -> list[str]:
    """The providers to ask for: ``wanted`` that this onnxruntime build offers, without the GPU
    ones when no GPU is visible (said in one line), CPU last resort; ``load``: preload the
    CUDA libraries when a GPU is there (the runtime's process; not cli.py's check)."""
    available = ort.get_available_providers()
    chosen = [p for p in wanted if p in available]
    if any(p in GPU_PROVIDERS for p in chosen):
        seen, why = gpu_visible()
        if seen and load:
            preload(ort)
        else:
            chosen = [p for p in chosen if p not in GPU_PROVIDERS]
            log.warning("no GPU visible (%s): serving on CPUExecutionProvider", why)
    return chosen or ["CPUExecutionProvider"]


class HostPin:
    """Page-locks numpy buffers with ``cudaHostRegister`` so host-to-device copies are one
    DMA, not a staged copy (onnxruntime's Python API has no pinned allocator). Best effort:
    unpinned buffers are correct, only slower."""

    def __init__(self) -> None:
        self.rt = None
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
            try:
                self.rt = ctypes.CDLL(name)
                break
            except OSError:
                continue

    def pin(self, array: Any) -> bool:
        if self.rt is None:
            return False
        rc = self.rt.cudaHostRegister(ctypes.c_void_p(array.ctypes.data),
                                      ctypes.c_size_t(array.nbytes), ctypes.c_uint(0))
        return rc == 0
