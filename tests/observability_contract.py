"""The Prometheus metric contract that the chart's dashboards and alerts rely on.

Used by tests/unit/test_dashboards.py, tests/unit/test_alerts.py and
tests/cluster/test_observability.py:

* ``CONTRACT``: the fixed metric names (team brief), as they appear in queries (counters with
  ``_total``, histograms with ``_bucket``/``_sum``/``_count``);
* ``metric_names(expr)``: the metric names a PromQL expression reads;
* ``grafana_to_promql(expr)``: a dashboard query with Grafana's variables replaced, so promtool
  and the Prometheus query API can parse it;
* ``exposed_metric_names()``: the sample names the real exporters register
  (``kubetune_trainer.exporter.TrainMetrics`` and ``kubetune_operator.metrics.OperatorMetrics``),
  read from their prometheus-client registries in-process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts/kubetune"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
ALERTS = CHART / "files/alerts.yaml"

TRAINER_METRICS = {
    "kubetune_train_loss",
    "kubetune_train_learning_rate",
    "kubetune_train_tokens_per_second",
    "kubetune_train_step",
    "kubetune_train_total_steps",
    "kubetune_train_epoch",
    "kubetune_train_eta_seconds",
    "kubetune_train_tokens_total",
    "kubetune_train_nonfinite_loss_total",
    "kubetune_train_validation_loss",
    "kubetune_train_best_validation_loss",
    "kubetune_gpu_memory_used_bytes",
    "kubetune_gpu_utilization_ratio",
}
OPERATOR_METRICS = {
    "kubetune_operator_finetunejobs",
    "kubetune_operator_stage_duration_seconds_bucket",
    "kubetune_operator_stage_duration_seconds_sum",
    "kubetune_operator_stage_duration_seconds_count",
    "kubetune_operator_reconcile_errors_total",
    "kubetune_operator_runs_total",
    "kubetune_operator_api_requests_total",
    "kubetune_finetunejob_perplexity",
    "kubetune_finetunejob_bleu",
}
CONTRACT = TRAINER_METRICS | OPERATOR_METRICS

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]+\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|s|m|h|d|w|y)?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<metric>[A-Za-z_:][\w:]*)")

GRAFANA_VARS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}


def metric_names(expr: str) -> set[str]:
    """Metric names read by a PromQL expression (functions, keywords and labels excluded)."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VAR.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):  # a function or an aggregation
            continue
        if match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables: intervals by durations, `$var` in regexes by `.*`."""

    def replace(match: re.Match[str]) -> str:
        name = match.group().lstrip("$").strip("{}")
        return GRAFANA_VARS.get(name, ".*")

    return _GRAFANA_VAR.sub(replace, expr)


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(where, expr) of every panel target and every variable query of a dashboard file."""
    dashboard = json.loads(path.read_text())
    out = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"{path.name} panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = _LABEL_VALUES.match(query)
            assert match, f"{path.name} variable {var['name']}: not a label_values() query"
            out.append((f"{path.name} variable {var['name']}", match.group("metric")))
    return out


def alert_rules() -> list[dict[str, Any]]:
    import yaml

    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _sample_names(family: Any) -> set[str]:
    name, kind = family.name, family.type
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "summary":
        return {f"{name}_sum", f"{name}_count", name}
    if kind == "info":
        return {f"{name}_info"}
    return {name}


def exporter_registries() -> list[Any]:
    """The registries of the real exporters, created in-process (nothing is served)."""
    from kubetune_operator.metrics import OperatorMetrics
    from kubetune_trainer.exporter import TrainMetrics

    return [TrainMetrics(job="contract", namespace="test").registry, OperatorMetrics().registry]


def exposed_metric_names() -> set[str]:
    """Sample names a scrape of the real exporters can show.

    Each registry's families are what ``/metrics`` renders (families with no labelled child
    yet included), turned into sample names: counters get ``_total``, histograms
    ``_bucket``/``_sum``/``_count``.
    """
    names: set[str] = set()
    for registry in exporter_registries():
        for family in registry.collect():
            names |= _sample_names(family)
    return {n for n in names if n.startswith("kubetune_")}
