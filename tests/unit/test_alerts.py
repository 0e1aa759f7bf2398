"""The chart's alerts (charts/kubetune/files/alerts.yaml): promtool accepts them, their unit tests
(tests/unit/promtool/alerts_test.yaml) pass, and they read only metrics the exporters expose."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from observability_contract import ALERTS, CONTRACT, alert_rules, exposed_metric_names, metric_names

PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool/alerts_test.yaml"


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: run `bash scripts/install-system-deps.sh`", pytrace=False)
    return subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, check=False, timeout=60
    )


def test_promtool_check_rules_accepts_the_alerts() -> None:
    result = _promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    """Failed runs, stalled training (and the jobs that must NOT fire), NaN losses, errors."""
    result = _promtool("test", "rules", str(PROMTOOL_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested() -> None:
    tested = PROMTOOL_TESTS.read_text()
    for rule in alert_rules():
        assert f"alertname: {rule['alert']}" in tested, f"{rule['alert']} has no promtool test"


def test_the_required_alerts_exist_with_severity_and_help() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert {
        "KubetuneFineTuneJobFailed",
        "KubetuneTrainingStalled",
        "KubetuneTrainingLossNonFinite",
    } <= set(rules)
    assert (
        "kubetune_train_nonfinite_loss_total[5m]" in rules["KubetuneTrainingLossNonFinite"]["expr"]
    )
    stalled = rules["KubetuneTrainingStalled"]["expr"]
    assert "kubetune_train_step" in stalled and "kubetune_train_total_steps" in stalled
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_alerts_read_only_metrics_the_exporters_expose() -> None:
    exposed = exposed_metric_names()
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= CONTRACT, f"{rule['alert']}: {sorted(names - CONTRACT)} not in the contract"
        assert names <= exposed, f"{rule['alert']}: {sorted(names - exposed)} not exposed"


def test_the_failed_run_alert_selects_the_outcome_label_the_operator_emits() -> None:
    from kubetune_operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    # The failed series exists at 0 before any failure, so increase() sees the first one.
    fresh = {
        s.labels["outcome"]: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "kubetune_operator_runs_total"
    }
    assert fresh == {"succeeded": 0.0, "failed": 0.0}
    metrics.observe(
        "ml", "tldr", {"phase": "Training", "run": "g1"}, {"phase": "Failed", "run": "g1"}
    )
    samples = [
        s
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "kubetune_operator_runs_total"
    ]
    values = {s.labels["outcome"]: s.value for s in samples}
    assert values == {"succeeded": 0.0, "failed": 1.0}
    expr = next(r["expr"] for r in alert_rules() if r["alert"] == "KubetuneFineTuneJobFailed")
    assert 'kubetune_operator_runs_total{outcome="failed"}' in expr


def test_the_exporters_output_passes_promtool_check_metrics() -> None:
    """Both exporters, with every series populated, pass promtool's metric lint."""
    from prometheus_client import generate_latest

    from kubetune_operator.metrics import OperatorMetrics
    from kubetune_trainer.exporter import TrainMetrics

    train = TrainMetrics(job="tldr", namespace="ml")
    # Set the series directly: update() also polls GPUs, which imports torch (slow, no GPU here).
    for gauge, value in (
        (train.step, 3),
        (train.total_steps, 10),
        (train.epoch, 0.3),
        (train.loss, 2.5),
        (train.learning_rate, 1e-4),
        (train.tokens_per_second, 900.0),
        (train.eta, 12.0),
    ):
        gauge.labels(**train.labels).set(value)
    train.tokens.labels(**train.labels).inc(4096)
    train.count_nonfinite()
    gpu = {**train.labels, "gpu": "0"}
    train.gpu_memory.labels(**gpu).set(2.0e9)
    train.gpu_utilization.labels(**gpu).set(0.75)
    operator = OperatorMetrics()
    operator.reconcile_error("ApiError")
    operator.observe(
        "ml",
        "tldr",
        {"run": "g1", "phase": "Evaluating"},
        {
            "run": "g1",
            "phase": "Succeeded",
            "results": {
                "perplexity": 12.0,
                "baselinePerplexity": 40.0,
                "bleu": 9.5,
                "baselineBleu": 2.0,
            },
        },
    )
    for registry in (train.registry, operator.registry):
        text = generate_latest(registry).decode()
        result = _promtool("check", "metrics", stdin=text)
        assert result.returncode == 0, result.stdout + result.stderr
