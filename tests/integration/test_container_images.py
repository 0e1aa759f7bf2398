"""The built images, run as containers with podman the way their pods run them.

    make images    # scripts/build-images.sh: buildah, a local Debian base, no registry
    ~/.cache/kubetune/venv/bin/python -m pytest tests/integration/test_container_images.py

Each test runs the image of the current tree (the content-hash tag that
`scripts/build-images.sh --ref` prints); a missing one fails and says to run `make images`
(`make test` builds them first). Containers get what the pods get: a read-only root
filesystem, the non-root user of the image (1000 for the trainer, 65532 for the operator) and
writable volumes only at /scratch and /tmp (trainer) or /tmp (operator); no network unless a
test needs one.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import tomllib
from built_images import built_image as image
from built_images import podman as _podman

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
TRAINER_USER = "1000:1000"
OPERATOR_USER = "65532:65532"
# The pods' writable volumes (operator/kubetune_operator/builders.py, the chart's Deployment):
# emptyDirs, approximated by tmpfs mounts; exec because torch/Triton load compiled kernels
# from their caches.
TRAINER_VOLUMES = ["--tmpfs", "/scratch:rw,exec,mode=1777", "--tmpfs", "/tmp:rw,exec,mode=1777"]
OPERATOR_VOLUMES = ["--tmpfs", "/tmp:rw,mode=1777"]
# Messages that mean something tried to write outside the volumes and fell back or failed.
WRITE_COMPLAINTS = ("Read-only file system", "is not a writable directory", "Permission denied")


def run(
    ref: str,
    user: str,
    volumes: list[str],
    *args: str,
    entrypoint: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """`podman run` with a read-only root: no /run or /var/tmp tmpfs either, only `volumes`."""
    command = [_podman(), "run", "--rm", "--read-only", "--read-only-tmpfs=false"]
    command += ["--user", user, "--network", "none", *volumes]
    if entrypoint is not None:
        command += ["--entrypoint", entrypoint]
    return subprocess.run(
        [*command, ref, *args], capture_output=True, text=True, check=False, timeout=timeout
    )


def image_config(ref: str) -> dict[str, object]:
    out = subprocess.run(
        [_podman(), "image", "inspect", "--format", "{{json .Config}}", ref],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    config: dict[str, object] = json.loads(out)
    return config


# ---- trainer ------------------------------------------------------------------------------


def test_trainer_image_runs_as_uid_1000_and_prints_the_project_version() -> None:
    ref = image("trainer")
    assert image_config(ref)["User"] == TRAINER_USER
    result = run(ref, TRAINER_USER, TRAINER_VOLUMES, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kubetune {VERSION}"


# Imports the trainer's stack, draws a matplotlib figure, asks each library where it keeps its
# cache, writes a file into each of those directories, and checks that the root is read-only.
TRAINER_PROBE = r"""
import json, os, tempfile
import accelerate, datasets, peft, pyarrow, sacrebleu, tokenizers, torch, transformers
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import datasets.config
import huggingface_hub.constants
import kubetune, kubetune_trainer
from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

fig, ax = plt.subplots()
ax.plot([1, 2, 3])
fig.savefig(os.path.join(tempfile.gettempdir(), "probe.png"))
try:
    from triton import knobs
    triton_cache = knobs.cache.dir
except ImportError:
    triton_cache = os.environ["TRITON_CACHE_DIR"]
paths = {k: str(v) for k, v in {
    "HOME": os.path.expanduser("~"),
    "tempfile": tempfile.gettempdir(),
    "matplotlib config": matplotlib.get_configdir(),
    "matplotlib cache": matplotlib.get_cachedir(),
    "Hugging Face hub": huggingface_hub.constants.HF_HUB_CACHE,
    "datasets": datasets.config.HF_DATASETS_CACHE,
    "torch hub": torch.hub.get_dir(),
    "torch inductor": inductor_cache_dir(),
    "Triton": triton_cache,
}.items()}
for path in paths.values():
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "probe"), "w") as f:
        f.write("ok")
try:
    open("/opt/venv/probe", "w").close()
    root_writable = True
except OSError:
    root_writable = False
