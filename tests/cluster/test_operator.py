"""The operator against a real control plane and the real node (tests/harness): kube-apiserver,
etcd, controller-manager, scheduler, a kubelet with containerd running every stage pod from the
trainer image under Pod Security ``restricted``, and a moto S3 server the pods reach through the
node's bridge. Run with ``pytest -m cluster tests/cluster/test_operator.py`` (root, ``make
images``).

Each test gets a fresh namespace and its own operator process (``python -m kubetune_operator``,
as its own ServiceAccount, watching only that namespace; ``real_node_env.env``), so killing and
restarting it is part of a test. Jobs are tiny (a fresh 1-layer model, 2-40 steps on 60 tldr
pages) to keep the file in minutes.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from itertools import islice
from typing import Any

import pytest
from cel_cases import CEL_CASES
from chart_operator import assert_no_refusal_but_the_expected_one
from datapaths import TLDR_CHAT, require
from operator_helpers import (
    apply,
    child_jobs,
    diagnose,
    dry_run,
    ftj_events,
    get_ftj,
    get_json,
    kubectl,
    refusal_failures,
    upload_text,
    wait_for,
)
from real_node_env import RUN_TIMEOUT, node_job, pod_url
from recording_http import RecordingServer

from harness.fixtures import ContainerdCluster
from harness.s3 import OutageProxy
from kubetune.layout import RunLayout
from kubetune.schema import job_manifest

pytestmark = pytest.mark.cluster


@pytest.fixture
def env(env: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The real node's FineTuneJob environment (real_node_env.env); afterwards, the operator's
    log must show no request the API server refused but the one a namespaced install meets by
    design (the chart's Role covers the rest)."""
    yield env
    op = env["op"]
    assert_no_refusal_but_the_expected_one(op.log_text(), getattr(op, "starts", 1))


def job_for(env: dict[str, Any], name: str, **training: Any) -> dict[str, Any]:
    """The tiny example on the real node, with BLEU as the example has it."""
    return node_job(env, name, bleu=True, **training)


def wait_phase(
    env: dict[str, Any],
    name: str,
    want: set[str],
    timeout: float = RUN_TIMEOUT,
    seen: list[str] | None = None,
) -> dict[str, Any]:
    """Poll until the phase is in ``want``; ``seen`` collects each new phase on the way."""
    kc, ns = env["kubeconfig"], env["ns"]

    def reached() -> dict[str, Any] | None:
        ftj = get_ftj(kc, ns, name)
        current = (ftj.get("status") or {}).get("phase")
        if seen is not None and current and (not seen or seen[-1] != current):
            seen.append(current)
        if current in want:
            return ftj
        if current == "Failed" and "Failed" not in want:
            raise AssertionError(f"{name} failed:\n{diagnose(kc, ns, name, env['op'])}")
        return None

    return dict(
        wait_for(
            reached,
            timeout,
            f"{name} to reach {sorted(want)}",
            dump=lambda: diagnose(kc, ns, name, env["op"]),
            interval=1.0,
        )
    )


def condition(ftj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in ftj["status"]["conditions"] if c["type"] == ctype)


def assert_no_secret_leaks(env: dict[str, Any], name: str) -> None:
    kc, ns = env["kubeconfig"], env["ns"]
    texts = {
        "status": json.dumps(get_ftj(kc, ns, name).get("status")),
        "events": kubectl(kc, "-n", ns, "get", "events", "-o", "yaml").stdout,
        "configmaps": kubectl(kc, "-n", ns, "get", "configmaps", "-o", "yaml").stdout,
        "jobs": kubectl(kc, "-n", ns, "get", "jobs", "-o", "yaml").stdout,
        "operator log": env["op"].log_text(),
    }
    for where, text in texts.items():
        for value in env["secret_values"]:
            assert value not in text, f"a secret value leaked into the {where}"


# --------------------------------------------------------------------------- validation


VALID: dict[str, Any] = job_manifest(
    "bad",
    model={"fresh": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "nPositions": 128}},
    dataset={"source": "s3://data/tldr/"},
    training={"maxSeqLength": 64},
    storage={"output": "s3://runs/bad/"},
)


