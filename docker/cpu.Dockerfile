# hopgate CPU image: onnxruntime, no torch. Build from the repository root:
#   buildah bud --isolation chroot -f docker/cpu.Dockerfile --build-arg BASE=<python 3.11 image> .
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    HOPGATE_HOST=0.0.0.0 HOPGATE_PORT=8000 HOPGATE_MODEL=/opt/hopgate/models/default.onnx

WORKDIR /opt/hopgate
COPY pyproject.toml README.md constraints.txt constraints-cpu.txt ./
COPY hopgate/ hopgate/
COPY service/ service/
# the export half installs as source only; its torch extra is not installed
COPY model_export/ model_export/
COPY models/default.onnx models/default.onnx
# Offline builds pass a mounted wheelhouse as build args (scripts/build-image does);
# unset, pip uses its index. Build args are not kept in the image.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
# a venv works on python:3.11-slim and on a plain Debian base alike (PEP 668);
# every dependency pinned: constraints.txt + the runtime's constraints-cpu.txt
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && python -m pip install --no-cache-dir -c constraints.txt -c constraints-cpu.txt ".[serve,cpu]" \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin hopgate

# run from an empty directory: `python -m` (each worker process, service/server/workers.py) puts the
# working directory first on sys.path, where the source folder hopgate/ would shadow the
# installed package (it has no hopgate.service: that maps from service/)
WORKDIR /opt/hopgate/run
USER 10001
EXPOSE 8000
# mount another bundle and point HOPGATE_MODEL at it to serve your own model
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=2s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request; port=os.environ.get('HOPGATE_PORT','8000'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2).status != 200)"]
# exec form: the server is PID 1 and receives SIGTERM itself (drain, then exit)
ENTRYPOINT ["hopgate-serve"]
