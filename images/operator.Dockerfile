# syntax=docker/dockerfile:1
# The kubetune operator image: Python slim + kubetune[operator] (kopf, kubernetes client,
# prometheus-client) in a venv at /opt/venv. No torch: tests/unit/test_images.py and the
# import check below keep it out.
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/kubetune/operator:0.1.0 .
#   bash scripts/build-images.sh     # here and in CI: buildah, a local Debian base, no registry
#
# Layers, so that a source change rebuilds only the last, small one (docs/images.md):
#   1. the dependencies of the [operator] extra, from images/operator.requirements.txt alone
#      (`make generate` writes it from pyproject.toml);
#   2. the kubetune wheel (built in the `wheel` stage), installed with --no-deps.
# uv installs layer 1 from a throwaway venv in /tmp (removed in the same step: not in the
# image); its download cache is a cache mount. The venv's own pip installs layer 2.
#
# Base image: pinned by tag. For reproducible releases pin the digest too, by passing
#   --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest>
# (`docker buildx imagetools inspect python:3.11.13-slim-bookworm` prints it).
# Any Debian-like base with python3 (>= 3.10) and the venv module works: scripts/build-images.sh
# passes a Debian bookworm base it makes with mmdebstrap.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG UV_VERSION=0.13.9

# ---- uv: the build tool of the wheel stage ----------------------------------------------
FROM ${PYTHON_IMAGE} AS uv
ARG UV_VERSION
# A CA bundle for a TLS-intercepting proxy between the build and PyPI: scripts/build-images.sh
# passes the host's as the secret `build-ca` and points PIP_CERT / SSL_CERT_FILE at it
# (/run/secrets/build-ca). Unset, pip and uv use their own roots. A secret and build arguments,
# not COPY and ENV: none of it stays in the image.
ARG PIP_CERT
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
FROM ${PYTHON_IMAGE}
ARG UV_VERSION
ARG PIP_CERT
ARG SSL_CERT_FILE
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
# Layer 1: the dependencies, from their list alone (images/operator.requirements.txt, generated
# from pyproject.toml), so editing a .py file or pyproject.toml's other tables reuses this layer. The last command fails the build if torch slipped in through a dependency.
COPY images/operator.requirements.txt /opt/kubetune/requirements.txt
RUN --mount=type=cache,target=/root/.cache/uv --mount=type=secret,id=build-ca \
    python3 -m venv /opt/venv \
    && python3 -m venv /tmp/uv \
    && /tmp/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}" \
    && /tmp/uv/bin/uv pip install --python /opt/venv/bin/python --link-mode copy --compile-bytecode \
        -r /opt/kubetune/requirements.txt \
    && rm -rf /tmp/uv \
    && /opt/venv/bin/python -c "import importlib.util as u, sys, kopf, kubernetes, prometheus_client; sys.exit(u.find_spec('torch') is not None)"
# Layer 2: kubetune itself, without dependencies (all of them are in layer 1), installed by
# the venv's pip: no network, no uv. A copied wheel, not `RUN --mount=type=bind,from=wheel`:
# buildah 1.28 does not invalidate a RUN layer when a mounted file changes, and finds nothing
# to mount from a stage that came from the layer cache.
COPY --from=wheel /dist/ /opt/kubetune/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index \
        /opt/kubetune/dist/kubetune-*.whl \
    && /opt/venv/bin/python -c "import importlib.util as u, sys, kubetune_operator; sys.exit(u.find_spec('torch') is not None)" \
    && /opt/venv/bin/kubetune --version
# The root filesystem is read-only in the chart's Deployment; /tmp is its one writable volume,
# so HOME and TMPDIR point there. After the installs: uv keeps its cache under $HOME, which
# during the build must be the cache mount's /root, not a directory in the image.
# USER and LOGNAME: kopf names itself with getpass.getuser(), which raises when the uid has no
# passwd entry (65532 here, or whatever uid a platform assigns) and no such variable is set.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/tmp \
    TMPDIR=/tmp \
    USER=kubetune-operator \
    LOGNAME=kubetune-operator
# 65532: the conventional "nonroot" uid; the chart's podSecurityContext runs as it too.
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 8081
# Kubernetes ignores HEALTHCHECK; the chart's liveness/readiness probes use the same endpoint
# (KUBETUNE_HEALTH_PORT, default 8081, path /healthz). This one serves `docker run`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KUBETUNE_HEALTH_PORT', '8081'), timeout=4)"]
ENTRYPOINT ["kubetune", "operator"]
