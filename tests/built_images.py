"""The container images of this tree, as `make images` (scripts/build-images.sh) tagged them.

    ref = built_image("trainer")    # localhost/kubetune/trainer:<content hash of this tree>

The tag is the one `scripts/build-images.sh --ref` prints for the current files, so a test
never runs an image built from other sources; a missing one fails the test with what to run
(`make test` builds the images first), never skips it.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@cache
def podman() -> str:
    found = shutil.which("podman")
    if found is None:
        pytest.fail("podman is missing: run `make images` (it installs it)", pytrace=False)
    return found


@cache
def built_image(name: str) -> str:
    """The tag of this tree's `name` image (operator or trainer); fails when it is not built."""
    ref = subprocess.run(
        ["bash", str(ROOT / "scripts/build-images.sh"), "--ref", name],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    exists = subprocess.run([podman(), "image", "exists", ref], check=False, timeout=60)
    if exists.returncode != 0:
        pytest.fail(
            f"image {ref} (the {name} image of this tree) is missing: run `make images`",
            pytrace=False,
        )
    return ref
