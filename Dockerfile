# syntax=docker/dockerfile:1
# Encapure CPU image: the serving install (ONNX Runtime, tokenizers, FastAPI, uvicorn) in a venv,
# no torch and no compilers in the runtime stage, running as a non-root user.
#
#   docker build -t encapure:cpu .
#   docker run --rm -p 8000:8000 -v /path/to/exported:/models/model:ro encapure:cpu
#
# Models: mount an exported folder (`encapure export ...`) at /models/model (or set ENCAPURE_MODEL to
# another path, `NAME=/models/x` pairs comma-separated for several), or bake one into the image at
# build time with `--build-arg EXPORT_MODEL=<hub id>` (the export
# stage installs torch; the runtime stage only copies the exported files). Every setting is an
# ENCAPURE_* variable (docs/api.md). The image runs offline: HF_HUB_OFFLINE=1.
#
# BASE: any Debian-like image with python3 and the venv module. Where no registry is reachable,
# build a local one (deploy/container-check.sh does, with debootstrap) and pass --build-arg BASE=...
ARG BASE=python:3.11-slim-bookworm

# --- builder: the serving install into /opt/venv (binary wheels only: no compiler needed) ----------
FROM ${BASE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY encapure ./encapure
RUN /opt/venv/bin/pip install --only-binary=:all: --no-binary=encapure . \
 && /opt/venv/bin/python -c "import encapure, onnxruntime, tokenizers, fastapi, uvicorn" \
 && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

# --- models baked in at build time (optional) --------------------------------------------------------
# With EXPORT_MODEL empty (the default) this stage only makes an empty /models. Otherwise it installs
# the export extra (torch, CPU wheels) and exports the model; the stage is thrown away, only /models
# is copied into the runtime stage. (One stage with a condition rather than a stage chosen by an
# ARG in FROM: buildah does not resolve stage names built from variables.)
FROM builder AS models
ARG EXPORT_MODEL=
ARG EXPORT_PRECISION=int8
# Where torch comes from: PyPI's default wheels pull the CUDA libraries, the CPU index keeps this
# stage small. Offline: --build-arg TORCH_PIP_ARGS="--no-index --find-links /wheels" with the wheels
# mounted into the build (podman build -v DIR:/wheels:ro). EXPORT_MODEL is a hub id, or a folder
# mounted into the build the same way.
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
RUN mkdir -p /models \
 && if [ -n "${EXPORT_MODEL}" ]; then \
        /opt/venv/bin/pip install ${TORCH_PIP_ARGS} torch \
     && /opt/venv/bin/pip install ".[export]" \
     && /opt/venv/bin/encapure export "${EXPORT_MODEL}" --output /models/model --precision "${EXPORT_PRECISION}" \
     && chmod -R a+rX /models; \
    fi

# --- runtime -----------------------------------------------------------------------------------------
FROM ${BASE} AS runtime
RUN groupadd --system --gid 10001 encapure \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/encapure --create-home encapure \
 && mkdir -p /var/cache/encapure && chown encapure:encapure /var/cache/encapure
COPY --from=builder /opt/venv /opt/venv
COPY --from=models /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    ENCAPURE_HOST=0.0.0.0 \
    ENCAPURE_PORT=8000 \
    ENCAPURE_MODEL=/models/model \
    ENCAPURE_CACHE=/var/cache/encapure \
    ENCAPURE_LOG_FORMAT=json \
    ENCAPURE_SHUTDOWN_TIMEOUT_S=30
USER encapure
WORKDIR /home/encapure
EXPOSE 8000
# Liveness only (/health): /ready is for load balancers and Kubernetes readiness.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "encapure.deploy.healthcheck"]
# SIGTERM drains in-flight requests (up to ENCAPURE_SHUTDOWN_TIMEOUT_S) and exits 0: give
# `docker stop -t` / terminationGracePeriodSeconds a few seconds more than that.
STOPSIGNAL SIGTERM
# Exec form: the server is PID 1 and receives the signal itself (no shell in between).
ENTRYPOINT ["encapure", "serve"]
