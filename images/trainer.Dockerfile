# syntax=docker/dockerfile:1
# The kubetune trainer image: CUDA runtime + Python + kubetune[trainer] (torch, transformers,
# accelerate, datasets, sacrebleu, ...). The operator runs its prepare/train/evaluate pods
# from it (`kubetune prepare|train|evaluate`, or `accelerate launch ...` for several GPUs).
#
#   docker build -f images/trainer.Dockerfile -t ghcr.io/kubetune/trainer:0.1.0 .
#
# Install steps mirror CI (scripts/setup-python.sh): CI runs
#   uv pip install -e ".[operator,trainer,dev]"
# in a venv; this image builds the same project into a wheel and runs
#   uv pip install --python /opt/venv/bin/python "<wheel>[trainer]"
# torch's Linux wheels from PyPI bring their own CUDA 12 libraries; the CUDA base adds cuDNN and
# the driver-facing runtime that nvidia-container-toolkit expects.
#
# Base image: pinned by tag. For reproducible releases pin the digest too, by passing
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04@sha256:<digest>
# (`docker buildx imagetools inspect nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04` prints it).
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ARG UV_VERSION=0.13.9

# ---- build: the kubetune wheel ---------------------------------------------------------
FROM ${CUDA_IMAGE} AS build
ARG UV_VERSION
ENV DEBIAN_FRONTEND=noninteractive
# Ubuntu's security updates within the 22.04 series are wanted, so apt versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m pip install --no-cache-dir "uv==${UV_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core/ core/
COPY trainer/ trainer/
COPY operator/ operator/
RUN uv build --wheel --out-dir /dist .

# ---- runtime ----------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
ARG UV_VERSION
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.description="kubetune trainer: prepare, fine-tune and evaluate language models (CUDA)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="kubetune"
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /dist/ /tmp/dist/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "uv==${UV_VERSION}" \
    && /opt/venv/bin/uv pip install --python /opt/venv/bin/python --no-cache \
        "$(ls /tmp/dist/kubetune-*.whl)[trainer]" \
    && /opt/venv/bin/pip uninstall --yes uv \
    && rm -rf /tmp/dist \
    && /opt/venv/bin/python -c "import torch, transformers, accelerate, sacrebleu, kubetune_trainer"
# uid/gid 1000: the stage pods' securityContext (runAsUser/runAsGroup/fsGroup 1000) set by the
# operator. The root filesystem is read-only in the pods; everything writable lives under
# /scratch (an emptyDir there) and /tmp, so HOME and the Hugging Face caches point there.
RUN groupadd --gid 1000 kubetune \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /scratch/home --shell /usr/sbin/nologin kubetune \
    && mkdir -p /scratch/home /scratch/hf /scratch/cache \
    && chown -R 1000:1000 /scratch
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/scratch/home \
    HF_HOME=/scratch/hf \
    XDG_CACHE_HOME=/scratch/cache \
    KUBETUNE_SCRATCH=/scratch \
    KUBETUNE_METRICS_PORT=9400
USER 1000:1000
WORKDIR /scratch
# Train pods serve Prometheus metrics here (port name `metrics`).
EXPOSE 9400
# Stage pods are batch Jobs: Kubernetes watches their exit code, not a health endpoint.
HEALTHCHECK NONE
ENTRYPOINT ["kubetune"]
CMD ["--help"]
