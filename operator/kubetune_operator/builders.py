"""Pure builders of every object the operator creates for a FineTuneJob.

Each function takes the parsed :class:`~kubetune.schema.FineTuneJob`,
the :class:`RunRef` it is for and the :class:`~kubetune_operator.config.OperatorConfig`,
and returns a plain dict ready for the Kubernetes API. Nothing here talks to a
cluster; ``tests/unit/test_builders.py`` compares the output with golden YAML
(``UPDATE_GOLDEN=1 pytest tests/unit/test_builders.py`` rewrites it).

Objects of one run ``<run>`` of FineTuneJob ``<ftj>`` (``g<generation>``, or
``g<generation>-r<n>`` for the n-th retrain of that spec, :mod:`kubetune_operator.triggers`):

* ConfigMap ``<ftj>-<run>-job``: the resolved manifest as ``job.json`` (the stage CLI's
  ``--job``), immutable, annotated with the run's spec hash, its trigger and retrain index,
  and the value of the FineTuneJob's ``kubetune.io/retrain`` annotation when it started;
* Job ``<ftj>-<run>-prepare``, ``<ftj>-<run>-train``, ``<ftj>-<run>-evaluate``;
* Service ``<ftj>-<run>-train`` (headless) when training uses several workers.

The run writes under ``<spec.storage.output>/runs/<uid[:8]>-<run>/``
(:func:`kubetune.layout.run_prefix`): the FineTuneJob's uid in the prefix keeps a deleted
and re-created FineTuneJob of the same name away from its predecessor's artifacts.
``job.json`` carries the run's identity (uid, and the annotations of
:class:`~kubetune.contract.RunAnnotation`), which each stage stamps into its result
(:class:`~kubetune.results.RunIdentity`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from kubetune.contract import (
    JOB_STAGES,
    METRICS_PORT,
    MLFLOW_CREDENTIAL_KEYS,
    NOT_RETRIABLE_EXIT_CODES,
    RENDEZVOUS_PORT,
    S3_CREDENTIAL_KEYS,
    Env,
    ExitCode,
    RunAnnotation,
    Stage,
)
from kubetune.layout import run_id, run_prefix
from kubetune.results import RunIdentity
from kubetune.schema import API_VERSION, KIND, FineTuneJob
from kubetune_operator.config import OperatorConfig
from kubetune_operator.fit import parse_quantity
from kubetune_operator.triggers import ANNOTATION_RETRAIN as ANNOTATION_RETRAIN
from kubetune_operator.triggers import Trigger

# Label and annotation keys (the chart, the tests and kubectl selectors use these).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_JOB = "kubetune.io/job"
LABEL_STAGE = "kubetune.io/stage"
LABEL_RUN = "kubetune.io/run"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"  # spec.queueName: Kueue manages the Job
LABEL_KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"  # spec.workloadPriorityClassName
MANAGED_BY = "kubetune-operator"
ANNOTATION_SPEC_HASH = RunAnnotation.SPEC_HASH
ANNOTATION_GENERATION = "kubetune.io/generation"
ANNOTATION_OUTPUT = "kubetune.io/output"
# Set by the operator on a stage Job it gave up on (image pull, OOM, unschedulable): the
# Job's own status cannot say so, and the operator must not retry it after a restart.
ANNOTATION_FAILED_REASON = "kubetune.io/failed-reason"
ANNOTATION_FAILED_MESSAGE = "kubetune.io/failed-message"
# On a run's ConfigMap: why the run started (a Trigger), which retrain of its generation it
# is (0 for g<generation>), and the FineTuneJob's ANNOTATION_RETRAIN ("kubetune.io/retrain",
# set by users to ask for a retrain) when the run started: a later, different value asks
# for the next run.
ANNOTATION_TRIGGER = "kubetune.io/trigger"
ANNOTATION_RETRAIN_INDEX = "kubetune.io/retrain-index"
ANNOTATION_RETRAIN_VALUE = "kubetune.io/retrain-value"

# Paths inside the stage containers.
JOB_DIR = "/etc/kubetune"
JOB_FILE = f"{JOB_DIR}/job.json"
JOB_KEY = "job.json"
SCRATCH_DIR = "/scratch"
TERMINATION_LOG = "/dev/termination-log"


# Child names must fit a DNS label (63) with room for the pod suffixes the Job controller
# adds (``-<index>`` for Indexed Jobs, ``-xxxxx`` for pods), so we cap them lower.
MAX_CHILD_NAME = 52
_INVALID = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class RunRef:
    """One run of a FineTuneJob (a spec generation, or a retrain of it), with its own output."""

    id: str  # "g<generation>", or "g<generation>-r<retrain>"
    generation: int
    output: str  # <spec.storage.output>/runs/<uid[:8]>-<id>
    spec_hash: str
    job_uid: str = ""  # metadata.uid of the FineTuneJob
    retrain: int = 0  # n of g<generation>-r<n>; 0 for the run a spec change started
    trigger: str = Trigger.SPEC_CHANGE.value  # why it started
    retrain_value: str = ""  # the FineTuneJob's kubetune.io/retrain when it started

    @classmethod
    def for_generation(
        cls,
        job: FineTuneJob,
        generation: int,
        retrain: int = 0,
        trigger: str = Trigger.SPEC_CHANGE.value,
        retrain_value: str | None = None,
    ) -> RunRef:
        rid = run_id(generation, retrain)
        uid = job.metadata.uid or ""
        if retrain_value is None:
            retrain_value = job.metadata.annotations.get(ANNOTATION_RETRAIN, "")
        return cls(
            id=rid,
            generation=generation,
            output=run_prefix(job.spec.storage.output, rid, uid),
            spec_hash=spec_hash(job),
            job_uid=uid,
            retrain=retrain,
            trigger=trigger,
            retrain_value=retrain_value,
        )

    def next_retrain(self, job: FineTuneJob, trigger: str) -> RunRef:
        """The run after this one for the same spec: ``g<generation>-r<n+1>``."""
        return RunRef.for_generation(job, self.generation, self.retrain + 1, trigger)

    def identity(self) -> RunIdentity:
        """What a result of this run carries in its ``run`` field (see ``job.json``)."""
        return RunIdentity(job_uid=self.job_uid or None, spec_hash=self.spec_hash, run_id=self.id)


def spec_hash(job: FineTuneJob) -> str:
    """Hash of the parts of the spec that change a run's outputs.

    ``suspend``, ``ttlSecondsAfterFinished`` and ``retrain`` are left out: changing them
    bumps ``metadata.generation`` but must pause/resume, clean up or schedule the SAME run
    (adding a retrain schedule to a finished job does not train it again now). Values equal
    to their default are left out too, so a release that adds a field with a default
    does not change the hash of every job already running (their results would no
    longer count as the current run's).
    """
    wire = job.spec.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True, mode="json")
    for key in ("suspend", "ttlSecondsAfterFinished", "retrain"):
        wire.pop(key, None)
    data = json.dumps(wire, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def child_name(ftj: str, run_id: str, suffix: str) -> str:
    """``<ftj>-<run>-<suffix>`` as a DNS-1035 label of at most :data:`MAX_CHILD_NAME` chars.

    Long FineTuneJob names are truncated and a hash of the full name is added, so two long
    names that share a prefix still get different children.
    """
    base = _INVALID.sub("-", ftj.lower()).strip("-") or "ftj"
    if not base[0].isalpha():  # Services need a leading letter
        base = f"kt-{base}"
    tail = f"-{run_id}-{suffix}"
    if len(base) + len(tail) > MAX_CHILD_NAME:
        digest = hashlib.sha256(ftj.encode()).hexdigest()[:6]
        keep = MAX_CHILD_NAME - len(tail) - len(digest) - 1
        base = f"{base[:keep].rstrip('-')}-{digest}"
    return f"{base}{tail}"


def config_map_name(ftj: str, run_id: str) -> str:
    return child_name(ftj, run_id, "job")


def job_name(ftj: str, run_id: str, stage: str) -> str:
    return child_name(ftj, run_id, stage)


def service_name(ftj: str, run_id: str) -> str:
    return child_name(ftj, run_id, Stage.TRAIN.value)


def labels(ftj: str, run_id: str, component: str) -> dict[str, str]:
    """Labels of every child; ``kubetune.io/job`` selects all children of one FineTuneJob."""
    out = {
        LABEL_NAME: "kubetune",
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_INSTANCE: ftj,
        LABEL_JOB: ftj,
        LABEL_RUN: run_id,
    }
    if component in JOB_STAGES:
        out[LABEL_STAGE] = component
    return out


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    """Makes the FineTuneJob the controller of a child, so deleting it deletes the child."""
    if not job.metadata.uid:
        raise ValueError(f"FineTuneJob {job.metadata.name} has no metadata.uid (not from the API?)")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FineTuneJob, run: RunRef, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": labels(job.metadata.name, run.id, component),
        "annotations": {
            ANNOTATION_SPEC_HASH: run.spec_hash,
            ANNOTATION_GENERATION: str(run.generation),
            ANNOTATION_OUTPUT: run.output,
        },
        "ownerReferences": [owner_reference(job)],
    }


def resolved_manifest(job: FineTuneJob, run: RunRef) -> dict[str, Any]:
    """The FineTuneJob the stage pods read from ``/etc/kubetune/job.json``.

    Only identity and spec (with every default filled in); never status. The run's id
    and spec hash are annotations, so each stage can stamp them into its result.
    """
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": job.metadata.name,
            "namespace": job.metadata.namespace,
            "generation": run.generation,
            "uid": job.metadata.uid,
            "annotations": {
                RunAnnotation.RUN_ID: run.id,
                RunAnnotation.SPEC_HASH: run.spec_hash,
            },
        },
        "spec": pod_spec(job),
    }


def pod_spec(job: FineTuneJob) -> dict[str, Any]:
    """The spec as the stage pods read it: ``compareWith[].apiKeyEnv`` is dropped.

    ``apiKeyEnv`` names a variable of the process that runs evaluate: harmless on a
    laptop, but in a pod it could name the pod's own credentials (``AWS_SECRET_ACCESS_KEY``)
    and send them as a bearer token to any URL. On a cluster an endpoint's key comes only
    from the Secret its ``apiKeySecret`` names (:func:`stage_env`).
    """
    spec = job.spec.to_wire()
    for entry in spec.get("evaluation", {}).get("compareWith", []):
        entry.pop("apiKeyEnv", None)
    return spec


def literal(value: str) -> str:
    """``value`` for a container's command, args or env value, never expanded.

    The kubelet replaces ``$(NAME)`` there with the container's variable NAME (a spec
    string such as ``storage.output: s3://b/$(AWS_SECRET_ACCESS_KEY)/`` would read a
    Secret); ``$$`` is its escape for a literal ``$``.
    """
    return value.replace("$", "$$")


def build_job_config_map(job: FineTuneJob, run: RunRef) -> dict[str, Any]:
    """ConfigMap ``<ftj>-<run>-job`` with the resolved manifest; immutable for the run."""
    manifest = resolved_manifest(job, run)
    meta = _metadata(job, run, config_map_name(job.metadata.name, run.id), "config")
    meta["annotations"][ANNOTATION_TRIGGER] = run.trigger
    meta["annotations"][ANNOTATION_RETRAIN_INDEX] = str(run.retrain)
    if run.retrain_value:
        meta["annotations"][ANNOTATION_RETRAIN_VALUE] = run.retrain_value
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "immutable": True,
        "data": {JOB_KEY: json.dumps(manifest, indent=2, sort_keys=True) + "\n"},
    }


def build_train_service(job: FineTuneJob, run: RunRef) -> dict[str, Any]:
    """Headless Service giving multi-worker training pods stable DNS names (rank 0 = master)."""
    name = service_name(job.metadata.name, run.id)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, run, name, Stage.TRAIN.value),
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve each other before they are Ready (there is no readiness).
            "publishNotReadyAddresses": True,
            "selector": {
                LABEL_JOB: job.metadata.name,
                LABEL_RUN: run.id,
                LABEL_STAGE: Stage.TRAIN.value,
            },
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def needs_service(job: FineTuneJob) -> bool:
    return job.spec.resources.workers > 1


def image(job: FineTuneJob, cfg: OperatorConfig) -> str:
    return job.spec.resources.image or cfg.trainer_image


def stage_gpus(job: FineTuneJob, stage: str) -> int:
    """GPUs per pod: training uses gpusPerWorker, evaluation one if the job uses GPUs."""
    gpus = job.spec.resources.gpus_per_worker
    if stage == Stage.TRAIN:
        return gpus
    if stage == Stage.EVALUATE:
        return 1 if gpus > 0 else 0
    return 0


def stage_command(job: FineTuneJob, run: RunRef, stage: str) -> list[str]:
    """The container command: ``kubetune <stage> --job ... --output ...``.

    Training on several GPUs or workers goes through ``accelerate launch``; the machine
    rank comes from the Indexed Job's completion index, the master is the pod of index 0.
    """
    cli_args = [stage, "--job", JOB_FILE, "--output", literal(run.output)]
    if stage == Stage.EVALUATE:
        cli_args.append("--report")
    workers = job.spec.resources.workers
    gpus = stage_gpus(job, stage)
    if stage != Stage.TRAIN or gpus <= 1:
        # One process per pod (CPU workers get their rank from cpu_worker_env): SIGTERM
        # reaches the trainer itself, which checkpoints before it exits.
        return ["kubetune", *cli_args]
    launch = ["accelerate", "launch", "--num_processes", str(workers * gpus), "--multi_gpu"]
    if workers > 1:
        master = master_address(job, run)
        launch += [
            "--num_machines",
            str(workers),
            "--machine_rank",
            "$(JOB_COMPLETION_INDEX)",
            "--main_process_ip",
            master,
            "--main_process_port",
            str(RENDEZVOUS_PORT),
            "--same_network",
        ]
    return [*launch, "-m", "kubetune.cli", *cli_args]


def master_address(job: FineTuneJob, run: RunRef) -> str:
    """DNS name of the training pod of index 0 (``<job>-0.<headless service>``)."""
    ftj = job.metadata.name
    return f"{job_name(ftj, run.id, Stage.TRAIN.value)}-0.{service_name(ftj, run.id)}"


def worker_env(job: FineTuneJob, run: RunRef) -> list[dict[str, Any]]:
    """torch.distributed's environment for the pods of a multi-worker training Job.

    Every pod knows its completion index; with GPUs ``accelerate launch`` turns it into the
    ranks of the pod's processes, while a CPU worker is a single process (gloo) whose rank
    is the index, so it gets torch's variables directly (what torchrun would set).
    """
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    env: list[dict[str, Any]] = [
        {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": index}}}
    ]
    if stage_gpus(job, Stage.TRAIN) == 0:
        workers = str(job.spec.resources.workers)
        env += [
            {"name": "ACCELERATE_USE_CPU", "value": "true"},
            {"name": "MASTER_ADDR", "value": master_address(job, run)},
            {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
            {"name": "RANK", "value": "$(JOB_COMPLETION_INDEX)"},
            {"name": "WORLD_SIZE", "value": workers},
            {"name": "LOCAL_RANK", "value": "0"},
            {"name": "LOCAL_WORLD_SIZE", "value": "1"},
        ]
    return env


def requested_cpus(cpu: str | None) -> int | None:
    """Whole CPUs of a CPU request (``250m`` -> 1, ``1.5`` -> 2): the threads a stage runs.

    Rounded up, as the Downward API rounds ``requests.cpu`` with divisor 1, so a fractional
    request still gets one thread; the trainer also caps it by the node's CPUs and any quota.
    None without a request, or for one that is no quantity (the CRD refuses it at apply; the
    Job API would refuse the Job, naming the field).
    """
    if not cpu:
        return None
    try:
        return max(1, math.ceil(parse_quantity(cpu)))
    except ValueError:
        return None


def stage_env(job: FineTuneJob, stage: str, run: RunRef | None = None) -> list[dict[str, Any]]:
    """Environment of a stage container. Credentials only as secretKeyRef, never as values."""
    env: list[dict[str, Any]] = [
        {"name": Env.TERMINATION_LOG, "value": TERMINATION_LOG},
        {"name": Env.SCRATCH, "value": SCRATCH_DIR},
        {"name": "HOME", "value": f"{SCRATCH_DIR}/home"},
        {"name": "HF_HOME", "value": f"{SCRATCH_DIR}/hf"},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH_DIR}/cache"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {
            "name": Env.METRICS_PORT,
            "value": str(METRICS_PORT if stage == Stage.TRAIN else 0),
        },
    ]
    cpus = requested_cpus(job.spec.resources.cpu)
    if cpus is not None:
        env.append({"name": Env.CPUS, "value": str(cpus)})
    storage = job.spec.storage
    if storage.credentials_secret:
        for key in S3_CREDENTIAL_KEYS:
            ref = {"name": storage.credentials_secret, "key": key}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    mlflow = job.spec.tracking.mlflow if job.spec.tracking else None
    if mlflow is not None and mlflow.credentials_secret:
        for key in MLFLOW_CREDENTIAL_KEYS:  # a token, or user and password: each may be absent
            optional = {"name": mlflow.credentials_secret, "key": key, "optional": True}
            env.append({"name": key, "valueFrom": {"secretKeyRef": optional}})
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": literal(storage.endpoint)})
    if storage.region:
        env.append({"name": "AWS_REGION", "value": literal(storage.region)})
    if stage == Stage.EVALUATE:
        for entry in job.spec.evaluation.compare_with:
            if entry.api_key_secret:
                ref = {"name": entry.api_key_secret, "key": "apiKey"}
                env.append(
                    {"name": Env.compare_api_key(entry.name), "valueFrom": {"secretKeyRef": ref}}
                )
    if stage == Stage.TRAIN and job.spec.resources.workers > 1:
        if run is None:
            raise ValueError("the environment of a multi-worker training pod needs its run")
        env += worker_env(job, run)
    return env


def _resources(job: FineTuneJob, stage: str) -> dict[str, Any]:
    res = job.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str | int] = {}
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = res.memory
        limits["memory"] = res.memory
    gpus = stage_gpus(job, stage)
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _pod_spec(job: FineTuneJob, run: RunRef, stage: str, cfg: OperatorConfig) -> dict[str, Any]:
    res = job.spec.resources
    ftj = job.metadata.name
    container: dict[str, Any] = {
        "name": stage,
        "image": image(job, cfg),
        "command": stage_command(job, run, stage),
        "env": stage_env(job, stage, run),
        "resources": _resources(job, stage),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        # Results come from this file (or from storage), never from logs.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "volumeMounts": [
            {"name": "job", "mountPath": JOB_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if res.image_pull_policy:
        container["imagePullPolicy"] = res.image_pull_policy
    if stage == Stage.TRAIN:
        container["ports"] = [{"name": "metrics", "containerPort": METRICS_PORT}]
        if res.workers > 1:
            container["ports"].append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT})
    volumes: list[dict[str, Any]] = [
        {
            "name": "job",
            "configMap": {
                "name": config_map_name(ftj, run.id),
                "items": [{"key": JOB_KEY, "path": JOB_KEY}],
            },
        },
        {"name": "scratch", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if stage_gpus(job, stage):
        # NCCL and DataLoader workers need more shared memory than the runtime's 64 MiB.
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Stage pods never call the API server.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if res.termination_grace_period_seconds is not None:
        spec["terminationGracePeriodSeconds"] = res.termination_grace_period_seconds
    if res.service_account_name:
        spec["serviceAccountName"] = res.service_account_name
    if res.priority_class_name:
        spec["priorityClassName"] = res.priority_class_name
    if res.node_selector:
        spec["nodeSelector"] = dict(sorted(res.node_selector.items()))
    if res.tolerations:
        spec["tolerations"] = [t.to_wire() for t in res.tolerations]
    if stage == Stage.TRAIN and res.workers > 1:
        spec["subdomain"] = service_name(ftj, run.id)
    return spec


def build_stage_job(
    job: FineTuneJob, run: RunRef, stage: str, cfg: OperatorConfig
) -> dict[str, Any]:
    """The batch/v1 Job running ``stage`` of ``run``."""
    if stage not in JOB_STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(JOB_STAGES)}")
    res = job.spec.resources
    ftj = job.metadata.name
    meta = _metadata(job, run, job_name(ftj, run.id, stage), stage)
    job_spec: dict[str, Any] = {
        "backoffLimit": res.backoff_limit,
        "podFailurePolicy": {
            "rules": [
                # The stage said retrying cannot help (bad dataset, bad spec): fail now.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": stage,
                        "operator": "In",
                        "values": NOT_RETRIABLE_EXIT_CODES,
                    },
                },
                # Evictions, preemptions and node drains are not the stage's fault.
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
                # Stopped on SIGTERM with a checkpoint saved: the next pod resumes from it.
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": stage,
                        "operator": "In",
                        "values": [ExitCode.INTERRUPTED.value],
                    },
                },
            ]
        },
        "template": {
            "metadata": {"labels": labels(ftj, run.id, stage)},
            "spec": _pod_spec(job, run, stage, cfg),
        },
    }
    if res.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = res.active_deadline_seconds
    if job.spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = job.spec.ttl_seconds_after_finished
    if job.spec.queue_name:
        # Kueue admits the Job by unsuspending it; the operator never does (reconcile).
        meta["labels"][LABEL_KUEUE_QUEUE] = job.spec.queue_name
        if job.spec.workload_priority_class_name:
            meta["labels"][LABEL_KUEUE_PRIORITY] = job.spec.workload_priority_class_name
        job_spec["suspend"] = True
    if stage == Stage.TRAIN and res.workers > 1:
        job_spec["completionMode"] = "Indexed"
        job_spec["completions"] = res.workers
        job_spec["parallelism"] = res.workers
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
