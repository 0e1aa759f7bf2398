"""kubetune's test harness: a real control plane and node, S3 and Prometheus on this host.

Modules:
    harness.tools          find/build the control-plane binaries (scripts/build-tools.sh)
    harness.cluster        ControlPlane: etcd, kube-apiserver, controller manager, scheduler
    harness.containerd_node  a real node: kubelet, containerd, runc, CNI, CoreDNS, kube-proxy
    harness.kubelet_vars   the kubelet's `$(NAME)` expansion (for the builders' tests)
    harness.s3             moto's S3 server behind a SigV4 credential check
    harness.prometheus     a private Prometheus from Debian's package
    harness.fixtures       the pytest plugin (pytest_plugins = ["harness.fixtures"])

From a shell (with tests/ on PYTHONPATH):
    python -m harness up [--state-dir DIR]     # prints `export KUBECONFIG=...` and S3 settings
    python -m harness down [--state-dir DIR]
"""
