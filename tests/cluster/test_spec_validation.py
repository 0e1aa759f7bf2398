"""A spec the Job API would reject is rejected at apply: the generated CRD on a real API server.

The operator turns a FineTuneJob into one batch/v1 Job per stage. A value the Job API refuses
(``resources.cpu: lots``, ``serviceAccountName: bad name``, a toleration operator
``Sometimes``) used to pass ``kubectl apply`` and fail only when the operator created the
Job. These tests apply the tables of ``tests/cel_cases.py`` (the ones the Python side and the
offline CRD tests use) with ``kubectl apply --dry-run=server`` to a real kube-apiserver with
``crds/finetunejob.yaml`` installed, and expect each malformed manifest refused with the
field's path in the message and each valid counterpart accepted. They also build the stage
Job of every valid counterpart and dry-run it against the Job API (we are not stricter than
needed for the values we accept), and show that the Job API does refuse the malformed values
once they reach a Job (the premise).

    export PATH=$HOME/.cache/kubetune/venv/bin:$PATH
    python -m pytest tests/cluster/test_spec_validation.py -q -p no:cacheprovider
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from cel_cases import FIELD_CASES, JOB_API_CEL_CASES
from operator_helpers import REPO, dry_run, refusal_failures

from kubetune.contract import Stage
from kubetune.schema import FineTuneJob, Toleration, parse_job
from kubetune_operator import builders
from kubetune_operator.builders import RunRef
from kubetune_operator.config import OperatorConfig

pytestmark = pytest.mark.cluster

CFG = OperatorConfig(trainer_image="ghcr.io/kubetune/trainer:test")


def test_api_server_refuses_each_malformed_field_naming_it(
    containerd_cluster: Any, node_namespace: str
) -> None:
    # (The Job API's own rules are in CEL_CASES, which test_operator.py checks the same way.)
    failures = refusal_failures(containerd_cluster.kubeconfig, node_namespace, FIELD_CASES)
    assert not failures, "\n".join(failures)


def test_api_server_accepts_every_example_finetunejob(
    containerd_cluster: Any, node_namespace: str
) -> None:
    examples = [
        doc
        for path in sorted((REPO / "examples").rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob"
    ]
    assert len(examples) >= 4
    failures = []
    for doc in examples:
        doc.get("metadata", {}).pop("namespace", None)
        result = dry_run(containerd_cluster.kubeconfig, node_namespace, doc)
        if result.returncode != 0:
            failures.append(f"{doc['metadata']['name']}: {result.stderr!r}")
    assert not failures, "\n".join(failures)


def _stage_job(job: FineTuneJob, namespace: str) -> dict[str, Any]:
    """The train stage's Job, as the operator would create it in ``namespace``.

    The job is placed without validating it again, so a malformed value reaches the builder.
    """
    place = {"namespace": namespace, "uid": "0b4c8f9e-1111-2222-3333-444455556666"}
    placed = job.model_copy(update={"metadata": job.metadata.model_copy(update=place)})
    return builders.build_stage_job(
        placed, RunRef.for_generation(placed, 1), Stage.TRAIN.value, CFG
    )


def test_job_api_accepts_the_stage_job_of_each_valid_counterpart(
    containerd_cluster: Any, node_namespace: str
) -> None:
    failures = []
    for case in [*FIELD_CASES, *JOB_API_CEL_CASES]:
        stage_job = _stage_job(parse_job(case.valid_manifest()), node_namespace)
        result = dry_run(containerd_cluster.kubeconfig, node_namespace, stage_job)
        if result.returncode != 0:
            failures.append(f"{case.id}: stderr={result.stderr!r}")
    assert not failures, "\n".join(failures)


# Malformed values put into a parsed spec without validation (model_copy does not validate),
# as a spec that passed apply before the CRD checked them would reach the builders; and the
# field of the stage Job the Job API names when it refuses it.
JOB_API_REFUSES: list[tuple[str, dict[str, Any], str]] = [
    # A bad quantity does not even decode (and the message names no field).
    ("cpu", {"cpu": "lots"}, "quantities must match"),
    ("memory", {"memory": "2 GB"}, "quantities must match"),
    ("serviceAccountName", {"service_account_name": "bad name"}, "serviceAccountName"),
    ("priorityClassName", {"priority_class_name": "Batch_Low"}, "priorityClassName"),
    ("nodeSelector key", {"node_selector": {"gpu type": "a100"}}, "nodeSelector"),
    ("nodeSelector value", {"node_selector": {"pool": "gpu nodes"}}, "nodeSelector"),
    (
        "toleration operator",
        {"tolerations": [Toleration.model_construct(key="gpu", operator="Sometimes")]},
        "tolerations[0].operator",
    ),
    (
        "toleration without key",
        {"tolerations": [Toleration.model_construct(operator="Equal", effect="NoSchedule")]},
        "tolerations[0].operator",
    ),
    (
        "tolerationSeconds without NoExecute",
        {
            "tolerations": [
                Toleration.model_construct(
                    key="gpu", operator="Exists", effect="NoSchedule", toleration_seconds=60
                )
            ]
        },
        "tolerations[0].effect",
    ),
]


@pytest.mark.parametrize(
    ("what", "update", "named"), JOB_API_REFUSES, ids=[c[0] for c in JOB_API_REFUSES]
)
def test_job_api_refuses_what_the_crd_now_refuses_at_apply(
    containerd_cluster: Any, node_namespace: str, what: str, update: dict[str, Any], named: str
) -> None:
    job = parse_job(FIELD_CASES[0].valid_manifest())
    resources = job.spec.resources.model_copy(update=update)
    job.spec = job.spec.model_copy(update={"resources": resources})
    stage_job = _stage_job(job, node_namespace)
    result = dry_run(containerd_cluster.kubeconfig, node_namespace, stage_job)
    assert result.returncode != 0, f"the Job API accepted a Job with a malformed {what}"
    assert named in result.stderr, result.stderr


def test_job_api_refuses_a_credentials_secret_of_another_namespace(
    containerd_cluster: Any, node_namespace: str
) -> None:
    job = parse_job(FIELD_CASES[0].valid_manifest())
    storage = job.spec.storage.model_copy(update={"credentials_secret": "../../kube-system/foo"})
    job.spec = job.spec.model_copy(update={"storage": storage})
    result = dry_run(containerd_cluster.kubeconfig, node_namespace, _stage_job(job, node_namespace))
    assert result.returncode != 0 and "secretKeyRef.name" in result.stderr, result.stderr
