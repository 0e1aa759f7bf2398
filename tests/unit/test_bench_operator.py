"""bench/operator_bench.py's pure helpers: Job status, stage state, request counts, sizes."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is a top-level package of the repo, not installed
    sys.path.insert(0, str(REPO))

from bench.operator_bench import (  # noqa: E402
    FIGURES,
    FULL,
    QUICK,
    counter_by_label,
    job_complete_status,
    per_object_per_minute,
    stage_state,
)

EXPOSITION = """\
# HELP kubetune_operator_api_requests_total Requests the reconciler sent.
# TYPE kubetune_operator_api_requests_total counter
kubetune_operator_api_requests_total{verb="get"} 12.0
kubetune_operator_api_requests_total{verb="list"} 40.0
kubetune_operator_api_requests_created{verb="get"} 1.7e9
# HELP kubetune_operator_runs_total Finished runs.
# TYPE kubetune_operator_runs_total counter
kubetune_operator_runs_total{outcome="succeeded"} 3.0
"""


def test_job_complete_status_is_what_the_job_controller_writes() -> None:
    status = job_complete_status(datetime(2026, 12, 2, 10, 0, 0, tzinfo=timezone.utc))
    assert status["startTime"] == status["completionTime"] == "2026-12-02T10:00:00Z"
    assert status["succeeded"] == 1
    types = [(c["type"], c["status"]) for c in status["conditions"]]
    # The API server accepts Complete only after SuccessCriteriaMet.
    assert types == [("SuccessCriteriaMet", "True"), ("Complete", "True")]


def test_stage_state_reads_the_wire_status() -> None:
    ftj = {"status": {"stages": {"prepare": {"state": "Succeeded"}}}}
    assert stage_state(ftj, "prepare") == "Succeeded"
    assert stage_state(ftj, "train") is None
    assert stage_state({"metadata": {}}, "prepare") is None


def test_counter_by_label_sums_the_counter_samples_only() -> None:
    by_verb = counter_by_label(EXPOSITION, "kubetune_operator_api_requests_total", "verb")
    assert by_verb == {"get": 12.0, "list": 40.0}
    assert counter_by_label(EXPOSITION, "kubetune_operator_missing_total", "verb") == {}


def test_per_object_per_minute_scales_the_window_to_a_minute() -> None:
    before, after = {"get": 10.0, "list": 20.0}, {"get": 110.0, "list": 420.0}
    # 500 requests from 100 objects in 30 s: 10 per object per minute.
    assert per_object_per_minute(before, after, 100, 30.0) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        per_object_per_minute(before, after, 0, 30.0)


def test_sizes_and_targets_are_the_issues() -> None:
    assert (FULL.singles, FULL.burst) == (200, 200)
    assert QUICK.singles < FULL.singles and QUICK.burst == 50
    assert QUICK.status_updates <= QUICK.singles and FULL.status_updates <= FULL.singles
    targets = {name: target for name, _, target in FIGURES}
    assert targets["apply_to_job_p50_s"] == "< 0.3"
    assert targets["apply_to_job_p99_s"] == "< 1"
    assert targets["fleet200_seconds"] == "< 60"
    assert targets["status_update_p99_s"] == "< 2"
    assert targets["operator_peak_rss_mb"] == "< 150"
    assert "api_requests_per_ftj_per_min" in targets
