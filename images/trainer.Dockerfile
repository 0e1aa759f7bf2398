# syntax=docker/dockerfile:1
# The kubetune trainer image: CUDA runtime + Python + kubetune[trainer] (torch, transformers,
# accelerate, datasets, sacrebleu, ...) in a venv at /opt/venv. The operator runs its
# prepare/train/evaluate pods from it (`kubetune prepare|train|evaluate`, or
# `accelerate launch ...` for several GPUs).
#
#   docker build -f images/trainer.Dockerfile -t ghcr.io/kubetune/trainer:0.1.0 .
#   bash scripts/build-images.sh     # here and in CI: buildah, a local Debian base, no registry
#
# Layers, so that a source change rebuilds only the last, small one (docs/images.md):
#   1. the dependencies of the [trainer] extra (torch and its CUDA wheels: gigabytes), from
#      images/trainer.requirements.txt alone (`make generate` writes it from pyproject.toml);
#      torch is the range pyproject.toml asks for, not a pin;
#   2. the kubetune wheel (built in the `wheel` stage), installed with --no-deps.
# uv installs layer 1 from a throwaway venv in /tmp (removed in the same step: not in the
# image); its download cache is a cache mount. The venv's own pip installs layer 2.
# torch's Linux wheels from PyPI bring their own CUDA libraries (nvidia-* wheels); the CUDA
# base adds the driver-facing runtime that nvidia-container-toolkit expects.
#
# Base image: pinned by tag. For reproducible releases pin the digest too, by passing
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04@sha256:<digest>
# (`docker buildx imagetools inspect nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04` prints it).
# Any Debian or Ubuntu base works: scripts/build-images.sh passes a Debian bookworm base it
# makes with mmdebstrap (no CUDA libraries beyond torch's own wheels).
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ARG UV_VERSION=0.13.9

# ---- uv: the build tool of the wheel stage ----------------------------------------------
FROM ${CUDA_IMAGE} AS uv
ARG UV_VERSION
# A CA bundle for a TLS-intercepting proxy between the build and PyPI: scripts/build-images.sh
# passes the host's as the secret `build-ca` and points PIP_CERT / SSL_CERT_FILE at it
# (/run/secrets/build-ca). Unset, pip and uv use their own roots. A secret and build arguments,
# not COPY and ENV: none of it stays in the image.
ARG PIP_CERT
ENV DEBIAN_FRONTEND=noninteractive
# Security updates within the base's release are wanted, so apt versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=secret,id=build-ca \
    python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}"

# ---- wheel: the kubetune wheel from the source tree ----------------------------------------
FROM uv AS wheel
ARG SSL_CERT_FILE
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core/ core/
COPY trainer/ trainer/
COPY operator/ operator/
RUN --mount=type=cache,target=/root/.cache/uv --mount=type=secret,id=build-ca \
    /opt/uv/bin/uv build --wheel --out-dir /dist .

# ---- runtime ----------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
ARG UV_VERSION
ARG PIP_CERT
ARG SSL_CERT_FILE
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
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
# uid/gid 1000: the stage pods' securityContext (runAsUser/runAsGroup/fsGroup 1000) set by the
# operator. The root filesystem is read-only in the pods; everything writable lives under
# /scratch (an emptyDir there) and /tmp (another), so HOME and every cache point there.
RUN groupadd --gid 1000 kubetune \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /scratch/home --shell /usr/sbin/nologin kubetune \
    && mkdir -p /scratch/home /scratch/hf /scratch/cache \
    && chown -R 1000:1000 /scratch
# Layer 1: the dependencies, from their list alone (images/trainer.requirements.txt, generated
# from pyproject.toml), so editing a .py file or pyproject.toml's other tables reuses this
# multi-gigabyte layer.
COPY images/trainer.requirements.txt /opt/kubetune/requirements.txt
RUN --mount=type=cache,target=/root/.cache/uv --mount=type=secret,id=build-ca \
    python3 -m venv /opt/venv \
    && python3 -m venv /tmp/uv \
    && /tmp/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}" \
    && /tmp/uv/bin/uv pip install --python /opt/venv/bin/python --link-mode copy --compile-bytecode \
        -r /opt/kubetune/requirements.txt \
    && rm -rf /tmp/uv \
    && /opt/venv/bin/python -c "import torch, transformers, accelerate, sacrebleu"
# Layer 2: kubetune itself, without dependencies (all of them are in layer 1), installed by
# the venv's pip: no network, no uv. A copied wheel, not `RUN --mount=type=bind,from=wheel`:
# buildah 1.28 does not invalidate a RUN layer when a mounted file changes, and finds nothing
# to mount from a stage that came from the layer cache.
COPY --from=wheel /dist/ /opt/kubetune/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index \
        /opt/kubetune/dist/kubetune-*.whl \
    && /opt/venv/bin/python -c "import kubetune_trainer" \
    && /opt/venv/bin/kubetune --version
# HOME, HF_HOME and XDG_CACHE_HOME are the values the operator gives stage pods too; the rest
# keep matplotlib, torch (hub, inductor), Triton and tempfile off the read-only root. After the
# installs: uv keeps its cache under $HOME, which during the build is the cache mount's /root.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/scratch/home \
    HF_HOME=/scratch/hf \
    XDG_CACHE_HOME=/scratch/cache \
    MPLCONFIGDIR=/scratch/cache/matplotlib \
    TORCH_HOME=/scratch/cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/scratch/cache/torchinductor \
    TRITON_CACHE_DIR=/scratch/cache/triton \
    TMPDIR=/tmp \
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
