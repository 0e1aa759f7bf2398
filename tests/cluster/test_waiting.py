"""Waiting is not failing: FineTuneJobs that the node cannot run all at once wait their turn.

On a real node (the light one, harness.fixtures.k8s_cluster: the host's 2 CPUs allocatable),
stage pods in the trainer image under Pod Security ``restricted``:

* many tiny FineTuneJobs applied at once, whose stage pods each request 1 CPU (so two run
  at a time), all end ``Succeeded``; none fails for waiting, and the waiting ones show reason
  ``Waiting`` with the scheduler's message;
* a FineTuneJob whose pod requests more CPUs than any node has fails with ``Unschedulable``
  and a message naming ``spec.resources.cpu`` and the node's CPUs, as soon as the
  operator's ``KUBETUNE_UNSCHEDULABLE_TIMEOUT`` (5 s here) has passed.

Run: ``PYTHONPATH=tests ~/.cache/kubetune/venv/bin/python -m pytest tests/cluster/test_waiting.py
-q`` (root, after ``make images``); ``KUBETUNE_WAITING_JOBS`` sets how many jobs the first
test applies (4 by default).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from built_images import built_image
from chart_operator import ChartOperator, assert_no_refusal_but_the_expected_one
from operator_helpers import (
    apply,
    diagnose,
    get_ftj,
    get_json,
    kubectl,
    tiny_job,
    wait_for,
)
from real_node_env import restricted_namespace, tenant_data

from harness.fixtures import ContainerdCluster

pytestmark = pytest.mark.cluster

# Twice what the node holds at once, so some must wait.
JOBS = int(os.environ.get("KUBETUNE_WAITING_JOBS", "4"))
CPU_PER_POD = "1"  # two stage pods fit the node's 2 CPUs at once
ALL_TIMEOUT = 900.0  # seconds for every job to succeed on a loaded 2-core machine
UNSCHEDULABLE_TIMEOUT = "5"  # seconds a pod no node can hold may wait (default 300)


@pytest.fixture
def env(
    k8s_cluster: ContainerdCluster, s3_server: Any, crd_installed: None, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """A restricted namespace, a small tldr slice in S3 that pods reach, a credentials Secret,
    the trainer image in the node, the chart's operator watching the namespace."""
    kc = k8s_cluster.kubeconfig
    image = built_image("trainer")
    k8s_cluster.load_image(image)
    ns = restricted_namespace(k8s_cluster, f"test-{uuid.uuid4().hex[:8]}")
    data = tenant_data(k8s_cluster, s3_server, ns, ns.removeprefix("test-"))
    op = ChartOperator.start(
        k8s_cluster,
        ns,
        s3_server.env(),
        tmp_path / "operator.log",
        KUBETUNE_TRAINER_IMAGE=image,
        KUBETUNE_STORAGE_ENDPOINTS=data["endpoint"],
        KUBETUNE_UNSCHEDULABLE_TIMEOUT=UNSCHEDULABLE_TIMEOUT,
    )
    node = json.loads(kubectl(kc, "get", "node", k8s_cluster.node_name, "-o", "json").stdout)
    ctx = {"kubeconfig": kc, "ns": ns, "op": op, "node": node, **data}
    yield ctx
    op.stop()
    assert_no_refusal_but_the_expected_one(op.log_text())
    kubectl(kc, "delete", "namespace", ns, "--wait=false", check=False)


def minimal_job(env: dict[str, Any], name: str, cpu: str) -> dict[str, Any]:
    """The tiny cluster example cut to the bone: 2 steps, perplexity on 8 lines, no baseline."""
    job = tiny_job(
        name,
        data_uri=env["data_uri"],
        output=f"s3://{env['out_bucket']}/{name}/",
        endpoint=env["endpoint"],
        secret="kubetune-s3",
        maxSteps=2,
        checkpointEverySteps=2,
        logEverySteps=1,
    )
    job["spec"]["evaluation"] = {
        "perplexity": True,
        "baseline": False,
        "maxSamples": 8,
        "bleu": {"enabled": False},
    }
    job["spec"]["resources"] = {
        **job["spec"]["resources"],
        "cpu": cpu,
        "memory": "1Gi",
        "gpusPerWorker": 0,
        "imagePullPolicy": "Never",
    }
    return job


