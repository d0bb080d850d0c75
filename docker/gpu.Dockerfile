# hopgate GPU image: onnxruntime-gpu with the CUDA and cuDNN runtime libraries PyPI ships (the
# nvidia-* wheels of onnxruntime-gpu's extras [cuda,cudnn]), on the same plain Debian/Python base
# as the CPU image: no CUDA base image. Only the driver comes from the host (the NVIDIA container
# toolkit injects libcuda.so.1; it needs a driver for CUDA 13, R580 or newer). Build from the
# repository root (scripts/build-image gpu does, offline):
#   buildah bud --isolation chroot -f docker/gpu.Dockerfile --build-arg BASE=<python 3.11 image> .
# With no GPU visible the server logs one line ("no GPU visible (...): serving on
# CPUExecutionProvider") and serves on the CPU.
ARG BASE=python:3.11-slim
FROM ${BASE}

# NVIDIA_*: what the container toolkit reads to mount the driver into a non-CUDA base image.
# LD_LIBRARY_PATH: the wheels' libraries, for cuDNN's own dlopen of its sub-libraries (the
# runtime also preloads them: service/runtime/cuda.py). ORT_DISABLE_TELEMETRY: onnxruntime-gpu's
# telemetry otherwise warns at start that it cannot persist a device id (no home directory).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib \
    ORT_DISABLE_TELEMETRY=1 \
    HOPGATE_HOST=0.0.0.0 HOPGATE_PORT=8000 HOPGATE_MODEL=/opt/hopgate/models/default.onnx

WORKDIR /opt/hopgate
COPY pyproject.toml README.md constraints.txt constraints-gpu.txt ./
COPY hopgate/ hopgate/
COPY service/ service/
# the export half installs as source only; its torch extra is not installed
COPY model_export/ model_export/
COPY models/default.onnx models/default.onnx
# Offline builds pass a mounted wheelhouse as build args (scripts/build-image gpu does);
# unset, pip uses its index. Build args are not kept in the image.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
# every dependency pinned: constraints.txt + constraints-gpu.txt (onnxruntime-gpu and the nvidia-*
# wheels); the venv works on python:3.11-slim and on a plain Debian base alike (PEP 668)
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && python -m pip install --no-cache-dir -c constraints.txt -c constraints-gpu.txt ".[serve,gpu]" \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin hopgate

# run from an empty directory: `python -m` (each worker process, service/server/workers.py) puts the
# working directory first on sys.path, where the source folder hopgate/ would shadow the
# installed package (it has no hopgate.service: that maps from service/)
WORKDIR /opt/hopgate/run
USER 10001
EXPOSE 8000
# mount another bundle and point HOPGATE_MODEL at it to serve your own model
VOLUME ["/models"]
# CUDA start-up (library loading, cuDNN's algorithm search per bucket, graph capture) takes longer
HEALTHCHECK --interval=10s --timeout=2s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request; port=os.environ.get('HOPGATE_PORT','8000'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2).status != 200)"]
# exec form: the server is PID 1 and receives SIGTERM itself (drain, then exit)
ENTRYPOINT ["hopgate-serve"]
