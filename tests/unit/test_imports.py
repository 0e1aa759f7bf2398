"""The layering: core <- trainer, core <- operator, and one owner for each contract name.

The operator image has no torch and the trainer image no kopf, so the core must import
without either; the trainer and the operator import the core and never each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.contract import METRICS_PORT, RENDEZVOUS_PORT, STAGE_ORDER, Env
from kubetune.schema import ConditionType, Reason

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "kubetune": ROOT / "core" / "kubetune",
    "kubetune_trainer": ROOT / "trainer" / "kubetune_trainer",
    "kubetune_operator": ROOT / "operator" / "kubetune_operator",
}

CORE_AND_LIGHT_TRAINER = [
    "kubetune",
    "kubetune.schema",
    "kubetune.contract",
    "kubetune.results",
    "kubetune.layout",
    "kubetune.dataset_format",
    "kubetune.storage",
    "kubetune.cli",
    "kubetune.crd",
    "kubetune_trainer.context",
    "kubetune_trainer.stages",
]


def _sources(package: str) -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGES[package].rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    return []


def _imports(tree: ast.Module, top_level_only: bool) -> set[str]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    return {name.split(".")[0] for node in nodes for name in _imported(node)}


def test_core_modules_import_neither_torch_nor_kopf() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE_AND_LIGHT_TRAINER)
        + "heavy = sorted(m for m in ('torch', 'transformers', 'kopf', 'kubernetes') "
        "if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core modules pulled in: {out.stdout.strip()}"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("kubetune_trainer", "kubetune_operator"), ("kubetune_operator", "kubetune_trainer")],
)
def test_trainer_and_operator_never_import_each_other(package: str, forbidden: str) -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path, tree in _sources(package)
        if forbidden in _imports(tree, top_level_only=False)
    ]
    assert offenders == [], f"{package} imports {forbidden} in {offenders}"


def test_core_imports_trainer_and_operator_only_lazily_from_the_cli() -> None:
    offenders = []
    for path, tree in _sources("kubetune"):
        top = _imports(tree, top_level_only=True) & {"kubetune_trainer", "kubetune_operator"}
        anywhere = _imports(tree, top_level_only=False) & {"kubetune_trainer", "kubetune_operator"}
        if top or (anywhere and path.name != "cli.py"):
            offenders.append(path.name)
    assert offenders == []


def _string_constants(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def _owners_of(
    values: set[str], packages: tuple[str, ...] = tuple(PACKAGES)
) -> dict[str, set[str]]:
    owners: dict[str, set[str]] = {v: set() for v in values}
    for package in packages:
        for path, tree in _sources(package):
            for text in _string_constants(tree):
                if text in owners:
                    owners[text].add(str(path.relative_to(ROOT)))
    return owners


def test_each_contract_env_name_is_written_once() -> None:
    names = {v for k, v in vars(Env).items() if k.isupper()}
    owners = _owners_of(names)
    assert all(owners[n] == {"core/kubetune/contract.py"} for n in names), owners


def test_stages_raise_typed_reasons() -> None:
    """The trainer names a failure with ``Reason``; only the schema spells the values.

    (The operator reads Kubernetes' own reasons such as a pod's ``OOMKilled``, which
    happen to share some spellings, so it is not part of this check.)
    """
    values = {r.value for r in Reason}
    owners = _owners_of(values, ("kubetune", "kubetune_trainer"))
    assert all(owners[v] <= {"core/kubetune/schema.py"} for v in values), owners


def test_each_condition_type_is_written_once() -> None:
    values = {c.value for c in ConditionType}
    owners = _owners_of(values)
    assert all(owners[v] == {"core/kubetune/schema.py"} for v in values), owners


def test_contract_ports_are_written_once() -> None:
    owners = []
    for package in PACKAGES:
        for path, tree in _sources(package):
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in (
                    METRICS_PORT,
                    RENDEZVOUS_PORT,
                ):
                    owners.append(str(path.relative_to(ROOT)))
    assert owners == ["core/kubetune/contract.py"] * 2


def test_no_stage_is_compared_with_a_string_literal() -> None:
    """``stage == "train"`` spells the contract again; ``stage == Stage.TRAIN`` uses it."""
    offenders = []
    for package in PACKAGES:
        for path, tree in _sources(package):
            for node in ast.walk(tree):
                if isinstance(node, ast.Compare):
                    for part in [node.left, *node.comparators]:
                        if isinstance(part, ast.Constant) and part.value in STAGE_ORDER:
                            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
