"""The reconciler against an in-memory API server (tests/unit/fake_kube.py): no cluster.

Each test plays the Job controller and the kubelet by editing the fake's Jobs and pods
between passes (:class:`World`), and reads back what the operator wrote: children,
status, Events. Result files live in a ``file://`` output under ``tmp_path``; a stage's
result carries the run identity its pod read from the run's ``job.json``, as the real
stages stamp it.
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from fake_kube import FakeKube

from kubetune.contract import JOB_STAGES, Stage
from kubetune.results import (
    EvaluateResult,
    ModelScores,
    PrepareResult,
    RunIdentity,
    TrainResult,
)
from kubetune.schema import API_VERSION, KIND, DatasetStats, FineTuneJob, parse_job
from kubetune.storage import open_storage
from kubetune_operator import builders, reconcile
from kubetune_operator.builders import (
    ANNOTATION_FAILED_REASON,
    ANNOTATION_SPEC_HASH,
    LABEL_JOB,
    LABEL_RUN,
    LABEL_STAGE,
    RunRef,
)
from kubetune_operator.config import OperatorConfig
from kubetune_operator.controller import Controller
from kubetune_operator.kube import Obj, all_ftjs_path, core_path, ftj_path, jobs_path
from kubetune_operator.reconcile import RETRY_SOON, Reconciler

NS, NAME = "ml", "tldr"
CFG = OperatorConfig(
    trainer_image="ghcr.io/kubetune/trainer:test",
    progress_interval=15.0,
    unschedulable_timeout=300.0,
    resync_interval=60.0,
    file_outputs=True,  # the runs write to file:// under tmp_path, which this process reads
)
T0 = "2025-01-01T00:00:00Z"


def prepare_result() -> dict[str, Any]:
    stats = DatasetStats(lines=500, kept_lines=400, train_lines=360, test_lines=40)
    return PrepareResult(
        stats=stats, train_sha256="a", test_sha256="b", tokenizer="bpe", dataset_uri="x"
    ).to_wire()


def train_result() -> dict[str, Any]:
    return TrainResult(
        steps=30, total_steps=30, epochs=1.0, final_loss=3.2, model_uri="m"
    ).to_wire()


def evaluate_result() -> dict[str, Any]:
    return EvaluateResult(
        fine_tuned=ModelScores(perplexity=40.0, bleu=5.0),
        baseline=ModelScores(perplexity=500.0, bleu=0.5),
    ).to_wire()


RESULTS = {
    Stage.PREPARE.value: prepare_result,
    Stage.TRAIN.value: train_result,
    Stage.EVALUATE.value: evaluate_result,
}


class World:
    """One FineTuneJob in a fake cluster, its reconciler, and a hand on the clock."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kube = FakeKube()
        self.output = f"file://{tmp_path}/out"
        self.clock = ["2025-01-01T00:00:00Z"]  # what the reconciler's utcnow() says
        self._pod_numbers = itertools.count()
        monkeypatch.setattr(reconcile, "utcnow", lambda: self.clock[0])
        self.reconciler = self.new_reconciler()
        self.add_ftj(NS, NAME, self.output)

    def add_ftj(self, ns: str, name: str, output: str, created: str = T0, **spec: Any) -> Obj:
        """``kubectl apply`` of a FineTuneJob created at ``created`` (a new uid)."""
        return self.kube.add(
            ftj_path(ns),
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
                "spec": {
                    "model": {"name": "gpt2"},
                    "dataset": {"source": "file:///data/tldr"},
                    "storage": {"output": output},
                    **spec,
                },
            },
        )

    # --------------------------------------------------------------- the operator

    def reconcile(self) -> float | None:
        return self.reconciler.reconcile(NS, NAME)

    def restart_operator(self) -> None:
        """A new process: nothing remembered but what is in the cluster."""
        self.reconciler = self.new_reconciler()

    def new_reconciler(self) -> Reconciler:
        return Reconciler(self.kube, CFG)

    def edit_spec(self, **changes: Any) -> None:
        """``kubectl patch --type=merge`` of the spec (bumps metadata.generation)."""
        self.kube.merge_patch(ftj_path(NS, NAME), {"spec": changes})

    # --------------------------------------------------------------- what it wrote

    def ftj(self) -> Obj:
        return self.kube.edit(ftj_path(NS, NAME))

    def status(self) -> dict[str, Any]:
        return dict(self.ftj().get("status") or {})

    def condition(self, ctype: str) -> dict[str, Any]:
        return next(c for c in self.status()["conditions"] if c["type"] == ctype)

    def jobs(self) -> list[Obj]:
        return self.kube.objects(jobs_path(NS))

    def job(self, stage: str, run: str = "") -> Obj:
        """The stage's Job of ``run`` (default: the status' current run)."""
        run = run or self.status()["run"]
        return self.kube.edit(jobs_path(NS, builders.job_name(NAME, run, stage)))

    def config_maps(self) -> list[Obj]:
        return self.kube.objects(core_path(NS, "configmaps"))

    def events(self) -> list[tuple[str, str]]:
        return [(e["type"], e["reason"]) for e in self.kube.objects(core_path(NS, "events"))]

    def parsed(self) -> FineTuneJob:
        body = self.ftj()
        return parse_job({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")})

    def run_output(self) -> str:
        """The current run's output prefix (``<output>/runs/<uid[:8]>-<run>``)."""
        return str(self.status()["output"])

    def identity(self, run: str = "") -> RunIdentity:
        """What a stage pod of ``run`` stamps into its result: read from the run's job.json."""
        run = run or self.status()["run"]
        cm = self.kube.edit(core_path(NS, "configmaps", builders.config_map_name(NAME, run)))
        return RunIdentity.of_job(parse_job(json.loads(cm["data"]["job.json"])))

    def result(self, stage: str, run: str = "") -> dict[str, Any]:
        """The stage's result as its pod of ``run`` writes it (with the run identity)."""
        return {**RESULTS[stage](), "run": self.identity(run).to_wire()}

    # --------------------------------------------------------------- the Job controller

    def add_pod(self, stage: str, run: str = "", created: str = T0, **status: Any) -> Obj:
        """A pod of the stage Job (labelled and owned as the Job controller does)."""
        run = run or self.status()["run"]
        job = self.job(stage, run)
        return self.kube.add(
            core_path(NS, "pods"),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{job['metadata']['name']}-{next(self._pod_numbers)}",
                    "labels": {LABEL_JOB: NAME, LABEL_RUN: run, LABEL_STAGE: stage},
                    "ownerReferences": [{"kind": "Job", "uid": job["metadata"]["uid"]}],
                    "creationTimestamp": created,
                },
                "status": {"phase": "Pending", **status},
            },
        )

    def start(self, stage: str, run: str = "") -> Obj:
        self.job(stage, run)["status"] = {"startTime": T0, "active": 1}
        return self.add_pod(stage, run, phase="Running")

    def succeed(self, stage: str, run: str = "") -> None:
        """The stage pod exits 0 with its result as termination message; the Job completes."""
        pod = self.start(stage, run)
        terminated = {"exitCode": 0, "message": json.dumps(self.result(stage, run))}
        pod["status"] = {
            "phase": "Succeeded",
            "containerStatuses": [{"name": stage, "state": {"terminated": terminated}}],
        }
        self.job(stage, run)["status"] = {
            "startTime": T0,
            "completionTime": "2025-01-01T00:01:00Z",
            "succeeded": 1,
            "conditions": [{"type": "Complete", "status": "True"}],
        }


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    return World(tmp_path, monkeypatch)


