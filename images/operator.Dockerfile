# syntax=docker/dockerfile:1
# The kubetune operator image: Python slim + kubetune[operator] (kopf, kubernetes client,
# prometheus-client). No torch: tests/unit/test_images.py and the import check below keep it out.
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/kubetune/operator:0.1.0 .
#
# Install steps mirror CI (scripts/setup-python.sh): CI runs
#   uv pip install -e ".[operator,trainer,dev]"
# in a venv; this image builds the same project into a wheel and runs
#   uv pip install --system "<wheel>[operator]"
# so the image gets exactly the [operator] extra of pyproject.toml, nothing else.
#
# Base image: pinned by tag. For reproducible releases pin the digest too, by passing
#   --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest>
# (`docker buildx imagetools inspect python:3.11.13-slim-bookworm` prints it).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG UV_VERSION=0.13.9

# ---- build: the kubetune wheel ---------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION
WORKDIR /src
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
COPY pyproject.toml README.md ./
COPY core/ core/
COPY trainer/ trainer/
COPY operator/ operator/
RUN uv build --wheel --out-dir /dist .

# ---- runtime ----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG UV_VERSION
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="kubetune operator: FineTuneJob -> prepare, train, evaluate Jobs (kopf)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="kubetune"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /dist/ /tmp/dist/
# One layer: install uv, install the wheel with its [operator] extra, then remove uv and the
# wheel again. The last command fails the build if torch slipped in through a dependency.
RUN pip install --no-cache-dir "uv==${UV_VERSION}" \
    && uv pip install --system --no-cache "$(ls /tmp/dist/kubetune-*.whl)[operator]" \
    && pip uninstall --yes uv \
    && rm -rf /tmp/dist \
    && python -c "import importlib.util as u, sys, kopf, kubernetes, prometheus_client, kubetune_operator; sys.exit(u.find_spec('torch') is not None)"
# 65532: the conventional "nonroot" uid; the chart's podSecurityContext runs as it too.
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 8081
# Kubernetes ignores HEALTHCHECK; the chart's liveness/readiness probes use the same endpoint
# (KUBETUNE_HEALTH_PORT, default 8081, path /healthz). This one serves `docker run`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KUBETUNE_HEALTH_PORT', '8081'), timeout=4)"]
ENTRYPOINT ["kubetune", "operator"]
