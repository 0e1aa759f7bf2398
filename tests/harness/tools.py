"""Locate (and if needed build) the harness's binaries.

`find_bin_dir()` returns the directory scripts/build-tools.sh fills with links to etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, helm and kubeconform. It builds them
with that script when any is missing, and raises `ToolsMissing` with what to do otherwise.

    python -m harness.tools      # prints the bin dir, building what is missing
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-tools.sh"
REQUIRED = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "helm",
    "kubeconform",
)


class ToolsMissing(RuntimeError):
    """A harness binary is missing and could not be built."""


def default_bin_dir() -> Path:
    tools_dir = os.environ.get("KUBETUNE_TOOLS_DIR") or str(Path.home() / ".cache/kubetune/tools")
    return Path(tools_dir) / "bin"


def missing_tools(bin_dir: Path) -> list[str]:
    return [name for name in REQUIRED if not os.access(bin_dir / name, os.X_OK)]


def find_bin_dir(*, build: bool = True) -> Path:
    """The bin dir with every required binary; build them first if `build` and any is missing."""
    bin_dir = default_bin_dir()
    missing = missing_tools(bin_dir)
    if not missing:
        return bin_dir
    hint = f"run `make tools` (or `bash {BUILD_SCRIPT.relative_to(REPO_ROOT)}`)"
    if not build:
        raise ToolsMissing(f"missing {', '.join(missing)} in {bin_dir}; {hint}")
    if shutil.which("bash") is None:
        raise ToolsMissing(f"missing {', '.join(missing)} and no bash to build them; {hint}")
    print(f"harness: building {', '.join(missing)} with {BUILD_SCRIPT} ...", file=sys.stderr)
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=None, text=True, check=False
    )
    if result.returncode != 0:
        raise ToolsMissing(
            f"{BUILD_SCRIPT} failed (exit {result.returncode}); see its output; {hint}"
        )
    built = Path(result.stdout.strip().splitlines()[-1])
    still_missing = missing_tools(built)
    if still_missing:
        raise ToolsMissing(
            f"{BUILD_SCRIPT} ran but {', '.join(still_missing)} is missing in {built}"
        )
    return built


if __name__ == "__main__":
    print(find_bin_dir())
