"""Kueue (sigs.k8s.io/kueue) on the test control plane: its CRDs, webhooks and manager process.

    from harness.kueue import Kueue, find_kueue
    kueue = Kueue(control_plane, find_kueue())   # binary + CRDs from scripts/build-kueue.sh
    kueue.start()        # returns when Kueue's webhook suspends a queued Job (server dry-run)
    kueue.create_resource_flavor("default")
    kueue.create_cluster_queue("gpus", {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"})
    kueue.create_local_queue("my-namespace", "main", "gpus")
    kueue.create_priority_class("high", 1000)
    ...                  # Jobs labelled kueue.x-k8s.io/queue-name=main are queued and admitted
    kueue.stop()         # no process left; webhook configurations gone, so Jobs create freely

The pytest fixture is harness.kueue_fixtures.kueue (Kueue on the session's k8s_cluster).

How the API server (a host process) reaches Kueue's webhooks without a Service: the webhook
configurations and the CRDs' conversion webhooks use ``url: https://127.0.0.1:<port>/...``.
Kueue's internal cert management stays on (it is what a real install runs, and with it off
Kueue insists on reading metrics certificates from /etc/kueue), but its generated certificate
names only ``<service>.<namespace>.svc``, which a URL on 127.0.0.1 does not match. So we play
the part of the install manifests and the kubelet: before Kueue starts, we create its cert
Secret with a CA of ours and a serving certificate for both that DNS name and 127.0.0.1, and
write the same files into its cert dir (a kubelet would mount the Secret there). Kueue's cert
rotator finds the Secret valid, keeps it, and injects the CA into the webhook configurations and
CRDs as it does in a cluster. The Secret's rules (``_webhook_certificates``) are the rotator's:
an RSA CA key in PKCS#1, the CA named ``kueue-ca`` in a DNS SAN, and everything valid for more
than its 90-day renewal look-ahead, or it replaces our certificates with ones for the DNS name.

Which Kueue webhooks are installed: the batch/v1 Job pair (only for Jobs carrying the queue-name
label: a dead Kueue must not block the unqueued Jobs of other tests on the same cluster) and
those of Kueue's own kinds, from config/components/webhook/manifests.yaml of the same version.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness._proc import ManagedProcess, free_port, log_tail, wait_until
from harness.cluster import ControlPlane
from harness.tools import REPO_ROOT, default_bin_dir

KUEUE_VERSION = "v0.17.0"  # scripts/build-kueue.sh builds this one
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-kueue.sh"

GROUP = "kueue.x-k8s.io"
API_VERSION = f"{GROUP}/v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # on a Job: the LocalQueue it waits in
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # on a Job: its WorkloadPriorityClass
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # on a Workload: the uid of the Job it queues

NAMESPACE = "kueue-system"  # Kueue's own: its cert Secret; never has managed Jobs
WEBHOOK_SERVICE = "kueue-webhook-service"  # no such Service: only names the certificate
WEBHOOK_SECRET = "kueue-webhook-server-cert"
# Kueue derives these from WEBHOOK_SERVICE ("kueue-" + kind) and injects its CA into them.
MUTATING_CONFIG = "kueue-mutating-webhook-configuration"
VALIDATING_CONFIG = "kueue-validating-webhook-configuration"
# The CRDs whose old versions (v1beta1) Kueue converts; its rotator requires all five to have
# a conversion webhook to inject its CA into.
CONVERTED_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")

# Seconds an admitted Workload's pods have to be Ready before Kueue evicts and requeues it
# (waitForPodsReady): the all-or-nothing guard for multi-pod Jobs whose quota fits but whose
# pods do not all get scheduled, which would otherwise hold their quota (and GPUs) forever.
PODS_READY_TIMEOUT = 300
START_TIMEOUT = 120.0  # seconds; Kueue is up in ~5s on an idle machine, much later on a busy one


class KueueMissing(RuntimeError):
    """Kueue's binary or CRDs are missing and could not be built."""


@dataclass(frozen=True)
class KueueInstall:
    binary: Path
    crd_dir: Path  # Kueue's CRD YAML files (config/components/crd/bases of the same version)


