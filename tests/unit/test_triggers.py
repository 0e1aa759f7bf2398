"""Retraining triggers against the in-memory API server: schedule, dataset change, manual.

A finished run ``g<gen>`` is followed by ``g<gen>-r1``, ``-r2``... of the same spec when
``spec.retrain.schedule`` is due, ``spec.retrain.onDatasetChange`` sees another source
listing than the run's prepare recorded, or the ``kubetune.io/retrain`` annotation gets a new
value; a spec change still starts ``g<generation>``. Uses :class:`test_reconcile.World`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_kube import FakeKube
from recording_http import RecordingServer
from test_reconcile import CFG, NAME, NS, World, run_to_success

from kubetune.layout import parse_run_dir, parse_run_id, run_id, run_prefix
from kubetune.schema import (
    API_VERSION,
    KIND,
    FineTuneJobStatus,
    Phase,
    PromotionStatus,
    Results,
    parse_job,
)
from kubetune.storage import Versions, open_storage
from kubetune_operator import builders
from kubetune_operator.builders import (
    ANNOTATION_RETRAIN_INDEX,
    ANNOTATION_RETRAIN_VALUE,
    ANNOTATION_TRIGGER,
    RunRef,
)
from kubetune_operator.kube import core_path, ftj_path
from kubetune_operator.reconcile import Reconciler
from kubetune_operator.result_reader import ResultReader, SourceNotPollable, SourceUnreadable
from kubetune_operator.status import RunView, compute_status
from kubetune_operator.triggers import (
    ANNOTATION_RETRAIN,
    listing_changes,
    recorded_listing,
)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    return World(tmp_path, monkeypatch)


def applied_with(world: World, **spec: Any) -> None:
    """The FineTuneJob as first applied had these spec fields (no generation bump)."""
    ftj = world.ftj()
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(ftj["spec"].get(key), dict):
            ftj["spec"][key].update(value)
        else:
            ftj["spec"][key] = value


def annotate(world: World, value: str | None) -> None:
    """``kubectl annotate ftj tldr kubetune.io/retrain=<value> --overwrite`` (or remove it)."""
    annotations = world.ftj()["metadata"].setdefault("annotations", {})
    if value is None:
        annotations.pop(ANNOTATION_RETRAIN, None)
    else:
        annotations[ANNOTATION_RETRAIN] = value


def job_names(world: World) -> list[str]:
    return [j["metadata"]["name"] for j in world.jobs()]


def config_map_names(world: World) -> list[str]:
    return [c["metadata"]["name"] for c in world.config_maps()]


def retrain_condition(world: World) -> dict[str, Any]:
    return world.condition("Retrain")


def run_current_to_success(world: World) -> None:
    for stage in ("prepare", "train", "evaluate"):
        world.succeed(stage)
        world.reconcile()
    assert world.status()["phase"] == "Succeeded"


# --------------------------------------------------------------------------- schedule


def test_a_due_schedule_starts_a_retrain_of_the_same_spec_and_a_spec_change_starts_g_gen(
    world: World,
) -> None:
    applied_with(world, retrain={"schedule": "0 3 * * *"})
    run_to_success(world)  # started at 00:00
    g1_output = world.run_output()
    status = world.status()
    assert (status["run"], status["trigger"]) == ("g1", "SpecChange")
    assert status["nextRunAt"] == "2025-01-01T03:00:00Z"
    assert retrain_condition(world)["status"] == "True"
    # Not due: looked at again when it is (capped by the resync interval).
    world.clock[0] = "2025-01-01T02:59:30Z"
    assert world.reconcile() == 30.0
    world.clock[0] = "2025-01-01T01:00:00Z"
    assert world.reconcile() == CFG.resync_interval
    assert world.status()["run"] == "g1" and job_names(world) == [
        "tldr-g1-evaluate",
        "tldr-g1-prepare",
        "tldr-g1-train",
    ]

    world.clock[0] = "2025-01-01T03:00:00Z"
    world.reconcile()
    status = world.status()
    assert (status["run"], status["trigger"], status["phase"]) == ("g1-r1", "Schedule", "Pending")
    assert status["observedGeneration"] == 1
    uid8 = world.ftj()["metadata"]["uid"][:8]
    assert status["output"] == f"{world.output}/runs/{uid8}-g1-r1" != g1_output
    (g1,) = status["history"]
    assert (g1["run"], g1["generation"], g1["phase"], g1["trigger"]) == (
        "g1",
        1,
        "Succeeded",
        "SpecChange",
    )
    assert g1["results"]["perplexity"] == 40.0 and "promoted" not in g1
    assert "results" not in status and "dataset" not in status
    # g1's children are gone; g1-r1 has its own, named after the run.
    assert job_names(world) == ["tldr-g1-r1-prepare"]
    assert config_map_names(world) == ["tldr-g1-r1-job"]
    cm = world.config_maps()[0]["metadata"]["annotations"]
    assert (cm[ANNOTATION_TRIGGER], cm[ANNOTATION_RETRAIN_INDEX]) == ("Schedule", "1")
    assert ("Normal", "Schedule") in world.events()
    event = next(
        e for e in world.kube.objects(core_path(NS, "events")) if e["reason"] == "Schedule"
    )
    assert "g1-r1" in event["message"] and "0 3 * * *" in event["message"]
    # The pods of the run read its id: their results count only for g1-r1.
    assert world.identity().run_id == "g1-r1"
    # The next time is after this run's start.
    assert status["nextRunAt"] == "2025-01-02T03:00:00Z"

    run_current_to_success(world)
    assert world.status()["results"]["perplexity"] == 40.0
    world.clock[0] = "2025-01-02T04:10:00Z"
    world.reconcile()
    status = world.status()
    assert status["run"] == "g1-r2"
    assert [h["run"] for h in status["history"]] == ["g1-r1", "g1"]
    assert status["history"][0]["trigger"] == "Schedule"

    # A restarted operator finds the same run (the newest by generation and retrain).
    world.restart_operator()
    world.reconcile()
    assert world.status()["run"] == "g1-r2"

    # A spec change: g<generation>, SpecChange, while g1-r2 was still working.
    world.edit_spec(training={"learningRate": 1e-4})
    world.reconcile()
    status = world.status()
    assert (status["run"], status["trigger"]) == ("g2", "SpecChange")
    assert [h["run"] for h in status["history"]] == ["g1-r2", "g1-r1", "g1"]
    assert job_names(world) == ["tldr-g2-prepare"]
    assert config_map_names(world) == ["tldr-g2-job"]
    assert ("Normal", "NewGeneration") in world.events()


def test_changing_only_spec_retrain_does_not_start_a_run(world: World) -> None:
    run_to_success(world)
    world.edit_spec(retrain={"schedule": "0 3 * * *"})  # generation 2, same spec hash
    world.reconcile()
    status = world.status()
    assert (status["run"], status["phase"], status["observedGeneration"]) == ("g1", "Succeeded", 2)
    assert status["nextRunAt"] == "2025-01-01T03:00:00Z"


def test_suspend_stops_the_triggers(world: World) -> None:
    applied_with(world, retrain={"schedule": "*/10 * * * *"})
    run_to_success(world)
    world.edit_spec(suspend=True)
    world.clock[0] = "2025-01-01T05:00:00Z"
    assert world.reconcile() is None
    status = world.status()
    assert (status["run"], status["phase"]) == ("g1", "Succeeded")
    assert "nextRunAt" not in status
    condition = retrain_condition(world)
    assert (condition["status"], condition["reason"]) == ("False", "Suspended")
    annotate(world, "now")  # not even by hand
    world.reconcile()
    assert world.status()["run"] == "g1"

    world.edit_spec(suspend=False)
    world.reconcile()
    assert world.status()["run"] == "g1-r1"
    assert world.status()["trigger"] == "Manual"  # the annotation came first


def test_a_schedule_that_does_not_parse_is_a_clear_condition_and_the_run_is_unharmed(
    world: World,
) -> None:
    applied_with(world, retrain={"schedule": "0 25 * * *"})
    world.reconcile()
    condition = retrain_condition(world)
    assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
    assert "spec.retrain.schedule" in condition["message"]
    assert "hour field '25': 25 is out of range 0-23" in condition["message"]
    assert world.events().count(("Warning", "InvalidSpec")) == 1
    assert job_names(world) == ["tldr-g1-prepare"]  # the run goes on
    run_current_to_success(world)
    world.clock[0] = "2025-02-01T00:00:00Z"
    assert world.reconcile() is None
    status = world.status()
    assert (status["run"], status["phase"]) == ("g1", "Succeeded")
    assert world.condition("Ready")["status"] == "True"
    assert world.condition("Stalled")["status"] == "False"
    assert status["results"]["perplexity"] == 40.0 and "nextRunAt" not in status
    assert world.events().count(("Warning", "InvalidSpec")) == 1  # said once

    world.edit_spec(retrain={"schedule": "0 3 * * *"})  # fixed: due since 03:00 on Jan 1
    world.reconcile()
    assert world.status()["run"] == "g1-r1"
    assert retrain_condition(world)["status"] == "True"


def test_a_failed_run_is_retrained_on_schedule(world: World) -> None:
    applied_with(world, retrain={"schedule": "0 * * * *"})
    world.reconcile()
    world.start("prepare")
    world.add_pod(
        "prepare",
        phase="Failed",
        containerStatuses=[
            {"name": "prepare", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
        ],
    )
    world.reconcile()
    assert world.status()["phase"] == "Failed"
    world.clock[0] = "2025-01-01T01:00:00Z"
    world.reconcile()
    status = world.status()
    assert (status["run"], status["phase"]) == ("g1-r1", "Pending")
    assert status["history"][0]["phase"] == "Failed"


# --------------------------------------------------------------------------- manual


def test_a_new_retrain_annotation_starts_a_run_once_the_current_one_finished(
    world: World,
) -> None:
    annotate(world, "a")  # there from the start: recorded by g1, no extra run
    world.reconcile()
    cm = world.config_maps()[0]["metadata"]["annotations"]
    assert cm[ANNOTATION_RETRAIN_VALUE] == "a"
    annotate(world, "b")  # while g1 works: waits for it
    world.succeed("prepare")
    world.reconcile()
    assert world.status()["run"] == "g1"
    run_current_to_success_from(world, "train")
    world.reconcile()
    status = world.status()
    assert (status["run"], status["trigger"]) == ("g1-r1", "Manual")
    assert world.config_maps()[0]["metadata"]["annotations"][ANNOTATION_RETRAIN_VALUE] == "b"
    assert ("Normal", "Manual") in world.events()
    assert "Retrain" not in [c["type"] for c in status["conditions"]]  # no spec.retrain

    run_current_to_success(world)
    world.reconcile()
    assert world.status()["run"] == "g1-r1"  # the same value asks for nothing more
    annotate(world, None)  # removing it asks for nothing either
    world.reconcile()
    assert world.status()["run"] == "g1-r1"
    annotate(world, "c")
    world.reconcile()
    assert world.status()["run"] == "g1-r2"


def run_current_to_success_from(world: World, first: str) -> None:
    stages = ["prepare", "train", "evaluate"]
    for stage in stages[stages.index(first) :]:
        world.succeed(stage)
        world.reconcile()


# --------------------------------------------------------------------------- dataset changes


def with_local_source(world: World, tmp_path: Path, poll: int = 300) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    (source / "a.txt").write_text("first file\n")
    (source / "b.txt").write_text("second file\n")
    applied_with(
        world,
        dataset={"source": f"file://{source}"},
        retrain={"onDatasetChange": True, "pollIntervalSeconds": poll},
    )
    return source


def prepare_recorded_listing(world: World, source: Path) -> None:
    """What the run's prepare pod writes: dataset/prepare.json with the source listing."""
    listing = open_storage(f"file://{source}").versions("")
    result = {
        **world.result("prepare"),
        "fingerprintInputs": {"sourceFiles": [list(v) for v in listing]},
    }
    open_storage(world.run_output()).write_text("dataset/prepare.json", json.dumps(result))


