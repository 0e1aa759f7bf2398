"""Experiment tracking (spec.tracking.mlflow) against a real MLflow tracking server.

The stages' tracking calls (kubetune_trainer.tracking, plain urllib) write to a real
``mlflow server`` (tests/tracking_server.py: SQLite store, proxied artifacts); everything
is read back through MLflow's REST API and the artifact store on disk. Failures (a server
that is down, refused credentials, 5xx answers) come back as a TrackingStatus error,
quickly and without the credentials; the credentials' headers are checked on a recording
server (tests/recording_http.py).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from recording_http import RecordingServer
from tiny_eval import write_stage_results
from tracking_server import (  # noqa: F401
    MlflowServer,
    experiment_runs,
    free_port,
    mlflow_server,
    rest,
)

from kubetune.layout import RunLayout
from kubetune.results import (
    EvaluateResult,
    ModelScores,
    PrepareResult,
    ReportResult,
    RunIdentity,
    TrainResult,
)
from kubetune.schema import Comparison, FineTuneJob, job_manifest, parse_job
from kubetune.storage import Storage, open_storage
from kubetune_trainer import tracking
from kubetune_trainer.tracking import MlflowTracker, TrackingError

UID = "0123abcd-5678-90ef-1234-567890abcdef"
IDENTITY = RunIdentity(job_uid=UID, spec_hash="f" * 16, run_id="g1")
TOKEN = "tok-3c7e1b9a5d"  # a credential that must never appear in a message
FAST = {"attempts": 3, "backoff": 0.05, "timeout": 5.0}


# --------------------------------------------------------------------------- helpers


def make_job(tracking_uri: str, experiment: str, secret: str | None = None) -> FineTuneJob:
    manifest = job_manifest(
        "tldr-chat",
        namespace="ml",
        model={"name": "gpt2"},
        dataset={"source": "s3://corpora/tldr/pages/"},
        training={"maxSteps": 40, "learningRate": 3e-3},
        storage={"output": "s3://runs/tldr-chat/"},
    )
    mlflow: dict[str, Any] = {"trackingUri": tracking_uri, "experiment": experiment}
    if secret:
        mlflow["credentialsSecret"] = secret
    manifest["spec"]["tracking"] = {"mlflow": mlflow}
    manifest["metadata"]["uid"] = UID
    return parse_job(manifest)


def history(server: MlflowServer, run_id: str, key: str) -> list[tuple[int, float]]:
    points = rest(server, "metrics/get-history", run_id=run_id, metric_key=key, max_results=25000)
    return sorted((int(m["step"]), float(m["value"])) for m in points.get("metrics", []))


def by_key(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {i["key"]: i["value"] for i in items}


def write_outputs(root: Path) -> Storage:
    """Every file the four stages leave under a run's output, as they write them."""
    store = open_storage(f"file://{root}")
    write_stage_results(store, n_train=900, n_test=100, train_tokens=20000, test_tokens=2500)
    rows = []
    for step in range(1, 41):
        row: dict[str, Any] = {
            "step": step,
            "epoch": step / 40,
            "loss": 6.0 - step * 0.1,
            "lr": 3e-3,
            "tokens_per_second": 5000.0 + step,
            "elapsed": step * 0.1,
        }
        if step % 10 == 0:
            row["validation_loss"] = 5.0 - step * 0.05
        rows.append(row)
    store.write_text(RunLayout.TRAIN_METRICS, "".join(json.dumps(r) + "\n" for r in rows))
    evaluate = EvaluateResult(
        fine_tuned=ModelScores(perplexity=12.5, bleu=21.25, chrf=40.5, exact_match=12.0),
        baseline=ModelScores(perplexity=48.0, bleu=5.5, chrf=20.0, exact_match=0.0),
        comparisons=[Comparison(name="ollama llama", bleu=30.0)],
        bleu_signature="nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
        kind="chat",
        test_lines=100,
        train_test_overlap=0,
        seconds=3.0,
    )
    store.write_text(RunLayout.EVAL_RESULT, evaluate.to_json())
    store.write_text(RunLayout.REPORT_MD, "# Fine-tune report: tldr-chat\n")
    store.write_text(RunLayout.REPORT_HTML, "<html><body>report</body></html>")
    store.write_bytes(RunLayout.LOSS_PNG, b"\x89PNG\r\n\x1a\nnot really a png")
    report = ReportResult(
        markdown_uri=store.uri(RunLayout.REPORT_MD),
        html_uri=store.uri(RunLayout.REPORT_HTML),
        loss_curve_uri=store.uri(RunLayout.LOSS_PNG),
    )
    store.write_text(RunLayout.REPORT_RESULT, report.to_json())
    return store


