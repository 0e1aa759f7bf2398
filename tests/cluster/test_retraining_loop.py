"""The GitOps retraining loop end to end on the test cluster (issue: the retraining loop).

A git repository made by the test holds a kustomization with one FineTuneJob. It is applied
the way a GitOps controller applies it: each commit is checked out and sent with
``kubectl apply --server-side -k`` under one field manager (Flux's kustomize-controller does
the same server-side apply; Flux itself is not built here). Then:

1. commit 1 (two epochs over the first 40 tldr pages): run ``g1`` is promoted (``v0001``);
2. commit 2 (one epoch, to save GPU time): run ``g2`` is worse than the champion and is not
   promoted (``NotBetter``), and ``current.json`` still names ``v0001``;
3. 120 more pages land in the dataset prefix: ``spec.retrain.onDatasetChange`` starts
   ``g2-r1``, whose one epoch over four times the data beats the champion, scored on the
   new test split: promoted (``v0002``, previous ``v0001``);
4. ``spec.retrain.keepRuns: 2`` deleted run g1's artifacts (its model lives on as
   ``versions/v0001``), and MLflow recorded the three runs.

At every status on the way the chart's Argo CD health check (Lua, as Argo CD runs it) gives
the health a GitOps user should see. Run with
``pytest -m cluster tests/cluster/test_retraining_loop.py``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from argocd_health import health
from chart_operator import assert_no_refusal_but_the_expected_one
from datapaths import tldr_files
from operator_helpers import get_ftj, get_json, kubectl, upload_files, wait_for
from real_node_env import RUN_TIMEOUT, pod_url
from test_operator import job_for
from tracking_server import MlflowServer, experiment_runs, mlflow_server  # noqa: F401

from kubetune.layout import run_dir
from kubetune_trainer.tokenizer_build import train_bpe_tokenizer

pytestmark = pytest.mark.cluster

NAME = "loop"
FIELD_MANAGER = "kubetune-gitops"  # the one owner of the fields git sets


class GitOpsRepo:
    """A git repository with a kustomization, and the apply a GitOps controller would do."""

    def __init__(self, root: Path, namespace: str) -> None:
        self.root, self.namespace = root, namespace
        self.checkouts = root.parent / "checkouts"
        root.mkdir()
        self.git("init", "-q", "-b", "main")
        (root / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "namespace": namespace,
                    "resources": ["finetunejob.yaml"],
                }
            )
        )

    def git(self, *args: str) -> str:
        author = ["-c", "user.name=kubetune-test", "-c", "user.email=test@kubetune.invalid"]
        done = subprocess.run(
            ["git", *author, "-C", str(self.root), *args],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    def commit(self, manifest: dict[str, Any], message: str) -> str:
        (self.root / "finetunejob.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def sync(self, kubeconfig: Path, revision: str) -> None:
        """Check ``revision`` out into a clean directory and apply it server-side."""
        checkout = self.checkouts / revision[:12]
        subprocess.run(
            ["git", "clone", "-q", str(self.root), str(checkout)], check=True, capture_output=True
        )
        subprocess.run(
            ["git", "-C", str(checkout), "checkout", "-q", revision],
            check=True,
            capture_output=True,
        )
        kubectl(
            kubeconfig,
            "apply",
            "--server-side",
            f"--field-manager={FIELD_MANAGER}",
            "-k",
            str(checkout),
        )


class HealthLog:
    """Each (run, phase) the FineTuneJob passes through, with the Argo CD health of it."""

    def __init__(self, context: dict[str, Any]) -> None:
        self.env = context
        self.seen: list[tuple[str, str, str, str]] = []  # run, phase, health, message

    def poll(self) -> dict[str, Any]:
        ftj = get_ftj(self.env["kubeconfig"], self.env["ns"], NAME)
        status = ftj.get("status") or {}
        state, message = health(ftj)
        entry = (status.get("run", ""), status.get("phase", ""), state, message)
        if not self.seen or self.seen[-1][:3] != entry[:3]:
            self.seen.append(entry)
        return ftj

    def until_done(self, run: str) -> dict[str, Any]:
        """Poll until run ``run`` succeeded (a failure or a Degraded health fails the test)."""

        def done() -> dict[str, Any] | None:
            ftj = self.poll()
            status = ftj.get("status") or {}
            assert self.seen[-1][2] != "Degraded", f"Degraded: {self.seen[-1]}"
            if status.get("run") == run and status.get("phase") == "Succeeded":
                return ftj
            return None

        return dict(wait_for(done, RUN_TIMEOUT, f"run {run} to succeed", dump=self.dump))

    def of_run(self, run: str) -> list[tuple[str, str, str, str]]:
        return [s for s in self.seen if s[0] == run]

    def dump(self) -> str:
        return "\n".join(map(str, self.seen)) + "\n" + self.env["op"].log_tail(60)


def read_json(client: Any, bucket: str, key: str) -> dict[str, Any]:
    return dict(json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read()))


def keys_under(client: Any, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def promoted(ftj: dict[str, Any]) -> dict[str, Any]:
    cond = next(c for c in ftj["status"]["conditions"] if c["type"] == "Promoted")
    return {**ftj["status"]["promotion"], "condition": cond}


@pytest.fixture
def env(light_env: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The FineTuneJob environment on the light node: this long test runs in the CI stream
    of the unit tests, whose node has room (the main node's stream is the longer one).
    Afterwards the operator's log shows no refusal but the one by design."""
    yield light_env
    assert_no_refusal_but_the_expected_one(light_env["op"].log_text())


