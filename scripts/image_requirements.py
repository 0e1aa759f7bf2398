"""The images' dependency lists, generated from pyproject.toml, which owns them.

    python scripts/image_requirements.py          # write images/<image>.requirements.txt
    python scripts/image_requirements.py --check  # exit 1 when a list drifted (`make lint`)

Each Dockerfile installs its dependency layer (gigabytes for the trainer) from its list rather
than from pyproject.toml, so an edit to pyproject.toml that leaves the dependencies alone (a
tool's setting, a pytest marker, the version) keeps that layer, and the image build reuses it.
A list is ``[project] dependencies`` followed by the image's extra.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
EXTRAS = {"operator": "operator", "trainer": "trainer"}  # image -> extra of pyproject.toml
HEADER = (
    "# Generated from pyproject.toml by `make generate` (scripts/image_requirements.py):\n"
    "# [project] dependencies + the {extra!r} extra. Do not edit; images/{image}.Dockerfile\n"
    "# installs its dependency layer from this file.\n"
)


def requirements(pyproject: dict[str, object], image: str) -> str:
    """The text of ``images/<image>.requirements.txt``."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    extra = EXTRAS[image]
    deps = [*project["dependencies"], *project["optional-dependencies"][extra]]
    return HEADER.format(extra=extra, image=image) + "".join(f"{d}\n" for d in deps)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    stale = []
    for image in EXTRAS:
        path = REPO / "images" / f"{image}.requirements.txt"
        text = requirements(pyproject, image)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if check:
            stale.append(str(path.relative_to(REPO)))
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print(f"stale generated files: {', '.join(stale)}; please run `make generate`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
