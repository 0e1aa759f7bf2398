"""The Grafana dashboards (charts/kubetune/dashboards/*.json): structure, variables, and queries
that parse (promtool) and read only metrics of the contract (tests/observability_contract.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from observability_contract import (
    CONTRACT,
    DASHBOARDS,
    dashboard_queries,
    exposed_metric_names,
    grafana_to_promql,
    iter_panels,
    metric_names,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _load(name: str) -> dict[str, Any]:
    return json.loads(next(p for p in DASHBOARDS if p.name == name).read_text())


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in iter_panels(dashboard) for t in p.get("targets", [])]


def test_both_dashboards_exist_with_unique_uids() -> None:
    assert [p.name for p in DASHBOARDS] == ["fleet.json", "training.json"]
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["title"].startswith("kubetune / ")
    panels = list(iter_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        assert panel.get("description"), f"{panel['title']} has no description"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE
            assert target["expr"].strip()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_variables(path: Path) -> None:
    variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "finetunejob"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DATASOURCE
        assert var["query"]["query"].startswith("label_values("), name
        assert var["query"]["query"].rstrip().endswith(f", {name})"), name
        assert var["includeAll"] and var["allValue"] == ".*"
    # finetunejob depends on the chosen namespace.
    assert "$namespace" in variables["finetunejob"]["query"]["query"]


def test_every_query_reads_only_contract_metrics() -> None:
    for path in DASHBOARDS:
        for where, expr in dashboard_queries(path):
            names = metric_names(expr)
            assert names, f"{where}: no metric in {expr!r}"
            unknown = names - CONTRACT
            assert not unknown, f"{where}: {sorted(unknown)} are not in the metric contract"


def test_metric_name_extraction_ignores_functions_labels_and_durations() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) "
        "(rate(kubetune_operator_stage_duration_seconds_bucket"
        '{outcome="failed", stage=~"$stage"}[$__rate_interval]))) / ignoring (model) '
        "kubetune_finetunejob_bleu offset 15m and on (namespace) up"
    )
    assert metric_names(expr) == {
        "kubetune_operator_stage_duration_seconds_bucket",
        "kubetune_finetunejob_bleu",
        "up",
    }


def test_training_dashboard_covers_the_live_training_metrics() -> None:
    read = set().union(*(metric_names(e) for e in _exprs(_load("training.json"))))
    assert {
        "kubetune_train_loss",
        "kubetune_train_learning_rate",
        "kubetune_train_tokens_per_second",
        "kubetune_train_step",
        "kubetune_train_total_steps",
        "kubetune_train_eta_seconds",
        "kubetune_gpu_memory_used_bytes",
        "kubetune_gpu_utilization_ratio",
    } <= read
    # Every training panel follows the namespace and finetunejob pickers.
    for expr in _exprs(_load("training.json")):
        assert 'namespace=~"$namespace"' in expr and 'finetunejob=~"$finetunejob"' in expr, expr


def test_fleet_dashboard_covers_phases_durations_failures_and_baselines() -> None:
    exprs = _exprs(_load("fleet.json"))
    read = set().union(*(metric_names(e) for e in exprs))
    assert {
        "kubetune_operator_finetunejobs",
        "kubetune_operator_stage_duration_seconds_bucket",
        "kubetune_operator_runs_total",
        "kubetune_operator_reconcile_errors_total",
        "kubetune_finetunejob_perplexity",
        "kubetune_finetunejob_bleu",
    } <= read
    assert any(e.startswith("histogram_quantile(") for e in exprs)
    for metric in ("kubetune_finetunejob_perplexity", "kubetune_finetunejob_bleu"):
        for model in ("fine_tuned", "baseline"):
            assert any(metric in e and f'model="{model}"' in e for e in exprs), (metric, model)


def test_every_dashboard_query_parses_with_promtool(tmp_path: Path) -> None:
    """promtool parses PromQL offline: each query becomes a recording rule of a rules file."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: run `bash scripts/install-system-deps.sh`", pytrace=False)
    rules = []
    for path in DASHBOARDS:
        for i, (_, expr) in enumerate(dashboard_queries(path)):
            rules.append({"record": f"dashboard:{path.stem}:{i}", "expr": grafana_to_promql(expr)})
    rules_file = tmp_path / "dashboards.rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_the_contract_is_what_the_real_exporters_expose() -> None:
    assert exposed_metric_names() == CONTRACT


def test_dashboard_metrics_are_exposed_by_the_real_exporters() -> None:
    exposed = exposed_metric_names()
    read = {
        name
        for path in DASHBOARDS
        for _, expr in dashboard_queries(path)
        for name in metric_names(expr)
    }
    assert read - exposed == set(), "read by dashboards but exposed by no exporter"