def test_gitops_loop_promotes_only_better_models_and_retrains_on_new_data(
    env: dict[str, Any],
    tmp_path: Path,
    mlflow_server: MlflowServer,  # noqa: F811 (the fixture)
) -> None:
    kc, ns, client = env["kubeconfig"], env["ns"], env["client"]
    bucket, out_bucket = env["data_bucket"], env["out_bucket"]
    pages = tldr_files("common")[:160]
    first, later = pages[:40], pages[40:]
    upload_files(client, bucket, "loop/data", first)
    # A fixed tokenizer (as a pre-trained model has): a run's perplexity is comparable with
    # the champion's only when both read the same tokens.
    tokenizer = train_bpe_tokenizer(
        (line for p in pages for line in p.read_text(encoding="utf-8").splitlines()), 512
    )
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    upload_files(client, bucket, "loop/tokenizer", sorted((tmp_path / "tokenizer").iterdir()))
    serving = f"s3://{out_bucket}/serving"
    experiment = f"loop-{ns}"
    tracking_uri = pod_url(env["cluster"], mlflow_server.url)  # as pods reach it

    def manifest(epochs: int) -> dict[str, Any]:
        job = job_for(env, NAME, epochs=epochs, checkpointEverySteps=100, logEverySteps=20)
        spec = job["spec"]
        spec["training"].pop("maxSteps")
        spec["model"]["tokenizer"] = f"s3://{bucket}/loop/tokenizer/"
        spec["dataset"]["source"] = f"s3://{bucket}/loop/data/"
        spec["evaluation"]["bleu"] = {"enabled": False}
        spec["promotion"] = {"target": serving}
        spec["retrain"] = {"onDatasetChange": True, "pollIntervalSeconds": 30, "keepRuns": 2}
        spec["tracking"] = {"mlflow": {"trackingUri": tracking_uri, "experiment": experiment}}
        job["metadata"].pop("namespace", None)  # the kustomization sets it
        return job

    repo = GitOpsRepo(tmp_path / "repo", ns)
    log = HealthLog(env)

    # 1. The first model: promoted, the serving pointer names it.
    repo.sync(kc, repo.commit(manifest(epochs=2), "fine-tune tldr: 2 epochs"))
    ftj = log.until_done("g1")
    g1_perplexity = ftj["status"]["results"]["perplexity"]
    p1 = promoted(ftj)
    assert p1["promoted"] and p1["version"] == "v0001", p1
    assert p1["condition"]["status"] == "True" and p1["condition"]["reason"] == "Promoted"
    assert read_json(client, out_bucket, "serving/current.json")["version"] == "v0001"
    uid = ftj["metadata"]["uid"]
    assert ftj["status"]["trigger"] == "SpecChange"
    assert ftj["status"]["tracking"]["url"].startswith(tracking_uri)

    # 2. A cheaper spec from git: a worse model, not promoted; serving unchanged.
    repo.sync(kc, repo.commit(manifest(epochs=1), "fine-tune tldr: 1 epoch saves GPU time"))
    ftj = log.until_done("g2")
    p2 = promoted(ftj)
    assert not p2["promoted"] and p2["reason"] == "NotBetter", p2
    assert p2["condition"]["status"] == "False" and "champion v0001" in p2["message"]
    assert read_json(client, out_bucket, "serving/current.json")["version"] == "v0001"
    assert ftj["status"]["results"]["perplexity"] > p2["championPerplexity"]

    # 3. New data lands: the operator notices the listing changed and trains again.
    upload_files(client, bucket, "loop/data", later)
    ftj = log.until_done("g2-r1")
    status = ftj["status"]
    assert status["trigger"] == "DatasetChanged"
    assert status["dataset"]["documents"] == 160
    p3 = promoted(ftj)
    assert p3["promoted"] and p3["version"] == "v0002" and p3["previous"] == "v0001", p3
    current = read_json(client, out_bucket, "serving/current.json")
    assert current["version"] == "v0002" and current["previous"] == "v0001"
    assert current["run"]["runId"] == "g2-r1" and current["run"]["jobUid"] == uid
    assert "serving/versions/v0001/config.json" in keys_under(client, out_bucket, "serving/")

    # 4. Retention: only the two newest runs keep their artifacts; history says so.
    assert keys_under(client, out_bucket, f"{NAME}/{run_dir('g1', uid)}/") == []
    g2_keys = keys_under(client, out_bucket, f"{NAME}/{run_dir('g2', uid)}/")
    assert f"{NAME}/{run_dir('g2', uid)}/eval/evaluate.json" in g2_keys
    history = {h["run"]: h for h in status["history"]}
    assert history["g1"]["promoted"] is True and history["g1"]["artifactsDeleted"] is True
    assert history["g2"]["promoted"] is False and "artifactsDeleted" not in history["g2"]
    assert history["g2"]["trigger"] == "SpecChange"
    assert history["g1"]["results"]["perplexity"] == g1_perplexity
    assert history["g1"]["output"].endswith(f"/{run_dir('g1', uid)}")
    # Only the current run has Jobs: the earlier runs' children were deleted.
    jobs = get_json(kc, ns, "jobs", "-l", f"kubetune.io/job={NAME}")["items"]
    assert {j["metadata"]["labels"]["kubetune.io/run"] for j in jobs} == {"g2-r1"}
    runs = experiment_runs(mlflow_server, experiment)
    assert len(runs) == 3, [r["info"]["run_name"] for r in runs]

    # Argo CD saw each step as a GitOps user should: busy, then healthy (with the reason a
    # model did not reach serving), then busy again from the moment git changed the spec.
    ends = {}
    for run in ("g1", "g2", "g2-r1"):
        steps = log.of_run(run)
        done_at = next(i for i, s in enumerate(steps) if s[1] == "Succeeded")
        working, done, after = steps[:done_at], steps[done_at], steps[done_at + 1 :]
        assert working and all(s[2] == "Progressing" for s in working), log.dump()
        assert done[2] == "Healthy", log.dump()
        assert all(s[2] == "Progressing" and "observe generation" in s[3] for s in after)
        ends[run] = done[3]
    assert "NotBetter: not promoted" in ends["g2"], ends
    assert "not promoted" not in ends["g1"] and "not promoted" not in ends["g2-r1"], ends
