"""FineTuneJobs on the real node: every stage in the trainer image, and failures made for real.

The containerd cluster (harness.containerd_node: kubelet + containerd + runc + CNI) runs the
stage pods from the image ``make images`` built, loaded into the node's image store, in a
namespace that enforces Pod Security ``restricted``. The operator runs as a host process with
the ServiceAccount rules of rbac.py; pods reach the S3 server on the host through the node's
bridge address. Each failure below is produced by the kernel, the kubelet or the scheduler,
not simulated, and must end in the FineTuneJob's status with its typed reason and a message
that names what to change:

* a memory limit too small to import torch -> ``OOMKilled``;
* an image that does not exist -> ``ImagePullFailed``, within seconds, not forever Pending;
* more GPUs than the node advertises -> ``Unschedulable``;
* a stage past ``activeDeadlineSeconds`` -> ``DeadlineExceeded``.

Run: ``pytest -m cluster tests/cluster/test_real_node.py`` (root, ``make images``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_helpers import (
    apply,
    diagnose,
    get_ftj,
    get_json,
    kubectl,
    wait_for,
)
from real_node_env import (
    RUN_TIMEOUT,
    failed_with,
    node_job,
)

pytestmark = pytest.mark.cluster


def test_every_stage_runs_in_the_trainer_image_under_pod_security_restricted(
    env: dict[str, Any],
) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "on-node"
    apply(kc, ns, node_job(env, name, maxSteps=10, checkpointEverySteps=10))

    def succeeded() -> dict[str, Any] | None:
        ftj = get_ftj(kc, ns, name)
        phase = (ftj.get("status") or {}).get("phase")
        assert phase != "Failed", diagnose(kc, ns, name, env["op"])
        return ftj if phase == "Succeeded" else None

    ftj = wait_for(
        succeeded, RUN_TIMEOUT, f"{name} to succeed", dump=lambda: diagnose(kc, ns, name, env["op"])
    )
    results = ftj["status"]["results"]
    assert results["perplexity"] < results["baselinePerplexity"]
    pods = get_json(kc, ns, "pods", "-l", f"kubetune.io/job={name}")["items"]
    stages = {p["metadata"]["labels"]["kubetune.io/stage"]: p for p in pods}
    assert set(stages) == {"prepare", "train", "evaluate"}, sorted(stages)
    for stage, pod in stages.items():
        (status,) = pod["status"]["containerStatuses"]
        assert status["image"].endswith(env["image"].split("/", 1)[1]), (stage, status["image"])
        assert status["imageID"], stage  # a real image in the node's store
        assert status["state"]["terminated"]["exitCode"] == 0, stage
        context = pod["spec"]["containers"][0]["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["runAsNonRoot"] is True
    node = get_json(kc, "default", "node", pods[0]["spec"]["nodeName"])
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.")
    # kubectl logs reads the container's log through the kubelet.
    logs = kubectl(kc, "-n", ns, "logs", stages["evaluate"]["metadata"]["name"]).stdout
    assert '"perplexity"' in logs


def test_a_memory_limit_too_small_is_oomkilled_and_says_which_field(
    env: dict[str, Any],
) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "too-little-memory"
    job = node_job(env, name, maxSteps=5)
    job["spec"]["resources"]["memory"] = "96Mi"  # torch alone needs more
    apply(kc, ns, job)
    ftj = failed_with(env, name, "OOMKilled")
    assert "spec.resources.memory" in ftj["status"]["message"], ftj["status"]["message"]
    # The kernel killed it: the stage whose pod hit the limit says so (prepare, which does
    # not load torch, may well fit).
    pods = get_json(kc, ns, "pods", "-l", f"kubetune.io/job={name}")["items"]
    ends = {
        p["metadata"]["labels"]["kubetune.io/stage"]: (
            p["status"]["containerStatuses"][0]["state"].get("terminated") or {}
        )
        for p in pods
    }
    killed = [
        s for s, t in ends.items() if (t.get("reason"), t.get("exitCode")) == ("OOMKilled", 137)
    ]
    assert killed, ends
    assert killed[0] in ftj["status"]["message"], ftj["status"]["message"]


def test_an_image_that_does_not_exist_fails_quickly_with_image_pull_failed(
    env: dict[str, Any],
) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "no-such-image"
    job = node_job(env, name, maxSteps=5)
    # No registry answers here: the kubelet's pull fails at once, as a typo's would.
    job["spec"]["resources"]["image"] = "localhost/kubetune/no-such-trainer:0.0.0"
    job["spec"]["resources"]["imagePullPolicy"] = "IfNotPresent"
    apply(kc, ns, job)
    ftj = failed_with(env, name, "ImagePullFailed")
    message = ftj["status"]["message"]
    assert "localhost/kubetune/no-such-trainer:0.0.0" in message, message


def test_more_gpus_than_the_node_has_is_unschedulable_naming_the_field(
    env: dict[str, Any],
) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "too-many-gpus"
    job = node_job(env, name, maxSteps=5)
    job["spec"]["resources"]["gpusPerWorker"] = 4  # the node advertises 2 nvidia.com/gpu
    apply(kc, ns, job)
    ftj = failed_with(env, name, "Unschedulable")
    message = ftj["status"]["message"]
    assert "spec.resources.gpusPerWorker" in message and "2" in message, message


def test_a_stage_past_its_deadline_is_deadline_exceeded(env: dict[str, Any]) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "too-slow"
    job = node_job(env, name, maxSteps=100_000, checkpointEverySteps=100_000)
    job["spec"]["resources"]["activeDeadlineSeconds"] = 20
    apply(kc, ns, job)
    ftj = failed_with(env, name, "DeadlineExceeded")
    assert "activeDeadlineSeconds" in ftj["status"]["message"], ftj["status"]["message"]


def test_a_read_only_root_without_the_scratch_volume_is_a_clear_stage_error(
    env: dict[str, Any],
) -> None:
    """The trainer image run the way a hand-written pod might: read-only root, no volume for
    the caches its ENV points at. The stage stops at once, naming each, instead of failing
    deep inside a library or hanging."""
    kc, ns = env["kubeconfig"], env["ns"]
    job = node_job(env, "bare-pod", maxSteps=5)
    job["metadata"]["namespace"] = ns
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "bare-pod-job"},
        "data": {"job.json": json.dumps(job)},
    }
    container = {
        "name": "prepare",
        "image": env["image"],
        "imagePullPolicy": "Never",
        "args": ["prepare", "--job", "/job/job.json", "--output", job["spec"]["storage"]["output"]],
        "volumeMounts": [{"name": "job", "mountPath": "/job", "readOnly": True}],
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": "/dev/termination-log",
        "env": [{"name": "KUBETUNE_TERMINATION_LOG", "value": "/dev/termination-log"}],
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bare-pod"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [container],
            "volumes": [{"name": "job", "configMap": {"name": "bare-pod-job"}}],
        },
    }
    apply(kc, ns, config_map)
    apply(kc, ns, pod)

    def ended() -> dict[str, Any] | None:
        statuses = get_json(kc, ns, "pod", "bare-pod").get("status", {}).get("containerStatuses")
        terminated = (statuses or [{}])[0].get("state", {}).get("terminated")
        return dict(terminated) if terminated else None

    terminated = wait_for(ended, 120, "the bare pod to end")
    assert terminated["exitCode"] == 3, terminated  # not retriable: a retry cannot help
    payload = json.loads(terminated["message"])
    assert payload["reason"] == "CacheNotWritable", payload
    assert "KUBETUNE_SCRATCH=/scratch (Read-only file system)" in payload["error"], payload
    assert "HF_HOME=/scratch/hf" in payload["error"], payload
    logs = kubectl(kc, "-n", ns, "logs", "bare-pod").stdout
    assert "kubetune prepare: CacheNotWritable:" in logs, logs