def run_to_success(world: World) -> None:
    world.reconcile()
    for stage in JOB_STAGES:
        world.succeed(stage)
        world.reconcile()
    assert world.status()["phase"] == "Succeeded"


# --------------------------------------------------------------------------- a whole run


def test_a_run_goes_through_its_stages_with_one_job_each_and_one_config_map(
    world: World,
) -> None:
    # A Pending stage needs no early look: its pod's events wake the operator.
    assert world.reconcile() == CFG.resync_interval
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g1-prepare"]
    assert world.status()["phase"] == "Pending" and world.status()["run"] == "g1"
    assert world.condition("Reconciling")["status"] == "True"
    assert ("Normal", "Created") in world.events() and ("Normal", "NewGeneration") in world.events()

    world.start("prepare")
    world.reconcile()
    assert world.status()["phase"] == "Preparing"

    world.succeed("prepare")
    # The progress file the trainer writes while training runs.
    open_storage(world.run_output()).write_text(
        "train/progress.json", json.dumps({"step": 12, "totalSteps": 30, "loss": 4.0})
    )
    assert world.reconcile() == CFG.progress_interval
    assert world.condition("DatasetReady")["status"] == "True"
    assert world.status()["dataset"]["trainLines"] == 360
    world.start("train")
    world.reconcile()
    status = world.status()
    assert status["phase"] == "Training" and status["progress"]["percent"] == 40

    world.succeed("train")
    world.reconcile()
    world.succeed("evaluate")
    assert world.reconcile() is None  # finished: only an event brings it back
    status = world.status()
    assert status["phase"] == "Succeeded" and status["results"]["perplexity"] == 40.0
    assert world.condition("Ready")["status"] == "True"
    assert sorted(j["metadata"]["labels"][LABEL_STAGE] for j in world.jobs()) == [
        "evaluate",
        "prepare",
        "train",
    ]
    # The ConfigMap's 409 for the later stages was "same run": adopted, not duplicated.
    assert [c["metadata"]["name"] for c in world.config_maps()] == ["tldr-g1-job"]
    reasons = [reason for _, reason in world.events()]
    assert reasons.count("Succeeded") == 1 and reasons.count("StageSucceeded") == 3

    # Nothing changes any more: no status patch, no Event.
    before = (len(world.events()), world.ftj()["metadata"]["resourceVersion"])
    world.reconcile()
    assert (len(world.events()), world.ftj()["metadata"]["resourceVersion"]) == before