def find_kueue(*, build: bool = True) -> KueueInstall:
    """Kueue as scripts/build-kueue.sh caches it; run that script first if anything is missing."""
    install = _cached_install(default_bin_dir())
    if install is not None:
        return install
    hint = f"run `bash {BUILD_SCRIPT.relative_to(REPO_ROOT)}`"
    if not build or shutil.which("bash") is None:
        raise KueueMissing(f"no Kueue {KUEUE_VERSION} in {default_bin_dir()}; {hint}")
    print(f"harness: building Kueue {KUEUE_VERSION} with {BUILD_SCRIPT} ...", file=sys.stderr)
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=None, text=True, check=False
    )
    if result.returncode != 0:
        raise KueueMissing(f"{BUILD_SCRIPT} failed (exit {result.returncode}); see its output")
    install = _cached_install(Path(result.stdout.strip().splitlines()[-1]))
    if install is None:
        raise KueueMissing(f"{BUILD_SCRIPT} ran but left no kueue binary or CRDs; {hint}")
    return install


def _cached_install(bin_dir: Path) -> KueueInstall | None:
    binary = bin_dir / "kueue"
    if not os.access(binary, os.X_OK):
        return None
    # The link points into kueue-<version>/, where the script also puts the CRDs.
    crd_dir = binary.resolve().parent / "crds"
    if not (crd_dir / ".complete").exists():
        return None
    return KueueInstall(binary=binary.resolve(), crd_dir=crd_dir)


