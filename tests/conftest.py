"""Root of the test suite.

Tiers (each a folder, run one with `make test-unit|test-integration|test-cluster`):
  unit/         pure functions, no cluster, no training
  integration/  stages on real text with tiny models; S3 on a real (moto) server
  cluster/      real control planes, real nodes (kubelet + containerd), S3, Prometheus, Kueue
                (tests/harness)
"""

# The harness fixtures (k8s_cluster, s3_server, prometheus_factory, ...) start real
# components lazily, only when a test asks for them.
pytest_plugins = ["harness.fixtures"]