# --------------------------------------------------------------------------- suspend


def test_suspend_suspends_the_current_stage_and_resume_continues_the_same_run(
    world: World,
) -> None:
    world.reconcile()
    world.succeed("prepare")
    world.reconcile()
    world.start("train")
    world.reconcile()

    world.edit_spec(suspend=True)
    assert world.reconcile() == CFG.resync_interval
    assert world.job("train")["spec"]["suspend"] is True
    status = world.status()
    assert (status["phase"], status["run"], status["observedGeneration"]) == ("Suspended", "g1", 2)
    assert world.condition("Reconciling")["status"] == "False"
    assert world.condition("Stalled")["status"] == "False"
    assert ("Normal", "Suspended") in world.events()
    assert len(world.config_maps()) == 1  # suspend is not a new run

    world.kube.objects(core_path(NS, "pods"))[-1]["status"]["phase"] = "Failed"  # pods go away
    world.edit_spec(suspend=False)
    world.reconcile()
    assert world.job("train")["spec"]["suspend"] is False
    world.add_pod("train", phase="Running")
    world.reconcile()
    assert world.status()["phase"] == "Training" and world.status()["run"] == "g1"
    assert len(world.jobs()) == 2


def test_a_queued_job_waits_for_kueue_and_suspend_gives_its_place_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, monkeypatch)
    world.kube.merge_patch(ftj_path(NS, NAME), {"spec": {"queueName": "team-a"}})
    world.reconcile()
    prepare = world.job("prepare")
    assert prepare["spec"]["suspend"] is True
    assert prepare["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    world.reconcile()  # the operator never admits it itself
    assert world.job("prepare")["spec"]["suspend"] is True
    assert (world.status()["phase"], world.status()["reason"]) == ("Pending", "Queued")

    world.job("prepare")["spec"]["suspend"] = False  # Kueue admitted it
    world.start("prepare")
    world.reconcile()
    assert world.status()["phase"] == "Preparing"

    world.edit_spec(suspend=True)
    world.reconcile()
    # Kueue would admit a Job suspended behind its back again: the Job goes instead.
    assert [j["metadata"]["name"] for j in world.jobs()] == []
    assert world.status()["phase"] == "Suspended"
    world.edit_spec(suspend=False)
    world.reconcile()
    again = world.job("prepare")
    assert again["spec"]["suspend"] is True and world.status()["reason"] == "Queued"


# --------------------------------------------------------------------------- giving up


def test_an_oom_killed_stage_is_given_up_for_good_and_survives_a_restart(world: World) -> None:
    world.reconcile()
    world.start("prepare")
    oom = {"exitCode": 137, "reason": "OOMKilled"}
    world.add_pod(
        "prepare",
        phase="Failed",
        containerStatuses=[{"name": "prepare", "state": {"terminated": oom}}],
    )
    world.reconcile()
    job = world.job("prepare")
    assert job["metadata"]["annotations"][ANNOTATION_FAILED_REASON] == "OOMKilled"
    assert job["spec"]["suspend"] is True  # its pods go away; the Job is not retried
    stalled = world.condition("Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "OOMKilled")
    assert world.status()["phase"] == "Failed"
    assert world.events().count(("Warning", "OOMKilled")) == 1

    world.restart_operator()
    world.reconcile()
    assert world.status()["phase"] == "Failed"
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g1-prepare"]
    assert world.events().count(("Warning", "OOMKilled")) == 1


def _unschedulable_pod(world: World, stage: str, cpu: str, message: str, since: str) -> Obj:
    """A stage pod the scheduler could not place since ``since``, requesting ``cpu``."""
    world.job(stage)["status"] = {"startTime": T0, "active": 1}
    unschedulable = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": message,
        "lastTransitionTime": since,
    }
    pod = world.add_pod(stage, created=since, conditions=[unschedulable])
    pod["spec"] = {"containers": [{"name": stage, "resources": {"requests": {"cpu": cpu}}}]}
    return pod


def _add_node(world: World, name: str, cpu: str) -> None:
    world.kube.add(
        "/api/v1/nodes",
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name},
            "status": {"allocatable": {"cpu": cpu, "memory": "32Gi", "pods": "110"}},
        },
    )