print(json.dumps({
    "paths": paths,
    "root_writable": root_writable,
    "matplotlib cache files": sorted(os.listdir(matplotlib.get_cachedir())),
    "torch": torch.__version__,
}))
"""


def test_trainer_image_imports_its_stack_and_keeps_every_cache_on_the_volumes() -> None:
    result = run(
        image("trainer"),
        TRAINER_USER,
        TRAINER_VOLUMES,
        "-c",
        TRAINER_PROBE,
        entrypoint="python",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["root_writable"] is False, "the root filesystem should be read-only"
    for what, path in report["paths"].items():
        assert path.startswith(("/scratch/", "/tmp")), f"{what} cache at {path}, off the volumes"
    # matplotlib built its font list in its cache dir on /scratch (not in a temporary one).
    assert any(f.startswith("fontlist") for f in report["matplotlib cache files"]), report
    for complaint in WRITE_COMPLAINTS:
        assert complaint not in result.stderr, result.stderr[-4000:]


def test_trainer_image_validates_a_job_manifest() -> None:
    examples = ["--volume", f"{ROOT / 'examples'}:/examples:ro"]
    result = run(
        image("trainer"),
        TRAINER_USER,
        TRAINER_VOLUMES + examples,
        "validate",
        "/examples/tldr-gpt2.yaml",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid FineTuneJob 'tldr-gpt2'" in result.stdout
    bad = run(
        image("trainer"),
        TRAINER_USER,
        TRAINER_VOLUMES,
        "validate",
        "/etc/hostname",
    )
    assert bad.returncode == 2, bad.stdout + bad.stderr


# ---- operator -----------------------------------------------------------------------------


def test_operator_image_runs_as_65532_and_prints_the_project_version() -> None:
    ref = image("operator")
    config = image_config(ref)
    assert config["User"] == OPERATOR_USER
    assert config["Entrypoint"] == ["kubetune", "operator"]
    result = run(ref, OPERATOR_USER, OPERATOR_VOLUMES, "--version", entrypoint="kubetune")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kubetune {VERSION}"
    helped = run(ref, OPERATOR_USER, OPERATOR_VOLUMES, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: kubetune operator")


@pytest.mark.parametrize("user", [OPERATOR_USER, "1000680000:0"])
def test_operator_image_names_its_user_whatever_uid_runs_it(user: str) -> None:
    """kopf calls getpass.getuser(); a uid without a passwd entry (65532, or the random uid
    a platform such as OpenShift assigns) crashed the operator in its pod before USER was set."""
    code = "import getpass; print(getpass.getuser())"
    result = run(image("operator"), user, OPERATOR_VOLUMES, "-c", code, entrypoint="python")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "kubetune-operator"


def test_operator_image_has_no_torch() -> None:
    result = run(
        image("operator"),
        OPERATOR_USER,
        OPERATOR_VOLUMES,
        "-c",
        "import torch",
        entrypoint="python",
    )
    assert result.returncode == 1
    assert "No module named 'torch'" in result.stderr, result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def test_operator_image_starts_and_serves_health_and_metrics(tmp_path: Path) -> None:
    """The operator starts as 65532 on a read-only root and serves /healthz and /metrics.

    Its kubeconfig names an API server that is not there (a closed loopback port): kopf keeps
    retrying the API, but the startup handlers ran and the endpoints answer. The real API
    server comes in the cluster tier.
    """
    ref = image("operator")
    kubeconfig = tmp_path / "kubeconfig"
    closed_port = _free_port()
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{closed_port}'}}}}]\n"
        "users: [{name: u, user: {token: not-a-token}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    kubeconfig.chmod(0o644)
    health, metrics = _free_port(), _free_port()
    name = f"kubetune-test-operator-{uuid.uuid4().hex[:8]}"
    command = [_podman(), "run", "--detach", "--name", name, "--read-only"]
    command += ["--read-only-tmpfs=false", "--user", OPERATOR_USER, *OPERATOR_VOLUMES]
    command += ["--network", "host", "--volume", f"{kubeconfig}:/kube/config:ro"]
    command += ["--env", "KUBECONFIG=/kube/config", "--env", f"KUBETUNE_HEALTH_PORT={health}"]
    command += ["--env", f"KUBETUNE_OPERATOR_METRICS_PORT={metrics}", ref]
    subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    try:
        deadline = time.monotonic() + 120
        status, body = 0, ""
        while time.monotonic() < deadline and status != 200:
            time.sleep(1)
            status, body = _get(f"http://127.0.0.1:{health}/healthz")
        logs = subprocess.run(
            [_podman(), "logs", name], capture_output=True, text=True, check=False, timeout=60
        )
        output = logs.stdout + logs.stderr
        assert status == 200, f"no /healthz answer in 120s; operator log:\n{output[-4000:]}"
        assert json.loads(body) == {}
        status, text = _get(f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200
        assert "kubetune_operator_finetunejobs" in text
        for complaint in WRITE_COMPLAINTS:
            assert complaint not in output, output[-4000:]
    finally:
        subprocess.run(
            [_podman(), "rm", "--force", "--time", "5", name],
            capture_output=True,
            check=False,
            timeout=120,
        )
