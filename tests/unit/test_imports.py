"""The operator image has no torch and the trainer image no kopf: the shared modules
must import without either."""

from __future__ import annotations

import subprocess
import sys

SHARED = [
    "kubetune_trainer.schema",
    "kubetune_trainer.results",
    "kubetune_trainer.layout",
    "kubetune_trainer.storage",
    "kubetune_trainer.context",
    "kubetune_trainer.stages",
    "kubetune_trainer.cli",
    "kubetune_trainer.crd",
]


def test_shared_modules_import_neither_torch_nor_kopf() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in SHARED)
        + "heavy = sorted(m for m in ('torch', 'transformers', 'kopf', 'kubernetes') "
        "if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"shared modules pulled in: {out.stdout.strip()}"