def test_a_changed_dataset_source_starts_a_retrain(world: World, tmp_path: Path) -> None:
    source = with_local_source(world, tmp_path)
    world.reconcile()
    prepare_recorded_listing(world, source)
    world.succeed("prepare")
    world.reconcile()
    assert "datasetCheckedAt" not in world.status()  # only a finished run is compared
    run_current_to_success_from(world, "train")
    status = world.status()
    assert (status["run"], status["phase"]) == ("g1", "Succeeded")
    assert status["datasetCheckedAt"] == "2025-01-01T00:00:00Z"  # listed: unchanged
    assert retrain_condition(world)["status"] == "True"
    assert "every 300 s" in retrain_condition(world)["message"]

    (source / "b.txt").write_text("second file, edited\n")
    (source / "c.txt").write_text("a third\n")
    world.clock[0] = "2025-01-01T00:04:00Z"
    assert world.reconcile() == CFG.resync_interval  # not polled again before 300 s
    assert world.status()["run"] == "g1"
    world.clock[0] = "2025-01-01T00:04:50Z"
    assert world.reconcile() == 10.0  # the poll is due in 10 s
    world.clock[0] = "2025-01-01T00:05:00Z"
    world.reconcile()
    status = world.status()
    assert (status["run"], status["trigger"]) == ("g1-r1", "DatasetChanged")
    assert status["history"][0]["run"] == "g1"
    event = next(
        e for e in world.kube.objects(core_path(NS, "events")) if e["reason"] == "DatasetChanged"
    )
    assert "1 added, 1 modified" in event["message"] and event["type"] == "Normal"
    assert job_names(world) == ["tldr-g1-r1-prepare"]

    # g1-r1's prepare recorded the new listing: nothing more to do.
    prepare_recorded_listing(world, source)
    run_current_to_success(world)
    world.clock[0] = "2025-01-01T01:00:00Z"
    world.reconcile()
    assert world.status()["run"] == "g1-r1"
    assert world.status()["datasetCheckedAt"] == "2025-01-01T01:00:00Z"