def _set(path: str, value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(VALID)
    *parents, leaf = path.split(".")
    node = obj
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        node.pop(leaf)
    else:
        node[leaf] = value
    return obj


_DELETE = object()

# Single-field problems (required, pattern, bounds, enums, unknown fields). The cross-field
# rules (CEL) are checked on the table of tests/cel_cases.py, the one the Python side uses.
MALFORMED = [
    ("spec", _DELETE, "spec"),
    ("spec.model", _DELETE, "spec.model"),
    ("spec.dataset.source", _DELETE, "spec.dataset.source"),
    ("spec.storage.output", "http://bucket/x", "spec.storage.output"),
    ("spec.dataset.source", "ftp://host/x", "spec.dataset.source"),
    ("spec.training.batchSize", 0, "spec.training.batchSize"),
    ("spec.training.learningRate", -1.0, "spec.training.learningRate"),
    ("spec.training.precision", "fp8", "spec.training.precision"),
    ("spec.training.scheduler", "exponential", "spec.training.scheduler"),
    ("spec.dataset.split", {"testFraction": 0.9}, "spec.dataset.split.testFraction"),
    ("spec.dataset.format", "xml", "spec.dataset.format"),
    ("spec.resources", {"imagePullPolicy": "Sometimes"}, "spec.resources.imagePullPolicy"),
    ("spec.evaluation", {"bleu": {"promptFraction": 1.5}}, "spec.evaluation.bleu.promptFraction"),
    ("spec.trainnig", {"epochs": 1}, "trainnig"),
]


def test_api_server_rejects_malformed_manifests_naming_the_field(
    containerd_cluster: ContainerdCluster, node_namespace: str
) -> None:
    ok = dry_run(containerd_cluster.kubeconfig, node_namespace, VALID)
    assert ok.returncode == 0, ok.stderr
    failures = []
    for path, value, expected in MALFORMED:
        result = dry_run(containerd_cluster.kubeconfig, node_namespace, _set(path, value))
        if result.returncode == 0 or expected not in result.stderr:
            failures.append(f"{path}={value!r}: rc={result.returncode} stderr={result.stderr!r}")
    assert not failures, "\n".join(failures)


def test_api_server_applies_each_cel_rule_to_its_cases_naming_the_field(
    containerd_cluster: ContainerdCluster, node_namespace: str
) -> None:
    failures = refusal_failures(containerd_cluster.kubeconfig, node_namespace, CEL_CASES)
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- end to end


def test_finetunejob_succeeds_with_results_conditions_artifacts_and_metrics(
    env: dict[str, Any],
) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "tldr-tiny"
    apply(kc, ns, job_for(env, name, maxSteps=20, checkpointEverySteps=10))
    phases: list[str] = []
    ftj = wait_phase(env, name, {"Succeeded"}, seen=phases, timeout=RUN_TIMEOUT)
    # The phase only moves forward within a run (polled once a second: some may be missed).
    order = ["Pending", "Preparing", "Training", "Evaluating", "Succeeded"]
    assert phases == sorted(phases, key=order.index) and phases[-1] == "Succeeded", phases
    status = ftj["status"]
    results = status["results"]
    for key in ("perplexity", "baselinePerplexity", "bleu", "baselineBleu"):
        assert isinstance(results.get(key), (int, float)), f"status.results.{key}: {results}"
    assert results["perplexity"] < results["baselinePerplexity"]  # training helped
    assert results["bleuSignature"]
    assert status["dataset"]["trainLines"] > 0 and status["dataset"]["overlap"] == 0
    assert status["progress"]["percent"] == 100
    assert status["run"] == "g1" and status["observedGeneration"] == 1
    assert condition(ftj, "Ready")["status"] == "True"
    assert condition(ftj, "Stalled")["status"] == "False"
    assert condition(ftj, "Reconciling")["status"] == "False"
    for ctype in ("DatasetReady", "Trained", "Evaluated"):
        assert condition(ftj, ctype)["status"] == "True"

    # The model is in S3 under the run's own prefix (the FineTuneJob's uid and the run).
    model_uri = status["artifacts"]["model"]
    uid8 = ftj["metadata"]["uid"][:8]
    assert model_uri.startswith(f"s3://{env['out_bucket']}/{name}/runs/{uid8}-g1/")
    bucket, _, prefix = model_uri.removeprefix("s3://").partition("/")
    keys = [
        o["Key"]
        for o in env["client"]
        .list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
        .get("Contents", [])
    ]
    assert any(k.endswith("config.json") for k in keys), keys
    assert any(k.endswith((".safetensors", ".bin")) for k in keys), keys

    # kubectl shows the printer columns.
    table = kubectl(kc, "-n", ns, "get", "ftj").stdout
    header = table.splitlines()[0].split()
    assert header[:6] == ["NAME", "PHASE", "REASON", "PROGRESS", "PPL", "BASE-PPL"], table
    assert "Succeeded" in table and "100" in table

    # One Job per stage, owned by the FineTuneJob; Events with typed reasons.
    jobs = child_jobs(kc, ns, name)
    assert sorted(j["metadata"]["labels"]["kubetune.io/stage"] for j in jobs) == [
        "evaluate",
        "prepare",
        "train",
    ]
    events = get_json(
        kc,
        ns,
        "events",
        "--field-selector",
        f"involvedObject.kind=FineTuneJob,involvedObject.name={name}",
    )["items"]
    reasons = {e["reason"] for e in events}
    assert {"Created", "StageSucceeded", "Succeeded"} <= reasons, reasons

    # Operator metrics.
    metrics = env["op"].metrics()
    assert 'kubetune_operator_finetunejobs{phase="Succeeded"} 1.0' in metrics
    assert 'kubetune_finetunejob_perplexity{finetunejob="tldr-tiny"' in metrics
    assert 'kubetune_operator_runs_total{outcome="succeeded"} 1.0' in metrics

    assert_no_secret_leaks(env, name)


def test_a_chat_job_trains_on_answers_and_reports_answer_metrics_in_status(
    env: dict[str, Any],
) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "tldr-chat"
    with open(require(TLDR_CHAT), encoding="utf-8") as fh:
        head = "".join(islice(fh, 1200))
    upload_text(env["client"], env["data_bucket"], "tldr-instruct/chat.jsonl", head)
    job = job_for(env, name, maxSteps=20, maxSeqLength=128)
    job["spec"]["model"]["fresh"]["nPositions"] = 128
    job["spec"]["dataset"] = {
        "source": f"s3://{env['data_bucket']}/tldr-instruct/chat.jsonl",
        "kind": "chat",
        "clean": {"stripMarkup": False, "minChars": 8},
        "split": {"testFraction": 0.2, "seed": 42, "groupBy": "command"},
    }
    apply(kc, ns, job)
    ftj = wait_phase(env, name, {"Succeeded"})
    status = ftj["status"]
    dataset = status["dataset"]
    assert dataset["kind"] == "chat" and dataset["records"] == 1200
    assert dataset["trainGroups"] > 0 and dataset["testGroups"] > 0
    assert dataset["promptOverlap"] == 0 and dataset["answerOverlap"] == 0
    results = status["results"]
    for key in ("perplexity", "baselinePerplexity", "bleu", "chrf", "baselineChrf"):
        assert isinstance(results.get(key), (int, float)), f"status.results.{key}: {results}"
    assert 0 <= results["exactMatch"] <= 100 and 0 <= results["baselineExactMatch"] <= 100
    assert results["perplexity"] < results["baselinePerplexity"]  # answers got likelier
    assert "nc:6" in results["chrfSignature"]  # sacrebleu chrF: character 6-grams
    # The API server documents the new fields (generated from the schema).
    explained = kubectl(kc, "explain", "ftj.spec.dataset").stdout
    for field in ("kind", "promptField", "completionField", "messagesField", "chatTemplate"):
        assert field in explained, explained
    assert "groupBy" in kubectl(kc, "explain", "ftj.spec.dataset.split").stdout


def test_dataset_that_cleans_to_nothing_fails_with_dataset_unusable(env: dict[str, Any]) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "empty-data"
    # Only lines shorter than minChars: nothing survives cleaning.
    upload_text(env["client"], env["data_bucket"], "short/a.txt", "ab\ncd\nef\n" * 20)
    job = job_for(env, name)
    job["spec"]["dataset"].update({"source": f"s3://{env['data_bucket']}/short/", "format": "text"})
    apply(kc, ns, job)
    ftj = wait_phase(env, name, {"Failed"}, timeout=240)
    stalled = condition(ftj, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "DatasetUnusable", stalled
    assert stalled["message"].startswith("prepare failed: ") and len(stalled["message"]) > 30
    assert condition(ftj, "DatasetReady")["reason"] == "DatasetUnusable"
    assert condition(ftj, "Ready")["status"] == "False"
    # Failed fast: one pod (podFailurePolicy), and no train Job.
    jobs = child_jobs(kc, ns, name)
    assert [j["metadata"]["labels"]["kubetune.io/stage"] for j in jobs] == ["prepare"]
    assert jobs[0]["status"].get("failed") == 1
    warnings = get_json(kc, ns, "events", "--field-selector", "type=Warning")["items"]
    assert any(e["reason"] == "DatasetUnusable" for e in warnings)
    assert_no_secret_leaks(env, name)


def test_missing_credentials_secret_is_an_invalid_spec_naming_the_secret(
    env: dict[str, Any],
) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "no-secret"
    job = job_for(env, name)
    job["spec"]["storage"]["credentialsSecret"] = "does-not-exist"
    apply(kc, ns, job)
    ftj = wait_phase(env, name, {"Failed"}, timeout=60)
    stalled = condition(ftj, "Stalled")
    assert stalled["reason"] == "InvalidSpec"
    assert "does-not-exist" in stalled["message"] and "credentialsSecret" in stalled["message"]
    assert child_jobs(kc, ns, name) == []


def test_operator_killed_in_every_stage_still_finishes_with_one_job_per_stage(
    env: dict[str, Any],
) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "restarts"
    apply(kc, ns, job_for(env, name, maxSteps=20, checkpointEverySteps=10))
    order = ["Preparing", "Training", "Evaluating", "Succeeded"]
    for i in range(len(order) - 1):
        # At or past the stage (a short stage can finish between two polls).
        wait_phase(env, name, set(order[i:]))
        env["op"].kill()
        env["op"] = env["op"].restart()
    ftj = wait_phase(env, name, {"Succeeded"})
    jobs = child_jobs(kc, ns, name)
    stages = sorted(j["metadata"]["labels"]["kubetune.io/stage"] for j in jobs)
    assert stages == ["evaluate", "prepare", "train"], stages
    assert ftj["status"]["results"]["perplexity"] > 0
    assert ftj["status"]["run"] == "g1"
    assert_no_secret_leaks(env, name)


def test_a_spec_string_cannot_read_the_pods_secrets_through_variable_expansion(
    env: dict[str, Any],
) -> None:
    """The kubelet expands $(VAR) in args and env values; spec strings must reach pods as is."""
    kc, ns, name, client = env["kubeconfig"], env["ns"], "leak", env["client"]
    manifest = job_for(env, name, maxSteps=2)
    manifest["spec"]["storage"]["output"] = (
        f"s3://{env['out_bucket']}/leak-$(AWS_SECRET_ACCESS_KEY)/"
    )
    apply(kc, ns, manifest)

    def prepared_keys() -> list[str] | None:
        listing = client.list_objects_v2(Bucket=env["out_bucket"]).get("Contents", [])
        keys = [o["Key"] for o in listing]
        return keys if any(k.endswith("/dataset/prepare.json") for k in keys) else None

    keys = wait_for(
        prepared_keys,
        RUN_TIMEOUT,
        "prepare's result",
        dump=lambda: diagnose(kc, ns, name, env["op"]),
    )
    assert all(k.startswith("leak-$(AWS_SECRET_ACCESS_KEY)/runs/") for k in keys), keys
    for value in env["secret_values"]:
        assert not any(value in k for k in keys), "a Secret value reached an S3 key"
    assert_no_secret_leaks(env, name)


def test_compare_endpoints_get_the_key_of_their_own_secret_and_never_the_pods_credentials(
    env: dict[str, Any],
) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "compare-keys"
    api_key = f"sk-endpoint-{uuid.uuid4().hex}"
    kubectl(
        kc,
        "-n",
        ns,
        "create",
        "secret",
        "generic",
        "endpoint-key",
        f"--from-literal=apiKey={api_key}",
    )
    # An OpenAI-style completions endpoint that records who called it.
    with RecordingServer(body={"choices": [{"text": " the end"}]}) as endpoint:
        url = pod_url(env["cluster"], endpoint.url)  # the bridge address pods reach it at
        job = job_for(env, name, maxSteps=2)
        job["spec"]["evaluation"]["compareWith"] = [
            # Names the pod's own S3 secret: in a pod the operator drops apiKeyEnv.
            {
                "name": "borrower",
                "baseUrl": f"{url}/borrower/v1",
                "model": "m",
                "apiKeyEnv": "AWS_SECRET_ACCESS_KEY",
            },
            {
                "name": "keyed",
                "baseUrl": f"{url}/keyed/v1",
                "model": "m",
                "apiKeySecret": "endpoint-key",
            },
        ]
        apply(kc, ns, job)
        ftj = wait_phase(env, name, {"Succeeded"})
    compared = {c["name"]: c for c in ftj["status"]["results"]["comparisons"]}
    assert set(compared) == {"borrower", "keyed"}, compared
    borrower, keyed = endpoint.authorizations("/borrower/"), endpoint.authorizations("/keyed/")
    assert borrower and keyed, endpoint.requests
    assert set(borrower) == {""}, "the pod sent a key to an endpoint that names no Secret"
    assert set(keyed) == {f"Bearer {api_key}"}
    for secret in env["secret_values"]:
        assert all(secret not in auth for auth in endpoint.authorizations())


def test_a_storage_outage_during_a_stage_costs_no_attempt(env: dict[str, Any]) -> None:
    # The job reaches S3 through a line the test cuts for 15 s when the prepare pod starts
    # downloading its source: the stage rides through on its retry budget.
    kc, ns, name = env["kubeconfig"], env["ns"], "outage"
    proxy = OutageProxy.start(env["s3"].endpoint_url)
    try:
        job = job_for(env, name, maxSteps=2)
        job["spec"]["storage"]["endpoint"] = pod_url(env["cluster"], proxy.endpoint_url)
        job["spec"]["evaluation"] = {"bleu": {"enabled": False}, "baseline": False}
        source = env["data_uri"].removeprefix("s3://")
        proxy.cut_on(f"GET /{source}".encode(), restore_after=15)
        apply(kc, ns, job)
        ftj = wait_phase(env, name, {"Succeeded"})
        outages = list(proxy.outages)
    finally:
        proxy.close()
    assert len(outages) == 1 and outages[0][1] is not None, outages
    cut, back = outages[0]
    assert back - cut >= 15
    assert all(not stage.get("failedAttempts") for stage in ftj["status"]["stages"].values())
    retrying = ftj_events(kc, ns, name, "StageRetrying")
    assert retrying == [], [e["message"] for e in retrying]


def test_a_trainer_killed_without_warning_costs_an_attempt_and_resumes(
    env: dict[str, Any],
) -> None:
    """No time to save (SIGKILL, as from the kernel's OOM killer or a crashed node): the
    attempt is lost, and the next one resumes from the last interval checkpoint. With a grace
    period the pod saves a checkpoint and loses nothing (tests/cluster/test_distributed.py)."""
    kc, ns, name = env["kubeconfig"], env["ns"], "resume"
    apply(kc, ns, job_for(env, name, maxSteps=40, checkpointEverySteps=5))
    client, bucket = env["client"], env["out_bucket"]
    run_prefix = f"{name}/runs/{get_ftj(kc, ns, name)['metadata']['uid'][:8]}-g1"
    prefix = f"{run_prefix}/{RunLayout.TRAINING_RUNS}/"  # <fingerprint>/checkpoints/step-*

    def checkpointed() -> bool:
        keys = [
            o["Key"]
            for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        ]
        return any(k.endswith("/COMPLETE") for k in keys)

    wait_for(
        checkpointed,
        RUN_TIMEOUT,
        "a complete checkpoint",
        dump=lambda: diagnose(kc, ns, name, env["op"]),
    )
    pods = get_json(kc, ns, "pods", "-l", f"kubetune.io/job={name},kubetune.io/stage=train")
    running = [p for p in pods["items"] if p["status"].get("phase") == "Running"]
    assert running, "the training pod should still be running after its first checkpoint"
    container_id = running[0]["status"]["containerStatuses"][0]["containerID"]
    env["node"].ctr("tasks", "kill", "--signal", "SIGKILL", container_id.split("://", 1)[1])
    wait_phase(env, name, {"Succeeded"})
    train = json.loads(
        client.get_object(Bucket=bucket, Key=f"{run_prefix}/train/train.json")["Body"].read()
    )
    assert (train.get("resumedFromStep") or 0) > 0, train
    assert train["steps"] == 40
    assert len(child_jobs(kc, ns, name)) == 3
    # The lost attempt was announced: a Warning naming the stage and what is left.
    events = ftj_events(kc, ns, name, "StageRetrying")
    assert [e["type"] for e in events] == ["Warning"], events
    assert events[0]["message"].startswith("train: attempt 1 of 3 failed"), events[0]["message"]
    status = get_ftj(kc, ns, name)["status"]
    assert status["stages"]["train"]["failedAttempts"] == 1
    assert not status["progress"].get("preemptions"), status["progress"]  # it saved nothing


def test_suspend_stops_the_stage_and_resume_finishes_the_same_run(env: dict[str, Any]) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "pause"
    apply(kc, ns, job_for(env, name, maxSteps=40, checkpointEverySteps=10))
    wait_phase(env, name, {"Training"})
    kubectl(kc, "-n", ns, "patch", "ftj", name, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    ftj = wait_phase(env, name, {"Suspended"}, timeout=60)
    assert condition(ftj, "Reconciling")["status"] == "False"
    wait_for(
        lambda: (
            not [
                p
                for p in get_json(kc, ns, "pods", "-l", f"kubetune.io/job={name}")["items"]
                if p["status"].get("phase") in ("Running", "Pending")
            ]
        ),
        60,
        "stage pods to stop",
    )
    kubectl(kc, "-n", ns, "patch", "ftj", name, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    ftj = wait_phase(env, name, {"Succeeded"})
    assert ftj["status"]["run"] == "g1"  # suspend is not a new run
    assert len(child_jobs(kc, ns, name)) == 3


def test_deleting_the_finetunejob_deletes_its_children(env: dict[str, Any]) -> None:
    kc, ns, name = env["kubeconfig"], env["ns"], "short-lived"
    apply(kc, ns, job_for(env, name))
    wait_for(lambda: child_jobs(kc, ns, name), 60, "the prepare Job")
    kubectl(kc, "-n", ns, "delete", "ftj", name, "--wait=true", timeout=60)
    wait_for(
        lambda: (
            not child_jobs(kc, ns, name)
            and not get_json(kc, ns, "configmaps", "-l", f"kubetune.io/job={name}")["items"]
        ),
        90,
        "garbage collection of the children",
    )


def test_rbac_grants_the_operator_what_it_needs_and_no_more(
    containerd_cluster: ContainerdCluster, node_namespace: str
) -> None:
    from kubetune_operator import rbac

    kc, k8s_namespace = containerd_cluster.kubeconfig, node_namespace
    name = f"kubetune-operator-{k8s_namespace}"
    for obj in rbac.manifests(k8s_namespace, name):
        apply(kc, k8s_namespace, obj)
    who = f"--as=system:serviceaccount:{k8s_namespace}:{name}"
    allowed = [
        ("watch", "finetunejobs.kubetune.io"),
        ("patch", "finetunejobs.kubetune.io", "--subresource=status"),
        ("create", "jobs.batch"),
        ("delete", "jobs.batch"),
        ("patch", "jobs.batch"),
        ("list", "pods"),
        ("create", "configmaps"),
        ("create", "services"),
        ("get", "secrets"),
        ("create", "events"),
    ]
    for verb, resource, *extra in allowed:
        result = kubectl(
            kc, "auth", "can-i", verb, resource, *extra, who, "-n", k8s_namespace, check=False
        )
        assert result.stdout.strip() == "yes", (verb, resource, result.stdout, result.stderr)
    denied = [
        ("list", "secrets"),
        ("watch", "secrets"),
        ("delete", "finetunejobs.kubetune.io"),
        ("create", "pods"),
        ("delete", "namespaces"),
    ]
    for verb, resource in denied:
        result = kubectl(kc, "auth", "can-i", verb, resource, who, "-n", k8s_namespace, check=False)
        assert result.stdout.strip() == "no", (verb, resource, result.stdout)
