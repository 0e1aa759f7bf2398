"""The chart's Argo CD health check (charts/kubetune/files/argocd-health.lua) in a real Lua 5.1.

Argo CD runs health checks in gopher-lua (Lua 5.1) with the live object as the global ``obj``.
:func:`health` does the same with Debian's ``lua5.1`` (``scripts/install-system-deps.sh``):
the FineTuneJob is turned into a Lua table literal, the script runs, and its ``hs.status`` and
``hs.message`` come back::

    status, message = health(kubectl_get_json_of_the_ftj)   # ("Healthy", "Succeeded: ...")
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

HEALTH_LUA = Path(__file__).resolve().parents[1] / "charts/kubetune/files/argocd-health.lua"


def lua_literal(value: Any) -> str:
    """A Python value as a Lua table constructor (lists are 1-indexed arrays, as in Argo CD)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid Lua escapes for this text
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        items = (f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no Lua literal for {value!r}")


def _lua() -> str:
    lua = shutil.which("lua5.1")
    if lua is None:
        pytest.fail(
            "lua5.1 is not installed; run `bash scripts/install-system-deps.sh` (as root)",
            pytrace=False,
        )
    return lua


def health(obj: dict[str, Any]) -> tuple[str, str]:
    driver = (
        f"obj = {lua_literal(obj)}\n"
        f"local check = assert(loadfile({json.dumps(str(HEALTH_LUA))}))\n"
        "local hs = check()\n"
        "io.write(hs.status, '\\n', hs.message or '', '\\n')\n"
    )
    result = subprocess.run(
        [_lua(), "-"], input=driver, capture_output=True, text=True, timeout=10, check=False
    )
    assert result.returncode == 0, result.stderr
    status, message = result.stdout.split("\n", 1)
    return status, message.rstrip("\n")