class Kueue:
    """Kueue's manager as a host process against `control_plane`, with admin credentials."""

    def __init__(self, control_plane: ControlPlane, install: KueueInstall) -> None:
        self.control_plane = control_plane
        self.install = install
        self.state_dir = control_plane.state_dir / "kueue"
        self.log_path = control_plane.log_dir / "kueue.log"
        self.webhook_port = 0
        self.health_port = 0
        self.process: ManagedProcess | None = None

    @property
    def webhook_url(self) -> str:
        return f"https://127.0.0.1:{self.webhook_port}"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.webhook_port, self.health_port = free_port(), free_port()
        try:
            self.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}])
            certificates = _webhook_certificates(f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc")
            self._install_certificates(certificates)
            self._install_crds()
            self.apply(_webhook_configurations(self.webhook_url))
            config_path = self.state_dir / "config.yaml"
            config_path.write_text(json.dumps(self.configuration(), indent=2) + "\n")
            self.process = ManagedProcess(
                "kueue",
                [str(self.install.binary), f"--config={config_path}", "--zap-log-level=2"],
                self.log_path,
                env={**os.environ, "KUBECONFIG": str(self.control_plane.kubeconfig)},
            )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the manager and take its webhooks out of the API server's path."""
        if self.process is not None:
            self.process.stop()
            self.process = None
        self.control_plane.kubectl(
            "delete",
            f"mutatingwebhookconfiguration/{MUTATING_CONFIG}",
            f"validatingwebhookconfiguration/{VALIDATING_CONFIG}",
            "--ignore-not-found",
            check=False,
        )
        # Objects stay readable in v1beta2 (the stored version) without the conversion webhook.
        for plural in CONVERTED_CRDS:
            self.control_plane.kubectl(
                "patch",
                f"crd/{plural}.{GROUP}",
                "--type=merge",
                '--patch={"spec": {"conversion": {"strategy": "None", "webhook": null}}}',
                check=False,
            )

    def check_running(self) -> None:
        if self.process is None:
            raise RuntimeError("Kueue is not started")
        self.process.check_running()

    def configuration(self) -> dict[str, Any]:
        """Kueue's Configuration file (config.kueue.x-k8s.io/v1beta2; JSON is valid YAML)."""
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            # Only Jobs labelled with a queue are Kueue's; kubetune labels the stage Jobs it
            # wants queued, and every other Job on the cluster runs as if Kueue were absent.
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": ["batch/job"]},
            "waitForPodsReady": {
                "timeout": f"{PODS_READY_TIMEOUT}s",
                # Admit the next Workload without waiting for this one's pods: quota alone
                # decides, and a Workload whose pods are not all Ready in time is requeued.
                "blockAdmission": False,
                "requeuingStrategy": {"timestamp": "Eviction", "backoffBaseSeconds": 10},
            },
            "internalCertManagement": {
                "enable": True,
                "webhookServiceName": WEBHOOK_SERVICE,
                "webhookSecretName": WEBHOOK_SECRET,
            },
            "webhook": {
                "host": "127.0.0.1",
                "port": self.webhook_port,
                "certDir": str(self.state_dir / "certs"),
            },
            # Plain HTTP /healthz and /readyz: how start() knows the webhook server is up.
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": "0"},  # off: nothing scrapes it in tests
            "leaderElection": {"leaderElect": False},
            "clientConnection": {"qps": 50, "burst": 100},
            # The visibility API is an aggregated API server on a fixed port (8082), which
            # would need an APIService and a Service to reach it; tests read Workloads instead.
            "featureGates": {"VisibilityOnDemand": False},
        }

    # -- start-up steps ------------------------------------------------------------------

    def _install_certificates(self, certificates: Mapping[str, bytes]) -> None:
        cert_dir = self.state_dir / "certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        for name in ("tls.crt", "tls.key"):
            (cert_dir / name).write_bytes(certificates[name])
            (cert_dir / name).chmod(0o600)
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": WEBHOOK_SECRET, "namespace": NAMESPACE},
            "type": "Opaque",
            "stringData": {name: data.decode() for name, data in certificates.items()},
        }
        # Replace, not merge: a Secret left by an earlier Kueue on this cluster holds other keys.
        self.control_plane.kubectl(
            "delete", "secret", "-n", NAMESPACE, WEBHOOK_SECRET, "--ignore-not-found"
        )
        self.apply([secret])

    def _install_crds(self) -> None:
        crds = []
        for path in sorted(self.install.crd_dir.glob("*.yaml")):
            crd = _load_yaml(path)
            if crd["spec"]["names"]["plural"] in CONVERTED_CRDS:
                crd["spec"]["conversion"] = {
                    "strategy": "Webhook",
                    "webhook": {
                        "clientConfig": {"url": f"{self.webhook_url}/convert"},
                        "conversionReviewVersions": ["v1"],
                    },
                }
            crds.append(crd)
        # Server-side: the workloads CRD is too large for client-side apply's annotation.
        self.apply(crds, server_side=True)
        names = [f"crd/{crd['metadata']['name']}" for crd in crds]
        self.control_plane.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", *names, timeout=90
        )

    def _wait_ready(self) -> None:
        def ready() -> bool:
            self.check_running()
            url = f"http://127.0.0.1:{self.health_port}/readyz"
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return bool(resp.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        try:
            wait_until(ready, timeout=START_TIMEOUT, what="Kueue's /readyz", interval=0.25)
            # Ready means Kueue listens and has injected its CA; this proves the API server
            # reaches the webhook over TLS and Kueue's mutating webhook suspends queued Jobs.
            wait_until(
                self._webhook_suspends_queued_job,
                timeout=60,
                what="Kueue's Job webhook to suspend a queued Job (server dry-run)",
                interval=0.5,
            )
        except TimeoutError as err:
            tail = log_tail(self.log_path)
            raise TimeoutError(f"{err}\nlast lines of {self.log_path}:\n{tail}") from None

    def _webhook_suspends_queued_job(self) -> bool:
        self.check_running()
        probe = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": "kueue-webhook-probe",
                "namespace": "default",
                "labels": {QUEUE_LABEL: "kueue-webhook-probe"},
            },
            "spec": {
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "main", "image": "none", "command": ["true"]}],
                    }
                }
            },
        }
        result = self._kubectl_stdin(
            ["create", "--dry-run=server", "-o", "json", "-f", "-"], [probe], check=False
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip())
        return bool(json.loads(result.stdout)["spec"].get("suspend"))

    # -- objects -------------------------------------------------------------------------

    def apply(self, objects: Sequence[Mapping[str, Any]], *, server_side: bool = False) -> None:
        """kubectl apply `objects` (dicts) as the admin user."""
        args = ["apply", "-f", "-"]
        if server_side:
            args += ["--server-side", "--force-conflicts", "--field-manager=kubetune-harness"]
        self._kubectl_stdin(args, objects)

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """kubectl create `obj`; returns it as stored, i.e. after the admission webhooks."""
        result = self._kubectl_stdin(["create", "-o", "json", "-f", "-"], [obj])
        created: dict[str, Any] = json.loads(result.stdout)
        return created

    def _kubectl_stdin(
        self, args: list[str], objects: Sequence[Mapping[str, Any]], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        # One object as itself, so that `create -o json` prints that object and not a List.
        document = (
            objects[0]
            if len(objects) == 1
            else {"apiVersion": "v1", "kind": "List", "items": list(objects)}
        )
        result = subprocess.run(
            ["kubectl", f"--kubeconfig={self.control_plane.kubeconfig}", *args],
            input=json.dumps(document),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    def create_resource_flavor(
        self, name: str, node_labels: Mapping[str, str] | None = None
    ) -> None:
        spec = {"nodeLabels": dict(node_labels)} if node_labels else {}
        self.apply([_kueue_object("ResourceFlavor", name, spec)])

    def create_cluster_queue(
        self,
        name: str,
        quota: Mapping[str, str],
        *,
        flavor: str = "default",
        preempt_lower_priority: bool = False,
    ) -> None:
        """A ClusterQueue for every namespace, with `quota` ({resource: nominal}) of `flavor`.

        A Job asking for a resource missing from `quota` is never admitted; with
        `preempt_lower_priority`, an admitted Workload of lower priority is evicted to make room.
        """
        spec: dict[str, Any] = {
            "namespaceSelector": {},  # {} is every namespace; leaving it out is none
            "queueingStrategy": "BestEffortFIFO",
            "resourceGroups": [
                {
                    "coveredResources": list(quota),
                    "flavors": [
                        {
                            "name": flavor,
                            "resources": [
                                {"name": resource, "nominalQuota": amount}
                                for resource, amount in quota.items()
                            ],
                        }
                    ],
                }
            ],
        }
        if preempt_lower_priority:
            spec["preemption"] = {"withinClusterQueue": "LowerPriority"}
        self.apply([_kueue_object("ClusterQueue", name, spec)])

    def create_local_queue(self, namespace: str, name: str, cluster_queue: str) -> None:
        local_queue = _kueue_object("LocalQueue", name, {"clusterQueue": cluster_queue})
        local_queue["metadata"]["namespace"] = namespace
        self.apply([local_queue])

    def create_priority_class(self, name: str, value: int, description: str = "") -> None:
        # WorkloadPriorityClass has no spec: value and description are top-level fields.
        priority_class = _kueue_object("WorkloadPriorityClass", name, None)
        priority_class.update(value=value, description=description or f"priority {value}")
        self.apply([priority_class])

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        """Delete a Kueue object (kind as kubectl names it, e.g. "clusterqueue"), waiting."""
        where = ["-n", namespace] if namespace else []
        self.control_plane.kubectl(
            "delete", f"{kind}.{GROUP}", name, *where, "--ignore-not-found", "--timeout=60s"
        )

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """A Kueue object (v1beta2) as a dict, or None if it does not exist."""
        scope = f"/namespaces/{namespace}" if namespace else ""
        status, body = self.control_plane.get(f"/apis/{API_VERSION}{scope}/{plural}/{name}")
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"GET {plural}/{name}: HTTP {status}: {body[:300]!r}")
        obj: dict[str, Any] = json.loads(body)
        return obj

    def workload_of(self, namespace: str, job_uid: str) -> dict[str, Any] | None:
        """The Workload Kueue made for the Job with uid `job_uid`, or None (not yet).

        Kueue labels it with the Job's uid (JOB_UID_LABEL) and makes the Job its owner.
        """
        selector = urllib.parse.quote(f"{JOB_UID_LABEL}={job_uid}")
        path = f"/apis/{API_VERSION}/namespaces/{namespace}/workloads?labelSelector={selector}"
        status, body = self.control_plane.get(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body[:300]!r}")
        for workload in json.loads(body)["items"]:
            owners = workload["metadata"].get("ownerReferences") or []
            if any(owner.get("uid") == job_uid for owner in owners):
                found: dict[str, Any] = workload
                return found
        return None


def workload_condition(workload: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    """The condition of type `kind` (QuotaReserved, Admitted, Evicted, ...) of a Workload."""
    for condition in workload.get("status", {}).get("conditions") or []:
        if condition["type"] == kind:
            found: dict[str, Any] = condition
            return found
    return None


def _kueue_object(kind: str, name: str, spec: Mapping[str, Any] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}}
    if spec is not None:
        obj["spec"] = dict(spec)
    return obj


def _load_yaml(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


# -- webhooks -----------------------------------------------------------------------------

# (name, path, apiGroup, apiVersion, resources, operations) per webhook, as Kueue v0.17.0 serves
# them (config/components/webhook/manifests.yaml), for batch/v1 Jobs and Kueue's own kinds.
_MUTATING = (
    ("mjob.kb.io", "/mutate-batch-v1-job", "batch", "v1", ["jobs"], ["CREATE"]),
    ("mclusterqueue.kb.io", "/mutate-kueue-x-k8s-io-v1beta2-clusterqueue", GROUP, "v1beta2",
     ["clusterqueues"], ["CREATE"]),
    ("mresourceflavor.kb.io", "/mutate-kueue-x-k8s-io-v1beta2-resourceflavor", GROUP, "v1beta2",
     ["resourceflavors"], ["CREATE"]),
    ("mworkload.kb.io", "/mutate-kueue-x-k8s-io-v1beta2-workload", GROUP, "v1beta2",
     ["workloads"], ["CREATE"]),
)  # fmt: skip
_VALIDATING = (
    ("vjob.kb.io", "/validate-batch-v1-job", "batch", "v1", ["jobs"], ["CREATE", "UPDATE"]),
    ("vclusterqueue.kb.io", "/validate-kueue-x-k8s-io-v1beta2-clusterqueue", GROUP, "v1beta2",
     ["clusterqueues"], ["CREATE", "UPDATE"]),
    ("vcohort.kb.io", "/validate-kueue-x-k8s-io-v1beta2-cohort", GROUP, "v1beta2",
     ["cohorts"], ["CREATE", "UPDATE"]),
    ("vresourceflavor.kb.io", "/validate-kueue-x-k8s-io-v1beta2-resourceflavor", GROUP,
     "v1beta2", ["resourceflavors"], ["CREATE", "UPDATE"]),
    ("vworkload.kb.io", "/validate-kueue-x-k8s-io-v1beta2-workload", GROUP, "v1beta2",
     ["workloads", "workloads/status"], ["CREATE", "UPDATE"]),
)  # fmt: skip


def _webhook_configurations(base_url: str) -> list[dict[str, Any]]:
    """Kueue's Mutating- and ValidatingWebhookConfiguration, calling `base_url` directly.

    No caBundle: Kueue's cert rotator injects its CA (from the Secret) at start-up.
    """

    def webhooks(table: Sequence[tuple[str, str, str, str, list[str], list[str]]]) -> list[Any]:
        hooks = []
        for name, path, group, version, resources, operations in table:
            hook: dict[str, Any] = {
                "name": name,
                "clientConfig": {"url": base_url + path},
                "rules": [
                    {
                        "apiGroups": [group],
                        "apiVersions": [version],
                        "resources": resources,
                        "operations": operations,
                    }
                ],
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
            }
            if group == "batch":
                # Only queued Jobs go through Kueue (an UPDATE matches on the old object too).
                hook["objectSelector"] = {
                    "matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]
                }
            hooks.append(hook)
        return hooks

    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": MUTATING_CONFIG},
            "webhooks": webhooks(_MUTATING),
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": VALIDATING_CONFIG},
            "webhooks": webhooks(_VALIDATING),
        },
    ]


def _webhook_certificates(dns_name: str) -> dict[str, bytes]:
    """The contents of Kueue's cert Secret: ca.crt, ca.key, tls.crt, tls.key (PEM).

    Shaped so that Kueue's cert rotator (open-policy-agent/cert-controller) accepts and keeps
    them: the CA key is RSA in PKCS#1 (the only form it parses), the CA cert carries the DNS
    name ``kueue-ca`` (it verifies the CA against that name), and both certs outlive its 90-day
    renewal look-ahead. The serving cert names `dns_name` (which the rotator checks) and
    127.0.0.1 (which the API server checks, calling the webhook by URL).
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=365)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "kueue-ca"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kueue"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("kueue-ca")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(dns_name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pkcs1 = serialization.PrivateFormat.TraditionalOpenSSL  # "RSA PRIVATE KEY"
    return {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": ca_key.private_bytes(
            serialization.Encoding.PEM, pkcs1, serialization.NoEncryption()
        ),
        "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
        "tls.key": key.private_bytes(
            serialization.Encoding.PEM, pkcs1, serialization.NoEncryption()
        ),
    }
