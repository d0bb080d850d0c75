# hopgate GPU image: CUDA + cuDNN runtime base, onnxruntime-gpu, no torch.
#   buildah bud --isolation chroot -f docker/gpu.Dockerfile --build-arg BASE=<cuda cudnn runtime image> .
ARG BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive \
    HOPGATE_HOST=0.0.0.0 HOPGATE_PORT=8000 HOPGATE_MODEL=/opt/hopgate/models/default.onnx

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/hopgate
COPY pyproject.toml README.md constraints.txt constraints-gpu.txt ./
COPY hopgate/ hopgate/
COPY service/ service/
# the export half installs as source only; its torch extra is not installed
COPY model_export/ model_export/
COPY models/default.onnx models/default.onnx
# Offline builds pass a mounted wheelhouse as build args (as scripts/build-image
# does for the CPU image); unset, pip uses its index. Not kept in the image.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
# the project itself, every dependency pinned: constraints.txt + constraints-gpu.txt
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir -c constraints.txt -c constraints-gpu.txt ".[serve,gpu]" \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin hopgate

USER 10001
EXPOSE 8000
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=2s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request; port=os.environ.get('HOPGATE_PORT','8000'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2).status != 200)"]
ENTRYPOINT ["hopgate-serve"]
