"""Results belong to the FineTuneJob and the run that made them, on a real control plane.

* A FineTuneJob deleted and applied again with a new spec runs new Jobs and reports its
  own numbers, never the old run's (each run writes under ``runs/<uid[:8]>-g<gen>/`` and
  every result names its run).
* A second FineTuneJob on an output prefix in use, in the same namespace or another, is
  refused (``OutputInUse``, naming the other job) and never gets the first one's results,
  not even after the first one is deleted.

Same set-up as test_operator.py (its ``env`` fixture: a fresh namespace, buckets, a
credentials Secret, an operator with the RBAC of rbac.py). Run with
``pytest -m cluster tests/cluster/test_ownership.py``.
"""

from __future__ import annotations

import functools
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from operator_helpers import (
    OperatorProcess,
    apply,
    child_jobs,
    diagnose,
    get_ftj,
    kubectl,
    service_account_kubeconfig,
    tiny_job,
    upload_text,
    wait_for,
)
from test_operator import env, job_for, wait_phase  # noqa: F401 (fixtures)

from kubetune.layout import RunLayout
from kubetune.results import (
    EvaluateResult,
    ModelScores,
    PrepareResult,
    RunIdentity,
    TrainResult,
)
from kubetune.schema import DatasetStats, parse_job
from kubetune_operator import builders

pytestmark = pytest.mark.cluster