def test_a_pod_waiting_for_free_cpu_waits_with_the_schedulers_message(world: World) -> None:
    world.reconcile()
    _add_node(world, "n1", "8")
    busy = "0/1 nodes are available: 1 Insufficient cpu."
    _unschedulable_pod(world, "prepare", "4", busy, since=T0)  # hours ago: no timeout applies
    assert world.reconcile() == CFG.resync_interval
    assert world.status()["phase"] == "Pending"
    reconciling = world.condition("Reconciling")
    assert (reconciling["status"], reconciling["reason"]) == ("True", "Waiting")
    assert busy in reconciling["message"]
    stage = world.condition("DatasetReady")
    assert stage["reason"] == "Waiting" and busy in stage["message"]
    assert world.condition("Stalled")["status"] == "False"
    assert not world.job("prepare")["metadata"].get("annotations", {}).get(ANNOTATION_FAILED_REASON)
    assert ("LIST", "/api/v1/nodes") in world.kube.calls


def test_a_pod_no_node_can_hold_fails_after_the_timeout_naming_the_field(world: World) -> None:
    world.reconcile()
    _add_node(world, "n1", "8")
    too_big = "0/1 nodes are available: 1 Insufficient cpu."
    recently = time.time() - (CFG.unschedulable_timeout - 30)  # 30 s left to wait
    since = datetime.fromtimestamp(recently, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    pod = _unschedulable_pod(world, "prepare", "64", too_big, since=since)
    # Waiting for a node that fits (an autoscaler may add one); looked at again when time is up.
    requeue = world.reconcile()
    assert requeue is not None and 25 < requeue < 35
    waiting = world.condition("Reconciling")
    assert (waiting["status"], waiting["reason"]) == ("True", "Waiting")
    assert "spec.resources.cpu" in waiting["message"] and "the run fails at" in waiting["message"]
    patches = world.kube.calls.count(("PATCH", ftj_path(NS, NAME) + "/status"))
    world.reconcile()  # nothing changed: the status is not written again
    assert world.kube.calls.count(("PATCH", ftj_path(NS, NAME) + "/status")) == patches

    pod["status"]["conditions"][0]["lastTransitionTime"] = T0  # long ago: past the timeout
    world.reconcile()
    stalled = world.condition("Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "Unschedulable")
    assert "cpu 64 (spec.resources.cpu)" in stalled["message"]
    assert "the most any node has is 8 (node n1)" in stalled["message"]
    assert world.job("prepare")["metadata"]["annotations"][ANNOTATION_FAILED_REASON] == (
        "Unschedulable"
    )
    assert world.status()["phase"] == "Failed"


def test_without_the_right_to_list_nodes_an_unschedulable_pod_only_waits(world: World) -> None:
    world.kube.forbidden.add("/api/v1/nodes")
    world.reconcile()
    _unschedulable_pod(world, "prepare", "64", "0/1 nodes are available: 1 Insufficient cpu.", T0)
    for _ in range(2):
        world.reconcile()
        assert world.status()["phase"] == "Pending"
        assert world.condition("Reconciling")["reason"] == "Waiting"
    assert world.kube.calls.count(("LIST", "/api/v1/nodes")) == 1  # asked once, then not again


def test_nodes_are_listed_only_while_a_pod_cannot_be_scheduled(world: World) -> None:
    run_to_success(world)
    assert ("LIST", "/api/v1/nodes") not in world.kube.calls


# --------------------------------------------------------------------------- 409


def test_a_job_created_meanwhile_for_the_same_run_is_adopted(world: World) -> None:
    """The Job appears between the pass's list and its create (a retry, a second writer)."""
    kube = world.kube
    plain_create = kube.create

    def someone_was_first(path: str, body: Obj) -> Obj:
        if body["kind"] == "Job":
            kube.add(path, body)
        return plain_create(path, body)

    kube.create = someone_was_first  # type: ignore[method-assign]
    world.reconcile()
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g1-prepare"]
    assert world.status()["stages"]["prepare"]["state"] == "Pending"


def test_a_child_of_another_spec_under_the_run_name_is_replaced_once_it_is_gone(
    world: World,
) -> None:
    # A ConfigMap of this run's name but an earlier spec (the run id was reused).
    job = world.parsed()
    stale = builders.build_job_config_map(job, RunRef.for_generation(job, 1))
    stale["metadata"]["annotations"][ANNOTATION_SPEC_HASH] = "0000000000000000"
    world.kube.finalizing = True  # deletions take a while (finalizers)
    world.kube.add(core_path(NS, "configmaps"), stale)

    assert world.reconcile() == RETRY_SOON  # deleting it; wait
    assert world.config_maps()[0]["metadata"].get("deletionTimestamp")
    assert world.reconcile() == RETRY_SOON  # still being deleted
    assert world.jobs() == []
    world.kube.finish_deletions()
    world.reconcile()
    (cm,) = world.config_maps()
    assert cm["metadata"]["annotations"][ANNOTATION_SPEC_HASH] == builders.spec_hash(job)
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g1-prepare"]


def test_a_child_name_taken_by_an_object_of_someone_else_is_an_error_naming_it(
    world: World,
) -> None:
    world.kube.add(
        core_path(NS, "configmaps"),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tldr-g1-job"}},
    )
    with pytest.raises(RuntimeError, match="tldr-g1-job exists and is not owned"):
        world.reconcile()
    assert world.jobs() == []


# --------------------------------------------------------------------------- runs


def test_a_spec_change_starts_run_g_gen_and_moves_the_old_run_into_history(
    world: World,
) -> None:
    run_to_success(world)
    world.edit_spec(training={"learningRate": 1e-4})
    world.reconcile()
    status = world.status()
    assert (status["run"], status["observedGeneration"]) == ("g2", 2)
    assert status["output"] == f"{world.output}/runs/{world.ftj()['metadata']['uid'][:8]}-g2"
    assert status["history"][0]["run"] == "g1"
    assert status["history"][0]["results"]["perplexity"] == 40.0
    assert "results" not in status and "dataset" not in status
    assert set(status["stages"]) == {"prepare"}
    # The earlier run's children (and, through ownerReferences, its pods) are gone.
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g2-prepare"]
    assert [c["metadata"]["name"] for c in world.config_maps()] == ["tldr-g2-job"]
    assert not [
        p for p in world.kube.objects(core_path(NS, "pods")) if "g1" in p["metadata"]["name"]
    ]
    assert ("Normal", "NewGeneration") in world.events()


def test_the_newest_run_config_map_names_the_run_and_suspend_is_not_a_new_run(
    world: World,
) -> None:
    world.reconcile()  # run g1
    world.edit_spec(training={"learningRate": 1e-4})  # generation 2
    # The operator died after creating run g2's ConfigMap, before deleting g1's children.
    job = world.parsed()
    world.kube.add(
        core_path(NS, "configmaps"),
        builders.build_job_config_map(job, RunRef.for_generation(job, 2)),
    )
    world.edit_spec(suspend=True)  # generation 3, the same spec hash as run g2
    world.restart_operator()
    world.reconcile()
    status = world.status()
    assert (status["run"], status["observedGeneration"], status["phase"]) == ("g2", 3, "Suspended")
    assert [c["metadata"]["name"] for c in world.config_maps()] == ["tldr-g2-job"]  # no g3
    assert world.jobs() == []  # g1's Job deleted; suspended before g2's first stage

    world.edit_spec(suspend=False)
    world.reconcile()
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g2-prepare"]
    assert world.status()["history"][0]["run"] == "g1"


# --------------------------------------------------------------------------- Jobs that vanish


def test_a_finished_job_deleted_by_its_ttl_keeps_its_result_from_the_status(world: World) -> None:
    world.edit_spec(ttlSecondsAfterFinished=0)  # generation 2: run g2
    world.reconcile()
    assert world.job("prepare")["spec"]["ttlSecondsAfterFinished"] == 0
    world.succeed("prepare")
    world.reconcile()
    world.kube.delete(jobs_path(NS, "tldr-g2-prepare"))  # the TTL controller
    world.restart_operator()
    world.reconcile()
    status = world.status()
    assert status["run"] == "g2" and status["stages"]["prepare"]["state"] == "Succeeded"
    assert status["dataset"]["trainLines"] == 360
    assert world.condition("DatasetReady")["status"] == "True"
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g2-train"]  # not re-run


def test_a_finished_job_deleted_before_the_status_saw_it_is_read_from_storage(
    world: World,
) -> None:
    world.reconcile()
    open_storage(world.run_output()).write_text(
        "dataset/prepare.json", json.dumps(world.result("prepare"))
    )
    world.kube.delete(jobs_path(NS, "tldr-g1-prepare"))
    world.reconcile()
    status = world.status()
    assert status["stages"]["prepare"]["state"] == "Succeeded"
    assert status["stages"]["prepare"]["message"] == "result found in storage"
    assert status["dataset"]["keptLines"] == 400
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g1-train"]


def test_a_job_deleted_while_running_is_created_again(world: World) -> None:
    world.reconcile()
    world.start("prepare")
    world.reconcile()
    world.kube.delete(jobs_path(NS, "tldr-g1-prepare"))  # by hand; its pods go with it
    assert world.kube.objects(core_path(NS, "pods")) == []
    world.reconcile()
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g1-prepare"]
    # Same run: the phase does not go back; the reason says the new Job's pod is pending.
    assert world.status()["phase"] == "Preparing" and world.status()["run"] == "g1"
    assert world.status()["reason"] == "StagePending"
    assert world.events().count(("Normal", "Created")) == 2


# --------------------------------------------------------------------------- invalid specs


def test_a_spec_that_does_not_parse_stalls_and_clears_the_old_run(world: World) -> None:
    run_to_success(world)
    world.edit_spec(training={"epochs": -1})  # the CRD would refuse; ours must too
    world.clock[0] = "2025-01-01T01:00:00Z"
    assert world.reconcile() is None
    status = world.status()
    assert (status["phase"], status["observedGeneration"]) == ("Failed", 2)
    stalled = world.condition("Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "InvalidSpec")
    assert "training.epochs" in stalled["message"]
    for ctype in ("Ready", "Reconciling", "DatasetReady", "Trained", "Evaluated"):
        assert world.condition(ctype)["reason"] == "InvalidSpec"
        assert world.condition(ctype)["status"] == "False"
    for field in ("run", "output", "results", "dataset", "artifacts", "progress", "startTime"):
        assert field not in status, field
    assert status["stages"] == {}
    assert status["history"][0]["run"] == "g1" and status["history"][0]["phase"] == "Succeeded"
    assert world.events().count(("Warning", "InvalidSpec")) == 1

    # The same facts again: lastTransitionTime kept, no patch, no second Event.
    version = world.ftj()["metadata"]["resourceVersion"]
    world.clock[0] = "2025-01-01T02:00:00Z"
    world.reconcile()
    assert world.ftj()["metadata"]["resourceVersion"] == version
    assert world.condition("Stalled")["lastTransitionTime"] == "2025-01-01T01:00:00Z"

    # Another bad edit: the new message and generation, the same lastTransitionTime.
    world.edit_spec(training={"epochs": -2})
    world.reconcile()
    stalled = world.condition("Stalled")
    assert stalled["observedGeneration"] == 3 and "-2" in stalled["message"]
    assert stalled["lastTransitionTime"] == "2025-01-01T01:00:00Z"
    assert world.events().count(("Warning", "InvalidSpec")) == 2

    # The spec restored: run g1's children are still there, so g1 is current again.
    world.edit_spec(training={"epochs": None})
    world.reconcile()
    status = world.status()
    assert (status["run"], status["phase"]) == ("g1", "Succeeded")
    assert status["results"]["perplexity"] == 40.0
    assert [h["run"] for h in status.get("history", [])] == []  # the current run is no history


def test_a_missing_credentials_secret_waits_and_the_run_starts_once_it_exists(
    world: World,
) -> None:
    world.edit_spec(storage={"credentialsSecret": "s3"})
    assert world.reconcile() == CFG.resync_interval
    assert world.jobs() == []
    stalled = world.condition("Stalled")
    assert stalled["reason"] == "InvalidSpec" and f"Secret {NS}/s3" in stalled["message"]
    assert ("GET metadata", core_path(NS, "secrets", "s3")) in world.kube.calls

    world.kube.add(core_path(NS, "secrets"), {"kind": "Secret", "metadata": {"name": "s3"}})
    world.reconcile()
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g2-prepare"]
    assert world.condition("Stalled")["status"] == "False"


def test_a_deleted_finetunejob_needs_no_pass() -> None:
    kube = FakeKube()
    assert Reconciler(kube, CFG).reconcile(NS, "gone") is None
    assert [verb for verb, _ in kube.calls] == ["GET"]


# --------------------------------------------------------------------------- results of other runs


def other_identities(world: World) -> dict[str, dict[str, Any] | None]:
    """Identities of results that are not the current run's, by what differs."""
    mine = world.identity().to_wire()
    return {
        "no run": None,
        "another job uid": {**mine, "jobUid": "uid-of-an-earlier-finetunejob"},
        "another spec": {**mine, "specHash": "0000000000000000"},
        "another run": {**mine, "runId": "g7"},
    }


@pytest.mark.parametrize("differs", ["no run", "another job uid", "another spec", "another run"])
def test_a_result_in_storage_of_another_run_is_not_adopted_and_the_stage_runs(
    world: World, differs: str
) -> None:
    world.reconcile()
    stale = {**prepare_result(), "run": other_identities(world)[differs]}
    open_storage(world.run_output()).write_text("dataset/prepare.json", json.dumps(stale))
    world.kube.delete(jobs_path(NS, "tldr-g1-prepare"))  # no Job: only storage could say
    world.restart_operator()
    world.reconcile()
    status = world.status()
    assert status["stages"]["prepare"]["state"] == "Pending" and "dataset" not in status
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g1-prepare"]  # created again
    assert world.events().count(("Normal", "Created")) == 2


def test_a_termination_message_of_another_run_gives_no_numbers(world: World) -> None:
    world.reconcile()
    world.succeed("prepare")
    pod = world.kube.objects(core_path(NS, "pods"))[-1]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    stale = {**prepare_result(), "run": other_identities(world)["another job uid"]}
    terminated["message"] = json.dumps(stale)
    world.reconcile()
    assert "dataset" not in world.status()


def test_a_finetunejob_deleted_and_applied_again_never_gets_the_old_runs_results(
    world: World,
) -> None:
    run_to_success(world)  # the reconciler remembers g1's results
    old = world.ftj()["metadata"]["uid"]
    old_output = world.run_output()
    for stage in JOB_STAGES:  # what the old run's pods left in storage
        path = reconcile.RunLayout.RESULT_KEYS[stage]
        open_storage(old_output).write_text(path, json.dumps(world.result(stage)))
    world.kube.delete(ftj_path(NS, NAME))  # children go with it (garbage collection)
    # Applied again at once, with a new spec: the operator never saw the FineTuneJob gone.
    world.add_ftj(NS, NAME, world.output, training={"learningRate": 1e-4})
    new = world.ftj()["metadata"]["uid"]
    assert new != old
    world.reconcile()
    status = world.status()
    assert status["run"] == "g1" and status["output"] == f"{world.output}/runs/{new[:8]}-g1"
    assert status["output"] != old_output
    assert status["phase"] == "Pending" and "results" not in status and "dataset" not in status
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g1-prepare"]

    # Even the old run's result files under the new prefix (a uid prefix collision) do not count.
    for stage in JOB_STAGES:
        stale = {**RESULTS[stage](), "run": {"jobUid": old, "runId": "g1"}}
        path = reconcile.RunLayout.RESULT_KEYS[stage]
        open_storage(world.run_output()).write_text(path, json.dumps(stale))
    world.kube.delete(jobs_path(NS, "tldr-g1-prepare"))
    world.reconcile()
    assert world.status()["stages"]["prepare"]["state"] == "Pending"
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g1-prepare"]


# --------------------------------------------------------------------------- shared outputs


def test_a_newer_finetunejob_on_an_output_in_use_is_refused_until_the_older_one_is_gone(
    world: World,
) -> None:
    world.reconcile()  # ml/tldr, created at T0, runs
    # Another team, later, on the same prefix written differently.
    world.add_ftj("team-b", "copy", world.output + "//", created="2025-01-01T00:05:00Z")
    assert world.reconciler.reconcile("team-b", "copy") == CFG.resync_interval
    assert world.kube.objects(jobs_path("team-b")) == []
    copy = world.kube.edit(ftj_path("team-b", "copy"))["status"]
    stalled = next(c for c in copy["conditions"] if c["type"] == "Stalled")
    assert copy["phase"] == "Failed"
    assert (stalled["status"], stalled["reason"]) == ("True", "OutputInUse")
    assert f"FineTuneJob {NS}/{NAME}" in stalled["message"]
    assert "choose another storage.output" in stalled["message"]
    assert "dataset" not in copy and "results" not in copy
    # The older job is not disturbed by the newer one.
    world.succeed("prepare")
    world.reconcile()
    assert world.status()["phase"] == "Training" and len(world.jobs()) == 2

    world.kube.delete(ftj_path(NS, NAME))
    world.reconciler.reconcile("team-b", "copy")
    assert [j["metadata"]["name"] for j in world.kube.objects(jobs_path("team-b"))] == [
        "copy-g1-prepare"
    ]
    copy = world.kube.edit(ftj_path("team-b", "copy"))["status"]
    assert next(c for c in copy["conditions"] if c["type"] == "Stalled")["status"] == "False"


def test_a_nested_output_is_refused_and_the_message_names_the_older_job(world: World) -> None:
    world.add_ftj(NS, "nested", f"{world.output}/team/", created="2025-01-01T00:00:01Z")
    world.reconciler.reconcile(NS, "nested")
    nested = world.kube.edit(ftj_path(NS, "nested"))["status"]
    stalled = next(c for c in nested["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "OutputInUse" and f"{NS}/{NAME}" in stalled["message"]
    world.reconcile()  # the older one runs
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g1-prepare"]


def test_without_a_cluster_wide_list_right_outputs_are_checked_in_the_namespace(
    world: World,
) -> None:
    world.kube.forbidden.add(all_ftjs_path())
    world.add_ftj(NS, "twin", world.output, created="2025-01-01T00:00:01Z")
    world.reconciler.reconcile(NS, "twin")
    twin = world.kube.edit(ftj_path(NS, "twin"))["status"]
    assert next(c for c in twin["conditions"] if c["type"] == "Stalled")["reason"] == "OutputInUse"
    assert ("LIST", ftj_path(NS)) in world.kube.calls


def test_watching_named_namespaces_outputs_are_checked_across_all_of_them(
    world: World,
) -> None:
    # Namespace-scoped install: Roles in ml and team-b only, no cluster-wide list.
    world.kube.forbidden.add(all_ftjs_path())
    cfg = OperatorConfig(namespaces=(NS, "team-b"), file_outputs=True)
    world.reconciler = Reconciler(world.kube, cfg)
    world.reconcile()  # ml/tldr, the older job, runs
    world.add_ftj("team-b", "copy", world.output, created="2025-01-01T00:05:00Z")
    world.reconciler.reconcile("team-b", "copy")
    copy = world.kube.edit(ftj_path("team-b", "copy"))["status"]
    assert next(c for c in copy["conditions"] if c["type"] == "Stalled")["reason"] == "OutputInUse"
    assert ("LIST", ftj_path(NS)) in world.kube.calls  # each watched namespace, after one 403


# --------------------------------------------------------------------------- controller


class FailingReconciler(Reconciler):
    def __init__(self) -> None:
        super().__init__(FakeKube(), CFG)

    def reconcile(self, namespace: str, name: str) -> float | None:
        raise RuntimeError("API server unreachable")


def test_forget_drops_the_controllers_failure_count() -> None:
    controller = Controller(FailingReconciler(), workers=1)
    for _ in range(3):
        controller.process(NS, NAME)
    assert controller.failures(NS, NAME) == 3
    controller.forget(NS, NAME)
    assert controller.failures(NS, NAME) == 0
    controller.process(NS, NAME)
    assert controller.failures(NS, NAME) == 1  # backoff starts again at 1 s


def test_a_missing_endpoint_key_secret_is_named_before_any_job(world: World) -> None:
    endpoint = {"name": "vllm", "baseUrl": "http://vllm/v1", "model": "m", "apiKeySecret": "vk"}
    world.edit_spec(evaluation={"compareWith": [endpoint]})
    world.reconcile()
    assert world.jobs() == []
    stalled = world.condition("Stalled")
    assert stalled["reason"] == "InvalidSpec"
    assert "spec.evaluation.compareWith[0].apiKeySecret" in stalled["message"]
    assert f"Secret {NS}/vk" in stalled["message"]


def test_a_child_the_api_server_refuses_stalls_the_run_with_its_message(world: World) -> None:
    message = (
        'Job.batch "tldr-g1-prepare" is invalid: spec.template.spec.containers[0].resources'
        '.requests: Invalid value: "lots": quantities must match the regular expression'
    )
    world.kube.refuse_create[jobs_path(NS)] = (422, message)
    assert world.reconcile() is None  # nothing to retry until the spec changes
    status = world.status()
    assert status["phase"] == "Failed" and status["reason"] == "InvalidSpec"
    stalled = world.condition("Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "InvalidSpec"
    assert 'Invalid value: "lots"' in stalled["message"]
    assert ("Warning", "InvalidSpec") in world.events()
    # Once the spec is fixed (a new generation), the stage Job is created.
    del world.kube.refuse_create[jobs_path(NS)]
    world.edit_spec(suspend=False, training={"maxSteps": 3})
    world.reconcile()
    assert [j["metadata"]["name"] for j in world.jobs()] == ["tldr-g2-prepare"]
    assert world.status()["phase"] == "Pending"


def test_a_file_output_stalls_on_a_cluster_whose_pods_share_no_file_system(
    world: World,
) -> None:
    world.reconciler = Reconciler(world.kube, OperatorConfig(file_outputs=False))
    world.reconcile()
    assert world.jobs() == []
    stalled = world.condition("Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "InvalidSpec"
    assert "spec.storage.output" in stalled["message"] and "s3://" in stalled["message"]