def condition(ftj: dict[str, Any], ctype: str) -> dict[str, Any]:
    conditions = (ftj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == ctype), {})


def test_jobs_beyond_the_nodes_cpus_wait_their_turn_and_all_succeed(
    env: dict[str, Any],
) -> None:
    kc, ns = env["kubeconfig"], env["ns"]
    names = [f"wait-{i:02d}" for i in range(JOBS)]
    batch = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [minimal_job(env, n, CPU_PER_POD) for n in names],
    }
    started = time.monotonic()
    apply(kc, ns, batch)  # all at once: 1 CPU each, 2 on the node

    waited: dict[str, str] = {}  # job -> a Waiting message it showed
    phases: dict[str, str] = {}

    def all_succeeded() -> bool:
        for ftj in get_json(kc, ns, "finetunejobs")["items"]:
            name = ftj["metadata"]["name"]
            status = ftj.get("status") or {}
            phases[name] = str(status.get("phase") or "")
            reconciling = condition(ftj, "Reconciling")
            if reconciling.get("reason") == "Waiting" and "Insufficient cpu" in str(
                reconciling.get("message")
            ):
                waited.setdefault(name, str(reconciling["message"]))
            if phases[name] == "Failed":
                raise AssertionError(
                    f"{name} failed while waiting its turn: {status.get('message')}\n"
                    + diagnose(kc, ns, name, env["op"])
                )
        return len(phases) == JOBS and all(p == "Succeeded" for p in phases.values())

    wait_for(
        all_succeeded,
        ALL_TIMEOUT,
        f"all {JOBS} FineTuneJobs to succeed",
        dump=lambda: f"phases: {phases}\n" + diagnose(kc, ns, names[-1], env["op"]),
        interval=2.0,
    )
    took = time.monotonic() - started
    print(
        f"\n{JOBS} FineTuneJobs applied at once: all Succeeded in {took:.0f}s; "
        f"{len(waited)} showed reason Waiting"
    )
    assert waited, "no job showed the Waiting condition although the node fits two pods at once"
    message = next(iter(waited.values()))
    assert "waiting for a node with room for the stage pod" in message
    assert "0/1 nodes are available" in message  # the scheduler's own words
    # Waiting never stopped a Job: none was given up on and suspended.
    for job in get_json(kc, ns, "jobs")["items"]:
        assert not job["spec"].get("suspend"), job["metadata"]["name"]


def test_a_job_no_node_can_hold_fails_quickly_naming_the_field(env: dict[str, Any]) -> None:
    kc, ns = env["kubeconfig"], env["ns"]
    apply(kc, ns, minimal_job(env, "too-big", cpu="64"))
    started = time.monotonic()

    def failed() -> dict[str, Any] | None:
        ftj = get_ftj(kc, ns, "too-big")
        return ftj if (ftj.get("status") or {}).get("phase") == "Failed" else None

    ftj = wait_for(
        failed, 120, "too-big to fail", dump=lambda: diagnose(kc, ns, "too-big", env["op"])
    )
    took = time.monotonic() - started
    stalled = condition(ftj, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "Unschedulable")
    message = stalled["message"]
    cpus, node = env["node"]["status"]["allocatable"]["cpu"], env["node"]["metadata"]["name"]
    expected = f"cpu 64 (spec.resources.cpu): the most any node has is {cpus} (node {node})"
    assert expected in message, message
    assert "Insufficient cpu" in message  # and the scheduler's words
    assert took < 60, f"took {took:.0f}s to fail a pod that no node can ever hold"
    (job,) = get_json(kc, ns, "jobs")["items"]
    assert job["spec"]["suspend"] is True  # given up on: its pod is gone, nothing retries