def results(store: Storage) -> dict[str, Any]:
    return {
        "prepare": PrepareResult.model_validate_json(store.read_text(RunLayout.PREPARE_RESULT)),
        "train": TrainResult.model_validate_json(store.read_text(RunLayout.TRAIN_RESULT)),
        "evaluate": EvaluateResult.model_validate_json(store.read_text(RunLayout.EVAL_RESULT)),
        "report": ReportResult.model_validate_json(store.read_text(RunLayout.REPORT_RESULT)),
    }


def new_experiment() -> str:
    return f"kubetune-test-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- a real server


def test_the_stages_of_a_run_land_in_one_mlflow_run(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    experiment = new_experiment()
    job = make_job(mlflow_server.url, experiment)
    store = write_outputs(tmp_path / "out")
    res = results(store)

    # Each call builds its own client, as each stage's pod does.
    statuses = [
        tracking.track_prepare(job, res["prepare"], store, IDENTITY),
        tracking.track_train(job, res["train"], store, IDENTITY),
        tracking.track_evaluate(job, res["evaluate"], store, IDENTITY),
        tracking.track_stage(job, "report", res["report"], store, IDENTITY),
    ]
    assert all(s is not None and s.error is None for s in statuses), statuses
    run_ids = {s.run_id for s in statuses if s is not None}
    assert len(run_ids) == 1
    (run_id,) = run_ids
    assert run_id is not None
    runs = experiment_runs(mlflow_server, experiment)
    assert [r["info"]["run_id"] for r in runs] == [run_id]
    info, data = runs[0]["info"], runs[0]["data"]
    eid = info["experiment_id"]
    assert statuses[0] is not None
    assert statuses[0].url == f"{mlflow_server.url}/#/experiments/{eid}/runs/{run_id}"
    assert info["run_name"] == "tldr-chat g1"
    assert info["status"] == "FINISHED"

    tags = by_key(data["tags"])
    assert tags["kubetune.job"] == "tldr-chat"
    assert tags["kubetune.namespace"] == "ml"
    assert tags["kubetune.run"] == "0123abcd-g1"
    assert tags["kubetune.stage"] == "report"
    assert tags["kubetune.stages"] == "prepare,train,evaluate,report"
    assert tags["kubetune.bleuSignature"].startswith("nrefs:1")

    params = by_key(data["params"])
    assert params["dataset.source"] == "s3://corpora/tldr/pages/"  # prepare: the dataset spec
    assert params["dataset.tokenizer"] == "trained byte-level BPE"
    assert params["model.name"] == "gpt2"
    assert params["learningRate"] == "0.003"  # train: TrainResult.config, flattened
    assert params["lora.r"] == "8"
    assert params["evaluation.baseline"] == "True"  # evaluate: the evaluation spec
    assert params["evaluation.bleu.maxSamples"] == "500"

    metrics = {m["key"]: m["value"] for m in data["metrics"]}
    assert metrics["dataset.trainLines"] == 900  # prepare: the statistics
    assert metrics["dataset.testTokens"] == 2500
    assert metrics["test_perplexity"] == 12.5  # evaluate: the model and its baseline
    assert metrics["baseline_test_perplexity"] == 48.0
    assert metrics["test_bleu"] == 21.25
    assert metrics["baseline_test_bleu"] == 5.5
    assert metrics["test_chrf"] == 40.5
    assert metrics["test_exact_match"] == 12.0
    assert metrics["compare.ollama llama.test_bleu"] == 30.0
    assert metrics["train_tokens"] == 10000  # train: the totals

    # train: one point per step of train/metrics.jsonl
    assert history(mlflow_server, run_id, "train_loss") == [
        (s, pytest.approx(6.0 - s * 0.1)) for s in range(1, 41)
    ]
    assert [s for s, _ in history(mlflow_server, run_id, "learning_rate")] == list(range(1, 41))
    assert history(mlflow_server, run_id, "validation_loss") == [
        (s, pytest.approx(5.0 - s * 0.05)) for s in (10, 20, 30, 40)
    ]

    # Artifacts: listed by the server and on its artifact store's disk, byte for byte.
    listed = rest(mlflow_server, "artifacts/list", run_id=run_id, path="report")
    assert {f["path"] for f in listed["files"]} == {
        "report/report.md",
        "report/report.html",
        "report/loss.png",
    }
    on_disk = mlflow_server.artifacts / eid / run_id / "artifacts"
    for key in (
        RunLayout.PREPARE_RESULT,  # the dataset card
        RunLayout.TRAIN_RESULT,
        RunLayout.TRAIN_METRICS,
        RunLayout.EVAL_RESULT,
        RunLayout.REPORT_MD,
        RunLayout.REPORT_HTML,
        RunLayout.LOSS_PNG,
    ):
        assert (on_disk / key).read_bytes() == store.read_bytes(key), key


def test_tracking_again_is_idempotent(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    experiment = new_experiment()
    job = make_job(mlflow_server.url, experiment)
    store = write_outputs(tmp_path / "out")
    res = results(store)

    assert job.spec.tracking is not None and job.spec.tracking.mlflow is not None
    spec = job.spec.tracking.mlflow
    tags = tracking.run_tags(job, IDENTITY)
    tracker = MlflowTracker.from_spec(spec, {})
    first = tracker.ensure_run("tldr-chat g1", tags)
    assert MlflowTracker.from_spec(spec, {}).ensure_run("tldr-chat g1", tags) == first

    # A train pod retried after its tracking succeeded: no step logged twice, same params.
    for _ in range(2):
        status = tracking.track_train(job, res["train"], store, IDENTITY)
        assert status is not None and status.error is None and status.run_id == first
    assert [s for s, _ in history(mlflow_server, first, "train_loss")] == list(range(1, 41))
    assert len(experiment_runs(mlflow_server, experiment)) == 1

    # Params are immutable: the same value again is fine, another value is skipped with a
    # warning (the other params of the call are still logged), long values are truncated.
    with caplog.at_level(logging.WARNING, logger="kubetune.tracking"):
        skipped = tracker.log_params(
            {"learningRate": 0.003, "lora": {"r": 64, "alpha": 16}, "long": "x" * 7000}
        )
    assert skipped == ["lora.r"]
    assert "lora.r" in caplog.text
    params = by_key(rest(mlflow_server, "runs/get", run_id=first)["run"]["data"]["params"])
    assert params["lora.r"] == "8"
    assert len(params["long"]) == 6000 and params["long"].startswith("xxx")

    # More metrics than one batch takes (1000).
    now = int(time.time() * 1000)
    logged = tracker.log_metrics(
        [("bulk", float(i), i, now) for i in range(2500)] + [("bulk", float("nan"), 9999, now)]
    )
    assert logged == 2500
    assert [s for s, _ in history(mlflow_server, first, "bulk")] == list(range(2500))


def test_a_run_without_an_operator_identity_gets_a_local_run(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    experiment = new_experiment()
    job = make_job(mlflow_server.url, experiment)
    job.metadata.uid = None
    store = write_outputs(tmp_path / "out")
    res = results(store)

    first = tracking.track_prepare(job, res["prepare"], store)
    second = tracking.track_evaluate(job, res["evaluate"], store)
    assert first is not None and second is not None and first.error is None
    assert first.run_id == second.run_id
    (run,) = experiment_runs(mlflow_server, experiment)
    assert run["info"]["run_name"] == "tldr-chat local"
    assert by_key(run["data"]["tags"])["kubetune.run"].startswith("local-")
    assert run["info"]["status"] == "RUNNING"

    # A stage that failed for good marks the run FAILED, with the message as a tag.
    failed = tracking.track_failure(job, "train", "training loss became nan at step 3", store)
    assert failed is not None and failed.error is None and failed.run_id == first.run_id
    (run,) = experiment_runs(mlflow_server, experiment)
    assert run["info"]["status"] == "FAILED"
    assert by_key(run["data"]["tags"])["kubetune.error"] == (
        "train: training loss became nan at step 3"
    )
    assert tracking.track_failure(job, "nonsense", "x", store) is not None  # never raises


# --------------------------------------------------------------------------- failures


def test_a_server_that_is_down_gives_an_error_quickly_and_never_raises(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    job = make_job(uri, "kubetune")
    store = write_outputs(tmp_path / "out")
    res = results(store)
    started = time.monotonic()
    status = tracking.track_prepare(job, res["prepare"], store, IDENTITY)
    elapsed = time.monotonic() - started
    assert status is not None and status.run_id is None
    assert status.error is not None
    assert uri in status.error and "cannot connect" in status.error
    assert "after 3 attempts" in status.error and "trackingUri" in status.error
    assert elapsed < 10, elapsed


def test_the_token_is_sent_and_never_shown(tmp_path: Path) -> None:
    store = write_outputs(tmp_path / "out")
    res = results(store)
    # A server that refuses the token and (carelessly) repeats it in its message.
    answer = {"error_code": "PERMISSION_DENIED", "message": f"bad token {TOKEN}"}
    with RecordingServer(status=403, body=answer) as server:
        job = make_job(server.url, "kubetune", secret="mlflow-credentials")
        status = tracking.track_prepare(
            job, res["prepare"], store, IDENTITY, environ={"MLFLOW_TRACKING_TOKEN": TOKEN}
        )
    assert server.authorizations() == [f"Bearer {TOKEN}"]  # one request: 403 is not retried
    assert status is not None and status.error is not None
    assert TOKEN not in status.error
    assert server.url in status.error
    assert "Secret mlflow-credentials" in status.error and "MLFLOW_TRACKING_TOKEN" in status.error


def test_basic_auth_from_username_and_password(tmp_path: Path) -> None:
    store = write_outputs(tmp_path / "out")
    with RecordingServer(status=401) as server:
        job = make_job(server.url, "kubetune")
        environ = {"MLFLOW_TRACKING_USERNAME": "kt", "MLFLOW_TRACKING_PASSWORD": TOKEN}
        status = tracking.track_stage(
            job, "prepare", results(store)["prepare"], store, IDENTITY, environ=environ
        )
    expected = "Basic " + base64.b64encode(f"kt:{TOKEN}".encode()).decode()
    assert server.authorizations() == [expected]
    assert status is not None and status.error is not None and TOKEN not in status.error


def test_5xx_answers_are_retried_a_bounded_number_of_times(tmp_path: Path) -> None:
    store = write_outputs(tmp_path / "out")
    with RecordingServer(status=503, body={"error_code": "TEMPORARILY_UNAVAILABLE"}) as server:
        job = make_job(server.url, "kubetune")
        status = tracking.track_prepare(
            job, results(store)["prepare"], store, IDENTITY, environ={}, **FAST
        )
    assert len(server.requests) == 3
    assert server.authorizations() == ["", "", ""]  # no credentials: no header
    assert status is not None and status.error is not None
    assert "HTTP 503" in status.error and "after 3 attempts" in status.error


def test_no_tracking_spec_means_no_tracking(tmp_path: Path) -> None:
    store = write_outputs(tmp_path / "out")
    job = make_job("http://127.0.0.1:1", "kubetune")
    job.spec.tracking = None
    assert tracking.track_prepare(job, results(store)["prepare"], store, IDENTITY) is None


def test_artifact_urls_follow_the_proxied_artifact_store() -> None:
    tracker = MlflowTracker("http://user:pw@mlflow.example:5000/mlflow/")
    assert tracker.display_uri == "http://mlflow.example:5000/mlflow"
    assert tracker.username == "user" and tracker.password == "pw"
    tracker.run_id, tracker.experiment_id = "abc", "7"
    tracker.artifact_uri = "mlflow-artifacts:/7/abc/artifacts"
    assert tracker._artifact_url("report/report.md") == (
        "http://mlflow.example:5000/mlflow/api/2.0/mlflow-artifacts/artifacts/7/abc/artifacts/"
        "report/report.md"
    )
    assert tracker.run_url() == "http://mlflow.example:5000/mlflow/#/experiments/7/runs/abc"
    tracker.artifact_uri = "s3://bucket/mlruns/7/abc/artifacts"
    with pytest.raises(TrackingError, match="--serve-artifacts"):
        tracker._artifact_url("report/report.md")