class UnreachableSource(ResultReader):
    """A storage that refuses listings until ``up`` is set."""

    up = False

    def source_versions(self, job: Any) -> Versions:
        if not self.up:
            raise OSError("Could not connect to the endpoint URL")
        return super().source_versions(job)


def test_an_unreadable_source_is_a_message_and_is_tried_again(world: World, tmp_path: Path) -> None:
    source = with_local_source(world, tmp_path, poll=60)
    reader = UnreachableSource(world.kube, local_files=True)
    world.reconciler = Reconciler(world.kube, CFG, reader=reader)
    world.reconcile()
    prepare_recorded_listing(world, source)
    run_current_to_success(world)
    condition = retrain_condition(world)
    assert (condition["status"], condition["reason"]) == ("False", "SourceUnreadable")
    assert "cannot list spec.dataset.source" in condition["message"]
    assert "Could not connect" in condition["message"]
    assert world.events().count(("Warning", "SourceUnreadable")) == 1
    status = world.status()
    assert (status["phase"], status["run"]) == ("Succeeded", "g1")
    assert "datasetCheckedAt" not in status and status["results"]["perplexity"] == 40.0
    world.clock[0] = "2025-01-01T00:01:00Z"
    world.reconcile()  # tried again, still down: no second Event
    assert world.events().count(("Warning", "SourceUnreadable")) == 1

    reader.up = True
    world.clock[0] = "2025-01-01T00:02:00Z"
    world.reconcile()
    assert retrain_condition(world)["status"] == "True"
    assert world.status()["datasetCheckedAt"] == "2025-01-01T00:02:00Z"
    assert world.status()["run"] == "g1"


