"""The Argo CD health check (charts/kubetune/files/argocd-health.lua) in a real Lua 5.1.

Argo CD runs health checks in gopher-lua (Lua 5.1) with the live object as the global ``obj``.
These tests do the same with Debian's ``lua5.1`` (``scripts/install-system-deps.sh``): each
FineTuneJob below is turned into a Lua table literal, the script runs, and its ``hs.status``
and ``hs.message`` come back on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from argocd_health import HEALTH_LUA, health

ROOT = Path(__file__).resolve().parents[2]
GITOPS_DOC = ROOT / "docs/gitops.md"


def _cond(
    kind: str, status: str, reason: str = "Reason", message: str = "", gen: int = 2
) -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": gen,
    }


def _job(status: dict[str, Any] | None, generation: int = 2) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tldr", "namespace": "ml", "generation": generation},
        "spec": {"model": {"name": "gpt2"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def test_a_new_job_without_status_is_progressing() -> None:
    assert health(_job(None))[0] == "Progressing"


def test_a_succeeded_job_with_ready_true_is_healthy() -> None:
    status, message = health(
        _job(
            {
                "phase": "Succeeded",
                "observedGeneration": 2,
                "conditions": [
                    _cond("Ready", "True", "Succeeded", "perplexity 12.1 (baseline 40.3)"),
                    _cond("Stalled", "False"),
                    _cond("Reconciling", "False"),
                ],
            }
        )
    )
    assert status == "Healthy"
    assert message == "Succeeded: perplexity 12.1 (baseline 40.3)"


def test_a_failed_job_is_degraded_with_the_stalled_reason() -> None:
    status, message = health(
        _job(
            {
                "phase": "Failed",
                "observedGeneration": 2,
                "conditions": [
                    _cond("Ready", "False", "DatasetUnusable"),
                    _cond("Stalled", "True", "DatasetUnusable", "no lines left after cleaning"),
                ],
            }
        )
    )
    assert (status, message) == ("Degraded", "DatasetUnusable: no lines left after cleaning")


def test_stalled_true_is_degraded_even_before_the_phase_says_failed() -> None:
    status, message = health(
        _job(
            {
                "phase": "Training",
                "observedGeneration": 2,
                "conditions": [_cond("Stalled", "True", "OOMKilled", "train pod was OOMKilled")],
            }
        )
    )
    assert (status, message) == ("Degraded", "OOMKilled: train pod was OOMKilled")


def test_a_suspended_job_is_suspended() -> None:
    status, _ = health(
        _job(
            {
                "phase": "Suspended",
                "observedGeneration": 2,
                "conditions": [_cond("Ready", "False", "Suspended"), _cond("Stalled", "False")],
            }
        )
    )
    assert status == "Suspended"


def test_a_training_job_is_progressing_with_its_step() -> None:
    status, message = health(
        _job(
            {
                "phase": "Training",
                "observedGeneration": 2,
                "progress": {"step": 40, "totalSteps": 100, "percent": 40},
                "conditions": [
                    _cond("Ready", "False"),
                    _cond("Reconciling", "True", "StageRunning"),
                ],
            }
        )
    )
    assert (status, message) == ("Progressing", "Training: step 40/100")


def test_a_preparing_job_is_progressing_with_the_reconciling_message() -> None:
    status, message = health(
        _job(
            {
                "phase": "Preparing",
                "observedGeneration": 2,
                "conditions": [_cond("Reconciling", "True", "StageRunning", "prepare Job running")],
            }
        )
    )
    assert (status, message) == ("Progressing", "Preparing: prepare Job running")


def test_a_spec_edit_not_yet_observed_is_progressing_not_the_old_health() -> None:
    # Generation 3 was just applied; the status still describes generation 2's success.
    old_success = {
        "phase": "Succeeded",
        "observedGeneration": 2,
        "conditions": [_cond("Ready", "True", "Succeeded", gen=2)],
    }
    status, message = health(_job(old_success, generation=3))
    assert status == "Progressing"
    assert "generation 3" in message
    old_failure = {
        "phase": "Failed",
        "observedGeneration": 2,
        "conditions": [_cond("Stalled", "True", "InvalidSpec", gen=2)],
    }
    assert health(_job(old_failure, generation=3))[0] == "Progressing"


def test_a_stale_ready_condition_does_not_make_a_new_run_healthy() -> None:
    # The status was observed at generation 3, but Ready still carries generation 2.
    status, _ = health(
        _job(
            {
                "phase": "Preparing",
                "observedGeneration": 3,
                "conditions": [_cond("Ready", "True", "Succeeded", gen=2)],
            },
            generation=3,
        )
    )
    assert status == "Progressing"


def test_gitops_doc_embeds_the_same_lua_as_the_chart() -> None:
    doc = GITOPS_DOC.read_text()
    assert "resource.customizations.health.kubetune.io_FineTuneJob" in doc
    script_lines = [line for line in HEALTH_LUA.read_text().splitlines() if line.strip()]
    missing = [line for line in script_lines if line not in doc]
    assert not missing, f"docs/gitops.md lacks lines of {HEALTH_LUA.name}: {missing[:3]}"


def test_gitops_examples_point_at_a_directory_of_valid_finetunejobs() -> None:
    import yaml

    from kubetune.schema import KIND, parse_job

    gitops = ROOT / "examples/gitops"
    apps = list(yaml.safe_load_all((gitops / "argocd-application.yaml").read_text()))
    paths = {app["metadata"]["name"]: app["spec"]["source"]["path"] for app in apps}
    assert paths["kubetune-operator"] == "charts/kubetune"
    flux = {d["kind"]: d for d in yaml.safe_load_all((gitops / "flux.yaml").read_text())}
    assert (
        flux["Kustomization"]["spec"]["sourceRef"]["name"]
        == flux["GitRepository"]["metadata"]["name"]
    )
    assert flux["Kustomization"]["spec"]["path"].removeprefix("./") == paths["kubetune-jobs"]
    jobs_dir = ROOT / paths["kubetune-jobs"]
    kustomization = yaml.safe_load((jobs_dir / "kustomization.yaml").read_text())
    assert kustomization["resources"]
    for resource in kustomization["resources"]:
        doc = yaml.safe_load((jobs_dir / resource).read_text())
        assert doc["kind"] == KIND
        parse_job(doc, source=resource)  # raises ManifestError listing every problem


def _succeeded_with(promoted: dict[str, Any]) -> dict[str, Any]:
    return _job(
        {
            "phase": "Succeeded",
            "observedGeneration": 2,
            "conditions": [
                _cond("Ready", "True", "Succeeded", "perplexity 12.1 (baseline 40.3)"),
                _cond("Stalled", "False"),
                promoted,
            ],
        }
    )


def test_a_model_not_better_than_the_champion_is_healthy_and_says_not_promoted() -> None:
    status, message = health(
        _succeeded_with(
            _cond("Promoted", "False", "NotBetter", "not promoted: perplexity 14 vs 12 of champion")
        )
    )
    assert status == "Healthy"
    assert message == (
        "Succeeded: perplexity 12.1 (baseline 40.3); "
        "NotBetter: not promoted: perplexity 14 vs 12 of champion"
    )
    promoted = _succeeded_with(_cond("Promoted", "True", "Promoted", "v0002"))
    assert health(promoted) == ("Healthy", "Succeeded: perplexity 12.1 (baseline 40.3)")


def test_a_promotion_that_failed_is_degraded_although_the_run_succeeded() -> None:
    status, message = health(
        _succeeded_with(_cond("Promoted", "False", "PromotionFailed", "s3://serve: access denied"))
    )
    assert (status, message) == ("Degraded", "PromotionFailed: s3://serve: access denied")
