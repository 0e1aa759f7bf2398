"""The trainer's Prometheus endpoint and progress files.

Run: ``python -m pytest tests/unit/test_exporter.py -q`` (no torch work, < 2 s).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.contract import METRICS_PORT
from kubetune.layout import RunLayout
from kubetune.schema import Progress
from kubetune.storage import open_storage
from kubetune_trainer.exporter import (
    METRIC_NAMES,
    ProgressWriter,
    TrainMetrics,
    final_scrape_limit,
    metrics_port,
)

GPU_ONLY = {"kubetune_gpu_memory_used_bytes", "kubetune_gpu_utilization_ratio"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            families.setdefault(sample.name, []).append((family.type, sample.labels, sample.value))
    return families


def test_endpoint_serves_every_contract_metric_with_job_labels() -> None:
    metrics = TrainMetrics("tldr-gpt2", "ml")
    port = metrics.serve(port=_free_port(), addr="127.0.0.1")
    assert port is not None
    try:
        metrics.update(
            step=10,
            total_steps=100,
            epoch=0.25,
            loss=3.5,
            learning_rate=5e-5,
            tokens_per_second=1234.5,
            eta_seconds=90.0,
            new_tokens=4096,
        )
        metrics.update(
            step=20,
            total_steps=100,
            epoch=0.5,
            loss=3.0,
            learning_rate=4e-5,
            tokens_per_second=1300.0,
            eta_seconds=80.0,
            new_tokens=4096,
        )
        metrics.count_nonfinite()
        metrics.update_validation(3.4, best=3.3)  # training.validation
        samples = _scrape(port)
    finally:
        metrics.close(final_scrape_limit_s=0)
    for name in set(METRIC_NAMES) - GPU_ONLY:
        assert name in samples, f"{name} missing from /metrics"
        for _, labels, _ in samples[name]:
            assert labels["finetunejob"] == "tldr-gpt2"
            assert labels["namespace"] == "ml"
    value = {name: rows[0][2] for name, rows in samples.items()}
    assert value["kubetune_train_step"] == 20
    assert value["kubetune_train_loss"] == 3.0
    assert value["kubetune_train_tokens_total"] == 8192
    assert value["kubetune_train_nonfinite_loss_total"] == 1
    assert value["kubetune_train_validation_loss"] == 3.4
    assert value["kubetune_train_best_validation_loss"] == 3.3
    assert samples["kubetune_train_tokens_total"][0][0] == "counter"
    assert samples["kubetune_train_eta_seconds"][0][0] == "gauge"


def test_namespace_label_defaults_to_local() -> None:
    metrics = TrainMetrics("job", None)
    port = metrics.serve(port=_free_port(), addr="127.0.0.1")
    assert port is not None
    try:
        samples = _scrape(port)
    finally:
        metrics.close(final_scrape_limit_s=0)
    assert samples["kubetune_train_step"][0][1]["namespace"] == "local"


def test_port_taken_is_logged_and_training_continues(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        metrics = TrainMetrics("job", None)
        with caplog.at_level(logging.WARNING):
            assert metrics.serve(port=port, addr="127.0.0.1") is None
        metrics.update(
            step=1,
            total_steps=2,
            epoch=0.1,
            loss=1.0,
            learning_rate=1e-3,
            tokens_per_second=None,
            eta_seconds=None,
            new_tokens=1,
        )
        metrics.close()
    assert f"port {port} unavailable" in caplog.text


def _closing(metrics: TrainMetrics, limit: float) -> threading.Thread:
    closer = threading.Thread(target=metrics.close, kwargs={"final_scrape_limit_s": limit})
    closer.start()
    return closer


def _update_step(metrics: TrainMetrics, step: int) -> None:
    metrics.update(
        step=step,
        total_steps=40,
        epoch=1.0,
        loss=2.0,
        learning_rate=1e-3,
        tokens_per_second=None,
        eta_seconds=None,
        new_tokens=1,
    )


def test_close_waits_for_a_scrape_of_the_final_values_when_prometheus_is_scraping() -> None:
    metrics = TrainMetrics("job", None)
    port = metrics.serve(port=_free_port(), addr="127.0.0.1")
    assert port is not None
    _scrape(port)
    _scrape(port)  # a scraper every ~few ms: the wait is bounded by 1.5 of that interval...
    metrics.scrapes.times[0] -= 60.0  # ...so make the observed interval a minute
    _update_step(metrics, 40)  # the run's last step, after the last scrape
    closer = _closing(metrics, limit=120.0)
    closer.join(0.5)
    assert closer.is_alive(), "close() returned before anything scraped the final values"
    final = _scrape(port)
    closer.join(10)
    assert not closer.is_alive(), "close() still waiting after the final scrape"
    assert final["kubetune_train_step"][0][2] == 40


def test_close_does_not_wait_when_nothing_scrapes(caplog: pytest.LogCaptureFixture) -> None:
    metrics = TrainMetrics("job", None)
    assert metrics.serve(port=_free_port(), addr="127.0.0.1") is not None
    _update_step(metrics, 40)
    with caplog.at_level(logging.INFO):
        closer = _closing(metrics, limit=120.0)
        closer.join(10)
    assert not closer.is_alive(), "close() waited although nobody was scraping"
    assert "waiting up to" not in caplog.text


def test_close_gives_up_on_the_final_scrape_after_the_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = TrainMetrics("job", None)
    port = metrics.serve(port=_free_port(), addr="127.0.0.1")
    assert port is not None
    _scrape(port)  # one scrape (say, a person with curl), then nothing
    with caplog.at_level(logging.INFO):
        started = time.monotonic()
        metrics.close(final_scrape_limit_s=0.3)
    assert time.monotonic() - started >= 0.3
    assert "no scrape came within" in caplog.text
    with pytest.raises(OSError):  # and the endpoint is gone
        _scrape(port)


def test_final_scrape_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS"
    monkeypatch.delenv(name, raising=False)
    assert final_scrape_limit() == 30.0
    monkeypatch.setenv(name, "0")
    assert final_scrape_limit() == 0.0
    monkeypatch.setenv(name, "2.5")
    assert final_scrape_limit() == 2.5
    monkeypatch.setenv(name, "soon")
    assert final_scrape_limit() == 30.0


def test_metrics_port_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_METRICS_PORT", raising=False)
    assert metrics_port() == METRICS_PORT  # the contract's port, which the train pod declares
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")
    assert metrics_port() == 0
    assert TrainMetrics("job", None).serve() is None  # 0 disables the endpoint
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "9555")
    assert metrics_port() == 9555
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "nope")
    assert metrics_port() == 0


def _progress(step: int) -> Progress:
    return Progress(
        step=step,
        total_steps=100,
        percent=step,
        epoch=step / 100,
        loss=2.0,
        tokens_per_second=10.0,
        eta_seconds=5.0,
        updated_at="2024-01-01T00:00:00Z",
    )


def test_progress_is_written_camelcase_and_throttled(tmp_path: Path) -> None:
    store = open_storage(f"file://{tmp_path}")
    writer = ProgressWriter(store, interval_s=3600)
    writer.log({"step": 10, "loss": 2.0}, _progress(10))  # first write goes out at once
    writer.log({"step": 20, "loss": 1.5}, _progress(20))  # within the interval: held back
    progress = json.loads(store.read_text(RunLayout.PROGRESS))
    assert progress["step"] == 10
    assert {"totalSteps", "percent", "tokensPerSecond", "etaSeconds", "updatedAt"} <= set(progress)
    assert len(store.read_text(RunLayout.TRAIN_METRICS).splitlines()) == 1
    writer.flush()
    assert json.loads(store.read_text(RunLayout.PROGRESS))["step"] == 20
    lines = store.read_text(RunLayout.TRAIN_METRICS).splitlines()
    assert [json.loads(x)["step"] for x in lines] == [10, 20]


def test_resumed_progress_keeps_earlier_metrics_up_to_the_checkpoint(tmp_path: Path) -> None:
    store = open_storage(f"file://{tmp_path}")
    store.write_text(
        RunLayout.TRAIN_METRICS,
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 10, 15)),
    )
    writer = ProgressWriter(store, interval_s=0)
    writer.resume(up_to_step=10)
    writer.log({"step": 15, "loss": 0.5}, _progress(15))
    lines = [json.loads(x) for x in store.read_text(RunLayout.TRAIN_METRICS).splitlines()]
    assert [(x["step"], x["loss"]) for x in lines] == [(5, 1.0), (10, 1.0), (15, 0.5)]


def test_every_series_names_the_training_process_that_serves_it() -> None:
    from prometheus_client import generate_latest

    metrics = TrainMetrics("tldr", "ml", rank=1)  # the second pod of a two-worker job
    metrics.step.labels(**metrics.labels).set(3)
    text = generate_latest(metrics.registry).decode()
    assert 'kubetune_train_step{finetunejob="tldr",namespace="ml",rank="1"} 3.0' in text
    assert TrainMetrics("tldr", "ml").labels["rank"] == "0"  # one process: rank 0