def test_a_run_without_a_recorded_listing_is_not_compared(world: World, tmp_path: Path) -> None:
    with_local_source(world, tmp_path)
    run_to_success(world)  # termination messages carry no listing; prepare.json not written
    condition = retrain_condition(world)
    assert (condition["status"], condition["reason"]) == ("False", "NoSourceListing")
    assert ANNOTATION_RETRAIN in condition["message"]
    assert world.status()["run"] == "g1"


def test_a_hub_source_cannot_be_polled_and_says_so_once(world: World) -> None:
    applied_with(
        world, dataset={"source": "hf://roneneldan/TinyStories"}, retrain={"onDatasetChange": True}
    )
    run_to_success(world)
    condition = retrain_condition(world)
    assert (condition["status"], condition["reason"]) == ("False", "SourceNotPollable")
    assert "hf://roneneldan/TinyStories" in condition["message"]
    assert "datasetCheckedAt" not in world.status()
    version = world.ftj()["metadata"]["resourceVersion"]
    world.clock[0] = "2025-01-02T00:00:00Z"
    assert world.reconcile() is None  # nothing to poll: no requeue
    assert world.ftj()["metadata"]["resourceVersion"] == version  # nothing new to write
    assert world.events().count(("Warning", "SourceNotPollable")) == 1


