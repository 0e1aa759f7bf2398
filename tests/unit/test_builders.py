"""The operator's pure builders: child objects, names, hashes, RBAC and settings.

Golden files in tests/unit/golden/ hold the exact children; after an intended change run
``UPDATE_GOLDEN=1 pytest tests/unit/test_builders.py`` and review the diff.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.kubelet_vars import expand_vars
from kubetune.contract import JOB_STAGES, Env, ExitCode, Stage
from kubetune.results import RunIdentity
from kubetune.schema import FineTuneJob, job_manifest, load_job, parse_job
from kubetune_operator import builders, rbac
from kubetune_operator.builders import RunRef
from kubetune_operator.config import OperatorConfig

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
CFG = OperatorConfig(trainer_image="ghcr.io/kubetune/trainer:test")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def example(filename: str, **meta: Any) -> FineTuneJob:
    job = load_job(REPO / "examples" / "cluster" / filename)
    data = job.to_wire()
    data["metadata"].update(
        {"namespace": "ml", "uid": "0b4c8f9e-1111-2222-3333-444455556666", "generation": 1}
    )
    data["metadata"].update(meta)
    return parse_job(data)


def with_spec(job: FineTuneJob, **changes: Any) -> FineTuneJob:
    data = copy.deepcopy(job.to_wire())
    for dotted, value in changes.items():
        node = data["spec"]
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_job(data)


def children(job: FineTuneJob, generation: int = 1) -> list[dict[str, Any]]:
    run = RunRef.for_generation(job, generation)
    objs = [builders.build_job_config_map(job, run)]
    if builders.needs_service(job):
        objs.append(builders.build_train_service(job, run))
    objs += [builders.build_stage_job(job, run, stage, CFG) for stage in JOB_STAGES]
    return objs


CASES = {
    "tldr-tiny": lambda: example("tldr-tiny.yaml"),
    "tldr-gpt2-multinode": lambda: example("tldr-gpt2-multinode.yaml"),
    "long-name": lambda: example(
        "tldr-tiny.yaml", name="a-very-long-finetunejob-name-that-goes-on-and-on-for-sixty-ch"
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_child_objects_match_golden_yaml(case: str) -> None:
    objs = children(CASES[case]())
    text = yaml.safe_dump_all(objs, sort_keys=True, width=100)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing; run UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(encoding="utf-8"), (
        f"children of {case} differ from {path}; if intended, run UPDATE_GOLDEN=1 pytest"
    )


def test_child_names_are_deterministic_dns_labels_even_for_long_names() -> None:
    long_a = "x" * 40 + "-training-run-number-one-abc"
    long_b = "x" * 40 + "-training-run-number-two-abc"
    names = {builders.job_name(n, "g12", s) for n in (long_a, long_b) for s in JOB_STAGES}
    assert len(names) == 6
    for name in names:
        assert len(name) <= builders.MAX_CHILD_NAME
        assert DNS_1035.match(name), name
        assert name.endswith(("-g12-prepare", "-g12-train", "-g12-evaluate"))
    assert builders.job_name(long_a, "g12", "train") == builders.job_name(long_a, "g12", "train")
    assert builders.job_name("tldr", "g3", "train") == "tldr-g3-train"
    # A Service name needs a leading letter; a FineTuneJob name may start with a digit or dot.
    assert DNS_1035.match(builders.service_name("1st.try", "g1"))


def test_spec_hash_ignores_suspend_and_ttl_but_not_hyperparameters() -> None:
    job = example("tldr-tiny.yaml")
    base = builders.spec_hash(job)
    assert builders.spec_hash(with_spec(job, suspend=True)) == base
    assert builders.spec_hash(with_spec(job, ttlSecondsAfterFinished=60)) == base
    assert builders.spec_hash(with_spec(job, **{"training.maxSteps": 31})) != base


def test_run_output_is_a_per_run_prefix_of_spec_storage_output() -> None:
    job = example("tldr-tiny.yaml")
    run = RunRef.for_generation(job, 4)
    assert run.id == "g4"
    # The uid's first 8 characters: a re-created FineTuneJob never shares its prefix.
    assert run.output == "s3://kubetune-runs/tldr-tiny/runs/0b4c8f9e-g4"
    again = example("tldr-tiny.yaml", uid="77aa0000-1111-2222-3333-444455556666")
    assert RunRef.for_generation(again, 4).output.endswith("/tldr-tiny/runs/77aa0000-g4")
    job_obj = builders.build_stage_job(job, run, "train", CFG)
    command = job_obj["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--output") + 1] == run.output


def test_job_config_map_holds_the_resolved_manifest_that_parses_back() -> None:
    job = example("tldr-tiny.yaml", generation=3)
    run = RunRef.for_generation(job, 3)
    cm = builders.build_job_config_map(job, run)
    assert cm["immutable"] is True
    manifest = json.loads(cm["data"]["job.json"])
    assert "status" not in manifest
    parsed = parse_job(manifest)
    assert parsed.metadata.generation == 3
    assert parsed.spec == job.spec
    assert cm["metadata"]["annotations"][builders.ANNOTATION_SPEC_HASH] == run.spec_hash
    # The pods read the run's identity from it and stamp it into their results.
    assert RunIdentity.of_job(parsed) == run.identity()
    assert run.identity() == RunIdentity(
        job_uid=job.metadata.uid, spec_hash=run.spec_hash, run_id="g3"
    )


def test_credentials_come_from_the_secret_by_reference_only() -> None:
    job = example("tldr-tiny.yaml")
    for obj in children(job):
        text = json.dumps(obj)
        assert "REPLACE-ME" not in text
    env = builders.stage_env(job, "prepare")
    by_name = {e["name"]: e for e in env}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in by_name[key]
        assert by_name[key]["valueFrom"]["secretKeyRef"] == {"name": "kubetune-s3", "key": key}
    assert by_name["AWS_ENDPOINT_URL"]["value"] == "http://127.0.0.1:9000"
    assert by_name["AWS_REGION"]["value"] == "us-east-1"
    assert by_name["KUBETUNE_TERMINATION_LOG"]["value"] == "/dev/termination-log"
    assert by_name["HOME"]["value"].startswith("/scratch")
    no_secret = with_spec(job, **{"storage.credentialsSecret": None})
    names = {e["name"] for e in builders.stage_env(no_secret, "prepare")}
    assert "AWS_ACCESS_KEY_ID" not in names


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        (0, {"prepare": 0, "train": 0, "evaluate": 0}),
        (4, {"prepare": 0, "train": 4, "evaluate": 1}),
    ],
)
def test_gpu_limits_per_stage(gpus: int, expected: dict[str, int]) -> None:
    job = with_spec(example("tldr-tiny.yaml"), **{"resources.gpusPerWorker": gpus})
    run = RunRef.for_generation(job, 1)
    for stage, want in expected.items():
        obj = builders.build_stage_job(job, run, stage, CFG)
        limits = obj["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        assert limits.get("nvidia.com/gpu", 0) == want, stage


def test_exporter_listens_where_the_pod_declares_its_metrics_port_and_only_in_train(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The trainer's exporter reads its port from the env the builder sets; Prometheus
    # scrapes the container port named "metrics". They must agree; no other stage serves.
    from kubetune_trainer.exporter import metrics_port

    job = example("tldr-tiny.yaml")
    run = RunRef.for_generation(job, 1)
    for stage in JOB_STAGES:
        pod = builders.build_stage_job(job, run, stage, CFG)["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        monkeypatch.setenv(Env.METRICS_PORT, env[Env.METRICS_PORT])
        declared = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert metrics_port() == declared.get("metrics", 0), stage
        assert (metrics_port() != 0) == (stage == Stage.TRAIN), stage


def test_multi_worker_training_is_an_indexed_job_behind_a_headless_service() -> None:
    job = example("tldr-gpt2-multinode.yaml")
    run = RunRef.for_generation(job, 1)
    svc = builders.build_train_service(job, run)
    train = builders.build_stage_job(job, run, "train", CFG)
    spec, pod = train["spec"], train["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert svc["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == svc["metadata"]["name"]
    pod_labels = train["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
    cmd = pod["containers"][0]["command"]
    assert cmd[:2] == ["accelerate", "launch"]
    assert cmd[cmd.index("--machine_rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    assert cmd[cmd.index("--main_process_ip") + 1] == (
        f"{train['metadata']['name']}-0.{svc['metadata']['name']}"
    )
    assert cmd[cmd.index("-m") + 1 :][:2] == ["kubetune.cli", "train"]
    env_names = [e["name"] for e in pod["containers"][0]["env"]]
    assert "JOB_COMPLETION_INDEX" in env_names
    # Prepare and evaluate stay single pods.
    prep = builders.build_stage_job(job, run, "prepare", CFG)
    assert "completionMode" not in prep["spec"]
    assert prep["spec"]["template"]["spec"]["containers"][0]["command"][0] == "kubetune"


def test_stage_pods_are_restricted_and_results_never_come_from_logs() -> None:
    for obj in children(example("tldr-tiny.yaml"))[1:]:
        pod = obj["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["terminationMessagePolicy"] == "File"
        assert pod["restartPolicy"] == "Never"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/scratch", "/tmp", "/etc/kubetune"} <= mounts


def test_not_retriable_exit_codes_fail_the_job_at_once() -> None:
    job = example("tldr-tiny.yaml")
    obj = builders.build_stage_job(job, RunRef.for_generation(job, 1), "prepare", CFG)
    rules = obj["spec"]["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert fail["onExitCodes"]["containerName"] == "prepare"
    assert 3 in fail["onExitCodes"]["values"] and 1 not in fail["onExitCodes"]["values"]
    assert obj["spec"]["backoffLimit"] == 2
    assert obj["spec"]["activeDeadlineSeconds"] == 1800


def test_placement_and_lifecycle_fields_reach_the_pods() -> None:
    job = with_spec(
        example("tldr-gpt2-multinode.yaml"),
        **{"resources.serviceAccountName": "trainer", "resources.priorityClassName": "batch"},
    )
    obj = builders.build_stage_job(job, RunRef.for_generation(job, 1), "train", CFG)
    pod = obj["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "trainer"
    assert pod["priorityClassName"] == "batch"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert obj["spec"]["ttlSecondsAfterFinished"] == 86400
    res = pod["containers"][0]["resources"]
    assert res["requests"] == {"cpu": "16", "memory": "128Gi"}
    assert res["limits"]["memory"] == "128Gi"


@pytest.mark.parametrize(
    ("cpu", "threads"), [("250m", "1"), ("1", "1"), ("1.5", "2"), ("16", "16"), (None, None)]
)
def test_the_cpu_request_reaches_every_stage_as_its_whole_cpus(
    cpu: str | None, threads: str | None
) -> None:
    # The pod sees every core of its node; the trainer sizes its threads to this instead.
    job = with_spec(example("tldr-tiny.yaml"), **{"resources.cpu": cpu})
    for stage in JOB_STAGES:
        env = {e["name"]: e.get("value") for e in builders.stage_env(job, stage)}
        assert env.get(Env.CPUS) == threads, stage
    assert builders.requested_cpus("lots") is None  # refused at apply; never a crash here


def test_image_comes_from_the_spec_else_the_operator_setting() -> None:
    job = example("tldr-tiny.yaml")
    assert builders.image(job, CFG) == "ghcr.io/kubetune/trainer:test"
    own = with_spec(job, **{"resources.image": "registry.local/trainer:1"})
    assert builders.image(own, CFG) == "registry.local/trainer:1"
    assert OperatorConfig().trainer_image.startswith("ghcr.io/kubetune/trainer:")


def test_children_are_owned_and_labelled_for_selection() -> None:
    job = example("tldr-tiny.yaml")
    for obj in children(job):
        meta = obj["metadata"]
        (owner,) = meta["ownerReferences"]
        assert owner["uid"] == job.metadata.uid and owner["controller"] is True
        assert owner["blockOwnerDeletion"] is True
        assert meta["labels"][builders.LABEL_JOB] == "tldr-tiny"
        assert meta["labels"][builders.LABEL_RUN] == "g1"
        assert meta["labels"][builders.LABEL_MANAGED_BY] == "kubetune-operator"
    no_uid = parse_job({**job.to_wire(), "metadata": {"name": "x", "namespace": "ml"}})
    with pytest.raises(ValueError, match="uid"):
        builders.owner_reference(no_uid)


def test_config_reads_the_environment_and_names_bad_values() -> None:
    cfg = OperatorConfig.from_env(
        {
            "KUBETUNE_NAMESPACE": "ml",
            "KUBETUNE_MAX_CONCURRENT": "8",
            "KUBETUNE_PROGRESS_INTERVAL": "2.5",
            "KUBETUNE_TRAINER_IMAGE": "img:1",
        }
    )
    assert (cfg.namespace, cfg.max_concurrent, cfg.progress_interval) == ("ml", 8, 2.5)
    assert cfg.trainer_image == "img:1"
    assert OperatorConfig.from_env({}).unschedulable_timeout == 300.0
    with pytest.raises(ValueError, match="KUBETUNE_MAX_CONCURRENT"):
        OperatorConfig.from_env({"KUBETUNE_MAX_CONCURRENT": "many"})


def test_rbac_rules_allow_what_the_operator_does_and_no_secret_listing() -> None:
    def verbs(group: str, resource: str) -> set[str]:
        return {
            v
            for r in rbac.RULES
            if group in r["apiGroups"] and resource in r["resources"]
            for v in r["verbs"]
        }

    assert {"create", "get", "list", "watch", "patch", "delete"} <= verbs("batch", "jobs")
    assert {"patch"} <= verbs("kubetune.io", "finetunejobs/status")
    assert {"create"} <= verbs("", "events")
    assert verbs("", "secrets") == {"get"}  # existence check only; never list/watch values


def test_rbac_module_prints_three_applyable_objects() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kubetune_operator.rbac", "--namespace", "ops"],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
    assert docs[2]["subjects"][0] == {
        "kind": "ServiceAccount",
        "name": "kubetune-operator",
        "namespace": "ops",
    }


def test_spec_strings_reach_the_pod_unexpanded_so_they_cannot_read_its_variables() -> None:
    leak = "s3://bucket/leak-$(AWS_SECRET_ACCESS_KEY)/"
    job = with_spec(
        example("tldr-tiny.yaml"),
        **{"storage.output": leak, "storage.endpoint": "http://s3:9000/$(AWS_ACCESS_KEY_ID)"},
    )
    run = RunRef.for_generation(job, 1)
    pod_env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ACCESS_KEY_ID": "AKIA"}
    for stage in JOB_STAGES:
        # What the kubelet does to command, args and env values (the harness's copy of it).
        args = [expand_vars(a, pod_env) for a in builders.stage_command(job, run, stage)]
        values = [
            expand_vars(e["value"], pod_env) for e in builders.stage_env(job, stage) if "value" in e
        ]
        assert args[args.index("--output") + 1] == run.output
        assert "http://s3:9000/$(AWS_ACCESS_KEY_ID)" in values
        assert not any("s3cr3t" in a or "AKIA" in a for a in args + values)


def test_endpoint_keys_come_only_from_their_secret_never_from_a_named_variable() -> None:
    endpoint = {
        "name": "ollama",
        "baseUrl": "http://ollama:11434/v1",
        "model": "llama3",
        "apiKeyEnv": "AWS_SECRET_ACCESS_KEY",  # would send the S3 secret as a bearer token
        "apiKeySecret": "ollama-key",
    }
    job = with_spec(example("tldr-tiny.yaml"), **{"evaluation.compareWith": [endpoint]})
    manifest = builders.resolved_manifest(job, RunRef.for_generation(job, 1))
    (entry,) = manifest["spec"]["evaluation"]["compareWith"]
    assert "apiKeyEnv" not in entry and entry["apiKeySecret"] == "ollama-key"
    by_name = {e["name"]: e for e in builders.stage_env(job, Stage.EVALUATE)}
    key = by_name[Env.compare_api_key("ollama")]
    assert key == {
        "name": "KUBETUNE_COMPARE_OLLAMA_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "ollama-key", "key": "apiKey"}},
    }
    train_env = {e["name"] for e in builders.stage_env(job, Stage.TRAIN)}
    assert Env.compare_api_key("ollama") not in train_env


def test_mlflow_credentials_reach_every_stage_only_as_optional_secret_refs() -> None:
    from kubetune.contract import MLFLOW_CREDENTIAL_KEYS

    manifest = job_manifest(
        "tracked",
        model={"name": "gpt2"},
        dataset={"source": "s3://corpora/tldr/"},
        storage={"output": "s3://runs/tracked/"},
    )
    manifest["spec"]["tracking"] = {
        "mlflow": {"trackingUri": "http://mlflow:5000", "credentialsSecret": "mlflow-creds"}
    }
    job = parse_job(manifest)
    for stage in ("prepare", "train", "evaluate"):
        env = {e["name"]: e for e in builders.stage_env(job, stage)}
        for key in MLFLOW_CREDENTIAL_KEYS:
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "mlflow-creds", "key": key, "optional": True}
            assert "value" not in env[key]


def test_a_new_field_at_its_default_does_not_change_the_spec_hash() -> None:
    manifest = job_manifest(
        "h",
        model={"name": "gpt2"},
        dataset={"source": "s3://corpora/tldr/"},
        storage={"output": "s3://runs/h/"},
    )
    before = builders.spec_hash(parse_job(manifest))
    manifest["spec"]["dataset"]["kind"] = "text"  # written out, equal to the default
    assert builders.spec_hash(parse_job(manifest)) == before
    manifest["spec"]["dataset"]["kind"] = "chat"
    assert builders.spec_hash(parse_job(manifest)) != before


def test_cpu_workers_are_one_process_each_ranked_by_completion_index() -> None:
    job = with_spec(
        example("tldr-tiny.yaml"), **{"resources.workers": 2, "resources.gpusPerWorker": 0}
    )
    run = RunRef.for_generation(job, 1)
    train = builders.build_stage_job(job, run, Stage.TRAIN, OperatorConfig())
    spec = train["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == builders.service_name(job.metadata.name, run.id)
    container = pod["containers"][0]
    # No launcher in between: SIGTERM reaches the trainer, which checkpoints.
    assert container["command"][0] == "kubetune" and "accelerate" not in container["command"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    for index in (0, 1):
        # What the kubelet makes of the env: the index comes from the pod's annotation.
        pod_env = {"JOB_COMPLETION_INDEX": str(index)}
        env = {
            e["name"]: expand_vars(e["value"], pod_env) for e in container["env"] if "value" in e
        }
        assert env["RANK"] == str(index) and env["WORLD_SIZE"] == "2"
        assert env["LOCAL_RANK"] == "0" and env["LOCAL_WORLD_SIZE"] == "1"
        assert env["ACCELERATE_USE_CPU"] == "true"
        assert env[
            "MASTER_ADDR"
        ] == f"{builders.job_name(job.metadata.name, run.id, 'train')}-0." + (
            builders.service_name(job.metadata.name, run.id)
        )
        assert env["MASTER_PORT"] == str(builders.RENDEZVOUS_PORT)
    service = builders.build_train_service(job, run)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_a_stop_on_sigterm_costs_no_attempt_and_the_grace_period_is_the_users() -> None:
    job = with_spec(example("tldr-tiny.yaml"), **{"resources.terminationGracePeriodSeconds": 300})
    run = RunRef.for_generation(job, 1)
    for stage in JOB_STAGES:
        child = builders.build_stage_job(job, run, stage, OperatorConfig())
        rules = child["spec"]["podFailurePolicy"]["rules"]
        ignored = [r for r in rules if r["action"] == "Ignore" and "onExitCodes" in r]
        assert [r["onExitCodes"]["values"] for r in ignored] == [[ExitCode.INTERRUPTED.value]]
        assert child["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    default = builders.build_stage_job(
        example("tldr-tiny.yaml"), run, Stage.TRAIN, OperatorConfig()
    )
    assert "terminationGracePeriodSeconds" not in default["spec"]["template"]["spec"]


def test_queue_name_puts_every_stage_job_suspended_into_that_kueue_queue() -> None:
    job = with_spec(
        example("tldr-tiny.yaml"), queueName="team-a", workloadPriorityClassName="nightly"
    )
    run = RunRef.for_generation(job, 1)
    for stage in JOB_STAGES:
        child = builders.build_stage_job(job, run, stage, OperatorConfig())
        assert child["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert child["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "nightly"
        assert child["spec"]["suspend"] is True  # Kueue admits it by unsuspending it
        # The pods carry no queue label: Kueue admits the Job, not pods one by one.
        assert "kueue.x-k8s.io/queue-name" not in child["spec"]["template"]["metadata"]["labels"]
    plain = builders.build_stage_job(example("tldr-tiny.yaml"), run, Stage.TRAIN, OperatorConfig())
    assert "suspend" not in plain["spec"]
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]