def stalled(ftj: dict[str, Any]) -> dict[str, Any]:
    conditions = (ftj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Stalled"), {})


def spec_hash_of(ftj: dict[str, Any]) -> str:
    """The spec hash the operator gives the run of ``ftj`` (what its pods stamp)."""
    return builders.spec_hash(
        parse_job({k: ftj[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    )


def plant(s3_client: Any, run_output: str, run: RunIdentity | None) -> None:
    """Result files of every stage under ``run_output``, with numbers no tiny run makes."""
    stats = DatasetStats(lines=4242, kept_lines=4242, train_lines=4200, test_lines=42)
    results = {
        RunLayout.PREPARE_RESULT: PrepareResult(
            run=run, stats=stats, train_sha256="a", test_sha256="b", tokenizer="t", dataset_uri="d"
        ),
        RunLayout.TRAIN_RESULT: TrainResult(
            run=run, steps=7, total_steps=7, epochs=1.0, model_uri="m"
        ),
        RunLayout.EVAL_RESULT: EvaluateResult(run=run, fine_tuned=ModelScores(perplexity=4242.0)),
    }
    bucket, _, prefix = run_output.removeprefix("s3://").partition("/")
    for key, result in results.items():
        upload_text(s3_client, bucket, f"{prefix.rstrip('/')}/{key}", result.to_json())


def test_a_finetunejob_deleted_and_applied_again_with_a_new_spec_runs_new_jobs_with_new_numbers(
    env: dict[str, Any],  # noqa: F811 (the fixture)
) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "again"
    apply(kc, ns, job_for(env, name, maxSteps=10, checkpointEverySteps=10))
    first = wait_phase(env, name, {"Succeeded"})
    old_jobs = {j["metadata"]["uid"] for j in child_jobs(kc, ns, name)}
    old_results, old_output = first["status"]["results"], first["status"]["output"]
    assert len(old_jobs) == 3

    # Deleted, and applied again at once with another spec (the children may still be
    # there for a moment: the garbage collector removes them in the background).
    kubectl(kc, "-n", ns, "delete", "ftj", name, "--wait=true", timeout=60)
    apply(kc, ns, job_for(env, name, maxSteps=5, checkpointEverySteps=5, learningRate=0.005))
    second = wait_phase(env, name, {"Succeeded"})
    status = second["status"]
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert status["run"] == "g1" and status["output"] != old_output
    assert status["output"].endswith(f"/runs/{second['metadata']['uid'][:8]}-g1")
    new_jobs = {j["metadata"]["uid"] for j in child_jobs(kc, ns, name)}
    assert len(new_jobs) == 3 and not new_jobs & old_jobs, "the stages ran again, as new Jobs"
    assert status["results"]["perplexity"] != old_results["perplexity"], (status, old_results)
    assert status["progress"]["step"] == 5  # the new spec's maxSteps, not the old 10


def test_a_second_finetunejob_on_an_output_in_use_is_refused_and_never_gets_its_results(
    cluster_wide_env: dict[str, Any], tmp_path: Path
) -> None:
    # Another namespace's jobs are in view only with cluster-wide reads (a namespaced
    # install checks its own namespaces; see docs/security-rbac.md).
    env = cluster_wide_env  # noqa: F811 (the module imports the fixture of that name)
    kc, ns, bucket = env["kubeconfig"], env["ns"], env["out_bucket"]
    # The first job holds s3://<bucket>/first/ (suspended: it needs no CPU to hold it).
    first = job_for(env, "first")
    first["spec"]["suspend"] = True
    apply(kc, ns, first)
    held = wait_phase(env, "first", {"Suspended"}, timeout=60)
    run_output = held["status"]["output"]
    assert run_output.startswith(f"s3://{bucket}/first/runs/{held['metadata']['uid'][:8]}-g1")
    # Results where an operator before run identities wrote them: runs/g1, no identity.
    plant(env["client"], f"s3://{bucket}/first/runs/g1", None)
    first_run = RunIdentity(
        job_uid=held["metadata"]["uid"], spec_hash=spec_hash_of(held), run_id="g1"
    )

    # Another team's namespace, with its own operator and no credentials Secret.
    other_ns = f"team-{uuid.uuid4().hex[:8]}"
    kubectl(kc, "create", "namespace", other_ns)
    sa = f"kubetune-operator-{ns}"  # the ClusterRole of env's operator covers every namespace
    op_kubeconfig = service_account_kubeconfig(kc, ns, sa, tmp_path / "team.kubeconfig")
    other_op = OperatorProcess.start(
        op_kubeconfig, other_ns, env["s3"].env(), tmp_path / "team-operator.log"
    )
    try:
        time.sleep(1.1)  # a later creationTimestamp (one-second resolution)
        copy = tiny_job(
            "copy",
            data_uri=env["data_uri"],
            output=f"s3://{bucket}/first",  # the same prefix, written without the slash
            endpoint=env["endpoint"],
            secret="kubetune-s3",  # does not exist in other_ns
        )
        apply(kc, other_ns, copy)
        time.sleep(1.1)
        nested = job_for(env, "nested")
        nested["spec"]["storage"]["output"] = f"s3://{bucket}/first/nested/"
        apply(kc, ns, nested)

        def refused(where: str, name: str, reason: str) -> dict[str, Any] | None:
            ftj = get_ftj(kc, where, name)
            return ftj if stalled(ftj).get("reason") == reason else None

        def dump() -> str:
            return diagnose(kc, other_ns, "copy", other_op) + diagnose(kc, ns, "nested", env["op"])

        for where, name in ((other_ns, "copy"), (ns, "nested")):
            ftj = wait_for(
                functools.partial(refused, where, name, "OutputInUse"), 60, name, dump=dump
            )
            message = stalled(ftj)["message"]
            assert f"FineTuneJob {ns}/first" in message, message
            assert "choose another storage.output" in message, message
            assert ftj["status"]["phase"] == "Failed"
            assert "dataset" not in ftj["status"] and "results" not in ftj["status"]
            assert child_jobs(kc, where, name) == []
        # The worst case of a shared prefix: the first job's results, with its identity,
        # right where the copy's run looks for its own.
        plant(env["client"], get_ftj(kc, other_ns, "copy")["status"]["output"], first_run)

        # The first job gone, the copy proceeds on its next pass: on its own prefix, with
        # nothing to adopt; it stops at its missing Secret. The nested one is now newer
        # than the copy, so the copy holds the prefix.
        kubectl(kc, "-n", ns, "delete", "ftj", "first", "--wait=true", timeout=60)
        ftj = wait_for(lambda: refused(other_ns, "copy", "InvalidSpec"), 60, "copy", dump=dump)
        assert f"Secret {other_ns}/kubetune-s3" in stalled(ftj)["message"]
        status = ftj["status"]
        assert "dataset" not in status and "results" not in status, status
        assert status["output"] != run_output
        assert status["output"].endswith(f"/runs/{ftj['metadata']['uid'][:8]}-g1")
        assert not [s for s in status.get("stages", {}).values() if s.get("state") == "Succeeded"]
        assert child_jobs(kc, other_ns, "copy") == []
        ftj = wait_for(
            lambda: (
                get_ftj(kc, ns, "nested")
                if f"{other_ns}/copy" in stalled(get_ftj(kc, ns, "nested")).get("message", "")
                else None
            ),
            60,
            "the nested job to name the copy",
            dump=dump,
        )
        assert stalled(ftj)["reason"] == "OutputInUse"
    finally:
        other_op.stop()
        kubectl(kc, "delete", "namespace", other_ns, "--wait=false", check=False)
    log = other_op.log_text()
    assert "Forbidden" not in log and " 403 " not in log, "the operator lacked an RBAC right"