# --------------------------------------------------------------------------- runs and names


def test_the_current_run_is_the_newest_by_generation_and_retrain(world: World) -> None:
    job = world.parsed()
    for n in (2, 10):  # "g1-r10" sorts before "g1-r2" as text
        world.kube.add(
            core_path(NS, "configmaps"),
            builders.build_job_config_map(job, RunRef.for_generation(job, 1, n, "Schedule")),
        )
    world.reconcile()
    assert world.status()["run"] == "g1-r10"
    assert config_map_names(world) == ["tldr-g1-r10-job"]


def test_long_names_with_retrain_run_ids_fit_and_differ() -> None:
    long = "a-very-long-finetunejob-name-that-goes-on-and-on-for-sixty-ch"
    names = set()
    for run in ("g1", "g1-r1", "g123-r4567"):
        for suffix in ("job", "prepare", "train", "evaluate"):
            name = builders.child_name(long, run, suffix)
            assert len(name) <= builders.MAX_CHILD_NAME, name
            assert name.endswith(f"-{run}-{suffix}")
            names.add(name)
    assert len(names) == 12
    assert run_prefix("s3://b/out", "g1-r1", "0b4c8f9e-11") == "s3://b/out/runs/0b4c8f9e-g1-r1"


def test_run_ids() -> None:
    assert (run_id(3), run_id(3, 2)) == ("g3", "g3-r2")
    assert parse_run_id("g3-r2") == (3, 2) and parse_run_id("g3") == (3, 0)
    assert parse_run_id("x") is None and parse_run_id("g3-r") is None
    assert parse_run_dir("1a2b3c4d-g3-r2") == ("1a2b3c4d", "g3-r2")
    assert parse_run_dir("1a2b3c4d-g3") == ("1a2b3c4d", "g3")
    assert parse_run_dir("notarun") is None and parse_run_dir("1a2b3c4d-x3") is None


def test_history_records_the_trigger_and_the_promotion() -> None:
    old = FineTuneJobStatus(
        phase=Phase.SUCCEEDED,
        run="g4-r2",
        trigger="DatasetChanged",
        output="s3://b/runs/x-g4-r2",
        results=Results(perplexity=12.0),
        promotion=PromotionStatus(promoted=True, reason="Promoted"),
        completion_time="2025-01-01T00:00:00Z",
    )
    run = RunRef(id="g4-r3", generation=4, output="s3://b/runs/x-g4-r3", spec_hash="h", retrain=3)
    new, _ = compute_status(old, RunView(run=run, generation=4), "2025-01-02T00:00:00Z")
    (record,) = new.history
    assert (record.run, record.generation, record.trigger, record.promoted) == (
        "g4-r2",
        4,
        "DatasetChanged",
        True,
    )
    assert new.trigger == "SpecChange"  # RunRef's default


