"""The operator's Prometheus metrics (names are a contract with the chart's dashboards).

    metrics = OperatorMetrics()            # its own registry; metrics.serve(8080) exposes it
    metrics.observe(ns, name, old_status, new_status)   # after each status change

* ``kubetune_operator_finetunejobs{phase}``: FineTuneJobs by phase;
* ``kubetune_operator_stage_duration_seconds{stage,outcome}``: stage Job durations;
* ``kubetune_operator_reconcile_errors_total{reason}``;
* ``kubetune_operator_runs_total{outcome}``: finished runs;
* ``kubetune_operator_api_requests_total{verb}``: requests the reconciler sent to the API
  server (``get``, ``list``, ``create``, ``patch``, ``delete``; kopf's watches not included);
* ``kubetune_finetunejob_perplexity{finetunejob,namespace,model}`` and
  ``kubetune_finetunejob_bleu{...}`` with ``model`` = ``fine_tuned`` or ``baseline``.

Transitions are counted when this process sees them in a status change, so a restarted
operator (whose status is already up to date) does not count a run twice.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetune.contract import JOB_STAGES
from kubetune.schema import Phase
from kubetune_operator.observe import parse_time

STAGE_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.finetunejobs = Gauge(
            "kubetune_operator_finetunejobs",
            "FineTuneJobs by phase.",
            ["phase"],
            registry=self.registry,
        )
        self.stage_duration = Histogram(
            "kubetune_operator_stage_duration_seconds",
            "Duration of stage Jobs.",
            ["stage", "outcome"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "kubetune_operator_reconcile_errors_total",
            "Failed reconcile passes.",
            ["reason"],
            registry=self.registry,
        )
        self.runs = Counter(
            "kubetune_operator_runs_total", "Finished runs.", ["outcome"], registry=self.registry
        )
        self.api_requests = Counter(
            "kubetune_operator_api_requests_total",
            "Requests the reconciler sent to the API server, by verb (kopf's watches excluded).",
            ["verb"],
            registry=self.registry,
        )
        self.perplexity = Gauge(
            "kubetune_finetunejob_perplexity",
            "Test perplexity of a FineTuneJob's models.",
            ["finetunejob", "namespace", "model"],
            registry=self.registry,
        )
        self.bleu = Gauge(
            "kubetune_finetunejob_bleu",
            "Test BLEU of a FineTuneJob's models.",
            ["finetunejob", "namespace", "model"],
            registry=self.registry,
        )
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        for phase in Phase:
            self.finetunejobs.labels(phase=phase.value).set(0)
        # Export the request and outcome series at 0 from the start: increase()/rate() cannot
        # see the first event of a series that appears already at 1, so the chart's failed-run
        # alert and stage-duration panels would miss the first failure after an operator start.
        for verb in ("get", "list", "create", "patch", "delete"):
            self.api_requests.labels(verb=verb)
        for outcome in ("succeeded", "failed"):
            self.runs.labels(outcome=outcome)
            for stage in JOB_STAGES:
                self.stage_duration.labels(stage=stage, outcome=outcome)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        if port:
            start_http_server(port, addr=addr, registry=self.registry)

    def _set_phase(self, key: tuple[str, str], phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
            counts = {p.value: 0 for p in Phase}
            for value in self._phases.values():
                counts[value] = counts.get(value, 0) + 1
        for value, count in counts.items():
            self.finetunejobs.labels(phase=value).set(count)

    def forget(self, namespace: str, name: str) -> None:
        self._set_phase((namespace, name), None)
        for gauge in (self.perplexity, self.bleu):
            for model in ("fine_tuned", "baseline"):
                with contextlib.suppress(KeyError):
                    gauge.remove(name, namespace, model)

    def api_request(self, verb: str) -> None:
        """Count one API request (``Kube(on_request=metrics.api_request)``)."""
        self.api_requests.labels(verb=verb).inc()

    def reconcile_error(self, reason: str) -> None:
        self.reconcile_errors.labels(reason=reason).inc()

    def observe(self, namespace: str, name: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Update gauges from ``new`` and count what changed since ``old``."""
        phase = new.get("phase")
        self._set_phase((namespace, name), phase)
        same_run = old.get("run") == new.get("run")
        old_stages = (old.get("stages") or {}) if same_run else {}
        for stage in JOB_STAGES:
            entry = (new.get("stages") or {}).get(stage) or {}
            state = entry.get("state")
            if (
                state in ("Succeeded", "Failed")
                and (old_stages.get(stage) or {}).get("state") != state
            ):
                start, end = (
                    parse_time(entry.get("startTime")),
                    parse_time(entry.get("completionTime")),
                )
                if start is not None and end is not None and end >= start:
                    outcome = "succeeded" if state == "Succeeded" else "failed"
                    self.stage_duration.labels(stage=stage, outcome=outcome).observe(end - start)
        old_phase = old.get("phase") if same_run else None
        # A spec that cannot be used has no run (status.run unset): no run finished.
        if phase in ("Succeeded", "Failed") and phase != old_phase and new.get("run"):
            self.runs.labels(outcome=phase.lower()).inc()
        results = new.get("results") or {}
        for gauge, ft, base in (
            (self.perplexity, "perplexity", "baselinePerplexity"),
            (self.bleu, "bleu", "baselineBleu"),
        ):
            for model, field in (("fine_tuned", ft), ("baseline", base)):
                value = results.get(field)
                if value is not None:
                    gauge.labels(finetunejob=name, namespace=namespace, model=model).set(value)