def test_listing_helpers() -> None:
    assert recorded_listing({"sourceFiles": [["b", 2, "y"], ["a", 1, "x"]]}) == [
        ("a", 1, "x"),
        ("b", 2, "y"),
    ]
    assert recorded_listing({"sourceFiles": None}) is None and recorded_listing(None) is None
    assert recorded_listing({"sourceFiles": [["a"]]}) is None
    before = [("a", 1, "x"), ("b", 2, "y")]
    assert (
        listing_changes(before, [("b", 3, "z"), ("c", 1, "w")]) == "1 added, 1 removed, 1 modified"
    )


# --------------------------------------------------------------------------- who lists the source


TENANT_KEY = "AKIATENANTKEY0000000"
OPERATOR_KEY = "AKIAOPERATOROWNKEY00"


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingServer]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", OPERATOR_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("KUBETUNE_S3_ENDPOINT", raising=False)
    with RecordingServer(status=500) as server:
        yield server


def s3_job(endpoint: str, secret: str | None = "s3") -> Any:
    storage: dict[str, Any] = {"output": "s3://runs/tldr/", "endpoint": endpoint}
    if secret:
        storage["credentialsSecret"] = secret
    return parse_job(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {
                "model": {"name": "gpt2"},
                "dataset": {"source": "s3://data/tldr/"},
                "storage": storage,
            },
        }
    )


def kube_with_keys() -> FakeKube:
    kube = FakeKube()
    data = {
        "AWS_ACCESS_KEY_ID": base64.b64encode(TENANT_KEY.encode()).decode(),
        "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"tenant").decode(),
    }
    kube.add(
        core_path(NS, "secrets"),
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "data": data},
    )
    return kube


def test_the_source_is_listed_with_the_jobs_keys_at_allowed_endpoints_only(
    endpoint: RecordingServer,
) -> None:
    off_list = ResultReader(kube_with_keys(), allowed_endpoints=["http://minio:9000"])
    with pytest.raises(SourceNotPollable, match="allow-list"):
        off_list.source_versions(s3_job(endpoint.url))
    no_secret = ResultReader(kube_with_keys(), allowed_endpoints=[endpoint.url])
    with pytest.raises(SourceNotPollable, match="credentialsSecret"):
        no_secret.source_versions(s3_job(endpoint.url, secret=None))
    with pytest.raises(SourceUnreadable, match="Secret gone"):
        no_secret.source_versions(s3_job(endpoint.url, secret="gone"))
    assert endpoint.requests == [], "contacted without the job's own keys at an allowed endpoint"

    allowed = ResultReader(kube_with_keys(), allowed_endpoints=[endpoint.url])
    with pytest.raises(Exception):  # noqa: B017  the recording server answers 500
        allowed.source_versions(s3_job(endpoint.url))
    assert endpoint.requests
    for request in endpoint.requests:
        assert f"Credential={TENANT_KEY}/" in request.get("Authorization", "")
        assert OPERATOR_KEY not in str(request)


def test_file_sources_are_not_listed_by_a_cluster_operator(tmp_path: Path) -> None:
    job = s3_job("http://x")
    job.spec.dataset.source = f"file://{tmp_path}"
    assert "stage pods' nodes" in (ResultReader(FakeKube()).source_refusal(job) or "")
    assert ResultReader(FakeKube(), local_files=True).source_refusal(job) is None


def test_deleted_ftj_forgets_its_polls(world: World, tmp_path: Path) -> None:
    source = with_local_source(world, tmp_path)
    world.reconcile()
    prepare_recorded_listing(world, source)
    run_current_to_success(world)
    assert world.reconciler._dataset_polls
    world.kube.delete(ftj_path(NS, NAME))
    world.reconcile()
    assert not world.reconciler._dataset_polls and not world.reconciler._listings
